"""Tenant and instance networks as the lifecycle sees them: plan from the store, apply to the host.

A pool with `--network none` has no NIC and touches nothing on the host.
"""

from __future__ import annotations

import os
from pathlib import Path

from mvm.config.paths import Layout
from mvm.context import Host
from mvm.model import Instance, Pool, State, Tenant
from mvm.network import claim, firewall, plan
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


def firewall_for(layout: Layout) -> firewall.Firewall:
    """The home's nftables tables: `mvm-<the home's tag>` (inet and bridge)."""
    return firewall.Firewall(f"mvm-{layout.runtime_dir().name}")


def firewall_of(ctx: Host) -> firewall.Firewall:
    return firewall_for(ctx.layout)


def _home(ctx: Host | Layout) -> str:
    layout = ctx if isinstance(ctx, Layout) else ctx.layout
    return str(layout.home.resolve())


def claim_netns(ctx: Host) -> None:
    """Claim this network namespace for the home (refused while another home's processes
    live there; a stale claim is taken over with what its home left behind)."""
    from mvm.network import host

    claim.claim(_home(ctx), firewall_of(ctx).name, host.live_taps, take_over)


def take_over(old: claim.Marker) -> None:
    """Remove what a home whose processes are gone left here: its tables, bridges and TAPs."""
    from mvm.network import host

    fw = firewall.Firewall(old.table)
    state = fw.read()
    bridges = set(state.from_bridge) if state is not None else set()
    for name, link in host.links().items():
        if link.tap and link.master in bridges:
            host.remove_tap(name)
    for b in bridges:
        n = plan.net_id_of_bridge(b)
        if n is not None:
            host.remove_bridge(n)
    fw.remove_all()


def tenant_net(t: Tenant) -> firewall.TenantNet:
    return firewall.TenantNet.of(t.net_id, t.subnet, allow=t.egress_allow, deny=t.egress_deny)


def tenant_up(ctx: Host, t: Tenant) -> str:
    """The tenant's bridge, gateway address, isolation, closed host and NAT (idempotent)."""
    from mvm.network import host

    with ctx.locks.lock("network"):
        claim_netns(ctx)
        bridge = host.ensure_bridge(t.net_id, t.subnet)
        host.enable_forwarding()
        firewall_of(ctx).ensure_tenant(tenant_net(t), host.host_networks())
    return bridge


def refresh_tenant(ctx: Host, t: Tenant) -> bool:
    """Re-install the tenant's rules (its egress lists changed) if its network is up here."""
    from mvm.network import host

    marker = claim.holder()
    if marker is None or marker.home != _home(ctx) or plan.bridge_name(t.net_id) not in host.links():
        return False
    tenant_up(ctx, t)
    return True


def instance_up(ctx: Host, i: Instance) -> None:
    net = _instance_net(ctx.store, i)
    if net is None:
        return
    master = Path("/sys/class/net") / net.tap / "master"
    if master.is_symlink() and Path(os.readlink(master)).name == net.bridge:
        return  # plugged in already (a woken instance keeps its TAP): no netlink round trips
    from mvm.errors import Conflict
    from mvm.network import host

    fw = firewall_of(ctx)
    port = firewall.Port.of(net.tap, net.mac, net.ip, net.net_id)
    if net.bridge not in host.links():
        tenant_up(ctx, ctx.store.tenant(i.tenant))  # first instance: bridge, isolation and NAT
    else:  # (the tenant's network is left alone; `mvm net verify --repair` mends drift)
        claim_netns(ctx)
    try:
        fw.ensure_port(port)  # before the TAP exists: it sends nothing else, ever
    except Conflict:  # the home's tables are gone: put the tenant's network back first
        tenant_up(ctx, ctx.store.tenant(i.tenant))
        fw.ensure_port(port)
    host.ensure_tap(net.tap, net.bridge)


def instance_down(ctx: Host, i: Instance) -> None:
    if i.host_index is None:
        return
    from mvm.network import host

    host.remove_tap(plan.tap_name(i.id))  # (its port stays allowed: same TAP, MAC and IP next start)


