"""A QEMU snapshot is its migration stream, written into a file mvm opened (a descriptor
passed over QMP) and loaded from one into a QEMU started with `-incoming defer -S`.

An outgoing migration that is still running when the vCPUs are asked to run again must be
cancelled first: when it ends, QEMU stops the vCPUs (`postmigrate`).
"""

from __future__ import annotations

import contextlib
import os
from pathlib import Path

from mvm.errors import RuntimeFailure
from mvm.runtime.qemu.qmp import Qmp
from mvm.util.retry import until

#: The default 128 MiB/s migration cap makes a 256 MiB snapshot take 6x longer.
SNAPSHOT_BANDWIDTH = 64 * 1024**3
SNAPSHOT_FD = "mvm-snapshot"
#: The first bytes of every QEMU migration stream.
QEVM_MAGIC = b"QEVM"
#: How long QEMU has to cancel a snapshot being written.
CANCEL_TIMEOUT = 5.0
_WAKE_HINT = "restart the instance cold instead of waking it"

#: Outgoing migration states in which QEMU still writes the stream (and stops the vCPUs
#: at its end). `query-migrate` without a status: no migration ever started.
_MIGRATING = ("setup", "active", "pre-switchover", "device", "wait-unplug", "cancelling",
              "postcopy-active", "postcopy-paused", "postcopy-recover")


def _send_file(q: Qmp, path: Path, flags: int) -> None:
    # An fd we own rather than `exec:cat > FILE`: once QEMU reports `completed` every byte
    # is in the file, whereas a `cat` child may still be draining its pipe.
    fd = os.open(path, flags | os.O_CLOEXEC, 0o600)
    try:
        q.send_fd(fd, SNAPSHOT_FD)
    finally:
        os.close(fd)


def save(q: Qmp, tmp: Path, vm: str, mem_mib: int) -> None:
    """Write the paused VM's migration stream into `tmp`; returns once it is all there."""
    q.execute("migrate-set-parameters", {"max-bandwidth": SNAPSHOT_BANDWIDTH})
    _send_file(q, tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC)
    q.execute("migrate", {"uri": f"fd:{SNAPSHOT_FD}"})
    wait_migration(q, vm, "save", transfer_timeout(mem_mib))


def load(q: Qmp, memory: Path, vm: str, mem_mib: int) -> None:
    """Load the stream in `memory` into a QEMU waiting for it (`-incoming defer`), which
    leaves its vCPUs paused; a failure says QEMU's reason (QEMU exits on it)."""
    _send_file(q, memory, os.O_RDONLY)
    try:
        q.execute("migrate-incoming", {"uri": f"fd:{SNAPSHOT_FD}"})
        wait_migration(q, vm, "load", transfer_timeout(mem_mib))
        state = q.execute("query-status")["status"]
    except RuntimeFailure as e:
        raise RuntimeFailure(f"QEMU could not load the snapshot of {vm}: {e.message}", _WAKE_HINT) from e
    if state != "paused":
        raise RuntimeFailure(f"{vm}: QEMU is {state} after loading the snapshot, expected paused")


def check_stream(memory: Path) -> None:
    """QEMU accepts a truncated stream as a finished one on some paths, and loads many a
    damaged one: never feed it what is not a stream (the caller checks size and checksum)."""
    with open(memory, "rb") as f:
        if f.read(4) != QEVM_MAGIC:
            raise RuntimeFailure(f"snapshot memory file {memory} is not a QEMU snapshot", _WAKE_HINT)


def wait_migration(q: Qmp, vm: str, what: str, timeout: float) -> None:
    def done() -> dict[str, object] | None:
        info: dict[str, object] = q.execute("query-migrate")
        return info if info.get("status") in ("completed", "failed", "cancelled") else None

    try:
        result = until(done, timeout, interval=0.005, what=f"snapshot {what}")
    except TimeoutError:
        if what == "save":
            with contextlib.suppress(RuntimeFailure):
                q.execute("migrate_cancel")
        raise RuntimeFailure(f"snapshot {what} of {vm} did not finish in {timeout:g}s") from None
    if result["status"] != "completed":
        raise RuntimeFailure(f"snapshot {what} of {vm} {result['status']}: "
                             f"{result.get('error-desc', 'no reason given')}")


def run_vcpus(q: Qmp) -> None:
    """Let the vCPUs run, and stay running: a snapshot still being written (its command was
    killed after handing QEMU the file) is cancelled first, since when it ends QEMU stops
    the vCPUs again (`postmigrate`), leaving a guest the store says runs frozen."""
    status = q.execute("query-migrate").get("status")
    if status in _MIGRATING:
        with contextlib.suppress(RuntimeFailure):
            q.execute("migrate_cancel")  # (refused when it just ended: fine, see below)
        try:
            until(lambda: q.execute("query-migrate").get("status") not in _MIGRATING,
                  CANCEL_TIMEOUT, interval=0.005, what="cancel the snapshot being written")
        except TimeoutError as e:
            raise RuntimeFailure(f"QEMU did not cancel a snapshot being written: {e}",
                                 "stop the instance and start it again") from None
    q.execute("cont")


def transfer_timeout(mem_mib: int) -> float:
    # Measured ~0.1 s per 256 MiB; allow a slow, busy host 100x that.
    return 30.0 + mem_mib / 16
