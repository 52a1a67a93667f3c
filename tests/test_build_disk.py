"""Builds count in the tenant's disk quota (issue 16 item 3): a pool's builder store and its
revisions, measured in allocated blocks, beside data disks; a build that would cross the quota
or the host's free space fails before its output is collected and leaves the current revision;
each successful build keeps only the current revision, those in use and the newest 3.

Fast: real files (sparse ones included) and the real store, the builders replaced by a
function that makes a revision directory as they do. Real builds: tests/test_build.py."""

from __future__ import annotations

import json
import os
import re
from collections.abc import Callable
from pathlib import Path

import pytest

from mvm.errors import QuotaExceeded
from mvm.image import archive, pipeline
from mvm.lifecycle import disks, quota
from mvm.model import Instance, Pool, PoolRef, Quotas, Revision, State
from mvm.services import pools, tenants
from tests.test_lifecycle_faults import World

REF = PoolRef("acme", "w")
MiB = 2**20


def world(root: Path, max_disk: int, data_disk: int = 0) -> World:
    w = World(root)
    tenants.create(w.ctx, "acme", quotas=Quotas(max_disk=max_disk, max_data_disk=max_disk))
    w.ctx.store.add_pool(Pool("acme", "w", "github:o/r", "p", 1, 256, data_disk=data_disk,
                              network="none"))
    return w


def sparse(path: Path, apparent: int, written: int) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("wb") as f:
        f.truncate(apparent)
        f.write(b"x" * written)
        os.fsync(f.fileno())


def test_builds_count_allocated_blocks_in_the_disk_quota(tmp_path: Path) -> None:
    w = world(tmp_path, max_disk=100)
    layout, store = w.ctx.layout, w.ctx.store
    # a 16 GiB sparse builder store Nix wrote 8 MiB into, and a revision of 20 MiB
    sparse(layout.pool_dir("acme", "w") / "builder" / "store.ext4", 16 * 2**30, 8 * MiB)
    sparse(layout.revision_dir("acme", "w", "r1") / "rootfs.ext4", 64 * MiB, 20 * MiB)
    used = quota.measure_builds(store, layout, "acme")
    assert 28 <= used <= 29  # allocated, not the 16 GiB + 64 MiB they seem to be
    assert store.pool("acme", "w").build_disk == used
    with pytest.raises(QuotaExceeded) as e:
        quota.check_build(store, layout, REF, 80 * MiB)
    assert e.value.line().startswith(
        f"building acme/w would exceed tenant acme's disk quota: {used} MiB used + 80 MiB"
        " needed > max-disk 100 MiB (the current revision stays;")
    quota.check_build(store, layout, REF, (100 - used) * MiB)  # exactly full: fine
    # the data disks' quota counts the builds too
    store.add_pool(Pool("acme", "d", "github:o/r", "p", 1, 256, data_disk=80, network="none"))
    with pytest.raises(QuotaExceeded, match=rf"80 MiB of data disks \+ {used} MiB of builds >"
                                            r" max-disk 100 MiB"):
        quota.check_create(store, PoolRef("acme", "d"))
    store.add_instance(Instance("i-1", "acme", "d", State.CREATED, None))
    assert quota.disk_in_use(store, "acme") == used + 80


def test_a_build_needing_more_than_the_host_has_free_is_refused(tmp_path: Path) -> None:
    w = world(tmp_path, max_disk=2**40)
    free = disks.free_mib(w.ctx.layout.home)
    with pytest.raises(QuotaExceeded, match=r"building acme/w needs \d+ MiB of host disk; the host"
                                            r" has \d+ MiB free there, less the 1024 MiB reserve"):
        quota.check_build(w.ctx.store, w.ctx.layout, REF, (free - 512) * MiB)


