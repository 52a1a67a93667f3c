"""The agent (`services/agent.py`): the reconciler, the idle policy and crash-loop backoff on
the fake runtime (a named double whose VMs are real processes) with a fake CPU/bytes sampler;
then, on real guests under QEMU, only what they alone show: `mvm agent serve` replacing a
SIGKILLed QEMU, adopting VMs across a restart, and idleness measured on real hypervisors."""

from __future__ import annotations

import json
import os
import signal
import sqlite3
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from mvm.context import Host
from mvm.errors import InvalidInput
from mvm.lifecycle import apply, specs
from mvm.model import Action, Instance, Pool, PoolRef, Quotas, Reason, State
from mvm.services import agent as agent_mod
from mvm.services import pools, scale, tenants
from mvm.services.agent import Agent, Usage, tolerant_counts
from mvm.store.locks import pool_lock_name
from mvm.util import pids
from tests.conftest import Mvm, needs_assets, sh
from tests.doubles.fake_runtime import _DETACHED, FakeRuntime
from tests.test_lifecycle_faults import REV, World


class Clock:
    """Wall time plus an offset a test moves forward (idle durations without sleeping)."""

    def __init__(self) -> None:
        self.offset = 0.0

    def __call__(self) -> float:
        return time.time() + self.offset


class Sampler:
    """DOUBLE of the agent's measurement: a busy instance uses a whole core, an idle one none."""

    def __init__(self, clock: Clock) -> None:
        self.clock = clock
        self.busy: set[str] = set()

    def __call__(self, ctx: Host, i: Instance) -> Usage | None:
        pid = ctx.runtime().pid(specs.control_spec(ctx.layout, i))
        if pid is None:
            return None
        return Usage(pid, self.clock() if i.id in self.busy else 0.0, 0)


class Fleet(World):
    def __init__(self, root: Path) -> None:
        self.clock = Clock()
        super().__init__(root)
        self.ctx = self.host(clock=self.clock)
        self.sampler = Sampler(self.clock)
        self.agent = Agent(self.ctx, 1.0, sampler=self.sampler)

    def pool(self, name: str, running: int = 0, warm: int = 0, **policy: object) -> PoolRef:
        self.ctx.store.add_pool(Pool("acme", name, "path:/nonexistent", "p", 1, 128,
                                     network="none", **policy))  # type: ignore[arg-type]
        self.ctx.store.set_pool_current("acme", name, REV)
        rdir = self.root / "home/tenants/acme/pools" / name / "artifacts/revisions" / REV
        rdir.mkdir(parents=True)
        for f in ("rootfs.ext4", "vmlinux"):
            (rdir / f).write_bytes(b"fake")
        ref = PoolRef("acme", name)
        scale.scale(self.ctx, ref, running, warm, 0)
        return ref

    def states(self, ref: PoolRef) -> list[str]:
        return sorted(i.state.value for i in self.ctx.store.instances(ref.tenant, ref.pool))

    def live(self, ref: PoolRef) -> list[Instance]:
        return [i for i in self.ctx.store.instances(ref.tenant, ref.pool) if i.state.is_live()]

    def kill(self, i: Instance) -> int:
        pid = self.ctx.runtime().pid(specs.control_spec(self.ctx.layout, i))
        assert pid is not None
        os.kill(pid, signal.SIGKILL)
        assert pids.wait_gone(pid, 30)  # (a loaded host delivers it a moment later)
        return pid

    def events(self, kind: str) -> list[dict[str, object]]:
        return [e for e in self.ctx.store.events(limit=1000) if e["kind"] == kind]

    def passes(self, n: int = 1, advance: float = 0.0) -> list[str]:
        out: list[str] = []
        for _ in range(n):
            self.clock.offset += advance
            out += self.agent.run_pass()
        return out


