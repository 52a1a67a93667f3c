"""Instances as users see them: views (read-only), create, transitions, destroy, observe,
exec (also for work arriving at the agent), console, and secrets re-delivery.

State changes go through `lifecycle.apply`; nothing here writes the store on a read path.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from mvm.context import Host
from mvm.errors import Conflict, IllegalTransition, MvmError, combined
from mvm.guest.agent_client import EXEC_OUTPUT_LIMIT, ExecResult, check_exec_limits
from mvm.lifecycle import apply, execs, observe, secrets_disk, specs
from mvm.lifecycle import create as lifecycle_create
from mvm.lifecycle.apply import pool_locked
from mvm.lifecycle.run import Progress, noop
from mvm.model import Action, Event, Instance, InstanceRef, PoolRef, Reason, State
from mvm.runtime import console as console_log


@dataclass(frozen=True)
class View:
    """An instance with what its hypervisor says (`observed`: empty when it agrees)."""

    instance: Instance
    observed: str


def views(ctx: Host, tenant: str | None = None, pool: str | None = None) -> list[View]:
    return [View(i, observe.probe(ctx, i)) for i in ctx.store.instances(tenant, pool)]


def view(ctx: Host, ref: InstanceRef) -> View:
    i = ctx.store.instance(ref.tenant, ref.pool, ref.instance)
    return View(i, observe.probe(ctx, i))


def create(ctx: Host, ref: PoolRef) -> Instance:
    """A new instance (state created) in the pool."""
    return lifecycle_create(ctx, ref)


def transition(ctx: Host, ref: InstanceRef, action: Action, progress: Progress = noop,
               keep_data: bool = False) -> Instance:
    """One state change asked for by a user (reason `user`)."""
    return apply(ctx, ref, action, progress=progress, keep_data=keep_data)


def destroy(ctx: Host, ref: InstanceRef, keep_data: bool = False) -> Path | None:
    """Destroy the instance; returns where its data disk was kept (`keep_data` and it had one)."""
    apply(ctx, ref, Action.DESTROY, keep_data=keep_data)
    kept = ctx.layout.tenant_dir(ref.tenant) / specs.kept_data(ref.pool, ref.instance)
    return kept if keep_data and kept.exists() else None


def observe_pool(ctx: Host, ref: PoolRef) -> list[str]:
    """Reconcile a pool's instances with their hypervisors, under the pool's lease; returns what
    was done."""
    ctx.store.pool(ref.tenant, ref.pool)
    with pool_locked(ctx, ref, None) as lease:
        return observe.pool(ctx, ref, lease)


def exec_for_work(ctx: Host, ref: InstanceRef, argv: list[str], timeout: float = 60.0,
                  output_limit: int = EXEC_OUTPUT_LIMIT) -> tuple[ExecResult, str | None]:
    """Work arriving: a warm instance is resumed and a sleeping one woken (reason `work`),
    then the command runs. A transition in flight on the instance is waited for first.
    Returns the result and the action that brought the instance back (None: it ran)."""
    check_exec_limits(timeout, output_limit)
    brought: str | None = None
    for attempt in range(3):  # (an idle policy may put it back between the two)
        i = ctx.store.instance(ref.tenant, ref.pool, ref.instance)
        if i.op is not None:  # its command holds the pool's lock until it has ended
            with pool_locked(ctx, ref.pool_ref, None) as lease:
                i = observe.instance(ctx, ref, lease)
        back = {State.WARM: Action.RESUME, State.SLEEPING: Action.WAKE}.get(i.state)
        if back is not None:
            apply(ctx, ref, back, reason=Reason.WORK)
            brought = back.value
        try:
            return exec_(ctx, ref, argv, timeout, output_limit), brought
        except (IllegalTransition, Conflict):  # (the command did not start)
            now = ctx.store.instance(ref.tenant, ref.pool, ref.instance)
            if attempt == 2 or (now.op is None and now.state not in (State.WARM, State.SLEEPING)):
                raise
    raise AssertionError("unreachable")


def exec_(ctx: Host, ref: InstanceRef, argv: list[str], timeout: float = 60.0,
          output_limit: int = EXEC_OUTPUT_LIMIT) -> ExecResult:
    """Run a command in a running instance. Every failure says whether the command started:
    `errors.ExecLost` when it did (or may have), any other error when it did not. A warm,
    sleep or stop of the instance waits for it (`lifecycle.execs`)."""
    check_exec_limits(timeout, output_limit)
    with execs.running(ctx, ref) as i:
        assert i.revision
        rt = specs.runtime(ctx, i)
        with rt.agent(specs.control_spec(ctx.layout, i)) as ag:
            return ag.exec(argv, timeout=timeout, output_limit=output_limit)


def console(ctx: Host, ref: InstanceRef) -> bytes:
    """The console kept (at most twice the cap: the log and the one before it), as the guest
    wrote it: escape it before it goes to a terminal (`util.text.printable`)."""
    i = ctx.store.instance(ref.tenant, ref.pool, ref.instance)
    return console_log.read(specs.runtime(ctx, i).console_log(specs.control_spec(ctx.layout, i)))


def redeliver_secrets(ctx: Host, tenant: str, progress: Progress = noop) -> list[str]:
    """Restart running/warm instances holding old secrets, each on the revision it runs;
    sleeping ones get the new secrets at wake. Returns what was restarted. A failure of one is
    reported and the others still go; all failures are in the error.

    Nothing is stopped unless the secrets disk a start builds can be built now: secrets that
    cannot be delivered leave every instance running as it was."""
    t = ctx.store.tenant(tenant)
    stale = [i for i in ctx.store.instances(tenant)
             if i.state in (State.RUNNING, State.WARM) and i.secrets_version < t.secrets_version]
    if stale:  # (a trial image, never named)
        secrets_disk.check(ctx.layout, tenant)
    done: list[str] = []
    failed: list[MvmError] = []
    for i in stale:
        was_warm = i.state is State.WARM
        try:
            apply(ctx, i.ref, Action.STOP, reason=Reason.SECRETS, progress=progress)
            apply(ctx, i.ref, Action.START, reason=Reason.SECRETS, progress=progress,
                  revision=i.revision)
            if was_warm:
                apply(ctx, i.ref, Action.WARM, reason=Reason.SECRETS, progress=progress)
            done.append(str(i.ref))
        except MvmError as e:
            progress(str(i.ref), f"failed: {e.line()}")
            failed.append(e)
    if stale:
        ctx.store.event(Event("tenant.secrets-rotate", f"secrets version {t.secrets_version} "
                              f"re-delivered to {len(done)} of {len(stale)} instance(s) by restarting"
                              f" them{': ' + ', '.join(done) if done else ''}", Reason.SECRETS,
                              tenant, cause="; ".join(e.line() for e in failed) or None))
    if failed:
        raise combined(failed, "secrets re-delivery")
    return done
