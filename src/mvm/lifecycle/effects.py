"""What each action does, step by step, and how a transition left half-done is finished.

Each action has `do(run)`, a list of idempotent steps each recorded when done (`Run.step`),
and `recover(run, error)`, which brings an instance whose transition did not finish — because
a step failed (`error`) or because the command died (`error is None`, found by the next
command) — to a consistent state: forward when the point of no return was passed, else back.

Two rules hold everywhere:
- A snapshot is consumed exactly once. A wake restores it paused, then records in the store
  that it is consumed, and only then lets the guest run; a sleep writes a new snapshot under a
  new name and commits it in the store. Files of a snapshot are deleted only when it is not
  the committed one and no hypervisor can map them.
- Nothing is hidden: a transition that does not end in a live state ends every hypervisor,
  TAP and clear-text secrets image it made.
"""

from __future__ import annotations

import shutil
from collections.abc import Callable
from dataclasses import dataclass

from mvm.context import Host
from mvm.errors import GuestError, MvmError
from mvm.lifecycle import execs, netops, secrets_disk, specs
from mvm.lifecycle.run import Progress, Run, noop
from mvm.model import Action, Instance, Reason, State
from mvm.runtime.base import SnapshotInfo, VmStatus
from mvm.store.base import Lease
from mvm.util import private

AGENT_READY_TIMEOUT = 120.0
STOP_TIMEOUT = 10.0
RECOVERY_AGENT_TIMEOUT = 10.0


@dataclass(frozen=True)
class Effect:
    do: Callable[[Run], Instance]
    recover: Callable[[Run, BaseException | None], Instance]


def _why(error: BaseException | None) -> str:
    if error is None:
        return "the command that ran it died"
    return error.line() if isinstance(error, MvmError) else type(error).__name__


def _recovery(run: Run, how: str, exc: BaseException | None
              ) -> tuple[str, str, Reason | None, str]:
    """The event of a transition that did not finish: kind, what was done and why, reason,
    cause."""
    kind = "instance.recovered" if exc is None else f"instance.{run.op.action.value}-failed"
    reason = Reason.CRASH if exc is None else None
    return kind, f"{run.op.action.value} {how} ({_why(exc)})", reason, _why(exc)


def _recovered(run: Run, state: State, how: str, exc: BaseException | None,
               **fields: object) -> Instance:
    """End a transition that did not finish, with an event saying why and what was done."""
    kind, message, reason, cause = _recovery(run, how, exc)
    return run.end(state, kind, message, reason, cause=str(fields.get("error") or cause), **fields)


def _running(run: Run, kind: str, message: str, reason: Reason | None, cause: str | None = None,
             **fields: object) -> Instance:
    """End a start or a wake with the guest up: no clear-text secrets image left (the hypervisor
    holds it open), the secrets version it got recorded, older snapshots swept. Its event says
    whether the hypervisor is jailed (and if not, why)."""
    secrets_disk.remove(run.ctx.layout, run.i.id)
    if (jail := run.rt.jail_of(run.control)) is not None:
        message = f"{message}; {jail}"
    i = run.end(State.RUNNING, kind, message, reason, cause=cause, error=None,
                secrets_version=int(run.op.data["secrets_version"]), **fields)
    sweep_snapshots(run, True)
    return i


# -- shared pieces ------------------------------------------------------------------------------

def halt(run: Run, graceful: bool) -> None:
    """No hypervisor afterwards. Graceful: the guest syncs its disks, then the power button."""
    spec = run.control
    if not run.rt.is_alive(spec):
        run.rt.stop(spec, 0)  # stale sockets and pid file
        return
    if run.i.unresponsive_since is not None:  # (observed not answering: nothing to ask it)
        run.rt.kill(spec)
        return
    if graceful:
        try:
            status = run.rt.status(spec)
        except MvmError:  # it does not answer (within the runtime's deadline): end it
            run.rt.kill(spec)
            return
        try:
            if status is VmStatus.PAUSED:
                run.rt.resume(spec)
            # Flush the guest's page cache to the data disk first, so a stop (or a destroy
            # --keep-data) never loses what the guest wrote.
            run.rt.agent(spec).sleep_prep()
        except MvmError:
            graceful = False
    run.rt.stop(spec, STOP_TIMEOUT if graceful else 0)


