"""Tenant quotas (DESIGN §1), checked before anything is touched: by `pool scale` for its
target counts, and by every single-instance transition that would take more.

Other pools of the tenant count with what they hold or are about to hold: an instance with a
transition in flight counts in the state it is heading for when that takes more, and a pool
counts at least its desired counts (a `pool scale` at work boots without the tenant's lock).
"""

from __future__ import annotations

from collections import Counter

from mvm.errors import QuotaExceeded
from mvm.model import Instance, PoolRef, Quotas, State
from mvm.store import Store


def check(store: Store, ref: PoolRef, running: int, warm: int, sleeping: int) -> None:
    t = store.tenant(ref.tenant)
    pool = store.pool(ref.tenant, ref.pool)
    q = t.quotas
    new = max(0, running + warm + sleeping - len(store.instances(ref.tenant, ref.pool)))
    tot = {"running": running, "warm": warm, "vcpus": running * pool.cpus,
           "mem": (running + warm) * pool.mem}
    for other in store.pools(ref.tenant):
        if other.id == ref.pool:
            continue
        held = Counter(effective(i) for i in store.instances(ref.tenant, other.id))
        run = max(held[State.RUNNING], other.desired_running)
        warm_n = max(held[State.WARM], other.desired_warm)
        tot["running"] += run
        tot["vcpus"] += run * other.cpus
        tot["warm"] += warm_n
        tot["mem"] += (run + warm_n) * other.mem  # warm instances hold their RAM too
    problems = []
    if tot["running"] > q.max_running:
        problems.append(f"{tot['running']} running > max-running {q.max_running}")
    if tot["warm"] > q.max_warm:
        problems.append(f"{tot['warm']} warm > max-warm {q.max_warm}")
    if tot["vcpus"] > q.max_vcpus:
        problems.append(f"{tot['vcpus']} vCPUs running > max-vcpus {q.max_vcpus}")
    if tot["mem"] > q.max_mem:
        problems.append(f"{tot['mem']} MiB in running+warm instances > max-mem {q.max_mem}")
    total = running + warm + sleeping
    if total > q.max_instances:
        problems.append(f"{total} instances > max-instances {q.max_instances}")
    if new and pool.data_disk:
        problems += _disk_problems(store, t.id, pool.data_disk, new, q)
    if problems:
        raise QuotaExceeded(f"scaling {ref} would exceed tenant {t.id}'s quota: "
                            + "; ".join(problems), "nothing was changed; lower the counts or"
                            " raise the quota")


def check_transition(store: Store, i: Instance, target: State) -> None:
    """The pool's counts as they would be after `i` moves to `target`, checked as a whole."""
    counts = Counter(effective(x) for x in store.instances(i.tenant, i.pool))
    counts[effective(i)] -= 1
    counts[target] += 1
    check(store, PoolRef(i.tenant, i.pool), counts[State.RUNNING], counts[State.WARM],
          counts[State.SLEEPING])


def effective(i: Instance) -> State:
    """The state an instance counts in: where a transition in flight leads, if that takes more."""
    if i.op is not None and i.op.target.is_live():
        return i.op.target
    return i.state


def check_create(store: Store, ref: PoolRef) -> None:
    """One more instance in the pool (a data disk of the pool's size included)."""
    t = store.tenant(ref.tenant)
    pool = store.pool(ref.tenant, ref.pool)
    q = t.quotas
    problems = []
    if len(store.instances(ref.tenant, ref.pool)) >= q.max_instances:
        problems.append(f"pool {ref} already has {q.max_instances} instances (max-instances)")
    if pool.data_disk:
        problems += _disk_problems(store, t.id, pool.data_disk, 1, q)
    if problems:
        raise QuotaExceeded(f"a new instance of {ref} would exceed tenant {t.id}'s quota: "
                            + "; ".join(problems), "nothing was changed; destroy instances you"
                            " no longer need or raise the quota")


def disk_in_use(store: Store, tenant: str) -> int:
    """MiB of data disks the tenant's instances have (each was made at its pool's size)."""
    return sum(p.data_disk * len(store.instances(tenant, p.id)) for p in store.pools(tenant)
               if p.data_disk)


def _disk_problems(store: Store, tenant: str, mib: int, count: int, q: Quotas) -> list[str]:
    out = []
    if mib > q.max_data_disk:
        out.append(f"a {mib} MiB data disk > max-data-disk {q.max_data_disk} MiB")
    used = disk_in_use(store, tenant)
    if used + count * mib > q.max_disk:
        out.append(f"{used + count * mib} MiB of data disks > max-disk {q.max_disk} MiB")
    return out
