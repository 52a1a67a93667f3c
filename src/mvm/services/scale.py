"""`pool scale`: converge a pool to desired counts now, reusing instances before creating.

Policy (documented in the README): every slot is filled first by an instance already in
that state, then by the cheapest instance to convert (warm→running is a resume, sleeping→
running a wake, failed or stopped→running a cold start: a failed one first, so that a crashed
instance comes back itself, with its address and data disk), then by a new instance. Instances left
over are stopped, not destroyed: their data disks stay and the next scale-up reuses them
first. `mvm instance destroy` removes one for good.

Every move is a path of actions through the one transition table (`model.TRANSITIONS`),
each taken by `lifecycle.apply`. The tenant's lock is held only while quotas are checked,
the desired counts recorded and new instances given addresses; boots and wakes run under the
pool's lock alone, side by side, each admitted by the tenant's quota when it has room (`Room`).
"""

from __future__ import annotations

import contextlib
import os
import re
import threading
import time
from collections import Counter, deque
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from functools import cache

from mvm.context import Host
from mvm.errors import InvalidInput, MvmError, NotFound, QuotaExceeded, combined
from mvm.lifecycle import admission, apply, create, disks, observe, quota
from mvm.lifecycle.apply import TAKES_MORE
from mvm.lifecycle.run import Progress, noop
from mvm.model import TRANSITIONS, Action, Event, Instance, PoolRef, Reason, State
from mvm.store.base import Lease
from mvm.store.locks import pool_lock_name, quota_lock_name, tenant_lock_name
from mvm.util import pids

Report = Callable[[str], None]
# Boots and wakes run side by side, one per core (under TCG a boot keeps one core busy).
WORKERS = max(1, min(8, os.cpu_count() or 1))

# For each target state, which current states may fill its slot, cheapest first.
PREFERENCE: dict[State, tuple[State, ...]] = {
    State.RUNNING: (State.WARM, State.SLEEPING, State.FAILED, State.STOPPED, State.CREATED),
    State.WARM: (State.RUNNING, State.SLEEPING, State.FAILED, State.STOPPED, State.CREATED),
    State.SLEEPING: (State.WARM, State.RUNNING, State.FAILED, State.STOPPED, State.CREATED),
}
MOVES = (Action.RESUME, Action.WAKE, Action.WARM, Action.SLEEP, Action.START, Action.STOP)
FREEING = (Action.STOP, Action.SLEEP)


@cache
def path(source: State, target: State) -> tuple[Action, ...]:
    """The shortest sequence of actions from one state to another, through the table."""
    seen = {source}
    queue: deque[tuple[State, tuple[Action, ...]]] = deque([(source, ())])
    while queue:
        state, actions = queue.popleft()
        if state is target:
            return actions
        for action in MOVES:
            froms, to = TRANSITIONS[action]
            if state in froms and to not in seen:
                seen.add(to)
                queue.append((to, (*actions, action)))
    raise InvalidInput(f"no way from {source.value} to {target.value}")


@dataclass
class Plan:
    moves: list[tuple[Instance | None, State]] = field(default_factory=list)  # None: new instance

    def actions(self) -> list[tuple[str, tuple[Action, ...]]]:
        out = []
        for inst, target in self.moves:
            if inst is None:
                out.append(("new", path(State.CREATED, target)))
            elif inst.state is not target:
                out.append((inst.id, path(inst.state, target)))
        return out


def plan(current: list[Instance], running: int, warm: int, sleeping: int) -> Plan:
    """Assign instances to slots: exact matches first, then by preference, then new ones."""
    want = {State.RUNNING: running, State.WARM: warm, State.SLEEPING: sleeping}
    free = list(current)
    p = Plan()
    for target, n in want.items():
        for inst in [i for i in free if i.state is target][:n]:
            free.remove(inst)
            p.moves.append((inst, target))
            want[target] -= 1
    for target in (State.RUNNING, State.WARM, State.SLEEPING):
        for source in PREFERENCE[target]:
            for inst in [i for i in free if i.state is source]:
                if want[target] == 0:
                    break
                free.remove(inst)
                p.moves.append((inst, target))
                want[target] -= 1
        p.moves.extend((None, target) for _ in range(want[target]))
        want[target] = 0
    for inst in free:
        if inst.state in (State.RUNNING, State.WARM, State.SLEEPING, State.FAILED):
            p.moves.append((inst, State.STOPPED))
    # Free resources before taking new ones: stops and sleeps first.
    p.moves.sort(key=lambda m: 0 if m[1] in (State.STOPPED, State.SLEEPING) and m[0] else 1)
    return p