@pytest.fixture
def fleet(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Fleet]:
    monkeypatch.delenv("MVM_HOME", raising=False)
    monkeypatch.setenv("MVM_RUNTIME_DIR", "/nonexistent-mvm-runtime-dir")
    f = Fleet(tmp_path)
    tenants.create(f.ctx, "acme", quotas=Quotas(max_warm=1))
    yield f
    for i in f.ctx.store.instances():
        FakeRuntime(f.ledger).stop(specs.control_spec(f.ctx.layout, i), 0)
    for proc in _DETACHED:
        if proc.poll() is None:
            proc.kill()


# -- the reconciler ------------------------------------------------------------------------------

def test_a_crashed_hypervisor_is_replaced_and_the_event_says_why(fleet: Fleet) -> None:
    ref = fleet.pool("w", running=2)
    victim, other = fleet.live(ref)
    other_pid = fleet.ctx.runtime().pid(specs.control_spec(fleet.ctx.layout, other))
    old = fleet.kill(victim)
    fleet.passes()
    assert fleet.states(ref) == ["running", "running"]
    now = fleet.ctx.store.instance("acme", "w", victim.id)
    new_pid = fleet.ctx.runtime().pid(specs.control_spec(fleet.ctx.layout, now))
    assert new_pid not in (None, old)
    assert fleet.ctx.runtime().pid(specs.control_spec(fleet.ctx.layout, other)) == other_pid
    [e] = fleet.events("instance.replaced")
    assert e["instance"] == victim.id and e["reason"] == Reason.CRASH.value
    assert "hypervisor process exited unexpectedly" in str(e["message"])
    assert e["cause"] == "hypervisor process exited unexpectedly"
    fleet.passes()  # at rest: nothing more happens
    assert len(fleet.events("instance.replaced")) == 1


def test_a_crashed_instance_is_started_again_itself_beside_a_stopped_sibling(fleet: Fleet) -> None:
    ref = fleet.pool("w", running=2)
    scale.scale(fleet.ctx, ref, 1, 0, 0)  # one of them stopped (its data disk kept)
    [victim] = fleet.live(ref)
    [sibling] = [i for i in fleet.ctx.store.instances("acme", "w") if i.state is State.STOPPED]
    fleet.kill(victim)
    fleet.passes()
    now = {i.id: i for i in fleet.ctx.store.instances("acme", "w")}
    assert now[victim.id].state is State.RUNNING and now[sibling.id].state is State.STOPPED
    assert (now[victim.id].host_index, now[victim.id].ip) == (victim.host_index, victim.ip)
    [e] = fleet.events("instance.replaced")
    assert e["instance"] == victim.id and e["cause"] == "hypervisor process exited unexpectedly"
    assert not [e for e in fleet.events("instance.start") if e["instance"] == sibling.id][1:]


def test_without_a_policy_a_pool_converges_to_exact_counts(fleet: Fleet) -> None:
    ref = fleet.pool("w", running=2)
    a, b = fleet.live(ref)
    apply(fleet.ctx, a.ref, Action.WARM)  # by hand: the agent undoes it, as `pool scale` would
    apply(fleet.ctx, b.ref, Action.STOP)
    fleet.passes()
    assert fleet.states(ref) == ["running", "running"]


def test_a_pool_a_command_holds_is_skipped_this_pass(fleet: Fleet) -> None:
    ref = fleet.pool("w", running=1)
    fleet.kill(fleet.live(ref)[0])
    with fleet.ctx.locks.lock(pool_lock_name("acme", "w")):
        lines = fleet.passes()
        assert any("skipped" in ln for ln in lines), lines
        assert fleet.states(ref) == ["running"]  # (not even observed: the store is untouched)
    fleet.passes()
    assert fleet.states(ref) == ["running"] and len(fleet.events("instance.replaced")) == 1


def _break(fleet: Fleet, ref: PoolRef) -> None:
    """The pool's revision loses its root disk: every start of it fails."""
    (fleet.root / "home/tenants/acme/pools" / ref.pool / "artifacts/revisions" / REV / "rootfs.ext4").unlink()


