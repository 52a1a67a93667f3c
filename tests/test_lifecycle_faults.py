"""Every transition, every undo and every crash point, on the fake runtime and agent (doubles).

A crash is the command killed with SIGKILL right after a step was recorded (no cleanup runs,
as with a real kill); the next command's observation must find a consistent state: no
transition left in flight, a hypervisor exactly when the state is live, no clear-text secrets
image, only the committed snapshot on disk, no snapshot restored twice, and every line the
guest had synced still on its data disk. A failure is a step raising; the failing command
itself must leave the same consistency.
"""

from __future__ import annotations

import os
import signal
from collections.abc import Iterator
from pathlib import Path

import pytest

from mvm.config.paths import Layout
from mvm.config.settings import Settings
from mvm.context import Host
from mvm.context.compose import crash_after, fail_before
from mvm.errors import Conflict, MvmError, NotFound, QuotaExceeded
from mvm.lifecycle import apply, create, observe, secrets_disk, specs
from mvm.lifecycle.apply import pool_locked
from mvm.model import Action, Instance, InstanceRef, Op, Pool, PoolRef, State
from mvm.runtime.base import SnapshotInfo, VmStatus
from mvm.services import tenants
from mvm.store import FileLocks, SqliteFences, SqliteStore
from tests.doubles.fake_runtime import FakeRuntime

REF = PoolRef("acme", "w")
REV = "abc123"


class World:
    def __init__(self, root: Path) -> None:
        self.root = root
        self.ledger = root / "restores.txt"
        self.ledger.touch()
        self.ctx = self.host()

    def host(self, **kw: object) -> Host:
        home = self.root / "home"
        return Host(layout=Layout(home, self.root / "run"), settings=Settings(),
                    store=SqliteStore(home / "mvm.db"), locks=FileLocks(home / "locks", SqliteFences(home / "mvm.db")),
                    runtime_factory=lambda: FakeRuntime(self.ledger),
                    store_factory=lambda: SqliteStore(home / "mvm.db"), **kw)  # type: ignore[arg-type]

    def instance(self, ref: InstanceRef) -> Instance:
        return self.ctx.store.instance(ref.tenant, ref.pool, ref.instance)

    def new(self, state: State = State.CREATED) -> InstanceRef:
        """An instance brought to `state` by the lifecycle itself."""
        ref = create(self.ctx, REF).ref
        for action in {State.CREATED: (), State.RUNNING: (Action.START,),
                       State.WARM: (Action.START, Action.WARM),
                       State.SLEEPING: (Action.START, Action.SLEEP),
                       State.STOPPED: (Action.START, Action.STOP)}[state]:
            apply(self.ctx, ref, action)
        return ref

    def guest(self, ref: InstanceRef, *argv: str) -> str:
        from mvm.services import instances

        return instances.exec_(self.ctx, ref, list(argv)).stdout.decode()

    def crash(self, ref: InstanceRef, action: Action, step: str) -> None:
        """Run `action` in a child process that is SIGKILLed right after `step` is recorded."""
        pid = os.fork()
        if pid == 0:  # the child: a command of its own, with its own store connection
            code = 0
            try:
                apply(self.host(crash_point=crash_after(f"{action.value}:{step}")), ref, action)
            except BaseException:
                code = 1
            os._exit(code)
        _, status = os.waitpid(pid, 0)
        assert os.WIFSIGNALED(status) and os.WTERMSIG(status) == signal.SIGKILL, \
            f"{action.value} did not reach step {step} (exit status {status})"

    def next_command(self, ref: InstanceRef) -> Instance | None:
        """What any next command does first: observe the instance under the pool's lock."""
        with pool_locked(self.ctx, ref.pool_ref, None) as lease:
            try:
                return observe.instance(self.ctx, ref, lease)
            except NotFound:
                return None

    def check(self, ref: InstanceRef) -> Instance:
        """The invariants a user relies on."""
        i = self.instance(ref)
        rt = self.ctx.runtime()
        spec = specs.control_spec(self.ctx.layout, i)
        assert i.op is None, f"transition left in flight: {i.op}"
        assert rt.is_alive(spec) == i.state.is_live(), f"{i.state}: hypervisor alive={rt.is_alive(spec)}"
        if i.state is State.RUNNING:
            assert rt.status(spec) is VmStatus.RUNNING
        if i.state is State.WARM:
            assert rt.status(spec) is VmStatus.PAUSED
        assert not secrets_disk.image_path(self.ctx.layout, i.id).exists(), "clear-text secrets image left"
        if i.state is State.SLEEPING:
            assert i.snapshot and SnapshotInfo.committed(specs.snapshot_dir(self.ctx.layout, i, i.snapshot))
        else:
            assert i.snapshot is None
        root = specs.snapshots_dir(self.ctx.layout, i)
        on_disk = {d.name for d in root.iterdir()} if root.is_dir() else set()
        assert on_disk <= ({i.snapshot} if i.snapshot else set()), f"stale snapshots {on_disk}"
        restored = self.ledger.read_text().split()
        assert len(restored) == len(set(restored)), f"a snapshot was restored twice: {restored}"
        return i

    def run_and_read(self, ref: InstanceRef) -> str:
        """Bring the instance back to running (as a user would) and read its data."""
        i = self.instance(ref)
        for action in {State.SLEEPING: (Action.WAKE,), State.WARM: (Action.RESUME,),
                       State.RUNNING: ()}.get(i.state, (Action.START,)):
            apply(self.ctx, ref, action)
        return self.guest(ref, "read")