def release(ctx: Host, i: Instance) -> None:
    """The instance is gone: its TAP and port too, and the tenant's network with its last
    instance."""
    instance_down(ctx, i)
    if i.host_index is None:
        return
    firewall_of(ctx).remove_port(plan.tap_name(i.id))
    if not any(o.host_index is not None for o in ctx.store.instances(i.tenant) if o.id != i.id):
        teardown_tenant(ctx, ctx.store.tenant(i.tenant))


def _expected(store: Store) -> tuple[list[firewall.TenantNet], list[tuple[str, str]],
                                      list[firewall.Port]]:
    """A tenant has a network while it has instances with one; live ones have TAPs."""
    tenants: dict[int, firewall.TenantNet] = {}
    taps, ports = [], []
    for t in store.tenants():
        for i in store.instances(t.id):
            if i.host_index is None or i.state is State.CREATED:
                continue  # (a tenant's network comes up with its first start)
            tenants[t.net_id] = tenant_net(t)
            net = plan.instance_net(t.net_id, t.subnet, i.id, i.host_index)
            ports.append(firewall.Port.of(net.tap, net.mac, net.ip, net.net_id))  # until destroyed
            if i.state in (State.RUNNING, State.WARM, State.SLEEPING):
                taps.append((net.tap, net.bridge))
    return sorted(tenants.values(), key=lambda t: t.net_id), taps, ports


def _expect_live_builders(store: Store, tenants: list[firewall.TenantNet],
                          taps: list[tuple[str, str]], ports: list[firewall.Port]) -> None:
    """A builder microVM at work has its TAP and port on its tenant's network (a stale one,
    whose builder is gone, is extra)."""
    from mvm.network import host

    live = set(host.live_taps())
    for t in store.tenants():
        net = builder_net(t)
        if net.tap in live:
            if all(x.net_id != t.net_id for x in tenants):
                tenants.append(tenant_net(t))
            taps.append((net.tap, net.bridge))
            ports.append(firewall.Port.of(net.tap, net.mac, net.ip, net.net_id))


def verify(ctx: Host, repair: bool) -> dict[str, object]:
    from mvm.network import verify as net_verify

    tenants, taps, ports = _expected(ctx.store)
    with ctx.locks.lock("network"):
        claim_netns(ctx)
        _expect_live_builders(ctx.store, tenants, taps, ports)
        report = net_verify.verify(tenants, taps, repair, fw=firewall_of(ctx), ports=ports)
        if repair and not tenants:
            _release_if_empty(ctx)
    return {"ok": report.ok, "problems": report.lines(), "repaired": report.repaired,
            "tenants": len(tenants), "taps": len(taps)}


def firewall_state(layout: Layout) -> str:
    """One line for `mvm doctor`: who holds this namespace and what the home's tables hold."""
    from mvm.errors import MvmError

    marker = claim.holder()
    fw = firewall_for(layout)
    try:
        state = fw.read()
    except MvmError as e:
        return f"cannot read table {fw.name}: {e.message}"
    if marker is not None and marker.home != _home(layout):
        who = f"network namespace held by another home, {marker.home}"
    elif marker is not None:
        who = "network namespace held by this home"
    else:
        who = "network namespace not claimed"
    if state is None:
        return f"{who}; no table {fw.name} (no tenant network up)"
    return (f"{who}; tables inet/bridge {fw.name}: {len(state.tenant_ids())} tenant(s), "
            f"{len(state.ports)} TAP(s) filtered, {len(state.hostnets)} host network(s) closed")


def _release_if_empty(ctx: Host) -> None:
    if not firewall_of(ctx).exists():
        claim.release(_home(ctx))


def teardown_tenant(ctx: Host, t: Tenant) -> None:
    """Remove exactly what the tenant's network created; drop the home's tables when it was
    the last. Nothing of the home is here while another home holds the namespace."""
    from mvm.errors import Conflict
    from mvm.network import host

    fw = firewall_of(ctx)
    if plan.bridge_name(t.net_id) not in host.links() and not fw.exists():
        return  # nothing of the tenant's here (nor of the home's): claim nothing
    with ctx.locks.lock("network"):
        try:
            claim_netns(ctx)
        except Conflict:
            return  # another home's processes live here: whatever we had was taken over
        builder_tap = plan.builder_tap_name(t.net_id)
        if builder_tap in host.live_taps():
            return  # a build's builder uses the network: it tears it down when it ends
        for name in host.list_taps():
            if name == builder_tap or any(name == plan.tap_name(i.id)
                                          for i in ctx.store.instances(t.id)):
                host.remove_tap(name)
        host.remove_bridge(t.net_id)
        fw.remove_tenant(t.net_id)  # (its chains, map and set elements, and its ports)
        if fw.remove_all_if_empty() or not fw.exists():
            _release_if_empty(ctx)


