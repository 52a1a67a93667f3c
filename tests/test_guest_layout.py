"""The guest files mvm puts in every image (boots nothing; the guests that run them are
test_guest_boot's)."""

from __future__ import annotations

import os
from pathlib import Path

from mvm.guest.layout import install_guest_files


def test_guest_files_layout(tmp_path: Path) -> None:
    install_guest_files(tmp_path)
    install_guest_files(tmp_path)  # idempotent
    mvm_dir = tmp_path / "mvm"
    assert os.access(mvm_dir / "busybox", os.X_OK)
    assert (mvm_dir / "init").read_bytes().startswith(b"#!/mvm/busybox sh")
    assert (mvm_dir / "agent").stat().st_mode & 0o777 == 0o755
    assert os.readlink(mvm_dir / "bin" / "mount") == "../busybox"
    assert (tmp_path / "tmp").stat().st_mode & 0o7777 == 0o1777
    for d in ("proc", "sys", "dev", "run", "data"):
        assert (tmp_path / d).is_dir()
    assert (mvm_dir / "init").stat().st_mtime == 0
