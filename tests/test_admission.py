# ruff: noqa: F811  (the `world` fixture, imported from test_lifecycle_faults, is a parameter)
"""Memory-aware admission: a start or a wake the host has no memory for is refused before
anything happens — the instance stays as it was, the refusal is an event and says what was
needed and what was available — while a resume (a warm instance already holds its RAM) is not
checked. In-process on the fake runtime (the host's MemAvailable replaced through the `Host`
seam), and through the real CLI with a reserve no host has."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import pytest

from mvm.errors import AdmissionRefused
from mvm.lifecycle import apply, specs
from mvm.model import Action, Op, Pool, PoolRef, Quotas, State
from mvm.services import scale, tenants
from mvm.store import SqliteStore
from tests.conftest import Mvm
from tests.doubles.fake_runtime import _DETACHED, FakeRuntime
from tests.test_lifecycle_faults import REV, World, world  # noqa: F401 (a fixture)

REF = PoolRef("acme", "w")
# The world's pool: 128 MiB guests; the fake runtime's overhead is the default 128 MiB; the
# default reserve is 512 MiB: a start or wake needs 768 MiB available.
NEED = 128 + 128 + 512


def refusals(w: World) -> list[dict[str, object]]:
    return [e for e in w.ctx.store.events("acme") if e["reason"] == "admission"]


def test_a_start_without_the_memory_is_refused_and_changes_nothing(world: World) -> None:
    ref = world.new(State.CREATED)
    world.ctx.mem_available = lambda: NEED - 1
    with pytest.raises(AdmissionRefused) as err:
        apply(world.ctx, ref, Action.START)
    assert err.value.message == (
        f"cannot start {ref}: needs 256 MiB of host memory (128 MiB guest + 128 MiB overhead)"
        f" + 512 MiB reserve, {NEED - 1} MiB available")
    assert "mem-reserve" in (err.value.hint or "")
    i = world.check(ref)
    assert (i.state, i.op, i.pid) == (State.CREATED, None, None)
    assert not world.ctx.runtime().is_alive(specs.control_spec(world.ctx.layout, i))
    [event] = refusals(world)
    assert (event["kind"], event["instance"], event["message"]) == (
        "instance.start-refused", ref.instance, err.value.message)
    assert event["cause"] == f"MemAvailable {NEED - 1} MiB < {NEED} MiB needed with the reserve"
    # exactly enough: admitted
    world.ctx.mem_available = lambda: NEED
    assert apply(world.ctx, ref, Action.START).state is State.RUNNING


def test_a_wake_is_refused_likewise_and_the_snapshot_kept(world: World) -> None:
    ref = world.new(State.SLEEPING)
    snapshot = world.instance(ref).snapshot
    world.ctx.mem_available = lambda: 300
    with pytest.raises(AdmissionRefused, match=r"cannot wake .*, 300 MiB available"):
        apply(world.ctx, ref, Action.WAKE)
    i = world.check(ref)
    assert (i.state, i.snapshot, i.op) == (State.SLEEPING, snapshot, None)
    assert [e["kind"] for e in refusals(world)] == ["instance.wake-refused"]
    world.ctx.mem_available = lambda: 10_000
    assert apply(world.ctx, ref, Action.WAKE).state is State.RUNNING
    world.check(ref)


def test_a_warm_instance_resumes_without_free_memory(world: World) -> None:
    ref = world.new(State.WARM)
    world.ctx.mem_available = lambda: 0
    assert apply(world.ctx, ref, Action.RESUME).state is State.RUNNING
    # and what frees memory is never refused
    assert apply(world.ctx, ref, Action.SLEEP).state is State.SLEEPING
    assert refusals(world) == []


def test_the_reserve_is_the_setting(tmp_path: Path, world: World) -> None:
    from dataclasses import replace

    ref = world.new(State.CREATED)
    world.ctx.mem_available = lambda: NEED
    world.ctx.settings = replace(world.ctx.settings, mem_reserve=513)
    with pytest.raises(AdmissionRefused, match=r"\+ 513 MiB reserve"):
        apply(world.ctx, ref, Action.START)
    world.ctx.settings = replace(world.ctx.settings, mem_reserve=0)
    world.ctx.mem_available = lambda: 256
    assert apply(world.ctx, ref, Action.START).state is State.RUNNING


@pytest.fixture
def roomy(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[World]:
    """A world whose tenant's quota never limits (memory alone decides)."""
    monkeypatch.delenv("MVM_HOME", raising=False)
    w = World(tmp_path)
    tenants.create(w.ctx, "acme", quotas=Quotas(max_running=16, max_vcpus=16, max_mem=65536))
    w.ctx.store.add_pool(Pool("acme", "w", "path:/nonexistent", "p", 1, 128, network="none"))
    w.ctx.store.set_pool_current("acme", "w", REV)
    rdir = w.ctx.layout.revision_dir("acme", "w", REV)
    rdir.mkdir(parents=True)
    for f in ("rootfs.ext4", "vmlinux"):
        (rdir / f).write_bytes(b"fake")
    yield w
    for i in w.ctx.store.instances():
        FakeRuntime(w.ledger).stop(specs.control_spec(w.ctx.layout, i), 0)
    for proc in _DETACHED:
        if proc.poll() is None:
            proc.kill()