def release_guest(run: Run) -> None:
    """What a VM that no longer runs leaves: its secrets image and its TAP."""
    secrets_disk.remove(run.ctx.layout, run.i.id)
    netops.instance_down(run.ctx, run.i)


def sweep_snapshots(run: Run, hypervisor_alive: bool) -> None:
    """Delete every snapshot but the committed one — never under a hypervisor that maps it."""
    if hypervisor_alive and run.rt.maps_snapshot_while_running:
        return
    root = specs.snapshots_dir(run.ctx.layout, run.i)
    if not root.is_dir():
        return
    keep = run.i.snapshot
    for d in root.iterdir():
        if d.name != keep:
            if d.is_dir():
                shutil.rmtree(d, ignore_errors=True)
            else:
                d.unlink(missing_ok=True)


def _holding_secrets(run: Run, open_vm: Callable[[], None]) -> None:
    """Boot or restore, then unlink the clear-text secrets image: the hypervisor holds it open
    (a restore re-delivers one built by the wake, at the same path)."""
    open_vm()
    secrets_disk.remove(run.ctx.layout, run.i.id)


# -- start ----------------------------------------------------------------------------------------

def start_do(run: Run) -> Instance:
    spec = run.spec
    run.step("network", lambda: netops.instance_up(run.ctx, run.i))
    run.step("secrets", lambda: secrets_disk.build(run.ctx.layout, run.i.tenant, run.i.id))
    run.step("boot", lambda: _holding_secrets(run, lambda: run.rt.boot(spec)))
    run.step("agent", lambda: run.rt.agent(spec).wait_ready(AGENT_READY_TIMEOUT))
    rev = run.op.data["revision"]
    return _running(run, "instance.start", f"running revision {rev}", None, revision=rev, snapshot=None)


def start_recover(run: Run, error: BaseException | None) -> Instance:
    if error is None and run.op.done("agent") and run.alive():
        return _running(run, *_recovery(run, "finished: the guest was up", error),
                        revision=run.op.data["revision"], snapshot=None)
    halt(run, graceful=False)
    release_guest(run)
    return _recovered(run, run.op.source, "rolled back: nothing of it runs", error)


# -- warm, resume ----------------------------------------------------------------------------------

def vcpus_do(run: Run) -> Instance:
    spec = run.spec
    if run.op.action is Action.WARM:
        run.step("vcpus", lambda: run.rt.pause(spec))
        return run.end(State.WARM, "instance.warm", "vCPUs paused")
    run.step("vcpus", lambda: run.rt.resume(spec))
    return run.end(State.RUNNING, "instance.resume", "vCPUs running")


def vcpus_recover(run: Run, error: BaseException | None) -> Instance:
    """Whatever the hypervisor now says is the truth."""
    try:
        status = run.rt.status(run.control)
    except MvmError:
        return _recovered(run, run.op.source, "left as it was: the hypervisor does not answer", error)
    if status is VmStatus.RUNNING:
        return _recovered(run, State.RUNNING, "ended with the vCPUs running", error)
    if status is VmStatus.PAUSED:
        return _recovered(run, State.WARM, "ended with the vCPUs paused", error)
    return gone(run, error)


def gone(run: Run, error: BaseException | None, cause: str = "its hypervisor is gone") -> Instance:
    halt(run, graceful=False)
    release_guest(run)
    sweep_snapshots(run, False)
    return _recovered(run, State.FAILED, f"failed: {cause}", error, pid=None,
                      error=f"{cause} ({_why(error)})")


# -- sleep ------------------------------------------------------------------------------------------

