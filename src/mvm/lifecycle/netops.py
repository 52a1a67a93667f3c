"""Tenant and instance networks as the lifecycle sees them: plan from the store, apply to the host.

A pool with `--network none` has no NIC and touches nothing on the host.
"""

from __future__ import annotations

import os
from pathlib import Path

from mvm.config.host import Host
from mvm.model import Instance, Pool, State, Tenant
from mvm.network import plan
from mvm.runtime.base import NetIf
from mvm.store import Store


def _wants_net(pool: Pool) -> bool:
    return pool.network != "none"


def allocate(store: Store, tenant: Tenant, pool: Pool, iid: str) -> tuple[int | None, str | None, str | None]:
    """Host index, IP and MAC for a new instance: deterministic, unique within the tenant."""
    if not _wants_net(pool):
        return None, None, None
    used = {i.host_index for i in store.instances(tenant.id) if i.host_index is not None}
    index = plan.allocate_host_index(used)
    net = plan.instance_net(tenant.net_id, tenant.subnet, iid, index)
    return index, str(net.ip), net.mac


def _instance_net(store: Store, i: Instance) -> plan.InstanceNet | None:
    if i.host_index is None:
        return None
    t = store.tenant(i.tenant)
    return plan.instance_net(t.net_id, t.subnet, i.id, i.host_index)


def netif(store: Store, i: Instance) -> NetIf | None:
    net = _instance_net(store, i)
    return NetIf(net.tap, net.mac) if net else None


def kernel_ip_arg(store: Store, i: Instance) -> str | None:
    net = _instance_net(store, i)
    return net.kernel_arg(i.id) if net else None


def tenant_up(ctx: Host, t: Tenant) -> str:
    """The tenant's bridge, gateway address, isolation and NAT (idempotent)."""
    from mvm.network import firewall, host

    with ctx.locks.lock("network"):
        bridge = host.ensure_bridge(t.net_id, t.subnet)
        host.enable_forwarding()
        firewall.ensure_tenant(t.net_id, t.subnet, bridge)
    return bridge


def instance_up(ctx: Host, i: Instance) -> None:
    net = _instance_net(ctx.store, i)
    if net is None:
        return
    master = Path("/sys/class/net") / net.tap / "master"
    if master.is_symlink() and Path(os.readlink(master)).name == net.bridge:
        return  # plugged in already (a woken instance keeps its TAP): no netlink round trips
    from mvm.network import host

    if net.bridge not in host.links():
        tenant_up(ctx, ctx.store.tenant(i.tenant))  # first instance: bridge, isolation and NAT
    # (otherwise the tenant's network is left alone; `mvm net verify --repair` mends drift)
    host.ensure_tap(net.tap, net.bridge)


def instance_down(ctx: Host, i: Instance) -> None:
    if i.host_index is None:
        return
    from mvm.network import host

    host.remove_tap(plan.tap_name(i.id))


def release(ctx: Host, i: Instance) -> None:
    """The instance is gone: its TAP too, and the tenant's network with its last instance."""
    instance_down(ctx, i)
    if i.host_index is None:
        return
    if not any(o.host_index is not None for o in ctx.store.instances(i.tenant) if o.id != i.id):
        teardown_tenant(ctx, ctx.store.tenant(i.tenant))


def _expected(store: Store) -> tuple[list[tuple[int, str]], list[tuple[str, str]]]:
    """A tenant has a network while it has instances with one; live ones have TAPs."""
    tenants, taps = {}, []
    for t in store.tenants():
        for i in store.instances(t.id):
            if i.host_index is None or i.state is State.CREATED:
                continue  # (a tenant's network comes up with its first start)
            tenants[t.net_id] = t.subnet
            if i.state in (State.RUNNING, State.WARM, State.SLEEPING):
                taps.append((plan.tap_name(i.id), plan.bridge_name(t.net_id)))
    return sorted(tenants.items()), taps


def verify(ctx: Host, repair: bool) -> dict[str, object]:
    from mvm.network import verify as net_verify

    tenants, taps = _expected(ctx.store)
    with ctx.locks.lock("network"):
        report = net_verify.verify(tenants, taps, repair)
    return {"ok": report.ok, "problems": report.lines(), "repaired": report.repaired,
            "tenants": len(tenants), "taps": len(taps)}


def teardown_tenant(ctx: Host, t: Tenant) -> None:
    """Remove exactly what the tenant's network created; drop mvm's table when it was the last."""
    from mvm.network import firewall, host

    with ctx.locks.lock("network"):
        for name in host.list_taps():
            if any(name == plan.tap_name(i.id) for i in ctx.store.instances(t.id)):
                host.remove_tap(name)
        host.remove_bridge(t.net_id)
        firewall.remove_tenant(t.net_id)
        firewall.remove_all_if_empty()
