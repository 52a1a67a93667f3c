"""One exception root. The library raises; the CLI and daemon turn it into one line."""

from __future__ import annotations


class MvmError(Exception):
    """Root of every error mvm reports to a user. `hint` says what to do about it."""

    exit_code = 1

    def __init__(self, message: str, hint: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.hint = hint

    def line(self) -> str:
        """The message and its hint; a hint after a message of several lines (one ending in
        the lines a console or a log said) goes on a line of its own."""
        if not self.hint:
            return self.message
        sep = "\n" if "\n" in self.message else " "
        return f"{self.message}{sep}({self.hint})"


class InvalidInput(MvmError):
    exit_code = 2


class NotFound(MvmError):
    exit_code = 3


class Conflict(MvmError):
    exit_code = 4


class Superseded(Conflict):
    """A command no longer owns what it was changing: its lease was granted to another (it
    lost its lock), or another command took over its transition. Its write was refused and
    nothing was written; it must not go on, nor undo anything (the new owner does)."""


class QuotaExceeded(MvmError):
    exit_code = 5


class IllegalTransition(MvmError):
    exit_code = 6


class BuildFailed(MvmError):
    exit_code = 7


class CommandFailed(MvmError):
    """A subprocess failed; message carries a copy-pasteable command line."""

    exit_code = 8

    def __init__(self, message: str, hint: str | None = None, *, returncode: int = 1,
                 stdout: str = "", stderr: str = "") -> None:
        super().__init__(message, hint)
        self.returncode = returncode
        self.stdout = stdout
        self.stderr = stderr


class RuntimeFailure(MvmError):
    """The hypervisor or the guest did not do what was asked."""

    exit_code = 9


class GuestError(RuntimeFailure):
    """The guest agent refused or did not answer."""


class ExecLost(GuestError):
    """`exec` told the guest to run the command, then lost its result: the command ran, or
    runs still (a client must not simply run it again)."""

    exit_code = 126


#: `mvm instance exec`'s own exit codes, kept apart from its other errors' 1-11 (which
#: commands use for their own ends) as Docker's `run` and `exec` keep them: 125, mvm failed
#: and the command did not start; 126 (`ExecLost`), it started and its result was lost.
EXEC_NOT_STARTED = 125
EXEC_LOST = ExecLost.exit_code


class HostUnsupported(MvmError):
    exit_code = 10


class AdmissionRefused(MvmError):
    """The host has not the memory a start or wake needs (with the configured reserve)."""

    exit_code = 11


def combined(errors: list[MvmError], what: str) -> MvmError:
    """One error naming every failure of a batch (the first decides the type and exit code)."""
    if len(errors) == 1:
        return errors[0]
    first = errors[0]
    return type(first)(f"{len(errors)} failures in {what}: " + "; ".join(e.line() for e in errors),
                       first.hint)
