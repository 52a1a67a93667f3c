"""One transition in flight: its steps recorded in the store as they complete."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import TypeVar

from mvm.context import Host
from mvm.errors import MvmError, NotFound
from mvm.lifecycle import specs
from mvm.model import Event, Instance, Op, Reason, State
from mvm.runtime.base import Runtime, VmSpec
from mvm.store.base import Lease
from mvm.util.progress import Progress

T = TypeVar("T")


def noop(step: str, message: str) -> None:
    pass


class Run:
    """The context of one transition: the host, the instance as the store has it (with its
    `op`), its VM and runtime, and the pool's lease it runs under (`fence`). `step()` runs one
    idempotent step, then records it, so that whoever comes next knows how far it got. Each
    write is compare-and-set on the transition this run holds, under the pool's lease: a run
    whose transition another command took over, or whose lease was lost, writes nothing."""

    def __init__(self, ctx: Host, i: Instance, progress: Progress = noop, reason: Reason = Reason.USER,
                 cause: str | None = None, fence: Lease | None = None) -> None:
        assert i.op is not None
        self.ctx = ctx
        self.i = i
        self.fence = fence
        self.progress = progress
        self.reason = reason
        self.cause = cause  # what made the caller act, for the end event
        self.rt: Runtime = specs.runtime(ctx, i)
        self._spec: VmSpec | None = None

    @property
    def op(self) -> Op:
        assert self.i.op is not None
        return self.i.op

    @property
    def store(self):  # type: ignore[no-untyped-def]
        return self.ctx.store

    @property
    def spec(self) -> VmSpec:
        """The VM of the revision this transition runs (its files must exist)."""
        if self._spec is None:
            rev = self.op.data.get("revision") or self.i.revision
            if not rev:
                raise NotFound(f"{self.i.ref} has no revision yet", "start it first")
            self._spec = specs.spec_for(self.ctx, self.i, rev)
        return self._spec

    @property
    def control(self) -> VmSpec:
        """Enough to find, ask and end the hypervisor, even when the revision's files are gone."""
        try:
            return self.spec
        except MvmError:
            return specs.control_spec(self.ctx.layout, self.i)

    def alive(self) -> bool:
        return self.rt.is_alive(self.control)

    def step(self, name: str, fn: Callable[[], T], **fields: object) -> T | None:
        """Run a step unless an earlier run of this transition recorded it done."""
        if self.op.done(name):
            return None
        t0 = time.monotonic()
        self.ctx.fail_point(self.op.action.value, name)
        result = fn()
        self.i = self.ctx.store.op_step(self.i.id, name, expect=self.op, fence=self.fence,
                                        **fields)
        self.progress(name, f"{time.monotonic() - t0:.2f}s")
        self.ctx.crash_point(self.op.action.value, name)
        return result

    def event(self, kind: str, message: str, reason: Reason | None = None,
              cause: str | None = None) -> Event:
        """The event that ends the transition, with how long it took (since its intent was
        recorded: for one a later command finished, the time between counts too)."""
        return Event(kind, message, reason or self.reason, self.i.tenant, self.i.pool, self.i.id,
                     cause=cause or self.cause,
                     duration=max(0.0, self.ctx.clock() - self.op.started))

    def end(self, state: State, kind: str, message: str, reason: Reason | None = None, *,
            cause: str | None = None, **fields: object) -> Instance:
        """The transition is over: its end state and its event, in one transaction."""
        self.i = self.ctx.store.end_op(self.i.id, state, self.event(kind, message, reason, cause),
                                       expect=self.op, fence=self.fence, **fields)
        return self.i
