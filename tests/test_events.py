# ruff: noqa: F811  (the `world` fixture, imported from test_lifecycle_faults, is a parameter)
"""Events: every change with its time, reason code, cause and (for transitions and builds) how
long it took; never a secret value; `mvm events` as a table, JSON, the newest N, one tenant's,
and followed as they happen until Ctrl-C. In-process on the fake runtime and through the CLI."""

from __future__ import annotations

import json
import os
import select
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from mvm.context.compose import fail_before
from mvm.errors import MvmError, QuotaExceeded, RuntimeFailure
from mvm.lifecycle import apply, create, specs
from mvm.model import Action, PoolRef, Quotas, Revision, State
from mvm.services import instances, pools, tenants
from tests.conftest import Mvm
from tests.doubles.fake_runtime import FakeRuntime
from tests.test_lifecycle_faults import World, world  # noqa: F401 (a fixture)

KEYS = {"id", "ts", "tenant", "pool", "instance", "kind", "message", "reason", "cause", "duration"}


def last(w: World, kind: str) -> dict[str, object]:
    return next(e for e in w.ctx.store.events("acme", limit=1000) if e["kind"] == kind)


def test_transitions_carry_their_duration_and_failures_their_cause(
        world: World, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(FakeRuntime, "boot_seconds", 0.3)  # a boot (and a restore) that takes time
    ref = world.new(State.RUNNING)
    start = last(world, "instance.start")
    assert set(start) == KEYS
    assert isinstance(start["duration"], float) and start["duration"] >= 0.3, start
    apply(world.ctx, ref, Action.SLEEP)
    apply(world.ctx, ref, Action.WAKE)
    assert float(last(world, "instance.wake")["duration"]) >= 0.3  # type: ignore[arg-type]
    assert last(world, "instance.sleep")["duration"] is not None
    created = last(world, "instance.create")
    assert created["duration"] is None and created["cause"] is None  # not a transition
    # a step that fails: the failure event says why, and how long the attempt took
    apply(world.ctx, ref, Action.STOP)
    with pytest.raises(RuntimeFailure):
        apply(world.host(fail_point=fail_before("start:agent")), ref, Action.START)
    failed = last(world, "instance.start-failed")
    assert failed["cause"] == ("injected failure before start step agent (MVM_TEST_FAIL_BEFORE)")
    assert float(failed["duration"]) >= 0.3 and failed["reason"] == "user"  # type: ignore[arg-type]
    # the hypervisor's exit, seen by the next command
    apply(world.ctx, ref, Action.START)
    i = world.instance(ref)
    os.kill(int(specs.control_spec(world.ctx.layout, i).run_dir.joinpath(FakeRuntime.PID_FILE)
                .read_text()), signal.SIGKILL)
    world.next_command(ref)
    gone = last(world, "instance.failed")
    assert (gone["reason"], gone["cause"]) == ("crash", "hypervisor process exited unexpectedly")


def test_a_callers_cause_is_kept_in_the_end_event(world: World) -> None:
    from mvm.model import Reason

    ref = world.new(State.RUNNING)
    apply(world.ctx, ref, Action.WARM, reason=Reason.POLICY, cause="idle for 300 s (cpu 2 ms, 0 bytes)")
    warm = last(world, "instance.warm")
    assert (warm["reason"], warm["cause"]) == ("policy", "idle for 300 s (cpu 2 ms, 0 bytes)")
    assert warm["duration"] is not None


def test_builds_and_rollbacks_are_events_with_duration_and_cause(
        world: World, monkeypatch: pytest.MonkeyPatch) -> None:
    """The build pipeline replaced by a stub that takes 0.2 s (what is under test is the
    bookkeeping around it)."""
    from mvm.image import pipeline

    ref = PoolRef("acme", "w")
    outcome: list[BaseException | None] = [None]

    def run_build(layout, nixpkgs, pool, force, log, progress, room=None):  # type: ignore[no-untyped-def]
        time.sleep(0.2)
        if outcome[0] is not None:
            raise outcome[0]
        return Revision("acme", "w", "def456", "/nix/store/x", {}, time.time()), False

    monkeypatch.setattr(pipeline, "run_build", run_build)
    monkeypatch.setattr(pipeline, "switch_current", lambda *a: None)
    pools.build(world.ctx, ref, builder_kind="host")
    kinds = [e["kind"] for e in world.ctx.store.events("acme", limit=2)]
    assert kinds == ["pool.build", "pool.build-start"]
    assert float(last(world, "pool.build")["duration"]) >= 0.2  # type: ignore[arg-type]
    outcome[0] = MvmError("nix build failed\nerror: attribute 'p' missing")
    with pytest.raises(MvmError):
        pools.build(world.ctx, ref, builder_kind="host")
    failed = last(world, "pool.build-failed")
    assert failed["cause"] == "error: attribute 'p' missing" and failed["reason"] == "build"
    assert float(failed["duration"]) >= 0.2  # type: ignore[arg-type]
    # rollback to the revision before
    rdir = world.ctx.layout.revision_dir("acme", "w", "abc123")
    (rdir / "manifest.json").write_text("{}")
    world.ctx.store.add_revision(Revision("acme", "w", "abc123", "/nix/store/y", {}, 1.0))
    pools.rollback(world.ctx, ref, "abc123")
    assert last(world, "pool.rollback")["message"] == "current def456 -> abc123"


def test_refusals_are_events_with_their_cause(world: World) -> None:
    from dataclasses import replace

    t = world.ctx.store.tenant("acme")
    world.ctx.store.remove_tenant("acme")
    world.ctx.store.add_tenant(replace(t, quotas=Quotas(max_instances=1, max_running=0)))
    ref = create(world.ctx, PoolRef("acme", "w")).ref
    with pytest.raises(QuotaExceeded):
        create(world.ctx, PoolRef("acme", "w"))
    refused = last(world, "instance.create-refused")
    assert (refused["reason"], refused["cause"]) == ("quota", "pool acme/w already has 1 instances (max-instances)")
    with pytest.raises(QuotaExceeded):
        apply(world.ctx, ref, Action.START)
    refused = last(world, "instance.start-refused")
    assert (refused["reason"], refused["instance"]) == ("quota", ref.instance)
    assert refused["cause"] and "max-running 0" in str(refused["cause"])


SECRET = "s3cr3t-Value-never-shown"


def test_a_secret_value_never_appears_in_any_event(world: World, tmp_path: Path) -> None:
    ref = world.new(State.RUNNING)
    src = tmp_path / "secrets.json"
    src.write_text(json.dumps({"API_KEY": SECRET, "DB_PASSWORD": "x"}))
    tenants.set_secrets(world.ctx, "acme", src)
    src.write_text(json.dumps({"API_KEY": SECRET + "-2", "OTHER": SECRET}))
    tenants.set_secrets(world.ctx, "acme", src)
    assert instances.redeliver_secrets(world.ctx, "acme") == [str(ref)]
    events = world.ctx.store.events(limit=10_000)
    kinds = [e["kind"] for e in events]
    assert kinds.count("tenant.secrets") == 2 and "tenant.secrets-rotate" in kinds
    rotate = last(world, "tenant.secrets-rotate")
    assert rotate["reason"] == "secrets" and str(ref) in str(rotate["message"])
    assert last(world, "tenant.secrets")["message"] == "secrets set (2 keys), version 2"
    for e in events:
        assert not any(SECRET.split("-")[0] in str(v) for v in e.values()), e


def test_store_events_after_an_id_oldest_first(world: World) -> None:
    tenants.create(world.ctx, "beta")
    newest = world.ctx.store.events(limit=3)
    assert [e["id"] for e in newest] == sorted((e["id"] for e in newest), reverse=True)  # type: ignore[type-var]
    first = int(newest[-1]["id"])  # type: ignore[call-overload]
    after = world.ctx.store.events(after=first - 1, limit=2)
    assert [e["id"] for e in after] == [first, first + 1]
    assert world.ctx.store.events("beta", after=0) == world.ctx.store.events("beta")
    assert [e["tenant"] for e in world.ctx.store.events("beta", after=0)] == ["beta"]
    assert world.ctx.store.events(after=int(newest[0]["id"])) == []  # type: ignore[call-overload]


# -- the CLI ------------------------------------------------------------------------------------

def test_cli_events_table_json_count_and_tenant(mvm: Mvm) -> None:
    for t in ("acme", "beta", "gamma"):
        mvm.ok("tenant", "create", t)
    all_ = json.loads(mvm.ok("events", "--json").out)
    assert [e["tenant"] for e in all_] == ["acme", "beta", "gamma"]  # oldest first
    assert all(set(e) == KEYS and e["kind"] == "tenant.create" for e in all_)
    assert [e["tenant"] for e in json.loads(mvm.ok("events", "-n", "2", "--json").out)] == ["beta", "gamma"]
    assert [e["tenant"] for e in json.loads(mvm.ok("events", "beta", "--json").out)] == ["beta"]
    table = mvm.ok("events").out.splitlines()
    assert table[0].split() == ["time", "tenant/pool/instance", "kind", "reason", "took", "message"]
    assert len(table) == 4 and table[3].split()[2:6] == ["gamma", "tenant.create", "user", "-"]
    r = mvm("events", "nobody")
    assert r.rc == 3 and r.lines == ["error: no tenant 'nobody' (and no events of one) (see `mvm tenant list`)"]
    r = mvm("events", "-n", "10001")
    assert r.rc == 2 and r.lines == ["error: -n must be between 0 and 10000 (got 10001)"]


def _readline(p: subprocess.Popen[str], timeout: float = 60.0) -> str:
    assert p.stdout is not None
    ready, _, _ = select.select([p.stdout], [], [], timeout)
    assert ready, "no line from `mvm events --follow`"
    return p.stdout.readline()


def test_cli_events_follow_prints_new_events_until_ctrl_c(mvm: Mvm) -> None:
    mvm.ok("tenant", "create", "acme")
    # Started with SIGINT ignored, as a non-interactive shell starts a background job (CI's
    # fresh machine did): Ctrl-C must still end it.
    p = subprocess.Popen([sys.executable, "-m", "mvm.cli.main", "events", "--follow", "--json"],
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=mvm.env,
                         stdin=subprocess.DEVNULL,
                         preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_IGN))
    try:
        assert json.loads(_readline(p))["tenant"] == "acme"  # what there was
        mvm.ok("tenant", "create", "beta")
        e = json.loads(_readline(p))  # what happened since, one JSON object per line
        assert (e["kind"], e["tenant"]) == ("tenant.create", "beta")
        p.send_signal(signal.SIGINT)
        _, err = p.communicate(timeout=60)
    finally:
        if p.poll() is None:
            p.kill()
    assert p.returncode == 0 and "Traceback" not in err, err