def test_one_pool_failing_does_not_stop_the_others(fleet: Fleet) -> None:
    bad, good = fleet.pool("a", running=1), fleet.pool("b", running=1)
    _break(fleet, bad)
    for ref in (bad, good):
        fleet.kill(fleet.live(ref)[0])
    fleet.passes()
    assert fleet.states(good) == ["running"]
    assert fleet.states(bad) == ["failed"]
    assert fleet.agent.errors == 1
    [e] = fleet.events("agent.reconcile-error")
    assert e["pool"] == "a" and "has no artifacts" in str(e["message"])
    assert "has no artifacts" in str(e["cause"])


def test_a_pool_that_keeps_failing_backs_off(fleet: Fleet, monkeypatch: pytest.MonkeyPatch) -> None:
    ref = fleet.pool("a", running=1)
    _break(fleet, ref)
    fleet.kill(fleet.live(ref)[0])
    fleet.passes(agent_mod.CRASH_LOOP_AFTER)
    [loop] = fleet.events("agent.crash-loop")
    assert loop["reason"] == Reason.CRASH.value and "next try in" in str(loop["message"])
    tries = len(fleet.events("agent.reconcile-error"))
    assert tries == agent_mod.CRASH_LOOP_AFTER
    fleet.passes(3)  # backing off: not tried again
    assert len(fleet.events("agent.reconcile-error")) == tries
    monkeypatch.setattr(agent_mod.time, "monotonic", lambda: time.perf_counter() + 10_000)
    fleet.passes()  # the back-off is over: tried again, and a longer back-off
    assert len(fleet.events("agent.reconcile-error")) == tries + 1
    assert "next try in 4" in str(fleet.events("agent.crash-loop")[0]["message"])


def test_restarting_the_agent_adopts_running_vms(fleet: Fleet) -> None:
    ref = fleet.pool("w", running=2)
    before = {i.id: fleet.ctx.runtime().pid(specs.control_spec(fleet.ctx.layout, i))
              for i in fleet.live(ref)}
    fresh = Agent(fleet.ctx, 1.0, sampler=fleet.sampler)
    lines = fresh.adopt()
    assert all(f"adopted hypervisor pid {p}" in "\n".join(lines) for p in before.values())
    fresh.run_pass()
    after = {i.id: fleet.ctx.runtime().pid(specs.control_spec(fleet.ctx.layout, i))
             for i in fleet.live(ref)}
    assert after == before
    assert not fleet.events("instance.start")[2:]  # the two starts of the scale only


def test_run_returns_when_stopped_and_passes_when_poked(fleet: Fleet) -> None:
    ref = fleet.pool("w", running=1)
    slow = Agent(fleet.ctx, 3600.0, sampler=fleet.sampler)
    stop = threading.Event()
    t = threading.Thread(target=slow.run, args=(stop,))
    t.start()
    try:
        deadline = time.monotonic() + 30
        while slow.passes < 1 and time.monotonic() < deadline:
            time.sleep(0.01)
        fleet.kill(fleet.live(ref)[0])
        slow.poke()
        while not fleet.events("instance.replaced") and time.monotonic() < deadline:
            time.sleep(0.05)
        assert fleet.events("instance.replaced")
    finally:
        stop.set()
        slow.poke()
        t.join(30)
    assert not t.is_alive()
    assert fleet.states(ref) == ["running"]


def test_a_change_in_the_store_starts_a_pass_at_once(fleet: Fleet) -> None:
    ref = fleet.pool("w", running=1)
    slow = Agent(fleet.ctx, 3600.0, sampler=fleet.sampler)
    stop = threading.Event()
    t = threading.Thread(target=slow.run, args=(stop,))
    t.start()
    try:
        deadline = time.monotonic() + 30
        while slow.passes < 1 and time.monotonic() < deadline:
            time.sleep(0.01)
        fleet.ctx.store.set_pool_desired("acme", "w", 2, 0, 0)  # (another connection: a command)
        while fleet.states(ref) != ["running", "running"] and time.monotonic() < deadline:
            time.sleep(0.05)
        assert fleet.states(ref) == ["running", "running"]
    finally:
        stop.set()
        slow.poke()
        t.join(30)