def fake_builder(w: World, sizes: dict[str, int]) -> Callable[..., tuple[Revision, bool]]:
    """pipeline.run_build's stand-in: asks `room` for the revision's bytes first, as step_pack
    does, then writes the revision directory (sizes[flake] bytes)."""
    n = [0]

    def run_build(layout, nixpkgs, pool, force, log, progress, room=lambda b: None):  # type: ignore[no-untyped-def]
        n[0] += 1
        size = sizes.get(pool.flake, 1 * MiB)
        rev = f"{n[0]:016x}"
        room(size)
        d = layout.revision_dir(pool.tenant, pool.id, rev)
        sparse(d / "rootfs.ext4", size, size)
        manifest = {"revision": rev, "out_path": "/nix/store/x", "built": float(n[0])}
        (d / "manifest.json").write_text(json.dumps(manifest))
        return Revision(pool.tenant, pool.id, rev, "/nix/store/x", manifest, float(n[0])), False

    return run_build


def test_each_build_keeps_the_current_revision_those_in_use_and_the_newest_three(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    w = world(tmp_path, max_disk=10_000)
    monkeypatch.setattr(pipeline, "run_build", fake_builder(w, {}))
    made = [pools.build(w.ctx, REF, builder_kind="host")[0].hash for _ in range(2)]
    w.ctx.store.add_instance(Instance("i-1", "acme", "w", State.STOPPED, revision=made[0]))
    made += [pools.build(w.ctx, REF, builder_kind="host")[0].hash for _ in range(4)]
    kept = [r.hash for r in w.ctx.store.revisions("acme", "w")]
    assert kept == [made[0], *made[-3:]]  # in use, and the newest 3 (the current one among them)
    on_disk = sorted(p.name for p in w.ctx.layout.revisions_dir("acme", "w").iterdir())
    assert on_disk == sorted(kept)
    assert w.ctx.store.pool("acme", "w").current == made[-1]
    pools.rollback(w.ctx, REF, made[-3])
    assert pools.gc(w.ctx, REF, keep=0) == [made[-2], made[-1]]  # `pool gc --keep N`: fewer
    assert [r.hash for r in w.ctx.store.revisions("acme", "w")] == [made[0], made[-3]]
    assert w.ctx.store.pool("acme", "w").build_disk == quota.measure_builds(
        w.ctx.store, w.ctx.layout, "acme")


def test_a_build_crossing_the_quota_fails_before_its_output_and_keeps_current(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    w = world(tmp_path, max_disk=100)
    w.ctx.store.add_pool(Pool("acme", "w2", "github:o/big", "p", 1, 256, network="none"))
    monkeypatch.setattr(pipeline, "run_build", fake_builder(w, {"github:o/r": 30 * MiB,
                                                                "github:o/big": 80 * MiB}))
    good = pools.build(w.ctx, REF, builder_kind="host")[0].hash
    with pytest.raises(QuotaExceeded) as e:  # another pool of the tenant: 30 + 80 > 100
        pools.build(w.ctx, PoolRef("acme", "w2"), builder_kind="host")
    assert re.fullmatch(r"building acme/w2 would exceed tenant acme's disk quota: 3[01] MiB"
                        r" used \+ 80 MiB needed > max-disk 100 MiB \(.*\)", e.value.line())
    assert w.ctx.store.pool("acme", "w").current == good and w.ctx.store.pool("acme", "w2").current is None
    assert not w.ctx.layout.revisions_dir("acme", "w2").exists()
    ev = w.ctx.store.events("acme", limit=1)[0]
    assert ev["kind"] == "pool.build-failed" and "80 MiB needed" in str(ev["cause"])
    assert w.ctx.store.builds("acme", "w2")[-1]["status"] == "failed"


def test_the_builder_output_is_measured_from_its_archive_and_collected_sparse(tmp_path: Path) -> None:
    rootfs = tmp_path / "rootfs.ext4"
    sparse(rootfs, 64 * MiB, 3 * MiB)
    disk = tmp_path / "output.img"
    with disk.open("wb") as f:
        archive.write_archive(f, {"ok": True}, [("rootfs.ext4", rootfs)])
    sizes = archive.sizes(disk)
    assert sizes["rootfs.ext4"] == 64 * MiB
    out = tmp_path / "out"
    out.mkdir()
    archive.read_archive(disk, out)
    assert (out / "rootfs.ext4").read_bytes() == rootfs.read_bytes()
    assert quota.allocated(out / "rootfs.ext4") <= 4 * MiB  # the zeros are holes, not blocks
