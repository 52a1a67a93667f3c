"""The agent: a loop that keeps every pool at its desired counts and applies idle policies.

Each pass, for every pool (each on its own: one pool's failure never stops the others):

1. **Locks.** The tenant's and the pool's leases, each with a short wait: a pool a command is
   working on (`pool scale`, `instance start`, a build) is skipped this pass and taken at the
   next; the CLI and the agent never act on a pool at the same time.
2. **Observe.** `observe.pool`: transitions dead commands left are finished; an instance
   whose hypervisor died is failed, with the cause, as an event. The hypervisors are asked
   how they are through the agent's own `observe.Probes`, kept across passes: a pass waits
   for answers at most `PROBE_WAIT`, so a hung hypervisor (observed `unresponsive` once its
   probe ends by the runtime's deadline) holds up no other instance; its answer is taken at
   the next pass, which its arrival starts at once. One unresponsive for its pool's grace is
   ended and failed.
3. **Reconcile.** The pool is brought to its desired counts through `scale.plan` and
   `scale.execute` (`lifecycle.apply` for every move). A failed instance is started again
   itself (the plan takes a failed instance before a stopped one: same id, address and data
   disk) and the event `instance.replaced` (reason `crash`) says why it had failed. With an idle policy
   (and not pinned) the counts are read tolerantly, so that the policy's moves stay: a running
   slot may be held by a running, warm or sleeping instance, a warm slot by a warm or sleeping
   one; the reconciler keeps the total (replacing failed, creating missing, stopping surplus)
   and never promotes. Without a policy, or pinned, it converges exactly like `pool scale`.
4. **Idle policy.** The hypervisor's CPU time (/proc/<pid>/stat) and its TAP's byte counters
   are sampled; an instance is idle while, between two samples, it used less than
   `CPU_IDLE` of a core and moved fewer than `NET_IDLE` bytes a second. Running and idle for
   `idle_warm` → warm; warm for `idle_sleep` → sleeping (a paused VM uses no CPU: its idle time
   counts from when it went warm); never fewer than `min_running` running; when the tenant's
   max-warm is reached, an idle running instance goes straight to sleep.

A pool whose passes keep failing (an error, or an instance that had to be replaced, in
`CRASH_LOOP_AFTER` passes in a row) backs off exponentially (capped at `BACKOFF_MAX`) with the
event `agent.crash-loop`. Starting, the agent adopts the hypervisors that run: it only reads
the store and /proc (nothing is restarted); stopping, it leaves them running.
"""

from __future__ import annotations

import contextlib
import os
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from mvm.context import Host
from mvm.errors import Conflict, InvalidInput, MvmError, NotFound, QuotaExceeded, combined
from mvm.lifecycle import create, execs, observe, quota, specs
from mvm.model import Event, Instance, Pool, PoolRef, Reason, State
from mvm.network import plan as netplan
from mvm.services import scale
from mvm.store.base import Lease
from mvm.store.locks import pool_lock_name, tenant_lock_name

#: Idle thresholds. An idle guest under TCG still costs its hypervisor ~1.1-1.5 % of a core
#: (timer ticks emulated; measured here, see the README), a busy loop ~100 %: 5 % is well above
#: the first. ARP, a health check every few seconds and the like move far less than 4 KiB/s.
CPU_IDLE = 0.05  # of one core
NET_IDLE = 4096.0  # bytes a second, both ways
LOCK_WAIT = 0.2  # seconds the agent waits for a pool a command holds, then skips it this pass
CRASH_LOOP_AFTER = 3  # failing passes in a row before a pool backs off
BACKOFF_MIN = 2.0
BACKOFF_MAX = 300.0
WATCH = 1.0  # seconds between looks at the store for a change (then a pass at once)
PROBE_WAIT = 0.5  # seconds a pass waits for hypervisors' answers (a silent one's comes later)

Report = Callable[[str], None]


@dataclass(frozen=True)
class Usage:
    """What a hypervisor has used so far: CPU seconds, and bytes through its TAP."""

    pid: int
    cpu: float
    net: int


Sampler = Callable[[Host, Instance], "Usage | None"]