def sleep_do(run: Run) -> Instance:
    spec = run.spec
    name = run.op.data["snapshot"]
    if run.op.source is State.WARM:
        run.step("resume", lambda: run.rt.resume(spec))  # the guest must run to sync its disks
    unprepared = run.step("prep", lambda: _sleep_prep(run))
    # Commits the snapshot's manifest, then ends the hypervisor: the VM never runs again.
    run.step("snapshot", lambda: run.rt.snapshot(spec, specs.snapshot_dir(run.ctx.layout, run.i, name)))
    secrets_disk.remove(run.ctx.layout, run.i.id)  # the TAP stays (it holds no RAM): a wake plugs straight back in
    i = run.end(State.SLEEPING, "instance.sleep", f"snapshotted to disk as {name}{unprepared or ''}",
                snapshot=name, pid=None)
    sweep_snapshots(run, False)
    return i


def _sleep_prep(run: Run) -> str:
    """The guest syncs its disks and drops its clean caches. A guest whose agent does not answer
    as it should (hung, broken, or replaced by its tenant, who is root in it) is snapshotted
    all the same, so that it cannot keep host memory by refusing to sleep: the snapshot is still
    consistent (QEMU flushes the disks when it stops the VM to save it), only larger, and its wake
    sets the clock without the setter the prep arms. Returns what the event should say."""
    try:
        run.rt.agent(run.spec).sleep_prep()
    except GuestError as e:
        if not run.alive():
            raise
        return f" (the guest did not prepare: {e.message.splitlines()[0]})"
    return ""


def sleep_recover(run: Run, error: BaseException | None) -> Instance:
    name = run.op.data["snapshot"]
    if SnapshotInfo.committed(specs.snapshot_dir(run.ctx.layout, run.i, name)):
        # Past the point of no return: the disks belong to the snapshot now.
        halt(run, graceful=False)
        secrets_disk.remove(run.ctx.layout, run.i.id)
        i = _recovered(run, State.SLEEPING, f"finished: snapshot {name} was committed", error,
                       snapshot=name, pid=None)
        sweep_snapshots(run, False)
        return i
    shutil.rmtree(specs.snapshot_dir(run.ctx.layout, run.i, name), ignore_errors=True)
    if not run.alive():
        return gone(run, error)
    # The VM runs on: back to where it was, the guest's clock untouched (no time was lost).
    try:
        if run.op.source is State.WARM:
            run.rt.pause(run.control)
        else:
            run.rt.resume(run.control)
    except MvmError:
        return gone(run, error, "its hypervisor does not answer")
    return _recovered(run, run.op.source, "rolled back: the VM runs on, no snapshot kept", error)


# -- wake -------------------------------------------------------------------------------------------

def wake_do(run: Run) -> Instance:
    spec = run.spec
    name = run.op.data["snapshot"]
    fresh = run.op.data.get("fresh_secrets") == "1"
    run.step("network", lambda: netops.instance_up(run.ctx, run.i))  # the TAP kept at sleep
    run.step("secrets", lambda: secrets_disk.build(run.ctx.layout, run.i.tenant, run.i.id))
    run.step("restore", lambda: _holding_secrets(  # paused
        run, lambda: run.rt.restore(spec, specs.snapshot_dir(run.ctx.layout, run.i, name))))
    # The point of no return, before the guest runs: the snapshot can never be restored again.
    run.step("consume", lambda: None, snapshot=None)
    run.step("resume", lambda: run.rt.resume(spec))
    run.step("agent", lambda: run.rt.agent(spec).wake(fresh_secrets=fresh))
    return _running(run, "instance.wake", "restored from snapshot", None)


