"""Hypervisor processes found by pid file and /proc — never by scraping `ps`.

A pid file alone can lie (the process died and the pid was reused), so a pid counts as ours
only if /proc shows a live process whose command line names that very pid file.
"""

from __future__ import annotations

import contextlib
import os
import signal
import time
from pathlib import Path


def read_pid(pid_file: Path) -> int | None:
    try:
        text = pid_file.read_text().strip()
    except (FileNotFoundError, NotADirectoryError):
        return None
    return int(text) if text.isdigit() else None


def _reap(pid: int) -> None:
    # Only succeeds if the process is our own child; a daemonized one is reaped by init.
    with contextlib.suppress(ChildProcessError, OSError):
        os.waitpid(pid, os.WNOHANG)


def is_running(pid: int) -> bool:
    """True if pid exists and is not a zombie (a zombie holds no RAM and runs nothing)."""
    _reap(pid)
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except (FileNotFoundError, ProcessLookupError):
        return False
    # The state letter follows the parenthesised command name, which may contain spaces.
    state = stat.rsplit(")", 1)[1].split()[0]
    return state not in ("Z", "X")


def cmdline(pid: int) -> list[str]:
    try:
        raw = Path(f"/proc/{pid}/cmdline").read_bytes()
    except (FileNotFoundError, ProcessLookupError):
        return []
    return [a.decode(errors="replace") for a in raw.split(b"\0") if a]


def has_arg(pid: int, flag: str, value: str) -> bool:
    """Whether process pid was started with `flag value` on its command line."""
    args = cmdline(pid)
    return any(args[i:i + 2] == [flag, value] for i in range(len(args) - 1))


def owned_pid(pid_file: Path, flag: str = "-pidfile") -> int | None:
    """The live pid recorded in pid_file, if that process was started with `flag pid_file`."""
    pid = read_pid(pid_file)
    if pid is None or not is_running(pid):
        return None
    return pid if has_arg(pid, flag, str(pid_file)) else None


def find_by_arg(flag: str, value: str) -> int | None:
    """A live process whose command line has `flag value` (e.g. QEMU's `-pidfile <path>`):
    how a hypervisor is still found after its pid file was removed under it."""
    want = [flag.encode(), value.encode()]
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        try:
            args = Path(f"/proc/{entry.name}/cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        if any(args[k:k + 2] == want for k in range(len(args) - 1)) and is_running(int(entry.name)):
            return int(entry.name)
    return None


def wait_gone(pid: int, timeout: float, interval: float = 0.01) -> bool:
    """Wait up to timeout for pid to stop running; True if it did."""
    deadline = time.monotonic() + timeout
    while is_running(pid):
        if time.monotonic() >= deadline:
            return False
        time.sleep(interval)
    return True


def kill(pid: int, sig: int = signal.SIGKILL) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, sig)
