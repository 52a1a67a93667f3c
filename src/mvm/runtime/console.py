"""A guest's serial console, kept on disk within a fixed size.

The hypervisor writes the console into a FIFO in the instance's run dir (`console.pipe`);
a small logger process per instance reads it and writes `console.log`, moving it to
`console.log.1` when it reaches the cap, so the two together never hold more than twice the
cap, however much the guest writes, and whether or not an mvm command runs. The logger runs
in a session of its own, outlives the mvm command that started it, and ends when the
hypervisor does (the FIFO reads EOF once its last writer is gone).

Start-up without a race or a hang: mvm opens the FIFO's read end (non-blocking, so the open
does not wait for a writer), starts the hypervisor (whose open of the write end then finds a
reader and succeeds at once), and hands the read end to the logger. Had the logger opened
the FIFO itself, a hypervisor that failed before opening it would leave the logger waiting
forever. A jailed hypervisor needs only write access to the FIFO in its run dir (or the
write end as a descriptor: `-add-fd` + `path=/dev/fdset/N`).

While the logger runs it holds an exclusive `flock` on `console.lock` (taken by mvm before
the logger starts, and inherited), so `settle` can wait until everything the hypervisor wrote
before it exited is in the log: a boot failure's last console lines are read after that.

A restored VM appends to the console of the boot it was snapshotted from; each hypervisor's
start is marked (`console.start`: the log's inode and size then), so that the last words of
a failed wake are what this hypervisor's guest wrote, never an earlier boot's lines.

The logger itself is `console_logger.py`, a script with no mvm import.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import stat
import sys
import time
from pathlib import Path

from mvm.util import private, proc

#: Default cap of console.log (and of console.log.1): at most twice this on disk per instance.
CAP = 1 << 20
PIPE = "console.pipe"
LOCK = "console.lock"
MARK = "console.start"
#: The kernel's pipe buffer for the console FIFO (the default is 64 KiB): room for bursts while
#: the logger sleeps between batches. pipe-max-size (1 MiB by default) bounds it.
PIPE_BYTES = 1 << 20

#: The logger, a script run by path (`python -I -S`): see its docstring.
LOGGER = Path(__file__).with_name("console_logger.py")


def pipe_path(log: Path) -> Path:
    return log.parent / PIPE


def old_log(log: Path) -> Path:
    return log.with_name(log.name + ".1")


def open_pipe(log: Path, owner: tuple[int, int] | None = None) -> int:
    """Make the console FIFO next to `log` (afresh) and open its read end, non-blocking.
    Returns the descriptor to give to `start_logger` once the hypervisor has opened the FIFO.
    `owner` (uid, gid): a hypervisor that runs as another user, which must open it to write."""
    fifo = pipe_path(log)
    with contextlib.suppress(FileNotFoundError):
        fifo.unlink()
    os.mkfifo(fifo, 0o600)
    if owner is not None:
        os.chown(fifo, *owner)
    fd = os.open(fifo, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
    with contextlib.suppress(OSError):
        fcntl.fcntl(fd, fcntl.F_SETPIPE_SZ, PIPE_BYTES)
    return fd


def start_logger(read_fd: int, log: Path, cap: int = CAP) -> None:
    """Start the logger on `read_fd`, which this closes (the logger keeps its copy). It runs
    detached (its own session, reparented at once) and ends at the FIFO's EOF."""
    try:
        _start_logger(read_fd, log, cap)
    finally:
        os.close(read_fd)


def _start_logger(read_fd: int, log: Path, cap: int) -> None:
    os.set_blocking(read_fd, True)
    # A new lock file each time: a logger of an earlier hypervisor, still draining, keeps the
    # old one (and `settle` then waits for this logger only).
    lock_path = log.parent / LOCK
    with contextlib.suppress(FileNotFoundError):
        lock_path.unlink()
    lock = os.open(lock_path, os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
    fcntl.flock(lock, fcntl.LOCK_EX)
    try:
        proc.spawn_detached([sys.executable, "-I", "-S", LOGGER, log, str(cap)],
                            stdin=read_fd, keep_fds=[lock])
    finally:
        os.close(lock)


def settle(log: Path, timeout: float = 2.0) -> None:
    """Wait (up to `timeout`) until no logger writes `log`: call it once the hypervisor is gone,
    before reading what it wrote last."""
    try:
        fd = os.open(log.parent / LOCK, os.O_RDONLY | os.O_CLOEXEC)
    except FileNotFoundError:
        return
    try:
        deadline = time.monotonic() + timeout
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
                return
            except BlockingIOError:
                if time.monotonic() >= deadline:
                    return
                time.sleep(0.01)
    finally:
        os.close(fd)


def read(log: Path) -> bytes:
    """The whole console kept: console.log.1, then console.log."""
    out = b""
    for f in (old_log(log), log):
        with contextlib.suppress(FileNotFoundError):
            out += f.read_bytes()
    return out


def mark(log: Path) -> None:
    """Note where the console of the hypervisor about to start begins (before it starts, with
    no logger writing): `tail` reads no further back. A console not there yet begins at 0."""
    try:
        st = log.stat()
        where = f"{st.st_ino} {st.st_size}\n"
    except FileNotFoundError:
        where = "0 0\n"
    private.write(log.parent / MARK, where.encode())


def _mark(log: Path) -> tuple[int, int] | None:
    try:
        ino, size = (log.parent / MARK).read_text().split()
        return int(ino), int(size)
    except (OSError, ValueError):
        return None  # unmarked: the whole console is this hypervisor's


def tail(log: Path, max_bytes: int = 4096) -> bytes:
    """The last `max_bytes` the console's current hypervisor wrote (see `mark`), reaching into
    console.log.1 when the log was rotated since."""
    start = _mark(log)
    out = b""
    for f in (log, old_log(log)):
        try:
            with open(f, "rb") as fh:
                st = os.fstat(fh.fileno())
                if not stat.S_ISREG(st.st_mode):
                    continue
                # the file this hypervisor's console began in: only what follows the mark
                began_here = start is not None and st.st_ino == start[0] and st.st_size >= start[1]
                first = start[1] if start is not None and began_here else 0
                fh.seek(max(first, st.st_size - (max_bytes - len(out))))
                out = fh.read(max_bytes - len(out)) + out
        except OSError:
            continue
        if len(out) >= max_bytes or began_here:
            break
    return out


def remove(log: Path) -> None:
    """Forget a console (a fresh boot starts a new one)."""
    for f in (log, old_log(log), log.parent / MARK):
        with contextlib.suppress(FileNotFoundError):
            f.unlink()


def remove_pipe(log: Path) -> None:
    """The FIFO and lock of a hypervisor that is gone."""
    for f in (pipe_path(log), log.parent / LOCK):
        with contextlib.suppress(FileNotFoundError):
            f.unlink()