def scale(ctx: Host, ref: PoolRef, running: int, warm: int, sleeping: int,
          report: Report = lambda s: None, progress: Progress = noop) -> list[Instance]:
    for name, n in (("--running", running), ("--warm", warm), ("--sleeping", sleeping)):
        if n < 0:
            raise InvalidInput(f"{name} must not be negative (got {n})")
    store = ctx.store
    pool = store.pool(ref.tenant, ref.pool)
    if not pool.current and running + warm + sleeping > 0:
        raise NotFound(f"pool {ref} has no built revision", f"run `mvm pool build {ref}` first")
    with contextlib.ExitStack() as outer:
        tenant = outer.enter_context(contextlib.ExitStack())
        tenant.enter_context(ctx.locks.lock(tenant_lock_name(ref.tenant)))
        lease = outer.enter_context(ctx.locks.lock(pool_lock_name(ref.tenant, ref.pool)))
        for line in observe.pool(ctx, ref, lease):  # what dead commands and hypervisors left
            report(line)
        p = plan(store.instances(ref.tenant, ref.pool), running, warm, sleeping)
        _check_memory(ctx, ref, p)
        with ctx.locks.lock(quota_lock_name(ref.tenant)):
            try:
                quota.check(store, ref, running, warm, sleeping)
                _check_boot_room(ctx, ref, p)
                _check_room(ctx, ref, running + warm + sleeping)
            except QuotaExceeded as e:
                store.event(Event("pool.scale-refused", e.message, Reason.QUOTA, ref.tenant, ref.pool))
                raise
            was = store.pool(ref.tenant, ref.pool)
            changed = (was.desired_running, was.desired_warm, was.desired_sleeping) != (running, warm, sleeping)
            store.set_pool_desired(ref.tenant, ref.pool, running, warm, sleeping,
                                   Event("pool.scale", f"desired running={running} warm={warm} "
                                         f"sleeping={sleeping}", tenant=ref.tenant, pool=ref.pool)
                                   if changed else None, fence=lease)
        if not p.actions():
            report(f"{ref}: already at running={running} warm={warm} sleeping={sleeping}")
        moves = []
        for inst, target in p.moves:
            if inst is None:  # created one by one: addresses are allocated in order
                inst = create(ctx, ref, Reason.SCALE, locked=True)
                report(f"{inst.id}: created")
            if inst.state is not target:
                moves.append((inst, target))
        tenant.close()  # the desired counts now reserve the quota; boots need only the pool's lock
        failed = execute(ctx, moves, report, progress, lease=lease)
        if failed:
            raise combined(failed, f"scaling {ref}")
        return store.instances(ref.tenant, ref.pool)


def execute(ctx: Host, moves: list[tuple[Instance, State]], report: Report = lambda s: None,
            progress: Progress = noop,
            reason: Callable[[Instance], Reason] = lambda i: Reason.SCALE,
            cause: Callable[[Instance], str | None] = lambda i: None, *,
            lease: Lease) -> list[MvmError]:
    """Take each instance to its target state (the caller holds the pool's `lease`); returns
    the errors of the moves that failed (the others went on). Used by `scale` and the agent."""
    getattr(ctx.runtime(), "accel", None)  # once: a KVM probe, if due, runs here, not per worker
    # What frees resources goes first, one by one; boots and wakes then run side by side,
    # each admitted by the quota when it has room (see `Room`): instances headed for sleep
    # first (they need a hypervisor only for a while), then warm, then running.
    freeing = [m for m in moves if path(m[0].state, m[1])[0] in FREEING]
    errors = [_converge(ctx, inst, target, report, progress, lease, reason=reason(inst),
                        cause=cause(inst)) for inst, target in freeing]
    rest = sorted((m for m in moves if m not in freeing), key=lambda m: HOLDS[m[1]])
    room = Room()
    with ThreadPoolExecutor(max_workers=WORKERS, thread_name_prefix="scale") as workers:
        errors += workers.map(lambda n: _in_thread(ctx, rest[n][0], rest[n][1], report,
                                                   progress, lease, room, n, reason(rest[n][0]),
                                                   cause(rest[n][0])),
                              range(len(rest)))
    return [e for e in errors if e is not None]