# -- the builder microVM's egress-only network -----------------------------------------------

RESOLV_CONFS = (Path("/etc/resolv.conf"), Path("/run/systemd/resolve/resolv.conf"))


def builder_lock(tenant: str) -> str:
    """One networked builder per tenant at a time: it has the tenant's one builder address."""
    return f"builder-net.{tenant}"


def builder_net(t: Tenant) -> plan.InstanceNet:
    """The builder's TAP, MAC and address on its tenant's network (`.2`, never an instance's)."""
    return plan.InstanceNet(
        net_id=t.net_id, subnet=plan._net(t.subnet), host_index=plan.BUILDER_INDEX,
        bridge=plan.bridge_name(t.net_id), tap=plan.builder_tap_name(t.net_id),
        mac=plan.mac_for(t.net_id, plan.BUILDER_INDEX), ip=plan.builder_ip(t.subnet),
        gateway=plan.gateway(t.subnet))


def builder_dns(hostnets: list[object] | None = None) -> list[str]:
    """The host's IPv4 nameservers a guest may reach: none that is loopback, link-local, or in
    one of the host's own networks (the closed host refuses guests' traffic there, e.g. a
    stub resolver at 127.0.0.53 or a LAN router); systemd-resolved's upstream list is read
    when /etc/resolv.conf names only its stub."""
    from ipaddress import IPv4Address, IPv4Network

    from mvm.network import host

    nets = [n for n in (hostnets if hostnets is not None else host.host_networks())
            if isinstance(n, IPv4Network)]
    out: list[str] = []
    for conf in RESOLV_CONFS:
        try:
            lines = conf.read_text(errors="replace").splitlines()
        except OSError:
            continue
        for ln in lines:
            parts = ln.split()
            if len(parts) < 2 or parts[0] != "nameserver":
                continue
            try:
                ip = IPv4Address(parts[1])
            except ValueError:
                continue  # IPv6: tenant networks are IPv4 only
            if ip.is_loopback or ip.is_link_local or ip.is_unspecified or ip.is_multicast \
                    or any(ip in n for n in nets) or str(ip) in out:
                continue
            out.append(str(ip))
        if out:
            break
    return out[:3]


def builder_up(ctx: Host, t: Tenant) -> plan.InstanceNet:
    """Plug the tenant's builder into the tenant's network (its bridge, isolation, closed host
    and NAT come up if they are not): the firewall lets its TAP send from its MAC and `.2`
    only, before the TAP exists. The caller holds `builder_lock(t.id)`."""
    from mvm.errors import Conflict
    from mvm.network import host

    net = builder_net(t)
    fw = firewall_of(ctx)
    port = firewall.Port.of(net.tap, net.mac, net.ip, net.net_id)
    tenant_up(ctx, t)
    with ctx.locks.lock("network"):
        try:
            fw.ensure_port(port)
        except Conflict:
            tenant_up(ctx, t)
            fw.ensure_port(port)
        host.ensure_tap(net.tap, net.bridge)
    return net


def builder_down(ctx: Host, t: Tenant) -> None:
    """Remove the tenant's builder TAP and port, and the tenant's network when no instance of
    it has one (idempotent: also the next build's cleanup after a killed command). The caller
    holds `builder_lock(t.id)`."""
    from mvm.network import host

    tap = plan.builder_tap_name(t.net_id)
    if tap not in host.links() and not firewall_of(ctx).exists():
        return
    with ctx.locks.lock("network"):
        host.remove_tap(tap)
        if firewall_of(ctx).exists():
            firewall_of(ctx).remove_port(tap)
    if not any(i.host_index is not None and i.state is not State.CREATED
               for i in ctx.store.instances(t.id)):
        teardown_tenant(ctx, t)