# -- the idle policy -----------------------------------------------------------------------------

def test_tolerant_counts_keep_policy_moves_and_never_promote() -> None:
    def insts(*states: State) -> list[Instance]:
        return [Instance(f"i-{n:08x}", "t", "p", s, None) for n, s in enumerate(states)]

    R, W, S = State.RUNNING, State.WARM, State.SLEEPING
    assert tolerant_counts(insts(R, W, S), 3, 0, 0) == (1, 1, 1)  # policy moves stay
    assert tolerant_counts(insts(S, S), 0, 2, 0) == (0, 0, 2)
    assert tolerant_counts(insts(R, State.FAILED), 2, 0, 0) == (2, 0, 0)  # the failed: replaced
    assert tolerant_counts(insts(R, R, W), 2, 0, 0) == (2, 0, 0)  # surplus: stopped
    assert tolerant_counts(insts(), 1, 1, 1) == (1, 1, 1)  # missing: created
    assert tolerant_counts(insts(R), 0, 1, 0) == (0, 1, 0)  # a running one in a warm slot: warmed


def test_idle_instances_go_warm_then_sleep_busy_ones_stay(fleet: Fleet) -> None:
    ref = fleet.pool("w", running=2, idle_warm=10.0, idle_sleep=20.0)
    idle, busy = fleet.live(ref)
    fleet.sampler.busy.add(busy.id)
    fleet.passes()  # first samples
    fleet.passes(advance=5)
    assert fleet.states(ref) == ["running", "running"]
    fleet.passes(advance=6)  # idle 11 s
    assert fleet.ctx.store.instance("acme", "w", idle.id).state is State.WARM
    assert fleet.ctx.store.instance("acme", "w", busy.id).state is State.RUNNING
    [e] = fleet.events("instance.warm")
    assert e["reason"] == Reason.POLICY.value and e["instance"] == idle.id
    assert str(e["cause"]).startswith("idle for 11 s: hypervisor CPU 0.0 % of a core"), e
    fleet.passes(advance=15)
    assert fleet.ctx.store.instance("acme", "w", idle.id).state is State.WARM
    fleet.passes(advance=10)  # warm for 25 s
    assert fleet.ctx.store.instance("acme", "w", idle.id).state is State.SLEEPING
    assert fleet.events("instance.sleep")[0]["reason"] == Reason.POLICY.value
    fleet.passes(3, advance=100)  # the reconciler does not undo the policy's moves
    assert fleet.ctx.store.instance("acme", "w", idle.id).state is State.SLEEPING
    assert fleet.ctx.store.instance("acme", "w", busy.id).state is State.RUNNING
    assert not fleet.events("instance.wake") and len(fleet.events("instance.start")) == 2
    # a crashed instance of a policy pool is replaced all the same, total kept
    fleet.kill(fleet.ctx.store.instance("acme", "w", busy.id))
    fleet.passes()
    assert fleet.states(ref) == ["running", "sleeping"]


def test_a_pinned_pool_is_never_moved_by_the_policy(fleet: Fleet) -> None:
    ref = fleet.pool("w", running=2, idle_warm=1.0, idle_sleep=1.0, pinned=True)
    fleet.passes(4, advance=10)
    assert fleet.states(ref) == ["running", "running"]


def test_min_running_holds(fleet: Fleet) -> None:
    ref = fleet.pool("w", running=3, idle_warm=5.0, min_running=2)
    fleet.passes(4, advance=10)
    assert fleet.states(ref) == ["running", "running", "warm"]


def test_at_max_warm_an_idle_instance_goes_straight_to_sleep(fleet: Fleet) -> None:
    ref = fleet.pool("w", running=2, idle_warm=5.0)  # (the tenant's max-warm is 1)
    fleet.passes()
    fleet.passes(advance=10)
    assert fleet.states(ref) == ["sleeping", "warm"]
    assert not fleet.events("instance.warm-refused")
    [e] = fleet.events("instance.sleep")
    assert "not warm: 2 warm > max-warm 1" in str(e["cause"]), e


