"""Observing the hypervisors: explicitly, under the pool's lock — and, for views, read-only.

`instance()` / `pool()` (callers hold the pool's lock) finish what dead commands left (their
recorded transitions), then reconcile the store with the hypervisors: a live instance whose
hypervisor exited is failed; one the hypervisor stopped (a failed disk write, a panic) is
failed with that cause; a hypervisor of an instance the store says is not live — a command
died between boot and recording it — is ended; TAPs and secrets images of instances that do
not run, and clear-text secrets no command will finish (`sweep`), are removed. Each
correction is an event, in the transaction that makes it, and is recorded before the world is
changed: a store that cannot record it (a full disk) leaves
everything as it was, and the cause recorded is the one observed.

A live hypervisor that does not answer its control socket within the runtime's deadline
(`runtime.base.CONTROL_DEADLINE`: hung, stopped, or its run directory removed) is
**unresponsive**: recorded with its cause (event `instance.unresponsive`) and, once it has not
answered for its pool's `unresponsive_grace`, ended and failed (to be started again by `pool
scale` or the agent). Hypervisors are asked all at once (`Probes`), so a silent one holds up
no other.

`probe()` only looks: `list` and `info` never write, so they work on a full disk and never
correct state under a command at work.
"""

from __future__ import annotations

import concurrent.futures as cf
import threading
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path

from mvm.context import Host
from mvm.errors import Conflict, MvmError, NotFound, RuntimeFailure, Superseded
from mvm.lifecycle import netops, secrets_disk, specs
from mvm.lifecycle.effects import recover
from mvm.model import Event, Instance, InstanceRef, Pool, PoolRef, Reason, State
from mvm.network import plan
from mvm.runtime.base import Runtime, VmSpec, VmStatus
from mvm.store.base import Lease
from mvm.util import pids

CAUSES = {
    VmStatus.IO_ERROR: "the hypervisor stopped the guest after a disk write failed on the host "
                       "(is the disk full?)",
    VmStatus.BROKEN: "the guest cannot run (it panicked, powered off or hit a hypervisor error)",
}
#: Probes running at once (each ends by its runtime's deadline).
PROBE_WORKERS = 16


@dataclass(frozen=True)
class Answer:
    """What a hypervisor said when asked how it is (`Runtime.status`)."""

    status: VmStatus | None  # None: it did not answer (unresponsive)
    cause: str = ""  # why it did not
    at: float = 0.0  # when it was asked (the host's clock)
    pid: int | None = None  # which hypervisor was asked (an answer of another is no answer)


def ask(rt: Runtime, spec: VmSpec, at: float) -> Answer:
    pid = rt.pid(spec)
    try:
        return Answer(rt.status(spec), at=at, pid=pid)
    except RuntimeFailure as e:
        if not rt.is_alive(spec):
            return Answer(VmStatus.GONE, at=at, pid=pid)
        return Answer(None, e.message, at, pid)


class Probes:
    """Hypervisors asked how they are, each on a thread of its own (every ask ends by the
    runtime's deadline), so that a silent one holds up no other.

    `wait`: seconds `answers` waits for probes still out; None: until they end (a command: at
    most the deadline). The agent keeps one `Probes` across passes with a short wait: a probe
    still waiting for a silent hypervisor stays out, its instance is kept as it is for that
    pass, and its answer is taken at a later one (`late` is called when such an answer comes,
    so that the next pass can start at once). Thread-safe."""

    def __init__(self, wait: float | None = None, late: Callable[[], None] = lambda: None) -> None:
        self.wait = wait
        self.late = late
        self._lock = threading.Lock()
        self._out: dict[str, cf.Future[Answer]] = {}
        self._workers = cf.ThreadPoolExecutor(PROBE_WORKERS, thread_name_prefix="probe")

    def answers(self, ctx: Host, instances: Iterable[Instance]) -> dict[str, Answer | None]:
        """An answer for every live instance without a transition in flight: asked now unless
        a probe of it is still out; None for one still waited for."""
        asked: dict[str, cf.Future[Answer]] = {}
        for i in instances:
            if not i.state.is_live() or i.op is not None:
                continue
            with self._lock:
                fut = self._out.get(i.id)
                if fut is None:
                    rt, spec = specs.runtime(ctx, i), specs.control_spec(ctx.layout, i)
                    fut = self._workers.submit(ask, rt, spec, ctx.clock())
                    self._out[i.id] = fut
            asked[i.id] = fut
        cf.wait(asked.values(), timeout=self.wait)
        out: dict[str, Answer | None] = {}
        for iid, fut in asked.items():
            if fut.done():
                with self._lock:
                    if self._out.get(iid) is fut:
                        del self._out[iid]
                out[iid] = fut.result()
            else:
                out[iid] = None
                if not getattr(fut, "mvm_late", False):
                    fut.mvm_late = True  # type: ignore[attr-defined]
                    fut.add_done_callback(lambda _: self.late())
        return out

    def waiting(self, iid: str) -> bool:
        """Whether a probe of the instance is still out (its hypervisor has not answered yet)."""
        with self._lock:
            fut = self._out.get(iid)
        return fut is not None and not fut.done()

    def close(self) -> None:
        self._workers.shutdown(wait=False, cancel_futures=True)


