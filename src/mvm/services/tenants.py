"""Tenants: the security, quota and network boundary (DESIGN §1)."""

from __future__ import annotations

import contextlib
import json
import shutil
import time
from collections.abc import Iterable
from ipaddress import IPv4Network
from pathlib import Path

from mvm.config.paths import TENANTS_MODE
from mvm.context import Host
from mvm.errors import Conflict, InvalidInput, QuotaExceeded
from mvm.lifecycle import observe, secrets_disk
from mvm.model import Event, Quotas, State, Tenant, check_id
from mvm.network import plan
from mvm.store import quota_lock_name, tenant_lock_name
from mvm.util import inputs, private


def create(ctx: Host, tid: str, net_id: int | None = None, subnet: str | None = None,
           quotas: Quotas | None = None, egress_allow: Iterable[str] = (),
           egress_deny: Iterable[str] = ()) -> Tenant:
    check_id("tenant", tid)
    from mvm.network import firewall

    allow = tuple(str(n) for n in firewall.parse_egress(egress_allow, "allow"))
    deny = tuple(str(n) for n in firewall.parse_egress(egress_deny, "deny"))
    q = quotas or Quotas()
    for name, value in vars(q).items():
        if value < 0:
            raise InvalidInput(f"--{name.replace('_', '-')} must not be negative (got {value})")
    store = ctx.store
    with ctx.locks.lock("tenants") as lease:
        existing = store.tenants()
        if any(t.id == tid for t in existing):
            raise Conflict(f"tenant {tid!r} already exists", "see `mvm tenant info " + tid + "`")
        used_ids = {t.net_id for t in existing}
        if net_id is None:
            net_id = plan.allocate_net_id(used_ids)
        else:
            plan.validate_net_id(net_id, used_ids)
        others = [t.subnet for t in existing]
        routes = _host_routes()
        if subnet is None:
            try:
                subnet = str(plan.allocate_subnet([*others, *routes], net_id))
            except QuotaExceeded:
                if not routes:
                    raise
                raise QuotaExceeded(
                    f"no /24 of {plan.SUBNET_POOL} is free of other tenants and of the host "
                    f"routes {', '.join(str(r) for r in routes)}",
                    "give the tenant a subnet of its own with --subnet") from None
        else:
            net = plan.validate_subnet(subnet, others)
            for route in routes:
                if route.overlaps(net):
                    raise Conflict(f"subnet {net} overlaps the host route {route}",
                                   "pick another /24, or omit --subnet to have one allocated")
            subnet = str(net)
        t = Tenant(tid, net_id, subnet, q, 0, time.time(), egress_allow=allow, egress_deny=deny)
        store.add_tenant(t, Event("tenant.create", f"tenant {tid} net-id {net_id} subnet {subnet}",
                                  tenant=tid), fence=lease)
        private.mkdirs(ctx.layout.tenant_dir(tid).parent, TENANTS_MODE)
        private.mkdirs(ctx.layout.tenant_dir(tid))
    return t


def _host_routes() -> list[IPv4Network]:
    """The host's routes other than the default route and mvm's bridges' (a tenant subnet on
    one of them would shadow it)."""
    from mvm.network import host

    return host.host_networks()


def set_egress(ctx: Host, tid: str, allow: Iterable[str] | None = None,
               deny: Iterable[str] | None = None) -> Tenant:
    """Replace the tenant's egress allow and/or deny list (None keeps a list as it is) and
    apply it at once to a network that is up."""
    from mvm.lifecycle import netops
    from mvm.network import firewall

    store = ctx.store
    t = store.tenant(tid)
    new_allow = t.egress_allow if allow is None else \
        tuple(str(n) for n in firewall.parse_egress(allow, "allow"))
    new_deny = t.egress_deny if deny is None else \
        tuple(str(n) for n in firewall.parse_egress(deny, "deny"))
    with ctx.locks.lock(tenant_lock_name(tid)) as lease:
        t = store.set_tenant_egress(tid, new_allow, new_deny,
                                    Event("tenant.egress", f"egress allow {list(new_allow) or 'any'}, "
                                          f"deny {list(new_deny) or 'none'}", tenant=tid), fence=lease)
        netops.refresh_tenant(ctx, t)
    return t


def destroy(ctx: Host, tid: str, force: bool = False) -> None:
    store = ctx.store
    store.tenant(tid)
    with ctx.locks.lock(tenant_lock_name(tid)) as lease:
        pools = store.pools(tid)
        if pools and not force:
            raise Conflict(f"tenant {tid} still has {len(pools)} pool(s): "
                           + ", ".join(p.id for p in pools),
                           "destroy them first, or pass --force to destroy everything of the tenant")
        from mvm.services import pools as pool_svc

        for p in pools:
            pool_svc.destroy(ctx, p.ref, force=True)
        from mvm.lifecycle import netops

        netops.teardown_tenant(ctx, store.tenant(tid))
        store.remove_tenant(tid, Event("tenant.destroy", f"tenant {tid} destroyed", tenant=tid),
                            fence=lease)
        shutil.rmtree(ctx.layout.tenant_dir(tid), ignore_errors=True)
        observe.sweep(ctx)  # clear-text secrets killed commands left (the tenant's, or others')
        if not store.tenants():  # the last one: this home's runtime dirs go too (when empty)
            for d in (ctx.layout.runtime_dir(), ctx.layout.secrets_runtime_dir()):
                with contextlib.suppress(OSError):
                    d.rmdir()
        ctx.locks.remove(quota_lock_name(tid))
        ctx.locks.remove(tenant_lock_name(tid))  # (we hold it)


def set_secrets(ctx: Host, tid: str, source: Path) -> int:
    """Store the tenant's secrets (a JSON object) 0600; returns the new secrets version.

    What is accepted here fits the secrets disk every start and wake builds (same limit). Under
    the tenant's lease: two at once each get a version of their own."""
    store = ctx.store
    store.tenant(tid)
    hint = "secrets must be a JSON object, e.g. {\"API_KEY\": \"...\"}"
    raw = inputs.read_file(source, secrets_disk.MAX_BYTES, hint)
    data = inputs.load_json(raw, str(source), hint)
    if not isinstance(data, dict):
        raise InvalidInput(f"{source} holds a JSON {type(data).__name__}, not an object", hint)
    stored = json.dumps(data, indent=2, sort_keys=True).encode() + b"\n"
    secrets_disk.check_size(tid, len(stored))
    dest = ctx.layout.secrets_file(tid)
    with ctx.locks.lock(tenant_lock_name(tid)) as lease:
        version = store.tenant(tid).secrets_version + 1
        private.mkdirs(dest.parent)
        private.write(dest, stored)
        return store.bump_secrets_version(
            tid, Event("tenant.secrets", f"secrets set ({len(data)} keys), version {version}",
                       tenant=tid), fence=lease)


def secret_keys(ctx: Host, tid: str) -> list[str]:
    try:
        return sorted(json.loads(ctx.layout.secrets_file(tid).read_text()))
    except FileNotFoundError:
        return []


def get(ctx: Host, tid: str) -> Tenant:
    return ctx.store.tenant(check_id("tenant", tid))


def stale_instances(ctx: Host, tid: str) -> list[str]:
    """Instances that hold secrets older than the tenant's current ones."""
    store = ctx.store
    t = store.tenant(tid)
    return [f"{i.tenant}/{i.pool}/{i.id}" for i in store.instances(tid)
            if i.state in (State.RUNNING, State.WARM, State.SLEEPING)
            and i.secrets_version < t.secrets_version]