# The order boots go in: what holds least at the end first.
HOLDS = {State.SLEEPING: 0, State.STOPPED: 0, State.WARM: 1, State.RUNNING: 2}


def _check_boot_room(ctx: Host, ref: PoolRef, p: Plan) -> None:
    """An instance headed for sleep or warm runs on its way there (a boot or a wake): the quota
    must have room for one such beside what stays live, or the scale could never finish."""
    def boots(source: State, target: State) -> bool:
        return target is not State.RUNNING and bool(
            {Action.START, Action.WAKE, Action.RESUME} & set(path(source, target)))

    if not any(boots(i.state if i else State.CREATED, t) for i, t in p.moves):
        return
    kept = Counter(t for i, t in p.moves if i is not None and i.state is t and t.is_live())
    try:
        quota.check(ctx.store, ref, kept[State.RUNNING] + 1, kept[State.WARM], 0)
    except QuotaExceeded as e:
        if _in_flight(ctx, ref.tenant):
            return  # another command's boot may hold the room for a while: its boots wait
        raise QuotaExceeded(f"scaling {ref} boots instances on their way to sleeping or warm, and"
                            f" tenant {ref.tenant}'s quota has no room for one: "
                            + e.message.split("quota: ", 1)[-1], e.hint) from None


def _check_memory(ctx: Host, ref: PoolRef, p: Plan) -> None:
    """The host has the memory for the starts and wakes the scale makes, all at once (they run
    side by side), counting what its stops and sleeps, which go first, give back."""
    def boots(source: State, target: State) -> bool:
        return bool({Action.START, Action.WAKE} & set(path(source, target)))

    starts = sum(1 for i, t in p.moves if boots(i.state if i else State.CREATED, t))
    frees = sum(1 for i, t in p.moves if i is not None and i.state.is_live() and not t.is_live())
    admission.check_scale(ctx, ref, starts, frees)


def _check_room(ctx: Host, ref: PoolRef, total: int) -> None:
    """The host has room for the data disks the scale will make (before it makes any)."""
    pool = ctx.store.pool(ref.tenant, ref.pool)
    new = max(0, total - len(ctx.store.instances(ref.tenant, ref.pool)))
    if new and pool.data_disk:
        disks.check_room(ctx.layout.pool_dir(ref.tenant, ref.pool), new * pool.data_disk)


class Room:
    """A scale's hypervisors are admitted by the tenant's quota one by one, in plan order.

    Every action that takes more is checked against the quota, and recorded, under the quota
    lock (`apply`), counting what is in flight: so never more hypervisors, vCPUs or memory run
    than the quota allows, even for a moment (an instance headed for sleep is booted first).
    A move the quota refuses waits for one of this scale's own moves to end an action, which
    may free room, and tries again; later moves wait behind it. When none of the scale's moves
    is at work, nothing will free room: it gives up with the quota's refusal.
    """

    def __init__(self) -> None:
        self.cond = threading.Condition()
        self.turn = 0  # the move whose first action may be admitted next
        self.busy = 0  # moves admitted and at work (not waiting for room)
        self.ended = 0  # actions ended so far (each may have freed room)

    def wait_turn(self, n: int) -> None:
        with self.cond:
            self.cond.wait_for(lambda: self.turn >= n)

    def pass_turn(self, n: int) -> None:
        with self.cond:
            if self.turn == n:
                self.turn = n + 1
                self.cond.notify_all()

    def work(self, delta: int) -> None:
        with self.cond:
            self.busy += delta
            self.cond.notify_all()

    def action_ended(self) -> None:
        with self.cond:
            self.ended += 1
            self.cond.notify_all()


