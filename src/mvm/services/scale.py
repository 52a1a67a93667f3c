"""`pool scale`: converge a pool to desired counts now, reusing instances before creating.

Policy (documented in the README): every slot is filled first by an instance already in
that state, then by the cheapest instance to convert (warm→running is a resume, sleeping→
running a wake, stopped→running a cold start), then by a new instance. Instances left
over are stopped, not destroyed: their data disks stay and the next scale-up reuses them
first. `mvm instance destroy` removes one for good.

Every move is a path of actions through the one transition table (`model.TRANSITIONS`),
each taken by `lifecycle.apply`. The tenant's lock is held only while quotas are checked,
the desired counts recorded and new instances given addresses; boots and wakes run under the
pool's lock alone, side by side.
"""

from __future__ import annotations

import contextlib
import os
from collections import deque
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from functools import cache

from mvm.config.host import Host
from mvm.errors import InvalidInput, MvmError, NotFound, QuotaExceeded, combined
from mvm.lifecycle import apply, create, observe, quota
from mvm.lifecycle.run import Progress, noop
from mvm.model import TRANSITIONS, Action, Event, Instance, PoolRef, Reason, State
from mvm.store.locks import pool_lock_name, tenant_lock_name

Report = Callable[[str], None]
# Boots and wakes run side by side, one per core (under TCG a boot keeps one core busy).
WORKERS = max(1, min(8, os.cpu_count() or 1))

# For each target state, which current states may fill its slot, cheapest first.
PREFERENCE: dict[State, tuple[State, ...]] = {
    State.RUNNING: (State.WARM, State.SLEEPING, State.STOPPED, State.CREATED, State.FAILED),
    State.WARM: (State.RUNNING, State.SLEEPING, State.STOPPED, State.CREATED, State.FAILED),
    State.SLEEPING: (State.WARM, State.RUNNING, State.STOPPED, State.CREATED, State.FAILED),
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
        outer.enter_context(ctx.locks.lock(pool_lock_name(ref.tenant, ref.pool)))
        for line in observe.pool(ctx, ref):  # what dead commands and hypervisors left
            report(line)
        try:
            quota.check(store, ref, running, warm, sleeping)
        except QuotaExceeded as e:
            store.event(Event("pool.scale-refused", e.message, Reason.QUOTA, ref.tenant, ref.pool))
            raise
        store.set_pool_desired(ref.tenant, ref.pool, running, warm, sleeping)
        p = plan(store.instances(ref.tenant, ref.pool), running, warm, sleeping)
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
        getattr(ctx.runtime(), "accel", None)  # once: a KVM probe, if due, runs here, not per worker
        # What frees resources goes first, one by one; boots and wakes then run side by side.
        freeing = [m for m in moves if path(m[0].state, m[1])[0] in FREEING]
        errors = [_converge(ctx, inst, target, report, progress) for inst, target in freeing]
        rest = [m for m in moves if m not in freeing]
        with ThreadPoolExecutor(max_workers=WORKERS, thread_name_prefix="scale") as workers:
            errors += workers.map(lambda m: _in_thread(ctx, m[0], m[1], report, progress), rest)
        failed = [e for e in errors if e is not None]
        if failed:
            raise combined(failed, f"scaling {ref}")
        return store.instances(ref.tenant, ref.pool)


def _converge(ctx: Host, inst: Instance, target: State, report: Report,
              progress: Progress) -> MvmError | None:
    """Take one instance to its target state (the caller holds the pool's lock)."""
    try:
        for action in path(inst.state, target):
            i = apply(ctx, inst.ref, action, reason=Reason.SCALE, locked=True, quota_checked=True,
                      progress=lambda step, msg: progress(f"{inst.id} {step}", msg))
            report(f"{inst.id}: {action.value} (now {i.state.value})")
        return None
    except MvmError as e:
        report(f"{inst.id}: failed: {e.line()}")
        return e


def _in_thread(ctx: Host, inst: Instance, target: State, report: Report,
               progress: Progress) -> MvmError | None:
    """The same, on a store connection of the worker thread's own."""
    mine = ctx.for_thread()
    try:
        return _converge(mine, inst, target, report, progress)
    finally:
        mine.store.close()
