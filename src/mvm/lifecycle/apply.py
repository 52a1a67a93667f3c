"""`apply`: the one entry point that changes an instance's state.

The CLI, `pool scale`, secrets re-delivery (and later the agent and the REST API) call it.
Its skeleton is written once: take the locks → observe the instance (finishing whatever a
dead command left) → guard the transition → check quotas → record the intent → run the
action's steps (each recorded when done) → end in one transaction with its event. A failing
step runs the same recovery a later command would run after a crash.
"""

from __future__ import annotations

import contextlib
import secrets
import time
from collections.abc import Iterator
from typing import Protocol

from mvm.context import Host
from mvm.errors import MvmError, NotFound, QuotaExceeded, RuntimeFailure, Superseded
from mvm.lifecycle import admission as memory
from mvm.lifecycle import execs, observe, quota, specs
from mvm.lifecycle.effects import EFFECTS
from mvm.lifecycle.run import Progress, Run, noop
from mvm.model import Action, Event, Instance, InstanceRef, Op, PoolRef, Reason, State, transition
from mvm.store.base import Lease
from mvm.store.locks import pool_lock_name, quota_lock_name

# Actions that may take more of the tenant's quota: checked, and their intent recorded, under
# the tenant's quota lock.
TAKES_MORE = frozenset({Action.START, Action.WARM, Action.RESUME, Action.WAKE})
# Actions that ask the live hypervisor to act: refused while it does not answer (observe.py).
NEEDS_ANSWER = frozenset({Action.WARM, Action.RESUME, Action.SLEEP})


class Admission(Protocol):
    """How a caller that runs several transitions (`pool scale`) has one refused by the quota
    wait for room instead of failing."""

    def refused(self, e: QuotaExceeded) -> bool:
        """Wait for room (the quota lock is not held); True: check again, False: give up."""

    def admitted(self) -> None:
        """The transition is recorded: it now counts against the quota."""


@contextlib.contextmanager
def pool_locked(ctx: Host, ref: PoolRef, held: Lease | None) -> Iterator[Lease]:
    """The pool's lease: `held` (the caller holds it), else taken here."""
    if held is not None:
        yield held
    else:
        with ctx.locks.lock(pool_lock_name(ref.tenant, ref.pool)) as lease:
            yield lease


def apply(ctx: Host, ref: InstanceRef, action: Action, *, reason: Reason = Reason.USER,
          progress: Progress = noop, revision: str | None = None, keep_data: bool = False,
          lease: Lease | None = None, admission: Admission | None = None,
          cause: str | None = None) -> Instance:
    """Take `ref` through `action`.

    `cause`: what made the caller act (e.g. the idle measurement behind a policy move), kept
    in the event that ends the transition.

    `lease`: the pool's lease, which the caller holds (else apply takes it). Every write of
    the transition is made under it (fenced): once another command got the pool's lock, this
    one writes nothing more. Lock order is always tenant, pool, quota; the quota lock is held
    only while quotas are checked and the intent recorded, never across a boot, so every
    hypervisor that starts was counted against the quota before it did.
    """
    with pool_locked(ctx, ref.pool_ref, lease) as fence:
        i = observe.instance(ctx, ref, fence)
        target = transition(i.state, action)
        if action in NEEDS_ANSWER and i.unresponsive_since is not None:
            raise RuntimeFailure(
                f"cannot {action.value} {ref}: its hypervisor does not answer ({i.unresponsive_cause})",
                f"it is ended after its pool's unresponsive grace ({observe.grace(ctx, i):g} s) and"
                f" started again by the agent or `mvm pool scale`; or stop it now: `mvm instance stop {ref}`")
        op = _intent(ctx, i, action, target, revision, keep_data)
        i = _begin(ctx, i, op, admission, fence)
        return _run(ctx, i, progress, reason, cause, fence)


def _begin(ctx: Host, i: Instance, op: Op, admission: Admission | None, fence: Lease) -> Instance:
    """Record the intent: for an action that takes more, only when the tenant's quota has room
    for the instance in its target state, checked and recorded in one critical section; for a
    start or wake, only when the host has the memory (`lifecycle.admission`: a refusal fails
    at once, even in a scale, and records nothing but its event)."""
    if op.action not in TAKES_MORE:
        return ctx.store.begin_op(i.id, op, fence=fence)
    while True:
        with ctx.locks.lock(quota_lock_name(i.tenant)):
            try:
                quota.check_transition(ctx.store, i, op.target)
            except QuotaExceeded as e:
                refused = e
            else:
                memory.check(ctx, i, op.action)
                begun = ctx.store.begin_op(i.id, op, fence=fence)
                if admission is not None:
                    admission.admitted()
                return begun
        if admission is None or not admission.refused(refused):
            ctx.store.event(Event(f"instance.{op.action.value}-refused", refused.message,
                                  Reason.QUOTA, i.tenant, i.pool, i.id,
                                  cause=refused.message.split("quota: ", 1)[-1]))
            raise refused


def _run(ctx: Host, i: Instance, progress: Progress, reason: Reason, cause: str | None,
         fence: Lease) -> Instance:
    assert i.op is not None
    run = Run(ctx, i, progress, reason, cause, fence)
    effect = EFFECTS[i.op.action]
    if i.op.action in execs.STOPS_VCPUS and not execs.drain(ctx, i, progress):
        progress("exec", f"going on after {execs.DRAIN_TIMEOUT:g} s: the execs still in flight"
                         " report that their command's result was lost")
    try:
        return effect.do(run)
    except Superseded:
        raise  # (the transition is no longer this command's: its new owner finishes it)
    except BaseException as e:
        # Ctrl-C too: the same recovery the next command would run after a crash (a kill
        # leaves the recorded transition for that next command).
        try:
            effect.recover(run, e)
        except BaseException as again:
            e.add_note(f"recovery failed too: {again}; the next command on it retries")
        raise


def _intent(ctx: Host, i: Instance, action: Action, target: State, revision: str | None,
            keep_data: bool) -> Op:
    """The transition to record before acting, with what its steps need to know; refuses
    (changing nothing) what cannot work."""
    store = ctx.store
    data: dict[str, str] = {}
    if action is Action.START:
        pool = store.pool(i.tenant, i.pool)
        rev = revision or pool.current
        if not rev:
            raise NotFound(f"pool {i.tenant}/{i.pool} has no built revision",
                           f"run `mvm pool build {i.tenant}/{i.pool}` first")
        data["revision"] = rev
        data["secrets_version"] = str(store.tenant(i.tenant).secrets_version)
        specs.spec_for(ctx, i, rev)  # its files exist
    elif action is Action.SLEEP:
        data["snapshot"] = f"{time.strftime('%Y%m%dT%H%M%S', time.gmtime(ctx.clock()))}-{secrets.token_hex(3)}"
    elif action is Action.WAKE:
        if not i.snapshot:
            raise MvmError(f"{i.ref} is sleeping but has no committed snapshot to restore",
                           f"start it cold: `mvm instance stop {i.ref}` then `mvm instance start {i.ref}`")
        version = store.tenant(i.tenant).secrets_version
        data["snapshot"] = i.snapshot
        data["secrets_version"] = str(version)
        data["fresh_secrets"] = "1" if i.secrets_version != version else ""
    elif action is Action.DESTROY and keep_data and specs.data_disk_path(ctx.layout, i).exists():
        data["kept"] = specs.kept_data(i.pool, i.id)
    return Op(action, target, i.state, data=data, owner=ctx.locks.owner, started=ctx.clock())
