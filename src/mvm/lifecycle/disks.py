"""Per-instance data disks: ext4 labelled mvm-data, created once, kept across restarts."""

from __future__ import annotations

import os
from pathlib import Path

from mvm.util import proc

LABEL = "mvm-data"


def create_data_disk(path: Path, mib: int) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    with tmp.open("wb") as f:
        f.truncate(mib * 2**20)
    try:
        proc.run(["mkfs.ext4", "-q", "-F", "-L", LABEL, "-m", "0", "-E", "root_owner=0:0",
                  str(tmp)], timeout=120)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    os.replace(tmp, path)
