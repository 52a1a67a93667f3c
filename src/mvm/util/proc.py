"""The one way mvm runs a subprocess: argv lists, stdin closed, always reaped, a deadline.

mvm runs as root and needs sbin tools (mkfs.ext4, debugfs, nft, useradd, …), yet cron or a
minimal service may start it with a PATH such as /usr/bin:/bin. A program that is not on PATH
is therefore also looked for in the standard system directories; the child's environment,
PATH included, is left as it was.
"""

from __future__ import annotations

import os
import shlex
import shutil
import subprocess
from collections.abc import Mapping, Sequence
from pathlib import Path

from mvm.errors import CommandFailed

DEFAULT_TIMEOUT = 600.0
#: Looked in, in this order, for a program that is not on PATH.
SYSTEM_DIRS = ("/usr/local/sbin", "/usr/local/bin", "/usr/sbin", "/usr/bin", "/sbin", "/bin")


def run(
    argv: Sequence[str | os.PathLike[str]],
    *,
    timeout: float = DEFAULT_TIMEOUT,
    check: bool = True,
    input: bytes | None = None,
    env: Mapping[str, str] | None = None,
    cwd: str | Path | None = None,
    capture: bool = True,
    stdout: int | None = None,
    pass_fds: Sequence[int] = (),
) -> subprocess.CompletedProcess[bytes]:
    """Run argv to completion. On failure raise CommandFailed naming the exact command."""
    args = [os.fspath(a) for a in argv]
    full_env = None
    if env is not None:
        full_env = dict(os.environ)
        full_env.update(env)
    # argv[0] stays as given (what the child sees, and what an error message shows); only the
    # file executed is resolved when PATH does not have it.
    executable = _resolve(args[0], (full_env or os.environ).get("PATH")) if args else None
    try:
        proc = subprocess.run(
            args,
            executable=executable,
            input=input,
            stdin=None if input is not None else subprocess.DEVNULL,
            stdout=stdout if stdout is not None else (subprocess.PIPE if capture else None),
            stderr=subprocess.PIPE if capture else None,
            env=full_env,
            cwd=cwd,
            timeout=timeout,
            check=False,
            pass_fds=tuple(pass_fds),
        )
    except FileNotFoundError as e:
        raise CommandFailed(f"{args[0]}: not found", "run `mvm doctor` to see what the host is missing",
                            returncode=127) from e
    except subprocess.TimeoutExpired as e:
        raise CommandFailed(f"timed out after {timeout:g}s: {shlex.join(args)}", returncode=124) from e
    if check and proc.returncode != 0:
        err = (proc.stderr or b"").decode(errors="replace").strip()
        tail = err.splitlines()[-1] if err else ""
        cause = f"exit {proc.returncode}" if proc.returncode > 0 else f"signal {-proc.returncode}"
        raise CommandFailed(
            f"{shlex.join(args)} failed ({cause}){': ' + tail if tail else ''}",
            returncode=proc.returncode,
            stdout=(proc.stdout or b"").decode(errors="replace"),
            stderr=err,
        )
    return proc


def output(argv: Sequence[str | os.PathLike[str]], **kw: object) -> str:
    """Run and return stdout as text."""
    return run(argv, **kw).stdout.decode()  # type: ignore[arg-type]


def which(name: str) -> str | None:
    """The program's path: on PATH, else in the standard system directories."""
    return shutil.which(name) or _resolve(name, os.environ.get("PATH"))


def _resolve(name: str, path: str | None) -> str | None:
    """Where to find a program that PATH does not have; None: leave it to the usual lookup."""
    if not name or "/" in name or shutil.which(name, path=path if path is not None else os.defpath):
        return None
    return shutil.which(name, path=os.pathsep.join(SYSTEM_DIRS))


def spawn_detached(argv: Sequence[str | os.PathLike[str]], *, stdin: int,
                   keep_fds: Sequence[int] = (), timeout: float = 10.0) -> None:
    """Start a long-lived helper that outlives this process: in a session of its own (no
    terminal's signals), reparented at once (`setsid --fork`: nothing for us to reap), stdin
    from `stdin`, stdout and stderr to /dev/null, `keep_fds` inherited as they are."""
    args = ["setsid", "--fork", *(os.fspath(a) for a in argv)]
    try:
        proc = subprocess.run(args, executable=_resolve("setsid", os.environ.get("PATH")),
                              # (no pipe: the helper would hold it open, and us waiting)
                              stdin=stdin, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                              pass_fds=tuple(keep_fds), timeout=timeout, check=False)
    except FileNotFoundError as e:
        raise CommandFailed("setsid: not found", "run `mvm doctor` to see what the host is missing",
                            returncode=127) from e
    except subprocess.TimeoutExpired as e:
        raise CommandFailed(f"timed out after {timeout:g}s: {shlex.join(args)}", returncode=124) from e
    if proc.returncode != 0:
        raise CommandFailed(f"{shlex.join(args)} failed (exit {proc.returncode})",
                            returncode=proc.returncode)
