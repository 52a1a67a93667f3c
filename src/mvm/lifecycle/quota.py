"""Tenant quotas (DESIGN §1), checked before anything is touched: by `pool scale` for its
target counts, and by every single-instance transition that would take more.

Other pools of the tenant count with what they hold or are about to hold: an instance with a
transition in flight counts in the state it is heading for when that takes more, and a pool
counts at least its desired counts (a `pool scale` at work boots without the tenant's lock).
"""

from __future__ import annotations

from collections import Counter

from mvm.errors import QuotaExceeded
from mvm.model import Instance, PoolRef, State
from mvm.store import Store


def check(store: Store, ref: PoolRef, running: int, warm: int, sleeping: int) -> None:
    t = store.tenant(ref.tenant)
    pool = store.pool(ref.tenant, ref.pool)
    q = t.quotas
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