def instance(ctx: Host, ref: InstanceRef, fence: Lease | None = None) -> Instance:
    """The instance, observed and repaired (the caller holds the pool's lease, `fence`: what
    is written is written under it)."""
    i = ctx.store.instance(ref.tenant, ref.pool, ref.instance)
    sweep(ctx)
    fixed = _observe(ctx, i, [], None, fence)
    if fixed is None:
        raise NotFound(f"no instance {ref}", f"it was being destroyed; see `mvm instance list {ref.pool_ref}`")
    return fixed


def pool(ctx: Host, ref: PoolRef, fence: Lease | None = None, probes: Probes | None = None) -> list[str]:
    """Observe every instance of a pool (the caller holds its lease, `fence`); returns what was
    done. `probes`: the agent's, kept across passes (else its hypervisors are asked here, at once)."""
    done = sweep(ctx)
    current = ctx.store.instances(ref.tenant, ref.pool)
    own = probes is None
    probes = probes or Probes()
    try:
        answers = probes.answers(ctx, current)
    finally:
        if own:
            probes.close()
    for i in current:
        _observe(ctx, i, done, answers, fence)
    return done


def sweep(ctx: Host) -> list[str]:
    """Remove the clear-text secrets no command will finish (`secrets_disk.sweep`): at every
    observation, at `tenant destroy` and at agent start. Returns what was done."""
    removed = secrets_disk.sweep(ctx.layout, lambda: (i.id for i in ctx.store.instances()))
    if not removed:
        return []
    message = f"removed clear-text secrets that killed commands left: {', '.join(sorted(removed))}"
    ctx.store.event(Event("host.secrets-swept", message, Reason.CRASH,
                          cause="their commands were killed before they could remove them"))
    return [message]


def _observe(ctx: Host, i: Instance, done: list[str], answers: dict[str, Answer | None] | None,
             fence: Lease | None) -> Instance | None:
    if i.op is not None:
        action = i.op.action.value
        recovered = recover(ctx, i, fence=fence)
        done.append(f"{i.id}: finished an interrupted {action}"
                    + (f" (now {recovered.state.value})" if recovered else " (destroyed)"))
        if recovered is None:
            return None
        i, answers = recovered, None  # (a new hypervisor, or none: asked afresh)
    return _reconcile(ctx, i, done, answers, fence)


def _event(i: Instance, kind: str, message: str, cause: str | None = None) -> Event:
    return Event(kind, message, Reason.CRASH, i.tenant, i.pool, i.id, cause=cause)


def _reconcile(ctx: Host, i: Instance, done: list[str],
               answers: dict[str, Answer | None] | None, fence: Lease | None) -> Instance:
    # (no transition is in flight: a hypervisor holds its image open, unlinked, at boot)
    if secrets_disk.image_path(ctx.layout, i.id).exists():
        _note(ctx, i, "instance.orphan", "removed a clear-text secrets image", done,
              f"a secrets image was left for an instance recorded {i.state.value}")
        secrets_disk.remove(ctx.layout, i.id)
    rt = specs.runtime(ctx, i)
    spec = specs.control_spec(ctx.layout, i)
    alive = rt.is_alive(spec)
    if i.state.is_live():
        # (the cleanup of a dead hypervisor: sockets, pid file, its jail's cgroup)
        if not alive:
            return _fail(ctx, i, "hypervisor process exited unexpectedly", done, fence, lambda: rt.stop(spec, 0))
        answer = ask(rt, spec, ctx.clock()) if answers is None else answers.get(i.id)
        if answer is None or answer.pid != rt.pid(spec):
            # Its probe is still out (the agent's): the answer comes at a later pass. Or it was
            # taken from a hypervisor that has since been replaced: asked again at the next.
            return i
        if answer.status is None:
            return _unresponsive(ctx, i, answer, done, fence, lambda: rt.kill(spec))
        if answer.status is VmStatus.GONE:
            return _fail(ctx, i, "hypervisor process exited unexpectedly", done, fence, lambda: rt.stop(spec, 0))
        if i.unresponsive_since is not None:
            i = _answers_again(ctx, i, done, fence)
        if answer.status.is_error():
            return _fail(ctx, i, CAUSES[answer.status], done, fence, lambda: rt.stop(spec, 0))
        seen = {VmStatus.RUNNING: State.RUNNING, VmStatus.PAUSED: State.WARM}.get(answer.status)
        if seen is not None and seen is not i.state:
            return _set(ctx, i, seen, f"the hypervisor reports the vCPUs {answer.status.value}", done, fence)
        return i
    # Each correction below is recorded first: a store that cannot record it changes nothing.
    if alive:
        _note(ctx, i, "instance.orphan", "ended a hypervisor the store did not know of "
              "(a command died between boot and recording it)", done,
              f"a hypervisor ran for an instance recorded {i.state.value}")
        rt.stop(spec, 0)
    # (a sleeping instance keeps its TAP for a quick wake)
    tap = Path(f"/sys/class/net/{plan.tap_name(i.id)}")
    if i.state is not State.SLEEPING and i.host_index is not None and tap.exists():
        _note(ctx, i, "instance.orphan", "removed a TAP of an instance that does not run", done,
              f"a TAP was left for an instance recorded {i.state.value}")
        netops.instance_down(ctx, i)
    return i


