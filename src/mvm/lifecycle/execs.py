"""Execs in flight, and the transitions that stop a guest's vCPUs.

A command an exec started must never be cut by a warm, sleep, stop or destroy of its
instance without its exec knowing. So an exec holds a shared lease on its instance for as
long as it talks to the guest, taken before it reads the instance's state: it goes ahead only
on a running instance with no transition in flight, and is refused otherwise, before anything
reached the guest. Such a transition records its intent first (from then on execs are
refused), then waits for the execs in flight to end — at most `DRAIN_TIMEOUT`, after which it
goes on, and an exec it cuts reports that its command started and its result was lost
(`errors.ExecLost`).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

from mvm.context import Host
from mvm.errors import Conflict, IllegalTransition
from mvm.lifecycle.run import Progress, noop
from mvm.model import Action, Instance, InstanceRef, State

#: Seconds a transition that stops the vCPUs waits for the execs in flight on its instance.
DRAIN_TIMEOUT = 30.0
STOPS_VCPUS = frozenset({Action.WARM, Action.SLEEP, Action.STOP, Action.DESTROY})


def lease_name(i: Instance) -> str:
    return f"exec-{i.tenant}--{i.pool}--{i.id}"


@contextlib.contextmanager
def running(ctx: Host, ref: InstanceRef) -> Iterator[Instance]:
    """The instance, running, with this exec counted in flight until the block ends; refused
    (nothing was sent to the guest) when it is not running or a transition is in flight."""
    i = ctx.store.instance(ref.tenant, ref.pool, ref.instance)
    with ctx.locks.shared(lease_name(i)):
        i = ctx.store.instance(ref.tenant, ref.pool, ref.instance)
        if i.op is not None:
            raise Conflict(f"cannot exec in {ref}: a {i.op.action.value} of it is in flight "
                           f"({i.op.owner})", "the command did not start: run it again when that "
                           f"has ended (`mvm instance info {ref}`)")
        if i.state is not State.RUNNING:
            hint = {State.WARM: f"resume it first: `mvm instance resume {ref}`, or exec through the"
                                " agent (`--agent`), which resumes it",
                    State.SLEEPING: f"wake it first: `mvm instance wake {ref}`, or exec through the"
                                    " agent (`--agent`), which wakes it"}.get(
                        i.state, f"start it first: `mvm instance start {ref}`")
            raise IllegalTransition(f"cannot exec in {ref}: it is {i.state.value}", hint)
        yield i


def in_flight(ctx: Host, i: Instance) -> bool:
    """Whether an exec runs in the instance now (a look, no wait)."""
    return not ctx.locks.drained(lease_name(i), 0)


def drain(ctx: Host, i: Instance, progress: Progress = noop) -> bool:
    """Before a transition that stops the vCPUs (its intent recorded: no exec starts any
    more): wait for the execs in flight, at most `DRAIN_TIMEOUT`. False: some still run."""
    return ctx.locks.drained(
        lease_name(i), DRAIN_TIMEOUT,
        lambda _: progress("exec", f"waiting for the commands exec runs in {i.ref} to end"
                                   f" (at most {DRAIN_TIMEOUT:g} s)"))


def forget(ctx: Host, i: Instance) -> None:
    """The instance is destroyed: its lease file goes."""
    ctx.locks.remove(lease_name(i))
