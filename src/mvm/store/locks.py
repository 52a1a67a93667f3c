"""Leases as flock()ed files, one per name, each recording who holds it.

A lease ends when its holder closes the file, exits or is killed: a crashed command never
leaves a lock held. A waiter that does not get the lease at once is told who holds it (a
silent wait of minutes looks like a hang). The lock of something destroyed is removed by its
holder; a waiter that then gets the old, unlinked file notices and locks the new one.

Each grant takes the lock's next fencing token from the store's database (a `Fencer`): a
holder whose lock file was removed under it, so that another command got the lock, holds an
older token, and the store refuses its writes.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import sys
import time
from collections.abc import Iterator
from pathlib import Path

from mvm.errors import Conflict
from mvm.store.base import Fencer, Lease, Waiting

TELL_AFTER = 1.0  # seconds of waiting before the waiter is told who holds the lock


def _me() -> str:
    words = [a for a in sys.argv[1:] if not a.startswith("-")][:2]
    return f"pid {os.getpid()} (mvm {' '.join(words)})".replace(" )", ")")


class FileLocks:
    def __init__(self, directory: Path, fences: Fencer, owner: str | None = None) -> None:
        self.dir = directory
        self.fences = fences
        self.owner = owner or _me()
        self.waiting: Waiting | None = None  # default for lock(): e.g. the CLI prints it

    def _path(self, name: str) -> Path:
        return self.dir / f"{name}.lock"

    def holder(self, name: str) -> str:
        try:
            return self._path(name).read_text().strip() or "another command"
        except OSError:
            return "another command"

    @contextlib.contextmanager
    def lock(self, name: str, timeout: float = 600.0, waiting: Waiting | None = None) -> Iterator[Lease]:
        waiting = waiting or self.waiting
        self.dir.mkdir(parents=True, exist_ok=True, mode=0o700)
        path = self._path(name)
        start = time.monotonic()
        told = False
        while True:
            fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                os.close(fd)
                waited = time.monotonic() - start
                if waited >= timeout:
                    raise Conflict(f"{name} is busy: {self.holder(name)} holds its lock",
                                   "wait for it to finish and retry") from None
                if waiting is not None and not told and waited >= min(TELL_AFTER, timeout):
                    waiting(f"waiting for {name}: {self.holder(name)} holds it")
                    told = True
                time.sleep(0.05)
                continue
            try:
                same = os.fstat(fd).st_ino == os.stat(path).st_ino
            except FileNotFoundError:
                same = False
            if not same:  # removed (its owner was destroyed) while we waited: lock the new one
                os.close(fd)
                continue
            break
        try:
            token = self.fences.grant(name)  # (only a real grant: after the inode check)
            os.ftruncate(fd, 0)
            os.pwrite(fd, f"{self.owner}\n".encode(), 0)
            yield Lease(name, token)
        finally:
            os.close(fd)

    @contextlib.contextmanager
    def shared(self, name: str, timeout: float = 5.0) -> Iterator[None]:
        """A shared lease: any number of holders at once; `drained` waits until none is left.
        (Refused after `timeout` only while a `drained` holds it, which is for a moment.)"""
        self.dir.mkdir(parents=True, exist_ok=True, mode=0o700)
        fd = os.open(self._path(name), os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        try:
            deadline = time.monotonic() + timeout
            while True:
                try:
                    fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
                    break
                except BlockingIOError:
                    if time.monotonic() >= deadline:
                        raise Conflict(f"{name} is busy", "wait for it to finish and retry") from None
                    time.sleep(0.01)
            yield
        finally:
            os.close(fd)

    def drained(self, name: str, timeout: float, waiting: Waiting | None = None) -> bool:
        """Wait until nobody holds a `shared` lease of `name`, at most `timeout` seconds;
        False if some still do then."""
        try:
            fd = os.open(self._path(name), os.O_RDWR | os.O_CLOEXEC)
        except FileNotFoundError:
            return True  # never held
        try:
            start = time.monotonic()
            told = False
            while True:
                try:
                    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                    return True
                except BlockingIOError:
                    waited = time.monotonic() - start
                    if waited >= timeout:
                        return False
                    if waiting is not None and not told and waited >= min(TELL_AFTER, timeout):
                        waiting(f"waiting for {name} (at most {timeout:g} s)")
                        told = True
                    time.sleep(0.05)
        finally:
            os.close(fd)

    def remove(self, name: str) -> None:
        self._path(name).unlink(missing_ok=True)


def pool_lock_name(tenant: str, pool: str) -> str:
    return f"pool-{tenant}--{pool}"


def tenant_lock_name(tenant: str) -> str:
    return f"tenant-{tenant}"


def quota_lock_name(tenant: str) -> str:
    """Held only while a tenant's quota is checked and what takes it is recorded: taken last
    (after the tenant's and a pool's), never held while waiting for another lock."""
    return f"quota-{tenant}"
