"""Instances as users see them: views (read-only), exec, console, and secrets re-delivery.

State changes go through `lifecycle.apply`; nothing here writes the store on a read path.
"""

from __future__ import annotations

from dataclasses import dataclass

from mvm.context import Host
from mvm.errors import MvmError, combined
from mvm.guest.agent_client import EXEC_OUTPUT_LIMIT, ExecResult, check_exec_limits
from mvm.lifecycle import apply, execs, observe, secrets_disk, specs
from mvm.lifecycle.run import Progress, noop
from mvm.model import Action, Event, Instance, InstanceRef, Reason, State
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