def wake_recover(run: Run, error: BaseException | None) -> Instance:
    name = run.op.data["snapshot"]
    if not run.op.done("consume"):
        # The restored guest never ran: end its hypervisor, keep the snapshot for the next wake
        # (or, when it was refused as damaged, for inspection: its failure stays on the instance).
        halt(run, graceful=False)
        secrets_disk.remove(run.ctx.layout, run.i.id)
        failed = {"error": f"wake failed: {_why(error)}"} if error is not None else {}
        return _recovered(run, State.SLEEPING, f"rolled back: snapshot {name} kept", error,
                          snapshot=name, **failed)
    if not run.alive():
        return gone(run, error, "its hypervisor is gone after the snapshot was consumed")
    try:
        spec = run.control
        run.rt.resume(spec)
        if not run.op.done("agent"):
            fresh = run.op.data.get("fresh_secrets") == "1"
            run.rt.agent(spec).wake(fresh_secrets=fresh, timeout=RECOVERY_AGENT_TIMEOUT)
    except MvmError as e:
        return gone(run, error, f"the woken guest does not answer ({e.line()})")
    return _running(run, *_recovery(run, "finished: the woken guest runs", error))


# -- stop, destroy ------------------------------------------------------------------------------------

def stop_do(run: Run) -> Instance:
    graceful = run.op.source in (State.RUNNING, State.WARM)
    run.step("halt", lambda: halt(run, graceful))
    run.step("release", lambda: release_guest(run))
    # (a stopped instance has no hypervisor to report on: a failed one's cause is in its events)
    i = run.end(State.STOPPED, "instance.stop", "stopped", pid=None, snapshot=None, error=None)
    sweep_snapshots(run, False)
    return i


def stop_recover(run: Run, error: BaseException | None) -> Instance:
    halt(run, graceful=False)
    release_guest(run)
    i = _recovered(run, State.STOPPED, "finished", error, pid=None, snapshot=None, error=None)
    sweep_snapshots(run, False)
    return i


def destroy_do(run: Run) -> Instance:
    graceful = run.op.source in (State.RUNNING, State.WARM)
    run.step("halt", lambda: halt(run, graceful))
    return _destroy_rest(run)


def _destroy_rest(run: Run) -> Instance:
    i = run.i
    netops.release(run.ctx, i)
    secrets_disk.remove(run.ctx.layout, i.id)
    kept = run.op.data.get("kept", "")
    data = specs.data_disk_path(run.ctx.layout, i)
    if kept and data.exists():
        # outside the pool: a later `pool destroy` must not take what the user kept
        dest = run.ctx.layout.tenant_dir(i.tenant) / kept
        private.mkdirs(dest.parent)
        data.rename(dest)
    shutil.rmtree(specs.instance_dir(run.ctx.layout, i), ignore_errors=True)
    shutil.rmtree(run.ctx.layout.runtime_dir() / i.id, ignore_errors=True)
    execs.forget(run.ctx, i)
    note = f" (data kept at {run.ctx.layout.tenant_dir(i.tenant) / kept})" if kept else ""
    run.store.remove_instance(i.id, run.event("instance.destroy", f"destroyed{note}"), fence=run.fence)
    return i


def destroy_recover(run: Run, error: BaseException | None) -> Instance:
    halt(run, graceful=False)
    return _destroy_rest(run)


EFFECTS: dict[Action, Effect] = {
    Action.START: Effect(start_do, start_recover),
    Action.WARM: Effect(vcpus_do, vcpus_recover),
    Action.RESUME: Effect(vcpus_do, vcpus_recover),
    Action.SLEEP: Effect(sleep_do, sleep_recover),
    Action.WAKE: Effect(wake_do, wake_recover),
    Action.STOP: Effect(stop_do, stop_recover),
    Action.DESTROY: Effect(destroy_do, destroy_recover),
}


def recover(ctx: Host, i: Instance, progress: Progress = noop,
            fence: Lease | None = None) -> Instance | None:
    """Finish a transition a dead command left (the caller holds the pool's lease, `fence`).
    Returns the instance as it now is, or None if it was being destroyed and now is."""
    assert i.op is not None
    run = Run(ctx, i, progress, Reason.CRASH, fence=fence)
    out = EFFECTS[i.op.action].recover(run, None)
    return None if i.op.action is Action.DESTROY else out