def test_a_warm_slot_keeps_a_sleeping_instance(fleet: Fleet) -> None:
    ref = fleet.pool("w", warm=1, idle_sleep=5.0)
    fleet.passes(2, advance=10)
    assert fleet.states(ref) == ["sleeping"]
    fleet.passes(2, advance=10)
    assert fleet.states(ref) == ["sleeping"]


# -- policy options -------------------------------------------------------------------------------

def test_durations() -> None:
    assert pools.parse_duration("30s", "--idle-warm") == 30
    assert pools.parse_duration("5m", "--idle-warm") == 300
    assert pools.parse_duration("1h", "--idle-warm") == 3600
    assert pools.parse_duration("2.5", "--idle-warm") == 2.5
    assert pools.parse_duration("0", "--idle-warm") is None
    assert pools.parse_duration("off", "--idle-warm") is None
    with pytest.raises(InvalidInput, match="not a duration"):
        pools.parse_duration("5 minutes", "--idle-warm")


def test_pool_update_sets_the_policy_and_refuses_bad_input(mvm: Mvm) -> None:
    from mvm.store import SqliteStore

    mvm.ok("tenant", "create", "acme")
    SqliteStore(mvm.home / "mvm.db").add_pool(Pool("acme", "w", "path:/x", "minimal", 1, 128))
    r = mvm.ok("pool", "update", "acme/w", "--idle-warm", "30s", "--idle-sleep", "5m",
               "--min-running", "1")
    assert r.out.strip() == "acme/w: idle-warm 30s, idle-sleep 5m, min-running 1"
    r = mvm.ok("pool", "update", "acme/w", "--pin", "--idle-sleep", "off")
    assert r.out.strip() == "acme/w: idle-warm 30s, idle-sleep off, min-running 1, pinned"
    info = json.loads(mvm.ok("pool", "info", "acme/w", "--json").out)
    assert (info["idle_warm"], info["idle_sleep"], info["min_running"], info["pinned"]) == (30, None, 1, True)
    for args, words in ((("--idle-warm", "soon"), "--idle-warm 'soon' is not a duration"),
                        (("--min-running", "-1"), "--min-running must not be negative")):
        bad = mvm("pool", "update", "acme/w", *args)
        assert bad.rc != 0 and len(bad.errors) == 1 and words in bad.errors[0], bad.err
    assert json.loads(mvm.ok("pool", "info", "acme/w", "--json").out) == info


# -- real guests: only what they alone show --------------------------------------------------------

def _qemus(inst: str) -> list[int]:
    from tests.test_lifecycle_real import qemus

    return qemus(inst)


class Serving:
    """`mvm agent serve --interval 1` as a user starts it, in the test's namespace."""

    def __init__(self, m: Mvm, log: Path) -> None:
        argv = [sys.executable, "-m", "mvm.cli.main", "agent", "serve", "--interval", "1"]
        assert m.ns
        self.log = log
        self.proc = subprocess.Popen(["ip", "netns", "exec", m.ns, *argv], env=m.env,
                                     stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                     stderr=log.open("a"))

    def stop(self) -> int:
        self.proc.send_signal(signal.SIGTERM)
        return self.proc.wait(120)

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()


def _wait(fn, timeout: float, what: str):  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + timeout
    while True:
        v = fn()
        if v:
            return v
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.3)


def _instances(m: Mvm, pool: str) -> dict[str, dict[str, object]]:
    return {i["address"]: i for i in json.loads(m.ok("instance", "list", pool, "--json").out)}


def _events(m: Mvm, kind: str) -> list[tuple[str, str, str]]:
    with sqlite3.connect(m.home / "mvm.db") as db:
        return db.execute("SELECT instance, message, reason FROM events WHERE kind=? ORDER BY id",
                          (kind,)).fetchall()


