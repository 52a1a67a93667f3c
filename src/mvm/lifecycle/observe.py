"""Observing the hypervisors: explicitly, under the pool's lock — and, for views, read-only.

`instance()` / `pool()` (callers hold the pool's lock) finish what dead commands left (their
recorded transitions), then reconcile the store with the hypervisors: a live instance whose
hypervisor exited is failed; one the hypervisor stopped (a failed disk write, a panic) is
failed with that cause; a hypervisor of an instance the store says is not live — a command
died between boot and recording it — is ended; TAPs and secrets images of instances that do
not run are removed. Each correction is an event, in the transaction that makes it.

`probe()` only looks: `list` and `info` never write, so they work on a full disk and never
correct state under a command at work.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from pathlib import Path

from mvm.context import Host
from mvm.errors import Conflict, MvmError, NotFound, Superseded
from mvm.lifecycle import netops, secrets_disk, specs
from mvm.lifecycle.effects import recover
from mvm.model import Event, Instance, InstanceRef, PoolRef, Reason, State
from mvm.network import plan
from mvm.runtime.base import VmStatus
from mvm.store.base import Lease
from mvm.util import pids

CAUSES = {
    VmStatus.IO_ERROR: "the hypervisor stopped the guest after a disk write failed on the host "
                       "(is the disk full?)",
    VmStatus.BROKEN: "the guest cannot run (it panicked, powered off or hit a hypervisor error)",
}


def instance(ctx: Host, ref: InstanceRef, fence: Lease | None = None) -> Instance:
    """The instance, observed and repaired (the caller holds the pool's lease, `fence`: what
    is written is written under it)."""
    i = ctx.store.instance(ref.tenant, ref.pool, ref.instance)
    fixed = _observe(ctx, i, [], fence)
    if fixed is None:
        raise NotFound(f"no instance {ref}", f"it was being destroyed; see `mvm instance list {ref.pool_ref}`")
    return fixed


def pool(ctx: Host, ref: PoolRef, fence: Lease | None = None) -> list[str]:
    """Observe every instance of a pool (the caller holds its lease, `fence`); returns what
    was done."""
    done: list[str] = []
    for i in ctx.store.instances(ref.tenant, ref.pool):
        _observe(ctx, i, done, fence)
    return done


def _observe(ctx: Host, i: Instance, done: list[str], fence: Lease | None) -> Instance | None:
    if i.op is not None:
        action = i.op.action.value
        recovered = recover(ctx, i, fence=fence)
        done.append(f"{i.id}: finished an interrupted {action}"
                    + (f" (now {recovered.state.value})" if recovered else " (destroyed)"))
        if recovered is None:
            return None
        i = recovered
    return _reconcile(ctx, i, done, fence)


def _event(i: Instance, kind: str, message: str, cause: str | None = None) -> Event:
    return Event(kind, message, Reason.CRASH, i.tenant, i.pool, i.id, cause=cause)


def _reconcile(ctx: Host, i: Instance, done: list[str], fence: Lease | None) -> Instance:
    rt = specs.runtime(ctx, i)
    spec = specs.control_spec(ctx.layout, i)
    alive = rt.is_alive(spec)
    if i.state.is_live():
        if not alive:
            rt.stop(spec, 0)  # what the dead hypervisor left: sockets, pid file, its jail's cgroup
            return _fail(ctx, i, "hypervisor process exited unexpectedly", done, fence)
        try:
            status = rt.status(spec)
        except MvmError:
            return i  # alive but not answering (busy, or its sockets were removed): keep what we know
        if status.is_error():
            rt.stop(spec, 0)
            return _fail(ctx, i, CAUSES[status], done, fence)
        seen = {VmStatus.RUNNING: State.RUNNING, VmStatus.PAUSED: State.WARM}.get(status)
        if seen is not None and seen is not i.state:
            return _set(ctx, i, seen, f"the hypervisor reports the vCPUs {status.value}", done, fence)
        return i
    if alive:
        rt.stop(spec, 0)
        _note(ctx, i, "instance.orphan", "ended a hypervisor the store did not know of "
              "(a command died between boot and recording it)", done,
              f"a hypervisor ran for an instance recorded {i.state.value}")
    # (a sleeping instance keeps its TAP for a quick wake)
    tap = Path(f"/sys/class/net/{plan.tap_name(i.id)}")
    if i.state is not State.SLEEPING and i.host_index is not None and tap.exists():
        netops.instance_down(ctx, i)
        _note(ctx, i, "instance.orphan", "removed a TAP of an instance that does not run", done,
              f"a TAP was left for an instance recorded {i.state.value}")
    if secrets_disk.image_path(ctx.layout, i.id).exists():
        secrets_disk.remove(ctx.layout, i.id)
        _note(ctx, i, "instance.orphan", "removed a clear-text secrets image", done,
              f"a secrets image was left for an instance recorded {i.state.value}")
    return i


def _note(ctx: Host, i: Instance, kind: str, message: str, done: list[str],
          cause: str | None = None) -> None:
    ctx.store.event(_event(i, kind, message, cause))
    done.append(f"{i.id}: {message}")


@contextlib.contextmanager
def _unless_changed() -> Iterator[None]:
    """A correction of a state another command changed meanwhile is dropped; one made after this
    command lost the pool's lease is an error (it must stop)."""
    try:
        yield
    except Superseded:
        raise
    except Conflict:
        pass


def _set(ctx: Host, i: Instance, state: State, why: str, done: list[str],
         fence: Lease | None) -> Instance:
    with _unless_changed():
        ctx.store.update_instance(i.id, expect=i.state, fence=fence, state=state,
                                  event=_event(i, "instance.observed", f"now {state.value}: {why}",
                                               why))
    done.append(f"{i.id}: {i.state.value} -> {state.value} ({why})")
    return ctx.store.instance(i.tenant, i.pool, i.id)


def _fail(ctx: Host, i: Instance, cause: str, done: list[str], fence: Lease | None) -> Instance:
    netops.instance_down(ctx, i)
    secrets_disk.remove(ctx.layout, i.id)
    with _unless_changed():
        ctx.store.update_instance(i.id, expect=i.state, fence=fence, state=State.FAILED, pid=None,
                                  error=cause,
                                  event=_event(i, "instance.failed", cause, cause))
    done.append(f"{i.id}: failed: {cause}")
    return ctx.store.instance(i.tenant, i.pool, i.id)


def probe(ctx: Host, i: Instance) -> str:
    """What the hypervisor says, for views: '' when it agrees with the store. Never writes."""
    if i.op is not None:
        pid = _owner_pid(i.op.owner)
        if pid is not None and pids.is_running(pid):
            return f"{i.op.action.value} in progress ({i.op.owner})"
        return f"{i.op.action.value} interrupted: the next command on it finishes it"
    rt = specs.runtime(ctx, i)
    spec = specs.control_spec(ctx.layout, i)
    alive = rt.is_alive(spec)
    if i.state.is_live():
        if not alive:
            return "hypervisor gone"
        try:
            status = rt.status(spec)
        except MvmError as e:
            return f"hypervisor not answering ({e.message})"
        if status.is_error():
            return f"{status.value}: {CAUSES[status]}"
        if (status is VmStatus.PAUSED) != (i.state is State.WARM):
            return f"vCPUs {status.value}"
        return ""
    if alive:
        return "a hypervisor runs that the store does not know of"
    return ""


def _owner_pid(owner: str) -> int | None:
    parts = owner.split()
    if len(parts) >= 2 and parts[0] == "pid" and parts[1].isdigit():
        return int(parts[1])
    return None
