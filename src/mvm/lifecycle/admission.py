"""Memory-aware admission: a start or a wake only when the host has the memory for it.

Counting slots without memory loses work to the kernel's OOM killer. Before a start or a wake
— not a resume: a warm instance already holds its RAM — the host's available memory
(MemAvailable, through `Host.mem_available`) must cover what the instance needs: its pool's
guest RAM plus what its hypervisor holds beyond it (`Runtime.mem_overhead`: for QEMU the
jail's memory limit beyond RAM, 128 MiB plus the TCG translation cache), with the `mem-reserve`
setting (MiB) left over for the host, after what the starts and wakes in flight were promised
(MemAvailable does not show RAM a guest has not touched yet). `pool scale` checks the boots and wakes it will make
together, up front. A refusal changes nothing (no transition is recorded) and is an event
with `Reason.ADMISSION`.
"""

from __future__ import annotations

from dataclasses import dataclass

from mvm.context import Host
from mvm.errors import AdmissionRefused
from mvm.model import Action, Event, Instance, Pool, PoolRef, Reason

#: The actions that make a hypervisor take guest RAM.
CHECKED = frozenset({Action.START, Action.WAKE})
HINT = ("free host memory (e.g. `mvm instance sleep` or `stop` instances), or lower the reserve: "
        "`mvm config set mem-reserve MiB`")


@dataclass(frozen=True)
class Need:
    """MiB one instance of a pool needs on this host, and the reserve to leave."""

    guest: int
    overhead: int
    reserve: int

    @property
    def each(self) -> int:
        return self.guest + self.overhead


def need(ctx: Host, pool: Pool) -> Need:
    return Need(pool.mem, ctx.runtime_for(pool.backend).mem_overhead(), ctx.settings.mem_reserve)


def check(ctx: Host, i: Instance, action: Action) -> None:
    """Refuse (AdmissionRefused, with its event) a start or wake the host has no memory for."""
    if action not in CHECKED:
        return
    n = need(ctx, ctx.store.pool(i.tenant, i.pool))
    measured = ctx.mem_available()
    pending = in_flight(ctx, i.id)
    available = measured - pending
    if n.each + n.reserve <= available:
        return
    others = f" ({measured} MiB free, {pending} MiB promised to starts and wakes in flight)" \
        if pending else ""
    e = AdmissionRefused(
        f"cannot {action.value} {i.ref}: needs {n.each} MiB of host memory ({n.guest} MiB guest"
        f" + {n.overhead} MiB overhead) + {n.reserve} MiB reserve, {available} MiB available{others}",
        HINT)
    ctx.store.event(Event(f"instance.{action.value}-refused", e.message, Reason.ADMISSION,
                          i.tenant, i.pool, i.id, cause=_cause(measured, n.each + n.reserve, -pending)))
    raise e


def in_flight(ctx: Host, but: str | None = None) -> int:
    """MiB promised to the starts and wakes of this home in flight (recorded, not ended): their
    hypervisors take guest RAM as the guest touches it, so MemAvailable does not show it yet."""
    pools = {(p.tenant, p.id): p for p in ctx.store.pools()}
    return sum(need(ctx, pools[(i.tenant, i.pool)]).each for i in ctx.store.instances()
               if i.op is not None and i.op.action in CHECKED and i.id != but
               and (i.tenant, i.pool) in pools)


def check_scale(ctx: Host, ref: PoolRef, boots: int, frees: int) -> None:
    """`boots` starts and wakes of the pool's instances, up front, all together (they run side
    by side); `frees`: live instances the scale stops or sleeps first (their memory comes back)."""
    if boots == 0:
        return
    n = need(ctx, ctx.store.pool(ref.tenant, ref.pool))
    measured = ctx.mem_available() - in_flight(ctx)
    available = measured + frees * n.each
    total = boots * n.each
    if total + n.reserve <= available:
        return
    freed = f" ({measured} MiB + {frees * n.each} MiB the scale frees first)" if frees else ""
    e = AdmissionRefused(
        f"cannot scale {ref}: its {boots} start(s) and wake(s) need {total} MiB of host memory"
        f" ({boots} x ({n.guest} MiB guest + {n.overhead} MiB overhead)) + {n.reserve} MiB"
        f" reserve, {available} MiB available{freed}", f"nothing was changed; {HINT}")
    ctx.store.event(Event("pool.scale-refused", e.message, Reason.ADMISSION, ref.tenant, ref.pool,
                          cause=_cause(measured, total + n.reserve, frees * n.each)))
    raise e


def _cause(available: int, wanted: int, freed: int = 0) -> str:
    plus = f" + {freed} MiB freed first" if freed > 0 else \
        f" - {-freed} MiB promised to starts and wakes in flight" if freed < 0 else ""
    return f"MemAvailable {available} MiB{plus} < {wanted} MiB needed with the reserve"