class _Admission:
    """One action's way through the quota, for `apply`: `first` is a move's first action (the
    move is not at work until it is admitted). With none of the scale's own moves at work, room
    can come only from another command's transition in flight: it is waited for (up to
    `ELSEWHERE_WAIT`), and given up on once nothing has been in flight for `ELSEWHERE_GRACE`
    (a command between two actions of a move has none in flight for a moment)."""

    def __init__(self, room: Room, n: int, first: bool, elsewhere: Callable[[], bool]) -> None:
        self.room, self.n, self.first, self.elsewhere = room, n, first, elsewhere
        self.admitted_ = False
        self.deadline = 0.0
        self.quiet_since: float | None = None
        with room.cond:
            self.seen = room.ended  # taken before the check, so no end after it is missed

    def refused(self, e: QuotaExceeded) -> bool:
        room = self.room
        with room.cond:
            at_work = 0 if self.first else 1
            room.busy -= at_work  # (waiting, a move frees nothing)
            try:
                room.cond.wait_for(lambda: room.ended != self.seen or room.busy == 0)
                if room.ended != self.seen:
                    self.seen = room.ended
                    return True
                now = time.monotonic()
                self.deadline = self.deadline or now + ELSEWHERE_WAIT
                if self.elsewhere():
                    self.quiet_since = None
                else:
                    self.quiet_since = self.quiet_since or now
                    if now - self.quiet_since >= ELSEWHERE_GRACE:
                        return False
                if now >= self.deadline:
                    return False
                room.cond.wait(ELSEWHERE_POLL)
                self.seen = room.ended
                return True
            finally:
                room.busy += at_work

    def admitted(self) -> None:
        self.admitted_ = True
        if self.first:
            self.room.work(+1)
            self.room.pass_turn(self.n)


ELSEWHERE_WAIT = 120.0
ELSEWHERE_GRACE = 0.5
ELSEWHERE_POLL = 0.05


def _in_flight(ctx: Host, tenant: str) -> bool:
    """A live command has a transition of the tenant's in flight (it may free room); one that
    died left its transition to the next command on that pool, and frees nothing meanwhile."""
    owners = [re.match(r"pid (\d+)", i.op.owner) for i in ctx.store.instances(tenant) if i.op]
    return any(m is None or pids.is_running(int(m.group(1))) for m in owners)


def _converge(ctx: Host, inst: Instance, target: State, report: Report, progress: Progress,
              lease: Lease, room: Room | None = None, n: int = 0, reason: Reason = Reason.SCALE,
              cause: str | None = None) -> MvmError | None:
    """Take one instance to its target state (the caller holds the pool's lock); with `room`,
    as move `n` of a scale whose actions that take more are admitted in order."""
    working = False  # counted in room.busy
    try:
        for action in path(inst.state, target):
            admission = None
            if room is not None and action in TAKES_MORE:
                if not working:
                    room.wait_turn(n)
                admission = _Admission(room, n, not working, lambda: _in_flight(ctx, inst.tenant))
            elif room is not None and not working:  # nothing to admit: at work at once
                room.work(+1)
                room.pass_turn(n)
                working = True
            try:
                i = apply(ctx, inst.ref, action, reason=reason, lease=lease, cause=cause,
                          admission=admission,
                          progress=lambda step, msg: progress(f"{inst.id} {step}", msg))
            finally:
                if room is not None:
                    working = working or (admission is not None and admission.admitted_)
                    room.pass_turn(n)  # (refused, or failed before its check)
                    room.action_ended()
            report(f"{inst.id}: {action.value} (now {i.state.value})")
        return None
    except MvmError as e:
        report(f"{inst.id}: failed: {e.line()}")
        return e
    finally:
        if room is not None:
            room.pass_turn(n)
            if working:
                room.work(-1)


def _in_thread(ctx: Host, inst: Instance, target: State, report: Report,
               progress: Progress, lease: Lease, room: Room, n: int, reason: Reason,
               cause: str | None) -> MvmError | None:
    """The same, on a store connection of the worker thread's own."""
    mine = ctx.for_thread()
    try:
        return _converge(mine, inst, target, report, progress, lease, room, n, reason, cause)
    finally:
        mine.store.close()