def _pool(m: Mvm, pool: str, *extra: str) -> None:
    m.ok("tenant", "create", pool.split("/")[0])
    m.ok("pool", "create", pool, "--profile", "minimal", "--mem", "256", *extra)
    m.ok("pool", "build", pool)


ON_GUESTS = needs_assets("kernel", "builtin-flake", "nixpkgs-offline")


@pytest.mark.guest
@pytest.mark.nix
@ON_GUESTS
def test_serve_replaces_a_killed_qemu_and_a_restart_adopts_vms(gmvm: Mvm, tmp_path: Path) -> None:
    _pool(gmvm, "acme/w")
    gmvm.ok("pool", "scale", "acme/w", "--running", "2")
    victim, other = sorted(_instances(gmvm, "acme/w"))
    [dead] = _qemus(victim)
    log = tmp_path / "agent.log"
    agent = Serving(gmvm, log)
    try:
        os.kill(dead, signal.SIGKILL)
        _wait(lambda: _qemus(victim) and _instances(gmvm, "acme/w")[victim]["state"] == "running"
              and _events(gmvm, "instance.replaced"), 120, "the agent to replace the killed QEMU")
        assert _qemus(victim) != [dead]
        assert sh(gmvm, victim, "echo up").out == "up\n"  # the replacement is ready
        [(iid, message, reason)] = _events(gmvm, "instance.replaced")
        assert victim.endswith(iid) and reason == "crash"
        assert "hypervisor process exited unexpectedly" in message
        # restart: SIGTERM leaves the VMs as they are; the next agent adopts them
        pids = {a: _qemus(a) for a in (victim, other)}
        assert agent.stop() == 0
        assert {a: _qemus(a) for a in pids} == pids
        seen = len(log.read_text())
        agent = Serving(gmvm, log)
        _wait(lambda: log.read_text()[seen:].count("adopted hypervisor pid") == 2, 60, "adoption")
        time.sleep(3)  # a few passes
        assert {a: _qemus(a) for a in pids} == pids
        assert all(i["state"] == "running" and i["observed"] == ""
                   for i in _instances(gmvm, "acme/w").values())
        assert agent.stop() == 0
        assert {a: _qemus(a) for a in pids} == pids
        text = log.read_text()
        assert "reconcile failed" not in text and text.count("(0 pool errors)") == 2, text
    finally:
        agent.kill()


@pytest.mark.guest
@pytest.mark.nix
@ON_GUESTS
def test_idle_policy_on_real_guests(gmvm: Mvm, tmp_path: Path) -> None:
    """An idle guest goes warm, then to sleep; a busy one (a loop in it) stays running; idle
    too, it stays running while --min-running 1 holds it, and goes warm without."""
    _pool(gmvm, "acme/p", "--idle-warm", "2s", "--idle-sleep", "3s")
    gmvm.ok("pool", "scale", "acme/p", "--running", "2")
    idle, busy = sorted(_instances(gmvm, "acme/p"))
    r = sh(gmvm, busy, "sh -c 'while :; do :; done' >/dev/null 2>&1 & echo $! > /tmp/busy")
    assert r.rc == 0, r.err
    agent = Serving(gmvm, tmp_path / "agent.log")
    try:
        _wait(lambda: _instances(gmvm, "acme/p")[idle]["state"] == "warm", 60, "the idle one to go warm")
        _wait(lambda: _instances(gmvm, "acme/p")[idle]["state"] == "sleeping", 60,
              "the idle one to go to sleep")
        assert _instances(gmvm, "acme/p")[busy]["state"] == "running"
        moves = [(i, reason) for i, _, reason in _events(gmvm, "instance.warm") + _events(gmvm, "instance.sleep")]
        assert moves == [(idle.split("/")[-1], "policy")] * 2
        gmvm.ok("pool", "update", "acme/p", "--min-running", "1")
        assert sh(gmvm, busy, "kill $(cat /tmp/busy)").rc == 0  # (the loop ran all along)
        time.sleep(6)  # idle now, for longer than --idle-warm: --min-running 1 keeps it running
        states = {a: i["state"] for a, i in _instances(gmvm, "acme/p").items()}
        assert states == {idle: "sleeping", busy: "running"}
        gmvm.ok("pool", "update", "acme/p", "--min-running", "0")
        _wait(lambda: _instances(gmvm, "acme/p")[busy]["state"] != "running", 60,
              "the no longer busy one to leave running")
        assert agent.stop() == 0
    finally:
        agent.kill()


