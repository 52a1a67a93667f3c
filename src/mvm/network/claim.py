"""One state home per network namespace: a marker under /run/mvm/netns, keyed by the namespace.

Two homes in one namespace would both allocate net-id 0, and each would tear down the
other's bridge and rules. So before mvm changes anything in a namespace, the home claims
it: `<dir>/<netns inode>.json` names the home (and its firewall table); every mvm process
of that home that works on the network holds `<dir>/<netns inode>.lock` shared for as long
as it runs, and its hypervisors hold their TAPs open (a TAP has a carrier only then). A
marker is another home's *live* claim while either is so; otherwise that home's processes
are gone, and the marker is taken over — together with what that home left behind (its
tables, bridges and TAPs), so no name collides with the new home's.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

from mvm.errors import Conflict

DIR = Path("/run/mvm/netns")

# Shared locks this process holds, by lock path: kept open until the process exits.
_HELD: dict[Path, int] = {}


@dataclass(frozen=True)
class Marker:
    home: str
    table: str
    pid: int
    since: float


def netns_key() -> str:
    """This process's network namespace: the inode of /proc/self/ns/net."""
    return str(os.stat("/proc/self/ns/net").st_ino)


def _paths(directory: Path) -> tuple[Path, Path, Path]:
    key = netns_key()
    return (directory / f"{key}.json", directory / f"{key}.lock", directory / f"{key}.mutex")


@contextlib.contextmanager
def _mutex(path: Path) -> Iterator[None]:
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)


def read(directory: Path = DIR) -> Marker | None:
    marker, _, _ = _paths(directory)
    try:
        data = json.loads(marker.read_text())
        return Marker(str(data["home"]), str(data["table"]), int(data["pid"]),
                      float(data["since"]))
    except (FileNotFoundError, ValueError, KeyError, TypeError):
        return None


def _write(path: Path, home: str, table: str) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}")
    tmp.write_text(json.dumps({"home": home, "table": table, "pid": os.getpid(),
                               "since": time.time()}) + "\n")
    os.replace(tmp, path)


def _hold_shared(lock: Path) -> None:
    if lock in _HELD:
        return
    fd = os.open(lock, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
    fcntl.flock(fd, fcntl.LOCK_SH)
    _HELD[lock] = fd


def _release_shared(lock: Path) -> None:
    fd = _HELD.pop(lock, None)
    if fd is not None:
        os.close(fd)


def _busy(lock: Path) -> bool:
    """True while any process holds the lock (a process of the marker's home at work)."""
    fd = os.open(lock, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        return False
    except BlockingIOError:
        return True
    finally:
        os.close(fd)


def claim(home: str, table: str, live_taps: Callable[[], list[str]],
          take_over: Callable[[Marker], None], directory: Path = DIR) -> Marker | None:
    """Claim this network namespace for `home`; return the stale marker taken over, if any.

    Refused with one line (Conflict) while another home's processes live: an mvm command of
    it at work, or a hypervisor holding a TAP. `take_over(old)` removes what the old home
    left (its processes are gone) before the marker names `home`.
    """
    directory.mkdir(parents=True, exist_ok=True, mode=0o700)
    marker, lock, mutex = _paths(directory)
    with _mutex(mutex):
        current = read(directory)
        if current is not None and current.home == home:
            if current.table != table:
                _write(marker, home, table)
            _hold_shared(lock)
            return None
        if current is not None:
            _release_shared(lock)  # (held for another home by this very process: tests only)
            taps = live_taps()
            if _busy(lock) or taps:
                why = (f"its hypervisors hold {len(taps)} TAP(s)" if taps
                       else "an mvm command of it is at work")
                raise Conflict(
                    f"this network namespace is managed by another mvm state home, "
                    f"{current.home} ({why})",
                    "use that home (MVM_HOME), or run this one in a network namespace of its own")
            take_over(current)
        _write(marker, home, table)
        _hold_shared(lock)
        return current


def holder(directory: Path = DIR) -> Marker | None:
    """The home that claimed this namespace, if any (read-only)."""
    return read(directory)


def release(home: str, directory: Path = DIR) -> bool:
    """Drop the marker when it is `home`'s (its last tenant network is gone); True if dropped."""
    marker, lock, mutex = _paths(directory)
    if not marker.exists():
        return False
    with _mutex(mutex):
        current = read(directory)
        if current is None or current.home != home:
            return False
        marker.unlink()
        _release_shared(lock)
        return True
