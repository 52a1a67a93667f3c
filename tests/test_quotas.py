"""Tight quotas: never more hypervisors, vCPUs or memory than the quota at any moment of a
scale; counts that concurrent commands cannot race past; data disks as a quota; secrets sized
at `secrets set`. On the fake runtime (a double whose VMs are real processes, and which logs how
many VMs of the home are alive whenever one starts) and through the real CLI."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from mvm.errors import InvalidInput, QuotaExceeded
from mvm.lifecycle import apply, create, specs
from mvm.model import Action, Pool, PoolRef, Quotas, State
from mvm.services import instances, scale, tenants
from tests.conftest import Mvm, Result
from tests.doubles.fake_runtime import _DETACHED, FakeRuntime
from tests.test_lifecycle_faults import REV, World

REF = PoolRef("acme", "w")


def make_world(root: Path, quotas: Quotas, cpus: int = 1, mem: int = 256, data_disk: int = 0) -> World:
    w = World(root)
    tenants.create(w.ctx, "acme", quotas=quotas)
    w.ctx.store.add_pool(Pool("acme", "w", "path:/nonexistent", "p", cpus, mem, data_disk=data_disk,
                              network="none"))
    w.ctx.store.set_pool_current("acme", "w", REV)
    rdir = w.ctx.layout.revision_dir("acme", "w", REV)
    rdir.mkdir(parents=True)
    for f in ("rootfs.ext4", "vmlinux"):
        (rdir / f).write_bytes(b"fake")
    return w


@pytest.fixture
def worlds(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[list[World]]:
    monkeypatch.delenv("MVM_HOME", raising=False)
    made: list[World] = []
    yield made
    for w in made:
        for i in w.ctx.store.instances():
            FakeRuntime(w.ledger).stop(specs.control_spec(w.ctx.layout, i), 0)
    for proc in _DETACHED:
        if proc.poll() is None:
            proc.kill()


def states(w: World) -> dict[str, int]:
    out: dict[str, int] = {}
    for i in w.ctx.store.instances("acme", "w"):
        out[i.state.value] = out.get(i.state.value, 0) + 1
    return out


def peaks(w: World) -> tuple[int, int, int]:
    """The most VMs, vCPUs and MiB seen alive at once (logged by the double at every start)."""
    rows = [tuple(map(int, ln.split())) for ln in w.ledger.with_name("live-vms.txt").read_text().split("\n") if ln]
    return max(r[0] for r in rows), max(r[1] for r in rows), max(r[2] for r in rows)


@pytest.mark.parametrize(("quotas", "counts"), [
    # the case: max-running 1, max-mem 256, `--running 1 --sleeping 3` ran 4 QEMUs
    (Quotas(max_running=1, max_mem=256), (1, 0, 3)),
    (Quotas(max_running=2, max_warm=1, max_mem=3 * 256, max_vcpus=2), (1, 1, 4)),
], ids=["running1-sleeping3", "running1-warm1-sleeping4"])
def test_a_scale_never_runs_more_hypervisors_than_the_quota(
        tmp_path: Path, worlds: list[World], monkeypatch: pytest.MonkeyPatch,
        quotas: Quotas, counts: tuple[int, int, int]) -> None:
    monkeypatch.setattr(scale, "WORKERS", 4)  # as on a host with 4 cores: 4 boots side by side
    monkeypatch.setattr(FakeRuntime, "boot_seconds", 0.2)  # boots that overlap if let
    w = make_world(tmp_path, quotas)
    worlds.append(w)
    lines: list[str] = []
    scale.scale(w.ctx, REF, *counts, report=lines.append)
    running, warm, sleeping = counts
    assert states(w) == {k: v for k, v in (("running", running), ("warm", warm),
                                           ("sleeping", sleeping)) if v}
    vms, vcpus, mem = peaks(w)
    assert vms <= quotas.max_running + quotas.max_warm, f"{vms} VMs at once: {lines}"
    assert vcpus <= quotas.max_vcpus and mem <= quotas.max_mem, (vcpus, mem)
    assert vms >= 1
    for i in w.ctx.store.instances("acme", "w"):
        w.check(i.ref)
    # all asleep, and back: wakes are admitted the same way
    scale.scale(w.ctx, REF, 0, 0, sum(counts))
    scale.scale(w.ctx, REF, *counts)
    assert peaks(w)[0] <= quotas.max_running + quotas.max_warm


def test_scales_of_two_pools_in_two_processes_share_the_quota(
        tmp_path: Path, worlds: list[World], monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(FakeRuntime, "boot_seconds", 0.2)
    w = make_world(tmp_path, Quotas(max_running=1, max_mem=256))
    worlds.append(w)
    w.ctx.store.add_pool(Pool("acme", "v", "path:/nonexistent", "p", 1, 256, network="none"))
    w.ctx.store.set_pool_current("acme", "v", REV)
    rdir = w.ctx.layout.revision_dir("acme", "v", REV)
    rdir.mkdir(parents=True)
    for f in ("rootfs.ext4", "vmlinux"):
        (rdir / f).write_bytes(b"fake")
    children = []
    for pool in ("w", "v"):
        pid = os.fork()
        if pid == 0:  # a command of its own
            code = 0
            try:
                scale.scale(w.host(), PoolRef("acme", pool), 0, 0, 3)
            except QuotaExceeded:
                code = 5
            except BaseException:
                code = 1
            os._exit(code)
        children.append(pid)
    codes = sorted(os.WEXITSTATUS(os.waitpid(pid, 0)[1]) for pid in children)
    assert codes == [0, 0], codes  # each waited for the room the other's boots freed
    assert peaks(w)[0] == 1 and peaks(w)[2] <= 256
    assert {i.state for i in w.ctx.store.instances("acme")} == {State.SLEEPING}


def test_a_scale_with_no_room_to_boot_on_the_way_is_refused_before_anything(
        tmp_path: Path, worlds: list[World]) -> None:
    w = make_world(tmp_path, Quotas(max_running=1, max_mem=256))
    worlds.append(w)
    scale.scale(w.ctx, REF, 1, 0, 0)
    before = w.ctx.store.instances("acme", "w")
    # a sleeping instance is booted on its way; the one running slot stays taken
    with pytest.raises(QuotaExceeded) as err:
        scale.scale(w.ctx, REF, 1, 0, 1)
    assert err.value.line() == (
        "scaling acme/w boots instances on their way to sleeping or warm, and tenant acme's quota"
        " has no room for one: 2 running > max-running 1; 512 MiB in running+warm instances >"
        " max-mem 256 (nothing was changed; lower the counts or raise the quota)")
    assert w.ctx.store.instances("acme", "w") == before
    assert w.ctx.store.pool("acme", "w").desired_sleeping == 0
    assert w.ctx.store.events("acme")[0]["kind"] == "pool.scale-refused"


def test_data_disks_are_a_quota(tmp_path: Path, worlds: list[World]) -> None:
    w = make_world(tmp_path, Quotas(max_data_disk=64, max_disk=100), data_disk=64)
    worlds.append(w)
    first = create(w.ctx, REF)
    assert specs.data_disk_path(w.ctx.layout, first).stat().st_size == 64 * 2**20
    before = sorted(os.listdir(w.ctx.layout.pool_dir("acme", "w") / "instances"))
    with pytest.raises(QuotaExceeded) as err:
        create(w.ctx, REF)
    assert err.value.line() == (
        "a new instance of acme/w would exceed tenant acme's quota: 128 MiB of data disks >"
        " max-disk 100 MiB (nothing was changed; destroy instances you no longer need or raise"
        " the quota)")
    with pytest.raises(QuotaExceeded, match="128 MiB of data disks > max-disk 100 MiB"):
        scale.scale(w.ctx, REF, 0, 0, 2)
    assert sorted(os.listdir(w.ctx.layout.pool_dir("acme", "w") / "instances")) == before
    assert [i.id for i in w.ctx.store.instances("acme", "w")] == [first.id]


def test_a_data_disk_needs_free_host_space(tmp_path: Path, worlds: list[World]) -> None:
    w = make_world(tmp_path, Quotas(), data_disk=64)
    worlds.append(w)
    small = w.ctx.layout.pool_dir("acme", "w") / "instances"
    small.mkdir(parents=True)
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=512m", "mvm-test", str(small)], check=True)
    try:
        with pytest.raises(QuotaExceeded) as err:
            create(w.ctx, REF)
        assert err.value.line().startswith("the host has 512 MiB free where data disks live; a 64 MiB"
                                           " data disk and the 1024 MiB reserve do not fit")
        with pytest.raises(QuotaExceeded, match="the host has 512 MiB free"):
            scale.scale(w.ctx, REF, 0, 0, 1)
        assert os.listdir(small) == [] and w.ctx.store.instances("acme", "w") == []
    finally:
        subprocess.run(["umount", str(small)], check=True)


def test_rotate_restart_stops_nothing_when_the_secrets_cannot_be_delivered(
        tmp_path: Path, worlds: list[World]) -> None:
    w = make_world(tmp_path, Quotas())
    worlds.append(w)
    ref = create(w.ctx, REF).ref
    apply(w.ctx, ref, Action.START)
    pid = w.instance(ref).pid
    # secrets an older mvm accepted: more than fit the secrets disk
    w.ctx.layout.secrets_file("acme").write_text(json.dumps({"BIG": "x" * 5_000_000}))
    w.ctx.store.bump_secrets_version("acme")
    with pytest.raises(InvalidInput, match=r"at most 3145728 .* fit the secrets disk"):
        instances.redeliver_secrets(w.ctx, "acme")
    i = w.check(ref)
    assert (i.state, i.pid) == (State.RUNNING, pid)


# -- through the CLI ------------------------------------------------------------------------

def refused(r: Result, rc: int, line: str) -> None:
    assert (r.rc, r.lines, r.out) == (rc, [f"error: {line}"], ""), (r.rc, r.out, r.err)


def test_data_disk_beyond_the_quota_is_refused(mvm: Mvm) -> None:
    mvm.ok("tenant", "create", "acme")
    r = mvm("pool", "create", "acme/w", "--data-disk", "4000000")
    refused(r, 5, "--data-disk 4000000 exceeds tenant acme's data disk quota (16384 MiB per"
                  " instance) (give a smaller --data-disk, or a tenant with a larger --max-data-disk)")
    assert json.loads(mvm.ok("pool", "list", "--json").out) == []
    mvm.ok("tenant", "create", "small", "--max-data-disk", "100", "--max-disk", "200")
    q = json.loads(mvm.ok("tenant", "info", "small", "--json").out)["quotas"]
    assert (q["max_data_disk"], q["max_disk"]) == (100, 200)


TINY_FLAKE = """{
  outputs = { self }: {
    packages.x86_64-linux.tiny = derivation {
      name = "tiny"; system = "x86_64-linux"; builder = "/bin/sh"; args = [ "-c" "echo > $out" ];
    };
  };
}
"""


@pytest.mark.nix
def test_concurrent_pool_creates_make_exactly_max_pools(mvm: Mvm, tmp_path: Path) -> None:
    flake = tmp_path / "tiny"
    flake.mkdir()
    (flake / "flake.nix").write_text(TINY_FLAKE)
    mvm.ok("tenant", "create", "acme", "--max-pools", "1")
    procs = [subprocess.Popen([sys.executable, "-m", "mvm.cli.main", "pool", "create", f"acme/p{n}",
                               "--flake", str(flake), "--profile", "tiny"],
                              env=mvm.env, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True) for n in range(3)]
    results = [(p.wait(timeout=300), p.stderr.read() if p.stderr else "") for p in procs]
    assert sorted(rc for rc, _ in results) == [0, 5, 5], results
    for rc, err in results:
        if rc:
            assert err.splitlines() == ["error: tenant acme already has 1 pools (quota 1)"], err
    assert len(json.loads(mvm.ok("pool", "list", "--json").out)) == 1
    made = [d.name for d in (mvm.home / "tenants/acme/pools").iterdir()]
    assert len(made) == 1


def test_secrets_files_are_regular_sized_and_shallow(mvm: Mvm, tmp_path: Path) -> None:
    mvm.ok("tenant", "create", "acme")
    hint = '(secrets must be a JSON object, e.g. {"API_KEY": "..."})'

    def secrets_set(path: Path | str) -> Result:
        return mvm("tenant", "secrets", "set", "acme", "--from-file", str(path), timeout=60)

    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    refused(secrets_set(fifo), 2, f"{fifo} is a FIFO, not a regular file {hint}")
    refused(secrets_set("/dev/zero"), 2, f"/dev/zero is a character device, not a regular file {hint}")
    refused(secrets_set(tmp_path), 2, f"{tmp_path} is a directory, not a regular file {hint}")
    big = tmp_path / "big.json"
    big.write_text(json.dumps({"BIG": "x" * 5_000_000}))
    refused(secrets_set(big), 2, f"{big} is {big.stat().st_size} bytes; at most 3145728 are accepted {hint}")
    # what the compact file holds, stored pretty-printed, must fit the secrets disk too
    many = tmp_path / "many.json"
    many.write_text(json.dumps({f"K{n:06d}": "" for n in range(190_000)}, separators=(",", ":")))
    r = secrets_set(many)
    assert r.rc == 2 and r.lines[0].startswith("error: tenant acme's secrets are ") \
        and "at most 3145728 (3 MiB) fit the secrets disk" in r.err, r.err
    deep = tmp_path / "deep.json"
    deep.write_text('{"a": ' + "[" * 100_000 + "]" * 100_000 + "}")
    refused(secrets_set(deep), 2, f"{deep} is JSON nested too deeply (at most 32 levels) {hint}")
    deep.write_text('{"a": ' + "[" * 40 + "]" * 40 + "}")
    refused(secrets_set(deep), 2, f"{deep} is JSON nested too deeply (at most 32 levels) {hint}")
    assert not (mvm.home / "tenants/acme/secrets.json").exists()
    assert json.loads(mvm.ok("tenant", "info", "acme", "--json").out)["secrets_version"] == 0
    ok = tmp_path / "ok.json"
    ok.write_text(json.dumps({"A": {"b": [1, [2, [3]]]}}))
    mvm.ok("tenant", "secrets", "set", "acme", "--from-file", str(ok))

