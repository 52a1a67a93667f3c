"""Tenant quotas (DESIGN §1), checked before anything is touched: by `pool scale` for its
target counts, and by every single-instance transition that would take more.

Other pools of the tenant count with what they hold or are about to hold: an instance with a
transition in flight counts in the state it is heading for when that takes more, and a pool
counts at least its desired counts (a `pool scale` at work boots without the tenant's lock).
"""

from __future__ import annotations

import os
from collections import Counter
from pathlib import Path

from mvm.config.paths import Layout
from mvm.errors import QuotaExceeded
from mvm.lifecycle import disks
from mvm.model import Instance, PoolRef, Quotas, State
from mvm.store import Store

MiB = 2**20


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
    """MiB of the tenant's disk quota in use: its instances' data disks (each made at its
    pool's size) and what its pools' builds hold (`Pool.build_disk`, measured at each build
    and gc: their builder stores and revisions)."""
    pools = store.pools(tenant)
    return sum(p.data_disk * len(store.instances(tenant, p.id)) for p in pools if p.data_disk) \
        + sum(p.build_disk for p in pools)


# -- builds: the pool's builder store and revisions count in max-disk --------------------------

def allocated(path: Path) -> int:
    """Bytes the filesystem allocated to a file, or to every file under a directory (blocks,
    not apparent size: a builder's store disk is a 16 GiB sparse file that takes what Nix
    writes into it); each inode counted once, links not followed; 0 when absent."""
    seen: set[tuple[int, int]] = set()
    total = 0
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return 0
    entries = [st]
    if os.path.isdir(path) and not os.path.islink(path):
        for dirpath, dirnames, filenames in os.walk(path):
            for name in dirnames + filenames:
                try:
                    entries.append(os.lstat(os.path.join(dirpath, name)))
                except FileNotFoundError:
                    continue
    for e in entries:
        if (e.st_dev, e.st_ino) not in seen:
            seen.add((e.st_dev, e.st_ino))
            total += e.st_blocks * 512
    return total


def build_storage(layout: Layout, tenant: str, pool: str) -> int:
    """Bytes a pool's builds hold on the host: its builder's Nix store disk and its revisions
    (the build's scratch files are counted by the build itself while it runs)."""
    return allocated(layout.pool_dir(tenant, pool) / "builder" / "store.ext4") \
        + allocated(layout.revisions_dir(tenant, pool))


def measure_builds(store: Store, layout: Layout, tenant: str, record: bool = True) -> int:
    """Measure every pool of the tenant's builds again and (with `record`) record what changed
    (`Pool.build_disk`); returns the MiB of the tenant's disk quota in use, as `disk_in_use`."""
    used = 0
    for p in store.pools(tenant):
        mib = -(-build_storage(layout, tenant, p.id) // MiB)
        if record and mib != p.build_disk:
            store.set_pool_build_disk(tenant, p.id, mib)
        used += mib + (p.data_disk * len(store.instances(tenant, p.id)) if p.data_disk else 0)
    return used


def check_build(store: Store, layout: Layout, ref: PoolRef, needed: int, record: bool = True) -> None:
    """A build of `ref` may add `needed` bytes (its new revision) to the tenant's disk: within
    max-disk (counting data disks and every pool's builds as they are now) and within the
    host's free space less the data disks' reserve; else QuotaExceeded with one line: used,
    needed and the quota (or the free space)."""
    q = store.tenant(ref.tenant).quotas
    used = measure_builds(store, layout, ref.tenant, record)
    need = -(-needed // MiB)
    if used + need > q.max_disk:
        raise QuotaExceeded(
            f"building {ref} would exceed tenant {ref.tenant}'s disk quota: {used} MiB used"
            f" + {need} MiB needed > max-disk {q.max_disk} MiB",
            "the current revision stays; free room with `mvm pool gc --keep 0`, or by"
            " destroying instances' data disks or other pools")
    free = disks.free_mib(layout.pool_dir(ref.tenant, ref.pool))
    if free - disks.RESERVE_MIB < need:
        raise QuotaExceeded(
            f"building {ref} needs {need} MiB of host disk; the host has {free} MiB free there,"
            f" less the {disks.RESERVE_MIB} MiB reserve",
            "the current revision stays; free host space, or remove old revisions (`mvm pool gc`)")


def _disk_problems(store: Store, tenant: str, mib: int, count: int, q: Quotas) -> list[str]:
    out = []
    if mib > q.max_data_disk:
        out.append(f"a {mib} MiB data disk > max-data-disk {q.max_data_disk} MiB")
    used = disk_in_use(store, tenant)
    builds = sum(p.build_disk for p in store.pools(tenant))
    if used + count * mib > q.max_disk:
        out.append(f"{used - builds + count * mib} MiB of data disks"
                   + (f" + {builds} MiB of builds" if builds else "") + f" > max-disk {q.max_disk} MiB")
    return out