def test_a_scale_checks_its_boots_together_up_front(roomy: World) -> None:
    w = roomy
    w.ctx.mem_available = lambda: 2 * 256 + 512  # room for two boots, not three
    with pytest.raises(AdmissionRefused) as err:
        scale.scale(w.ctx, REF, 3, 0, 0)
    assert err.value.message == (
        "cannot scale acme/w: its 3 start(s) and wake(s) need 768 MiB of host memory"
        " (3 x (128 MiB guest + 128 MiB overhead)) + 512 MiB reserve, 1024 MiB available")
    assert w.ctx.store.instances("acme", "w") == []  # nothing was changed
    assert w.ctx.store.pool("acme", "w").desired_running == 0
    assert [(e["kind"], e["reason"]) for e in refusals(w)] == [("pool.scale-refused", "admission")]
    scale.scale(w.ctx, REF, 2, 0, 0)
    assert sorted(i.state for i in w.ctx.store.instances("acme", "w")) == [State.RUNNING] * 2
    # (sleeps are never refused; two wakes fit the same room)
    scale.scale(w.ctx, REF, 0, 0, 2)
    scale.scale(w.ctx, REF, 2, 0, 0)


def test_a_move_refused_in_a_scale_fails_that_move_at_once(roomy: World) -> None:
    w = roomy
    calls = iter([10_000])  # the scale's up-front check sees room; then something took it
    w.ctx.mem_available = lambda: next(calls, 100)
    lines: list[str] = []
    with pytest.raises(AdmissionRefused, match="2 failures in scaling acme/w: cannot start"):
        scale.scale(w.ctx, REF, 2, 0, 0, report=lines.append)
    assert sum("failed: cannot start" in ln and "100 MiB available" in ln for ln in lines) == 2, lines
    assert {i.state for i in w.ctx.store.instances("acme", "w")} == {State.CREATED}
    assert all(i.op is None for i in w.ctx.store.instances("acme", "w"))
    assert [e["kind"] for e in refusals(w)] == ["instance.start-refused"] * 2


def test_cli_start_refused_by_the_reserve(mvm: Mvm) -> None:
    """The real CLI: a reserve no host has refuses the start with one line and exit 11; the
    instance stays created; the refusal is in `mvm events`."""
    mvm.ok("tenant", "create", "acme")
    store = SqliteStore(mvm.home / "mvm.db")
    store.add_pool(Pool("acme", "w", "path:/nonexistent", "p", 1, 256, network="none"))
    store.set_pool_current("acme", "w", REV)
    store.close()
    rdir = mvm.home / "tenants/acme/pools/w/artifacts/revisions" / REV
    rdir.mkdir(parents=True)
    for f in ("rootfs.ext4", "vmlinux"):
        (rdir / f).write_bytes(b"fake")
    inst = mvm.ok("instance", "create", "acme/w").out.strip()
    mvm.ok("config", "set", "accel", "tcg")  # (the overhead is then QEMU's jail figure under TCG)
    mvm.ok("config", "set", "mem-reserve", "100000000")
    r = mvm("instance", "start", inst)
    assert r.rc == 11, r
    [line] = r.lines
    assert line.startswith(f"error: cannot start {inst}: needs 448 MiB of host memory (256 MiB"
                           " guest + 192 MiB overhead) + 100000000 MiB reserve, "), line
    assert " MiB available (" in line and "mem-reserve" in line
    [i] = json.loads(mvm.ok("instance", "list", "acme/w", "--json").out)
    assert (i["state"], i["transition"]) == ("created", None)
    last = json.loads(mvm.ok("events", "acme", "-n", "1", "--json").out)[0]
    assert (last["kind"], last["reason"], last["instance"]) == (
        "instance.start-refused", "admission", inst.split("/")[-1])
    assert last["cause"].startswith("MemAvailable ")
    bad = mvm("config", "set", "mem-reserve", "lots")
    assert bad.rc == 2 and "whole number of MiB" in bad.err


def test_starts_in_flight_hold_their_memory_until_they_end(world: World) -> None:
    """MemAvailable does not show the RAM a booting guest has not touched yet: a start or wake
    in flight (recorded, not ended) holds its need, so two racing starts cannot both take it."""
    booting, other = world.new(State.CREATED), world.new(State.CREATED)
    i = world.instance(booting)
    world.ctx.store.begin_op(i.id, Op(Action.START, State.RUNNING, State.CREATED, owner="pid 1 (test)"))
    world.ctx.mem_available = lambda: NEED + 255  # one need short of room for both
    with pytest.raises(AdmissionRefused, match=r"256 MiB promised to starts and wakes in flight"):
        apply(world.ctx, other, Action.START)
    assert world.instance(other).state is State.CREATED
    world.ctx.mem_available = lambda: NEED + 256
    assert apply(world.ctx, other, Action.START).state is State.RUNNING
