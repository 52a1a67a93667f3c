"""What the read commands show, as plain JSON-able data: the CLI prints it, the REST API
returns it, so both give the same answer for the same call. Reading only: nothing here
writes the store."""

from __future__ import annotations

from typing import Any

from mvm.context import Host
from mvm.lifecycle import quota, specs
from mvm.model import Instance, InstanceRef, PoolRef, State, check_id
from mvm.services import instances, pools, tenants
from mvm.util.jsonable import jsonable


def tenant_list(ctx: Host) -> list[dict[str, Any]]:
    return [jsonable(t) for t in ctx.store.tenants()]


def tenant_info(ctx: Host, tenant: str) -> dict[str, Any]:
    store = ctx.store
    t = store.tenant(check_id("tenant", tenant))
    insts = store.instances(t.id)
    return {
        "id": t.id, "net_id": t.net_id, "subnet": t.subnet,
        "egress": {"allow": list(t.egress_allow), "deny": list(t.egress_deny)},
        "quotas": jsonable(t.quotas),
        # MiB of max-disk in use: data disks, and builds as measured at their last build or gc
        "disk_used": quota.disk_in_use(store, t.id),
        "pools": [p.id for p in store.pools(t.id)],
        "instances": {s: sum(1 for i in insts if i.state.value == s)
                      for s in sorted({i.state.value for i in insts})},
        "secret_keys": tenants.secret_keys(ctx, t.id), "secrets_version": t.secrets_version,
    }


def pool_list(ctx: Host, tenant: str | None = None) -> list[dict[str, Any]]:
    if tenant:
        ctx.store.tenant(check_id("tenant", tenant))
    return [jsonable(p) for p in ctx.store.pools(tenant)]


def instance_counts(ctx: Host, tenant: str | None = None) -> dict[str, int]:
    """Instances per pool address (`tenant/pool`), for the pool table."""
    out: dict[str, int] = {}
    for i in ctx.store.instances(tenant):
        key = f"{i.tenant}/{i.pool}"
        out[key] = out.get(key, 0) + 1
    return out


def state_counts(ctx: Host) -> dict[tuple[str, str, str], int]:
    """Instances by (tenant, pool, state): every pool, every state but destroyed (0 included)."""
    counts: dict[tuple[str, str, str], int] = {}
    for p in ctx.store.pools():
        for s in State:
            if s is not State.DESTROYED:
                counts[(p.tenant, p.id, s.value)] = 0
    for i in ctx.store.instances():
        key = (i.tenant, i.pool, i.state.value)
        counts[key] = counts.get(key, 0) + 1
    return counts


def pool_info(ctx: Host, ref: PoolRef) -> dict[str, Any]:
    store = ctx.store
    info: dict[str, Any] = jsonable(store.pool(ref.tenant, ref.pool))
    info["revisions"] = len(store.revisions(ref.tenant, ref.pool))
    info["builds"] = store.builds(ref.tenant, ref.pool)[-5:]
    info["instances"] = [{"id": i.id, "state": i.state.value, "revision": i.revision}
                         for i in store.instances(ref.tenant, ref.pool)]
    return info


def revisions(ctx: Host, ref: PoolRef) -> list[dict[str, Any]]:
    current = ctx.store.pool(ref.tenant, ref.pool).current
    in_use = pools.revisions_in_use(ctx, ref)
    return [{"revision": r.hash, "current": r.hash == current, "in_use": r.hash in in_use,
             "out_path": r.out_path, "created": r.created, "manifest": r.manifest}
            for r in pools.revisions(ctx, ref)]


def instance(i: Instance, observed: str | None = None) -> dict[str, Any]:
    out: dict[str, Any] = {
        "id": i.id, "pool": f"{i.tenant}/{i.pool}", "tenant": i.tenant, "state": i.state.value,
        "revision": i.revision, "ip": i.ip, "mac": i.mac, "secrets_version": i.secrets_version,
        "error": i.error, "address": str(i.ref),
        "transition": i.op.action.value if i.op else None, "snapshot": i.snapshot}
    if observed is not None:
        out["observed"] = observed
    return out


def instance_list(ctx: Host, where: str | None = None) -> list[dict[str, Any]]:
    """`where`: a tenant, `tenant/pool`, or everything."""
    tenant = pool = None
    if where:
        if len(where.split("/")) == 2:
            ref = PoolRef.parse(where)
            ctx.store.pool(ref.tenant, ref.pool)
            tenant, pool = ref.tenant, ref.pool
        else:
            tenant = check_id("tenant", where)
            ctx.store.tenant(tenant)
    return [instance(v.instance, v.observed) for v in instances.views(ctx, tenant, pool)]


def instance_info(ctx: Host, ref: InstanceRef) -> dict[str, Any]:
    v = instances.view(ctx, ref)
    i = v.instance
    info = instance(i, v.observed)
    disk = specs.data_disk_path(ctx.layout, i)
    info["data_disk"] = str(disk) if disk.exists() else None
    info["pool_current_revision"] = ctx.store.pool(i.tenant, i.pool).current
    # the running hypervisor's jail, as its start decided: "jailed" or "unjailed: why"
    info["jail"] = specs.runtime(ctx, i).jail_of(specs.control_spec(ctx.layout, i))
    return info
