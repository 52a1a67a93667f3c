"""Snapshot checksums (runtime/base.py): taken when a snapshot is committed, checked in a pass
over its files before any hypervisor loads them. The backends' refusals: tests/test_firecracker.py
(the API double), tests/test_qemu_runtime.py and tests/test_lifecycle_real.py (QEMU)."""

from __future__ import annotations

import hashlib
import os
import zlib
from pathlib import Path

import pytest

from mvm.errors import RuntimeFailure
from mvm.runtime.base import SnapshotInfo, checksum
from tests.conftest import corrupt


def _file(tmp_path: Path, size: int = (3 << 20) + 12345) -> Path:
    f = tmp_path / "memory"
    f.write_bytes(os.urandom(size))
    return f


def _info(**kw: object) -> SnapshotInfo:
    return SnapshotInfo(backend="qemu", memory_file="memory", mem_mib=256, vcpus=1, devices=(),
                        size_bytes=0, created=0.0, **kw)  # type: ignore[arg-type]


def test_a_checksum_names_its_algorithm(tmp_path: Path) -> None:
    f = _file(tmp_path)
    assert checksum(f) == f"crc32:{zlib.crc32(f.read_bytes()):08x}"
    assert checksum(f, "sha256") == f"sha256:{hashlib.sha256(f.read_bytes()).hexdigest()}"


def test_a_file_that_does_not_match_its_checksum_is_refused_in_one_line(tmp_path: Path) -> None:
    f = _file(tmp_path)
    info = _info(checksums={"memory": checksum(f)})
    info.verify(tmp_path, "acme/w/i-1")  # as written
    _info(checksums={"memory": checksum(f, "sha256")}).verify(tmp_path, "acme/w/i-1")
    corrupt(f)
    with pytest.raises(RuntimeFailure) as err:
        info.verify(tmp_path, "acme/w/i-1")
    assert err.value.message == (f"the snapshot of acme/w/i-1 is damaged: {f} does not match the "
                                 "checksum taken when it was written")
    assert "\n" not in err.value.line() and "kept for inspection" in err.value.line()


def test_a_manifest_of_an_older_mvm_without_checksums_still_loads(tmp_path: Path) -> None:
    written = _info(checksums={"memory": "crc32:00000000"})
    old = written.to_json().replace('"checksums": {\n    "memory": "crc32:00000000"\n  },\n', "")
    assert "checksums" not in old
    info = SnapshotInfo.from_json(old)
    assert info.checksums == {}
    info.verify(tmp_path, "acme/w/i-1")  # nothing to check: not refused
    assert SnapshotInfo.from_json(written.to_json()) == written