@pytest.fixture
def world(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[World]:
    # (nothing reads MVM_HOME or MVM_RUNTIME_DIR below the edge: the layout is passed in)
    monkeypatch.delenv("MVM_HOME", raising=False)
    monkeypatch.setenv("MVM_RUNTIME_DIR", "/nonexistent-mvm-runtime-dir")
    w = World(tmp_path)
    tenants.create(w.ctx, "acme")
    w.ctx.store.add_pool(Pool("acme", "w", "path:/nonexistent", "p", 1, 128, data_disk=8, network="none"))
    w.ctx.store.set_pool_current("acme", "w", REV)
    rdir = tmp_path / "home/tenants/acme/pools/w/artifacts/revisions" / REV
    rdir.mkdir(parents=True)
    for f in ("rootfs.ext4", "vmlinux"):
        (rdir / f).write_bytes(b"fake")
    yield w
    for i in w.ctx.store.instances():
        FakeRuntime(w.ledger).stop(specs.control_spec(w.ctx.layout, i), 0)
    for proc in __import__("tests.doubles.fake_runtime", fromlist=["_DETACHED"])._DETACHED:
        if proc.poll() is None:
            proc.kill()


STEPS: dict[tuple[Action, State], tuple[str, ...]] = {
    (Action.START, State.CREATED): ("network", "secrets", "boot", "agent"),
    (Action.START, State.STOPPED): ("network", "secrets", "boot", "agent"),
    (Action.WARM, State.RUNNING): ("vcpus",),
    (Action.RESUME, State.WARM): ("vcpus",),
    (Action.SLEEP, State.RUNNING): ("prep", "snapshot"),
    (Action.SLEEP, State.WARM): ("resume", "prep", "snapshot"),
    (Action.WAKE, State.SLEEPING): ("network", "secrets", "restore", "consume", "resume", "agent"),
    (Action.STOP, State.RUNNING): ("halt", "release"),
    (Action.STOP, State.SLEEPING): ("halt", "release"),
    (Action.DESTROY, State.RUNNING): ("halt",),
}

# Where the next command leaves an instance whose command died right after a step.
AFTER_CRASH: dict[tuple[Action, State, str], State | None] = {}
for (a, src), steps in STEPS.items():
    for s in steps:
        AFTER_CRASH[(a, src, s)] = {
            Action.START: State.RUNNING if s == "agent" else src,
            Action.WARM: State.WARM,
            Action.RESUME: State.RUNNING,
            Action.SLEEP: State.SLEEPING if s == "snapshot" else src,
            Action.WAKE: State.RUNNING if s in ("consume", "resume", "agent") else State.SLEEPING,
            Action.STOP: State.STOPPED,
            Action.DESTROY: None,
        }[a]

CASES = [pytest.param(a, src, s, id=f"{a.value}-from-{src.value}-after-{s}") for a, src, s in AFTER_CRASH]


def _prepare(world: World, source: State) -> tuple[InstanceRef, list[str]]:
    """An instance in `source` whose guest (if it ever ran) synced some lines to its data disk."""
    if source is State.CREATED:
        return world.new(State.CREATED), []
    ref = world.new(State.RUNNING)
    world.guest(ref, "write", "synced-1", "synced-2")
    world.guest(ref, "sync")
    world.guest(ref, "write", "in-memory-1")
    for action in {State.RUNNING: (), State.WARM: (Action.WARM,), State.SLEEPING: (Action.SLEEP,),
                   State.STOPPED: (Action.STOP,)}[source]:
        apply(world.ctx, ref, action)
    return ref, ["synced-1", "synced-2"]


@pytest.mark.parametrize(("action", "source", "step"), CASES)
def test_a_crash_after_any_step_is_finished_by_the_next_command(
        world: World, action: Action, source: State, step: str) -> None:
    ref, synced = _prepare(world, source)
    world.crash(ref, action, step)
    left = world.instance(ref) if action is not Action.DESTROY else None
    if left is not None:
        assert left.op is not None and left.op.done(step)  # the crash left its intent behind
    after = world.next_command(ref)
    want = AFTER_CRASH[(action, source, step)]
    if want is None:
        assert after is None and not world.ctx.layout.instance_dir(ref.tenant, ref.pool, ref.instance).exists()
        return
    assert after is not None and after.state is want, f"{after and after.state} != {want}"
    world.check(ref)
    events = [e for e in world.ctx.store.events("acme") if e["instance"] == ref.instance]
    assert events[0]["kind"] == "instance.recovered" and events[0]["reason"] == "crash"
    data = world.run_and_read(ref).split()
    for line in synced:  # nothing the guest had synced is lost
        assert line in data
    world.check(ref)


@pytest.mark.parametrize(("action", "source", "step"), CASES)
def test_a_failing_step_leaves_a_consistent_state(
        world: World, action: Action, source: State, step: str) -> None:
    ref, synced = _prepare(world, source)
    failing = world.host(fail_point=fail_before(f"{action.value}:{step}"))
    with pytest.raises(MvmError, match="injected failure"):
        apply(failing, ref, action)
    if action is Action.DESTROY:
        with pytest.raises(NotFound):
            world.instance(ref)
        return
    i = world.check(ref)
    # before the point of no return: back where it was; after it: forward
    forward = {Action.WAKE: ("resume", "agent"), Action.STOP: ("halt", "release")}.get(action, ())
    assert i.state is ({Action.WAKE: State.RUNNING, Action.STOP: State.STOPPED}[action]
                       if step in forward else source)
    data = world.run_and_read(ref).split()
    for line in synced:
        assert line in data


def test_a_snapshot_is_consumed_exactly_once(world: World) -> None:
    ref = world.new(State.SLEEPING)
    name = world.instance(ref).snapshot
    world.crash(ref, Action.WAKE, "consume")  # the guest did not run yet; the snapshot is spent
    assert world.instance(ref).snapshot is None
    i = world.next_command(ref)
    assert i is not None and i.state is State.RUNNING
    world.guest(ref, "write", "after-wake")
    world.guest(ref, "sync")
    apply(world.ctx, ref, Action.SLEEP)
    new = world.instance(ref).snapshot
    assert new and new != name  # a new snapshot goes to a new name
    apply(world.ctx, ref, Action.WAKE)
    assert "after-wake" in world.guest(ref, "read").split()
    world.check(ref)


def test_wake_killed_before_consume_keeps_the_snapshot_for_the_next_wake(world: World) -> None:
    ref = world.new(State.SLEEPING)
    name = world.instance(ref).snapshot
    world.crash(ref, Action.WAKE, "restore")
    i = world.next_command(ref)
    assert i is not None and i.state is State.SLEEPING and i.snapshot == name
    apply(world.ctx, ref, Action.WAKE)
    world.check(ref)


def test_a_hidden_hypervisor_is_ended_and_scale_sees_it(world: World) -> None:
    from mvm.services import scale

    ref = world.new(State.RUNNING)
    world.ctx.store.update_instance(ref.instance, state=State.STOPPED)  # a store that lost track
    assert world.ctx.runtime().is_alive(specs.control_spec(world.ctx.layout, world.instance(ref)))
    lines: list[str] = []
    scale.scale(world.ctx, REF, 0, 0, 0, report=lines.append)
    assert any("ended a hypervisor the store did not know of" in ln for ln in lines)
    assert not world.ctx.runtime().is_alive(specs.control_spec(world.ctx.layout, world.instance(ref)))
    world.check(ref)


def test_a_dead_hypervisor_or_a_disk_error_is_failed_with_its_cause(world: World) -> None:
    rt = world.ctx.runtime()
    gone = world.new(State.RUNNING)
    os.kill(int(Path(rt.pid_file(specs.control_spec(world.ctx.layout, world.instance(gone)))).read_text()),  # type: ignore[attr-defined]
            signal.SIGKILL)
    stuck = world.new(State.RUNNING)
    spec = specs.control_spec(world.ctx.layout, world.instance(stuck))
    vm = rt._vm(spec)  # type: ignore[attr-defined]
    vm["status"] = "io-error"
    rt._save_vm(spec, vm)  # type: ignore[attr-defined]
    from mvm.services import instances

    seen = {v.instance.id: v.observed for v in instances.views(world.ctx, "acme", "w")}
    assert seen[gone.instance] == "hypervisor gone"
    assert seen[stuck.instance].startswith("io-error")
    assert world.instance(gone).state is State.RUNNING  # a view only looks
    with pool_locked(world.ctx, REF, None) as lease:
        done = observe.pool(world.ctx, REF, lease)
    assert any("exited unexpectedly" in d for d in done) and any("disk write failed" in d for d in done)
    assert world.check(gone).state is State.FAILED and world.check(stuck).state is State.FAILED
    assert "disk write failed" in (world.instance(stuck).error or "")
    apply(world.ctx, stuck, Action.START)  # a failed instance starts again
    world.check(stuck)


def test_illegal_transitions_change_nothing(world: World) -> None:
    ref = world.new(State.SLEEPING)
    before = world.instance(ref)
    for action in (Action.WARM, Action.RESUME, Action.SLEEP, Action.START):
        with pytest.raises(MvmError, match=f"cannot {action.value} instance: it is sleeping"):
            apply(world.ctx, ref, action)
    after = world.instance(ref)
    assert (after.state, after.snapshot, after.op) == (before.state, before.snapshot, None)


def test_a_transition_in_flight_counts_against_the_quota(world: World) -> None:
    from dataclasses import replace

    from mvm.model import Quotas

    t = world.ctx.store.tenant("acme")
    world.ctx.store.remove_tenant("acme")
    world.ctx.store.add_tenant(replace(t, quotas=Quotas(max_running=1)))
    a, b = world.new(State.CREATED), world.new(State.CREATED)
    # another command is booting `a` (its intent is recorded, the VM not up yet)
    world.ctx.store.begin_op(a.instance, Op(Action.START, State.RUNNING, State.CREATED,
                                            owner=f"pid {os.getpid()} (mvm instance start)"))
    with pytest.raises(QuotaExceeded, match="max-running 1"):
        apply(world.ctx, b, Action.START)
    assert world.instance(b).state is State.CREATED and world.instance(b).op is None
    refused = world.ctx.store.events("acme")[0]
    assert (refused["kind"], refused["reason"], refused["instance"]) == ("instance.start-refused", "quota", b.instance)


@pytest.mark.parametrize("at", ["start:network", "start:boot", "start:agent", "warm:vcpus",
                                "sleep:prep", "sleep:snapshot"])
def test_scale_converges_after_a_crash_in_the_middle(world: World, at: str) -> None:
    from mvm.services import scale

    pid = os.fork()
    if pid == 0:
        try:
            scale.scale(world.host(crash_point=crash_after(at)), REF, 2, 1, 1)
        finally:
            os._exit(1)
    _, status = os.waitpid(pid, 0)
    assert os.WIFSIGNALED(status) and os.WTERMSIG(status) == signal.SIGKILL
    lines: list[str] = []
    scale.scale(world.ctx, REF, 2, 1, 1, report=lines.append)
    assert any(f"finished an interrupted {at.split(':')[0]}" in ln for ln in lines), lines
    states = sorted(i.state.value for i in world.ctx.store.instances("acme", "w"))
    assert states == ["running", "running", "sleeping", "warm"]
    for i in world.ctx.store.instances("acme", "w"):
        world.check(i.ref)


def test_scale_reports_every_failure(world: World) -> None:
    from mvm.services import scale

    failing = world.host(fail_point=fail_before("start:boot"))
    with pytest.raises(MvmError) as err:
        scale.scale(failing, REF, 2, 0, 0)
    assert err.value.message.startswith("2 failures in scaling acme/w: ")
    assert err.value.message.count("injected failure") == 2
    for i in world.ctx.store.instances("acme", "w"):
        assert world.check(i.ref).state is State.CREATED


@pytest.mark.parametrize(("step", "kept"), [("restore", True), ("consume", True), ("resume", False)])
def test_ctrl_c_during_wake_keeps_a_snapshot_the_guest_never_ran_from(
        world: World, step: str, kept: bool) -> None:
    ref = world.new(State.SLEEPING)
    name = world.instance(ref).snapshot
    ctx = world.host()

    def interrupt(action: str, at: str) -> None:
        if (action, at) == ("wake", step):
            raise KeyboardInterrupt

    ctx.fail_point = interrupt
    with pytest.raises(KeyboardInterrupt):
        apply(ctx, ref, Action.WAKE)
    i = world.check(ref)
    if kept:  # interrupted before the guest ran: the same snapshot waits for the next wake
        assert (i.state, i.snapshot) == (State.SLEEPING, name)
    else:  # the guest had been let run: it runs on, and the snapshot is spent
        assert (i.state, i.snapshot) == (State.RUNNING, None)
    world.run_and_read(ref)
    world.check(ref)


def test_a_command_that_lost_the_pools_lock_stops_and_writes_nothing(world: World) -> None:
    """Its pool's lock file is removed under it and another command takes the lock while it
    boots: its next write is refused (fenced), it undoes nothing (the transition is the new
    holder's now), and the next command finishes the transition it left."""
    import contextlib

    ref = world.new()
    home = world.root / "home"
    ctx = world.host()
    other = contextlib.ExitStack()

    def lose_the_lock(action: str, step: str) -> None:
        if (action, step) == ("start", "boot"):
            (home / "locks" / "pool-acme--w.lock").unlink()
            locks = FileLocks(home / "locks", SqliteFences(home / "mvm.db"), "pid 2 (mvm pool scale)")
            other.enter_context(locks.lock("pool-acme--w", timeout=5))

    ctx.fail_point = lose_the_lock
    with other, pytest.raises(Conflict, match="lost its lock pool-acme--w") as err:
        apply(ctx, ref, Action.START)
    assert err.value.exit_code == 4
    i = world.instance(ref)
    assert i.state is State.CREATED and i.op is not None and i.op.steps == ("network", "secrets")
    assert world.ctx.runtime().is_alive(specs.control_spec(world.ctx.layout, i))  # (left as it was)
    kinds = [e["kind"] for e in world.ctx.store.events("acme") if e["instance"] == ref.instance]
    assert kinds == ["instance.create"]  # no start, no failure, no recovery written
    after = world.next_command(ref)  # the lock is free again: the transition left is finished
    assert after is not None and after.state is State.CREATED
    world.check(ref)


# -- clear-text secrets of a killed command --------------------------------------------------------

SECRET = "hunter2-7f3c9a"


def killing_mkfs(where: Path) -> tuple[Path, Path]:
    """A test seam: an `mkfs.ext4` first on PATH that, when it makes the secrets disk, SIGKILLs
    the command that runs it (its parent: the secrets are handed over by then), then makes the
    image all the same, as the real one left running would, and touches a marker when done."""
    from mvm.util import proc

    real = proc.which("mkfs.ext4")
    assert real
    bin_dir, done = where / "seam-bin", where / "mkfs-done"
    bin_dir.mkdir()
    wrapper = bin_dir / "mkfs.ext4"
    wrapper.write_text("#!/bin/sh\n"
                       'case "$*" in *mvm-secrets*) kill -KILL "$PPID";; esac\n'
                       f'{real} "$@"\nrc=$?\ntouch {done}\nexit $rc\n')
    wrapper.chmod(0o755)
    return bin_dir, done


def readable_secrets(root: Path) -> list[str]:
    """Every file under root (the secrets' runtime directory) that holds the secret in clear."""
    if not root.exists():
        return []
    return [str(p) for p in root.rglob("*") if p.is_file() and SECRET.encode() in p.read_bytes()]


def _wait_for(path: Path, timeout: float = 30.0) -> None:
    from mvm.util.retry import until

    until(lambda: path.exists() or None, timeout, interval=0.02, what=str(path))


@pytest.mark.parametrize("source", [State.CREATED, State.SLEEPING], ids=["start", "wake"])
def test_a_command_killed_while_mkfs_makes_the_secrets_disk_leaves_no_secrets(
        world: World, tmp_path: Path, source: State) -> None:
    secrets = tmp_path / "secrets.json"
    secrets.write_text(f'{{"API_KEY": "{SECRET}"}}')
    tenants.set_secrets(world.ctx, "acme", secrets)
    ref = world.new(source)
    action = Action.START if source is State.CREATED else Action.WAKE
    bin_dir, done = killing_mkfs(tmp_path)
    pid = os.fork()
    if pid == 0:
        os.environ["PATH"] = f"{bin_dir}:{os.environ['PATH']}"
        try:
            apply(world.host(), ref, action)
        finally:
            os._exit(1)
    _, status = os.waitpid(pid, 0)
    assert os.WIFSIGNALED(status) and os.WTERMSIG(status) == signal.SIGKILL, status
    _wait_for(done)  # the orphaned mkfs finished too
    shm = world.ctx.layout.secrets_runtime_dir()
    assert readable_secrets(shm) == [] and os.listdir(shm) == []
    left = world.instance(ref)
    assert left.op is not None and left.op.done("network") and not left.op.done("secrets")
    after = world.next_command(ref)
    assert after is not None and after.state is source
    world.check(ref)
    apply(world.ctx, ref, action)  # and the next start or wake builds it and runs
    assert world.check(ref).state is State.RUNNING
    assert readable_secrets(shm) == []  # (the hypervisor holds the image it opened, unlinked)


def _leftovers(world: World) -> tuple[Path, Path]:
    """What killed commands left: an older mvm's staging directory, and the image of an
    instance since destroyed."""
    shm = world.ctx.layout.secrets_runtime_dir()
    secrets_disk.build(world.ctx.layout, "acme", "i-gone0000")
    stage = shm / "stage-k2j4h5"
    stage.mkdir()
    (stage / "secrets.json").write_text(f'{{"API_KEY": "{SECRET}"}}')
    return stage, secrets_disk.image_path(world.ctx.layout, "i-gone0000")


def _swept(world: World, *paths: Path) -> None:
    assert not any(p.exists() for p in paths)
    swept = [e for e in world.ctx.store.events() if e["kind"] == "host.secrets-swept"]
    assert swept and "stage-k2j4h5" in swept[0]["message"] and "i-gone0000.img" in swept[0]["message"]


def test_the_next_command_sweeps_clear_text_secrets_killed_commands_left(world: World) -> None:
    ref = world.new(State.CREATED)
    leftovers = _leftovers(world)
    apply(world.ctx, ref, Action.START)
    _swept(world, *leftovers)


def test_observe_sweeps_clear_text_secrets_but_not_a_transition_at_work(world: World) -> None:
    busy = world.new(State.CREATED)
    # another command is starting `busy`: its image is built, its hypervisor not booted yet
    world.ctx.store.begin_op(busy.instance, Op(Action.START, State.RUNNING, State.CREATED,
                                               owner=f"pid {os.getpid()} (mvm instance start)"))
    mine = secrets_disk.build(world.ctx.layout, "acme", busy.instance)
    leftovers = _leftovers(world)
    lines = observe.sweep(world.ctx)
    _swept(world, *leftovers)
    assert mine.exists() and len(lines) == 1


def test_tenant_destroy_sweeps_clear_text_secrets(world: World) -> None:
    leftovers = _leftovers(world)
    tenants.destroy(world.ctx, "acme", force=True)
    _swept(world, *leftovers)


def test_the_agent_sweeps_clear_text_secrets_when_it_starts(world: World) -> None:
    import threading

    from mvm.services.agent import Agent

    leftovers = _leftovers(world)
    lines: list[str] = []
    stop = threading.Event()
    stop.set()  # (started and stopped: what it does before its first pass)
    Agent(world.ctx, 3600.0, report=lines.append).run(stop)
    _swept(world, *leftovers)
    assert any("removed clear-text secrets" in ln for ln in lines), lines


def test_fifty_sleep_wake_cycles_under_concurrent_exec_and_list(world: World) -> None:
    """Every wake of fifty sleep/wake cycles succeeds while another command execs and lists
    all along, and the guest's data and a consistent state come out of it. (The real-guest run
    in test_lifecycle_real makes a few cycles; fifty cost milliseconds here.)"""
    import threading

    from mvm.errors import IllegalTransition
    from mvm.services import instances

    ref = world.new(State.RUNNING)
    world.guest(ref, "write", "kept")
    world.guest(ref, "sync")
    stop = threading.Event()
    seen = {"exec-ok": 0, "exec-refused": 0, "list": 0}

    def pester() -> None:
        ctx = world.host()  # another command: a store connection of its own
        while not stop.is_set():
            try:
                if "kept" in instances.exec_(ctx, ref, ["read"]).stdout.decode().split():
                    seen["exec-ok"] += 1
            except IllegalTransition as e:
                assert "it is sleeping" in str(e), e
                seen["exec-refused"] += 1
            except MvmError:
                pass  # the VM went to sleep between the state read and the exec
            assert [v.instance.id for v in instances.views(ctx, "acme", "w")] == [ref.instance]
            seen["list"] += 1

    t = threading.Thread(target=pester)
    t.start()
    failed_wakes = []
    try:
        for n in range(50):
            apply(world.ctx, ref, Action.SLEEP)
            try:
                apply(world.ctx, ref, Action.WAKE)
            except MvmError as e:
                failed_wakes.append((n, str(e)))
                break
    finally:
        stop.set()
        t.join()
    assert failed_wakes == []
    assert world.check(ref).state is State.RUNNING
    assert world.guest(ref, "read").split() == ["kept"]
    assert seen["exec-ok"] > 0 and seen["exec-refused"] > 0 and seen["list"] > 0, seen
