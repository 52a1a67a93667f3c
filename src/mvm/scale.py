"""`pool scale`: converge a pool to desired counts now, reusing instances before creating.

Policy (documented in the README): every slot is filled first by an instance already in
that state, then by the cheapest instance to convert (warm→running is a resume, sleeping→
running a wake, stopped→running a cold start), then by a new instance. Instances left
over are stopped, not destroyed: their data disks stay and the next scale-up reuses them
first. `mvm instance destroy` removes one for good.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

from mvm import instances, quota
from mvm.errors import InvalidInput, MvmError, NotFound
from mvm.model import Instance, PoolRef, State
from mvm.store import Store, pool_lock, tenant_lock

Report = Callable[[str], None]
# Boots and wakes run side by side, one per core (under TCG a boot keeps one core busy).
WORKERS = max(1, min(8, os.cpu_count() or 1))

# For each target state, which current states may fill its slot, cheapest first.
PREFERENCE: dict[State, tuple[State, ...]] = {
    State.RUNNING: (State.WARM, State.SLEEPING, State.STOPPED, State.CREATED, State.FAILED),
    State.WARM: (State.RUNNING, State.SLEEPING, State.STOPPED, State.CREATED, State.FAILED),
    State.SLEEPING: (State.WARM, State.RUNNING, State.STOPPED, State.CREATED, State.FAILED),
}

# How to get from a state to a target, as instance operations.
PATHS: dict[tuple[State, State], tuple[str, ...]] = {
    (State.WARM, State.RUNNING): ("resume",),
    (State.SLEEPING, State.RUNNING): ("wake",),
    (State.RUNNING, State.WARM): ("warm",),
    (State.SLEEPING, State.WARM): ("wake", "warm"),
    (State.RUNNING, State.SLEEPING): ("sleep",),
    (State.WARM, State.SLEEPING): ("sleep",),
}
for _s in (State.STOPPED, State.CREATED, State.FAILED):
    PATHS[(_s, State.RUNNING)] = ("start",)
    PATHS[(_s, State.WARM)] = ("start", "warm")
    PATHS[(_s, State.SLEEPING)] = ("start", "sleep")
for _s in (State.RUNNING, State.WARM, State.SLEEPING, State.FAILED):
    PATHS[(_s, State.STOPPED)] = ("stop",)

OPS = {
    "start": instances.start, "warm": instances.warm, "resume": instances.resume,
    "sleep": instances.sleep, "wake": instances.wake, "stop": instances.stop,
}


@dataclass
class Plan:
    moves: list[tuple[Instance | None, State]] = field(default_factory=list)  # None: new instance

    def actions(self) -> list[tuple[str, tuple[str, ...]]]:
        out = []
        for inst, target in self.moves:
            if inst is None:
                out.append(("new", ("create", *PATHS[(State.CREATED, target)])))
            elif inst.state is not target:
                out.append((inst.id, PATHS[(inst.state, target)]))
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


def scale(store: Store, ref: PoolRef, running: int, warm: int, sleeping: int,
          report: Report = lambda s: None,
          progress: instances.Progress = instances._noop) -> list[Instance]:
    for name, n in (("--running", running), ("--warm", warm), ("--sleeping", sleeping)):
        if n < 0:
            raise InvalidInput(f"{name} must not be negative (got {n})")
    pool = store.pool(ref.tenant, ref.pool)
    if not pool.current and running + warm + sleeping > 0:
        raise NotFound(f"pool {ref} has no built revision", f"run `mvm pool build {ref}` first")
    with tenant_lock(ref.tenant), pool_lock(ref.tenant, ref.pool):
        quota.check(store, ref, running, warm, sleeping)
        store.set_pool_desired(ref.tenant, ref.pool, running, warm, sleeping)
        current = instances.list_instances(store, ref.tenant, ref.pool, locked=True)
        p = plan(current, running, warm, sleeping)
        if not p.actions():
            report(f"{ref}: already at running={running} warm={warm} sleeping={sleeping}")
        instances.runtime()  # once: a KVM probe, if due, runs here and not in every worker
        moves = []
        for inst, target in p.moves:
            if inst is None:  # created one by one: addresses are allocated in order
                inst = instances.create(store, ref, locked=True)
                report(f"{inst.id}: created")
            if inst.state is not target:
                moves.append((inst, target))
        # What frees resources goes first, one by one; boots and wakes then run side by side.
        freeing = [m for m in moves if PATHS[(m[0].state, m[1])][0] in ("stop", "sleep")]
        errors = [_converge(store.path, inst, target, report, progress) for inst, target in freeing]
        rest = [m for m in moves if m not in freeing]
        with ThreadPoolExecutor(max_workers=WORKERS, thread_name_prefix="scale") as pool_:
            errors += pool_.map(lambda m: _converge(store.path, m[0], m[1], report, progress), rest)
        failed = [e for e in errors if e is not None]
        if failed:
            raise failed[0]
        return instances.list_instances(store, ref.tenant, ref.pool, locked=True)


def _converge(db: Path, inst: Instance, target: State, report: Report,
              progress: instances.Progress) -> MvmError | None:
    """Take one instance to its target state; its own store connection (one per thread)."""
    store = Store(db)
    try:
        for op in PATHS[(inst.state, target)]:
            OPS[op](store, inst.ref, lambda step, msg: progress(f"{inst.id} {step}", msg), locked=True)
            report(f"{inst.id}: {op} (now {_after(op).value})")
        return None
    except MvmError as e:
        report(f"{inst.id}: failed: {e.line()}")
        return e
    finally:
        store.close()


def _after(op: str) -> State:
    from mvm.model import TRANSITIONS, Action

    return TRANSITIONS[Action(op)][1]
