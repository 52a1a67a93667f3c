"""Per-instance data disks: ext4 labelled mvm-data, created once, kept across restarts.

A data disk is a sparse file: it takes host space as the guest writes. Before one is made, the
filesystem that will hold it must have room for all of it plus a reserve, so a host is never
promised more than it has on the day the disk is made.
"""

from __future__ import annotations

import os
from pathlib import Path

from mvm.errors import QuotaExceeded
from mvm.util import private, proc

LABEL = "mvm-data"
#: Host space that data disks never take (MiB): the store, logs and snapshots need room too.
RESERVE_MIB = 1024


def free_mib(path: Path) -> int:
    """MiB an unprivileged user could still write on the filesystem holding `path`."""
    p = path
    while not p.exists():
        p = p.parent
    st = os.statvfs(p)
    return st.f_bavail * st.f_frsize // 2**20


def check_room(path: Path, mib: int) -> None:
    free = free_mib(path)
    if free - RESERVE_MIB < mib:
        raise QuotaExceeded(f"the host has {free} MiB free where data disks live; a {mib} MiB data"
                            f" disk and the {RESERVE_MIB} MiB reserve do not fit",
                            "free host space, or use a pool with a smaller --data-disk")


def create_data_disk(path: Path, mib: int) -> None:
    check_room(path, mib)
    private.mkdirs(path.parent)
    tmp = path.with_suffix(".tmp")
    with os.fdopen(private.create(tmp), "wb") as f:  # 0600 before mkfs writes a byte
        f.truncate(mib * 2**20)
    try:
        proc.run(["mkfs.ext4", "-q", "-F", "-L", LABEL, "-m", "0", "-E", "root_owner=0:0",
                  str(tmp)], timeout=120)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    os.replace(tmp, path)