def measure(ctx: Host, i: Instance) -> Usage | None:
    """The instance's hypervisor's CPU time (user + system, all its threads) and its TAP's
    bytes (received + sent); None when no hypervisor runs."""
    pid = specs.runtime(ctx, i).pid(specs.control_spec(ctx.layout, i))
    if pid is None:
        return None
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return None
    cpu = (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    net = 0
    stats = Path("/sys/class/net") / netplan.tap_name(i.id) / "statistics"
    for name in ("rx_bytes", "tx_bytes"):
        with contextlib.suppress(OSError, ValueError):
            net += int((stats / name).read_text())
    return Usage(pid, cpu, net)


@dataclass
class _Seen:
    usage: Usage
    at: float
    state: State
    idle_since: float | None = None
    measured: str = ""  # what the last two samples showed, for the event of a policy move


@dataclass
class _Health:
    failures: int = 0  # failing passes in a row
    not_before: float = 0.0  # (monotonic) backing off until then
    cause: str | None = None  # the last error


def tolerant_counts(current: list[Instance], running: int, warm: int,
                    sleeping: int) -> tuple[int, int, int]:
    """Desired counts read so that the idle policy's moves stay: a running slot may be held by
    a running, warm or sleeping instance, a warm slot by a warm or sleeping one. Returns the
    counts to converge to (same total): held slots count in their holder's state, the others
    as desired."""
    have = {s: sum(1 for i in current if i.state is s)
            for s in (State.RUNNING, State.WARM, State.SLEEPING)}
    out = {State.RUNNING: 0, State.WARM: 0, State.SLEEPING: 0}

    def fill(slots: int, holders: tuple[State, ...], desired: State) -> None:
        for h in holders:
            n = min(slots, have[h])
            have[h] -= n
            out[h] += n
            slots -= n
        out[desired] += slots

    # The most particular slots first: a sleeping slot takes only a sleeping instance.
    fill(sleeping, (State.SLEEPING,), State.SLEEPING)
    fill(warm, (State.WARM, State.SLEEPING), State.WARM)
    fill(running, (State.RUNNING, State.WARM, State.SLEEPING), State.RUNNING)
    return out[State.RUNNING], out[State.WARM], out[State.SLEEPING]


class _Busy(Exception):
    def __init__(self, conflict: Conflict) -> None:
        super().__init__(conflict.message)
        self.conflict = conflict


def _lease(ctx: Host, stack: contextlib.ExitStack, name: str) -> Lease:
    """A lease taken with a short wait (held: `_Busy`), left when `stack` closes."""
    try:
        return stack.enter_context(ctx.locks.lock(name, timeout=LOCK_WAIT))
    except Conflict as e:
        raise _Busy(e) from None


class Agent:
    """Keeps pools converged; see the module's docstring. `run_pass` once, or `run` in a loop
    until `stop` is set; `poke` asks for a pass at once (another thread may call it)."""

    def __init__(self, ctx: Host, interval: float, *, sampler: Sampler = measure,
                 report: Report = lambda s: None) -> None:
        if interval <= 0:
            raise InvalidInput(f"--interval must be positive (got {interval:g})")
        self.ctx = ctx
        self.interval = interval
        self.sampler = sampler
        self.report = report
        self.errors = 0  # pool passes that failed, since the agent started
        self.passes = 0
        self._poked = threading.Event()
        self._seen: dict[str, _Seen] = {}
        self._health: dict[PoolRef, _Health] = {}
        self.probes = observe.Probes(PROBE_WAIT, late=self.poke)

    # -- the loop --------------------------------------------------------------------------

    def poke(self) -> None:
        self._poked.set()

    def run(self, stop: threading.Event) -> None:
        """Pass, then wait for the interval, a poke or a change in the store; until `stop`."""
        ctx = self.ctx.for_thread()  # (a store connection of this thread's own)
        try:
            for line in self.adopt(ctx):
                self.report(line)
            try:  # (what killed commands left in clear text: before anything else)
                for line in observe.sweep(ctx):
                    self.report(f"agent: {line}")
            except MvmError as e:
                self.report(f"agent: sweep failed: {e.line()}")
            while not stop.is_set():
                self._poked.clear()
                try:
                    for line in self._pass(ctx, stop):
                        self.report(line)
                except MvmError as e:  # (the store unreadable, say): tried again next pass
                    self.report(f"agent: pass failed: {e.line()}")
                version = ctx.store.version()
                deadline = time.monotonic() + self.interval
                while not stop.is_set() and not self._poked.is_set():
                    left = deadline - time.monotonic()
                    if left <= 0:
                        break
                    self._poked.wait(min(WATCH, left))
                    if ctx.store.version() != version:  # a command changed something
                        break
        finally:
            self.probes.close()
            if ctx.store is not self.ctx.store:
                ctx.store.close()

    def adopt(self, ctx: Host | None = None) -> list[str]:
        """The hypervisors that run now, as the store knows them: only read (the store and
        /proc), never restarted; the first pass observes them like any other."""
        ctx = ctx or self.ctx
        out = []
        for i in ctx.store.instances():
            if i.state.is_live():
                pid = specs.runtime(ctx, i).pid(specs.control_spec(ctx.layout, i))  # (its pool's backend)
                out.append(f"{i.ref}: {i.state.value}, " + (f"adopted hypervisor pid {pid}" if pid
                           else "no hypervisor (the next pass observes it)"))
        return out

    def run_pass(self) -> list[str]:
        """One pass over every pool; returns what was done, one line each."""
        return self._pass(self.ctx, None)

    def _pass(self, ctx: Host, stop: threading.Event | None) -> list[str]:
        self.passes += 1
        done: list[str] = []
        live: set[str] = set()
        for pool in ctx.store.pools():
            if stop is not None and stop.is_set():
                break
            live.update(i.id for i in ctx.store.instances(pool.tenant, pool.id))
            done += self._pool(ctx, pool.ref)
        for gone in set(self._seen) - live:
            del self._seen[gone]
        for ref in set(self._health) - {p.ref for p in ctx.store.pools()}:
            del self._health[ref]
        return done

    # -- one pool ---------------------------------------------------------------------------

    def _pool(self, ctx: Host, ref: PoolRef) -> list[str]:
        health = self._health.setdefault(ref, _Health())
        if time.monotonic() < health.not_before:
            return []
        done: list[str] = []
        replaced, error = 0, None  # type: int, Exception | None
        try:
            replaced = self._reconcile(ctx, ref, done)
        except _Busy as e:  # a command holds it: next pass
            return [f"{ref}: skipped ({e.conflict.message})"]
        except NotFound as e:
            if not any(p.ref == ref for p in ctx.store.pools(ref.tenant)):
                return done  # destroyed meanwhile
            error = e
        except Exception as e:  # one pool's failure never stops the others
            error = e
        if error is not None:
            self.errors += 1
            cause = error.line() if isinstance(error, MvmError) else f"{type(error).__name__}: {error}"
            done.append(f"{ref}: reconcile failed: {cause}")
            self._event(ctx, Event("agent.reconcile-error", f"reconciling {ref} failed: {cause}",
                                   Reason.SCALE, ref.tenant, ref.pool, cause=cause))
            health.cause = cause
        if error is None and not replaced:
            health.failures = 0
            return done
        health.failures += 1
        if health.failures >= CRASH_LOOP_AFTER:
            delay = min(BACKOFF_MAX, max(BACKOFF_MIN, self.interval)
                        * 2 ** (health.failures - CRASH_LOOP_AFTER))
            health.not_before = time.monotonic() + delay
            why = "failed" if error is not None else "had to replace crashed instances"
            msg = (f"pool {ref} {why} in {health.failures} passes in a row: backing off,"
                   f" next try in {delay:g} s")
            done.append(msg)
            self._event(ctx, Event("agent.crash-loop", msg, Reason.CRASH, ref.tenant, ref.pool,
                                   cause=health.cause if error is not None else None))
        return done

    @staticmethod
    def _event(ctx: Host, e: Event) -> None:
        with contextlib.suppress(MvmError):  # (a full disk: the line is still printed)
            ctx.store.event(e)

    def _reconcile(self, ctx: Host, ref: PoolRef, done: list[str]) -> int:
        """Observe, converge and apply the idle policy; returns how many instances it replaced."""
        store = ctx.store
        with contextlib.ExitStack() as outer:
            tenant = outer.enter_context(contextlib.ExitStack())
            _lease(ctx, tenant, tenant_lock_name(ref.tenant))
            lease = _lease(ctx, outer, pool_lock_name(ref.tenant, ref.pool))
            done += [f"{ref} {line}" for line in observe.pool(ctx, ref, lease, self.probes)]
            pool = store.pool(ref.tenant, ref.pool)
            current = store.instances(ref.tenant, ref.pool)
            want: tuple[int, int, int] = (pool.desired_running, pool.desired_warm, pool.desired_sleeping)
            if pool.has_idle_policy:
                want = tolerant_counts(current, *want)
            p = scale.plan(current, *want)
            if not pool.current and any(want):
                raise MvmError(f"pool {ref} has no built revision", f"run `mvm pool build {ref}`")
            moves: list[tuple[Instance, State]] = []
            for inst, target in p.moves:
                if inst is None:
                    inst = create(ctx, ref, Reason.SCALE, locked=True)
                    done.append(f"{inst.ref}: created")
                if inst.state is not target:
                    moves.append((inst, target))
            tenant.close()  # boots need only the pool's lock
            errors = scale.execute(ctx, moves, lambda s: done.append(f"{ref}/{s}"),
                                   reason=lambda i: Reason.CRASH if i.state is State.FAILED
                                   else Reason.SCALE,
                                   cause=lambda i: i.error if i.state is State.FAILED else None,
                                   lease=lease)
            replaced = 0
            for inst, target in moves:
                if inst.state is State.FAILED and target is not State.STOPPED:
                    replaced += 1
                    now = store.instance(ref.tenant, ref.pool, inst.id)
                    if now.state is target:
                        msg = (f"replaced: {now.state.value} again after it failed"
                               f" ({inst.error or 'cause unknown'})")
                        store.event(Event("instance.replaced", msg, Reason.CRASH, ref.tenant,
                                          ref.pool, inst.id, cause=inst.error))
                        done.append(f"{inst.ref}: {msg}")
            if pool.has_idle_policy and not errors:
                errors += self._idle(ctx, pool, done, lease)
            if errors:
                raise combined(errors, f"reconciling {ref}")
            return replaced

    # -- the idle policy ------------------------------------------------------------------------

    def _idle_for(self, ctx: Host, i: Instance, now: float) -> float:
        """Seconds the instance has been idle (0: busy, or not measured twice yet)."""
        if i.state is State.WARM:  # paused: idle since it went warm
            seen = self._seen.get(i.id)
            if seen is not None and seen.state is State.WARM and seen.idle_since is not None:
                return now - seen.idle_since
            # (it went warm before this agent saw it: by its age in the store)
            since = now - max(0.0, time.time() - i.updated)
            self._seen[i.id] = _Seen(Usage(0, 0.0, 0), now, State.WARM, since)
            return now - since
        usage = self.sampler(ctx, i)
        seen = self._seen.get(i.id)
        if usage is None:
            self._seen.pop(i.id, None)
            return 0.0
        if seen is None or seen.usage.pid != usage.pid or seen.state is not i.state:
            self._seen[i.id] = _Seen(usage, now, i.state)
            return 0.0
        span = now - seen.at
        if span <= 0:
            return 0.0 if seen.idle_since is None else now - seen.idle_since
        cpu, net = (usage.cpu - seen.usage.cpu) / span, (usage.net - seen.usage.net) / span
        idle = cpu < CPU_IDLE and net < NET_IDLE
        began = (seen.idle_since if seen.idle_since is not None else seen.at) if idle else None
        measured = (f"hypervisor CPU {cpu * 100:.1f} % of a core, TAP {net:.0f} B/s over the last"
                    f" {span:.1f} s (idle below {CPU_IDLE * 100:g} % and {NET_IDLE:g} B/s)")
        self._seen[i.id] = _Seen(usage, now, i.state, began, measured)
        return 0.0 if began is None else now - began

    def _idle(self, ctx: Host, pool: Pool, done: list[str], lease: Lease) -> list[MvmError]:
        now = ctx.clock()
        current = ctx.store.instances(pool.tenant, pool.id)
        # (one that does not answer is left to observing: asking it to move would only wait)
        running = [i for i in current if i.state is State.RUNNING and i.op is None
                   and i.unresponsive_since is None and not self.probes.waiting(i.id)]
        idle = sorted(((self._idle_for(ctx, i, now), i) for i in running),
                      key=lambda x: -x[0])
        errors: list[MvmError] = []

        def move(i: Instance, target: State, why: str) -> None:
            done.append(f"{i.ref}: {why} -> {target.value}")
            errors.extend(scale.execute(ctx, [(i, target)], reason=lambda i: Reason.POLICY,
                                        cause=lambda i: why, lease=lease))
            if target is State.WARM:
                self._seen[i.id] = _Seen(Usage(0, 0.0, 0), now, State.WARM, now)

        if pool.idle_sleep is not None:
            for i in current:
                if (i.state is State.WARM and i.op is None and i.unresponsive_since is None
                        and not self.probes.waiting(i.id)):
                    seconds = self._idle_for(ctx, i, now)
                    if seconds >= pool.idle_sleep:
                        move(i, State.SLEEPING, f"warm for {seconds:.0f} s (idle-sleep"
                             f" {pool.idle_sleep:g} s)")
        first = pool.idle_warm if pool.idle_warm is not None else pool.idle_sleep
        may_leave = len(running) - pool.min_running
        for seconds, i in idle:
            if first is None or seconds <= 0 or seconds < first or may_leave <= 0:
                continue
            if execs.in_flight(ctx, i):  # (a command waiting in it is work, not idleness)
                continue
            may_leave -= 1
            target = State.WARM if pool.idle_warm is not None else State.SLEEPING
            why = f"idle for {seconds:.0f} s: {self._seen[i.id].measured}"
            if target is State.WARM:
                try:
                    quota.check_transition(ctx.store, i, State.WARM)
                except QuotaExceeded as e:  # max-warm reached: straight to sleep
                    target = State.SLEEPING
                    why += f"; not warm: {e.message.split('quota: ', 1)[-1]}"
            move(i, target, why)
        return errors