def _note(ctx: Host, i: Instance, kind: str, message: str, done: list[str],
          cause: str | None = None) -> None:
    ctx.store.event(_event(i, kind, message, cause))
    done.append(f"{i.id}: {message}")


def _set(ctx: Host, i: Instance, state: State, why: str, done: list[str],
         fence: Lease | None) -> Instance:
    try:
        ctx.store.update_instance(i.id, expect=i.state, fence=fence, state=state,
                                  event=_event(i, "instance.observed", f"now {state.value}: {why}", why))
    except Superseded:  # (this command lost the pool's lease: it must stop)
        raise
    except Conflict:  # (another command changed it: it is theirs)
        return ctx.store.instance(i.tenant, i.pool, i.id)
    done.append(f"{i.id}: {i.state.value} -> {state.value} ({why})")
    return ctx.store.instance(i.tenant, i.pool, i.id)


def _fail(ctx: Host, i: Instance, cause: str, done: list[str], fence: Lease | None,
          end: Callable[[], None]) -> Instance:
    """Record the instance failed with its cause, then `end` what is left of its hypervisor and
    remove its TAP and secrets image — in that order, so that a store that cannot record the
    failure (a full disk) leaves the hypervisor as it was and the cause is never lost."""
    try:
        ctx.store.update_instance(i.id, expect=i.state, fence=fence, state=State.FAILED, pid=None,
                                  error=cause, event=_event(i, "instance.failed", cause, cause))
    except Superseded:
        raise
    except Conflict:  # (another command changed it: it is theirs)
        return ctx.store.instance(i.tenant, i.pool, i.id)
    end()
    netops.instance_down(ctx, i)
    secrets_disk.remove(ctx.layout, i.id)
    done.append(f"{i.id}: failed: {cause}")
    return ctx.store.instance(i.tenant, i.pool, i.id)


def grace(ctx: Host, i: Instance) -> float:
    """Seconds the instance's hypervisor may stay unresponsive before it is ended."""
    try:
        return ctx.store.pool(i.tenant, i.pool).unresponsive_grace
    except NotFound:
        return Pool.unresponsive_grace


def _unresponsive(ctx: Host, i: Instance, answer: Answer, done: list[str], fence: Lease | None,
                  end: Callable[[], None]) -> Instance:
    """A live hypervisor that did not answer: recorded (with its cause) the first time; ended
    and failed once it has not answered for its pool's grace."""
    wait = grace(ctx, i)
    if i.unresponsive_since is None:
        msg = (f"its hypervisor does not answer: {answer.cause} (ended and failed if it still does"
               f" not answer after {wait:g} s)")
        try:
            ctx.store.update_instance(i.id, expect=i.state, fence=fence, unresponsive_since=answer.at,
                                      unresponsive_cause=answer.cause,
                                      event=_event(i, "instance.unresponsive", msg, answer.cause))
        except Superseded:
            raise
        except Conflict:
            return ctx.store.instance(i.tenant, i.pool, i.id)
        done.append(f"{i.id}: unresponsive: {answer.cause}")
        return ctx.store.instance(i.tenant, i.pool, i.id)
    silent = max(0.0, ctx.clock() - i.unresponsive_since)
    if silent < wait:
        done.append(f"{i.id}: unresponsive for {silent:.0f} s of a {wait:g} s grace: {answer.cause}")
        return i
    return _fail(ctx, i, f"its hypervisor did not answer for {silent:.0f} s ({answer.cause})", done,
                 fence, end)


def _answers_again(ctx: Host, i: Instance, done: list[str], fence: Lease | None) -> Instance:
    try:
        ctx.store.update_instance(i.id, expect=i.state, fence=fence, unresponsive_since=None,
                                  unresponsive_cause=None,
                                  event=_event(i, "instance.responsive", "its hypervisor answers again",
                                               i.unresponsive_cause))
    except Superseded:
        raise
    except Conflict:
        pass
    done.append(f"{i.id}: its hypervisor answers again")
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
            return f"unresponsive: {e.message}"
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