@pytest.mark.guest
@pytest.mark.nix
@pytest.mark.net
@ON_GUESTS
def test_a_stopped_qemu_is_unresponsive_refused_in_one_line_and_replaced_after_the_grace(
        gmvm: Mvm, tmp_path: Path) -> None:
    """`kill -STOP` of a QEMU: `observe` says unresponsive, with the cause; warm and exec fail with
    one line (each within the 5 s control deadline plus what they do); the agent ends it after the
    pool's grace (made 3 s for it) and starts the same instance again."""
    _pool(gmvm, "acme/h", "--unresponsive-grace", "5m")
    gmvm.ok("pool", "scale", "acme/h", "--running", "1")
    [inst] = _instances(gmvm, "acme/h")
    [hung] = _qemus(inst)
    os.kill(hung, signal.SIGSTOP)
    agent = None
    try:
        r = gmvm.ok("instance", "observe", "acme/h", timeout=60)
        assert f"{inst.split('/')[-1]}: unresponsive: QEMU did not answer" in r.out, r.out
        [(iid, message, reason)] = _events(gmvm, "instance.unresponsive")
        assert inst.endswith(iid) and reason == "crash" and "after 300 s" in message
        assert str(_instances(gmvm, "acme/h")[inst]["observed"]).startswith("unresponsive: ")
        took = {}
        for cmd in (("instance", "warm", inst), ("instance", "exec", inst, "--", "true")):
            start = time.monotonic()
            r = gmvm(*cmd, timeout=60)
            took[cmd[1]] = round(time.monotonic() - start, 1)
            # (warm fails as mvm's own commands do; an exec that did not start says so: 125)
            assert r.rc == {"warm": 9, "exec": 125}[cmd[1]], r.err
            assert len(r.errors) == 1 and "does not answer" in r.errors[0], r.err
        print(f"seconds to fail on a stopped QEMU: {took}")
        assert _qemus(inst) == [hung]
        gmvm.ok("pool", "update", "acme/h", "--unresponsive-grace", "3s")
        agent = Serving(gmvm, tmp_path / "agent.log")
        _wait(lambda: _events(gmvm, "instance.replaced") and _qemus(inst)
              and _instances(gmvm, "acme/h")[inst]["state"] == "running", 120,
              "the agent to replace the unresponsive QEMU")
        [(iid, message, reason)] = _events(gmvm, "instance.replaced")
        assert inst.endswith(iid) and reason == "crash" and "did not answer for" in message
        assert hung not in _qemus(inst) and not Path(f"/proc/{hung}").exists()
        assert sh(gmvm, inst, "echo up").out == "up\n"
        assert agent.stop() == 0
    finally:
        if Path(f"/proc/{hung}").exists():
            os.kill(hung, signal.SIGCONT)
        if agent is not None:
            agent.kill()


def test_the_systemd_unit_lets_hypervisors_outlive_the_agent(tmp_path: Path) -> None:
    import shutil

    unit = Path(agent_mod.__file__).parent.parent / "data/systemd/mvm-agent.service"
    text = unit.read_text()
    assert "KillMode=process" in text.splitlines()
    assert "ExecStart=/usr/local/bin/mvm agent serve" in text
    if shutil.which("systemd-analyze") is None:
        pytest.skip("no systemd-analyze")
    copy = tmp_path / unit.name  # (pointed at a program that exists here)
    copy.write_text(text.replace("/usr/local/bin/mvm", sys.executable))
    r = subprocess.run(["systemd-analyze", "verify", str(copy)], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
