"""`mvm tenant`: tenants, their egress and their secrets."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from mvm.cli import output, present
from mvm.cli.common import JsonOpt, agent, ctx, show
from mvm.cli.output import emit_json
from mvm.model import Quotas, check_id

tenant_app = typer.Typer(no_args_is_help=True, help="Tenants: quota, secrets and network boundary.")
secrets_app = typer.Typer(no_args_is_help=True, help="A tenant's secrets (values are never printed).")
tenant_app.add_typer(secrets_app, name="secrets")


@tenant_app.command("create")
def tenant_create(
    tenant: str,
    net_id: Annotated[int | None, typer.Option("--net-id", help="0-4095; auto when omitted")] = None,
    subnet: Annotated[str | None, typer.Option(help="a private /24; auto when omitted")] = None,
    max_vcpus: Annotated[int, typer.Option("--max-vcpus")] = Quotas.max_vcpus,
    max_mem: Annotated[int, typer.Option("--max-mem", help="MiB")] = Quotas.max_mem,
    max_running: Annotated[int, typer.Option("--max-running")] = Quotas.max_running,
    max_warm: Annotated[int, typer.Option("--max-warm")] = Quotas.max_warm,
    max_pools: Annotated[int, typer.Option("--max-pools")] = Quotas.max_pools,
    max_instances: Annotated[int, typer.Option("--max-instances", help="per pool")] = Quotas.max_instances,
    max_data_disk: Annotated[int, typer.Option(
        "--max-data-disk", help="MiB of data disk per instance")] = Quotas.max_data_disk,
    max_disk: Annotated[int, typer.Option(
        "--max-disk", help="MiB of data disks of all the tenant's instances")] = Quotas.max_disk,
    egress_allow: Annotated[list[str] | None, typer.Option(
        "--egress-allow", help="IPv4 CIDR guests may reach outside (repeat; default: anywhere)")] = None,
    egress_deny: Annotated[list[str] | None, typer.Option(
        "--egress-deny", help="IPv4 CIDR guests may not reach (repeat)")] = None,
) -> None:
    """Create a tenant."""
    from mvm.services import tenants

    t = tenants.create(ctx(), tenant, net_id, subnet,
                       Quotas(max_vcpus, max_mem, max_running, max_warm, max_pools, max_instances,
                              max_data_disk=max_data_disk, max_disk=max_disk),
                       egress_allow or (), egress_deny or ())
    print(f"tenant {t.id} created (net-id {t.net_id}, subnet {t.subnet})")


@tenant_app.command("egress")
def tenant_egress(
    tenant: str,
    allow: Annotated[list[str] | None, typer.Option(
        "--allow", help="IPv4 CIDR guests may reach outside (repeat; replaces the allow list)")] = None,
    deny: Annotated[list[str] | None, typer.Option(
        "--deny", help="IPv4 CIDR guests may not reach (repeat; replaces the deny list)")] = None,
    clear: Annotated[bool, typer.Option("--clear", help="empty both lists first")] = False,
    json_: JsonOpt = False,
) -> None:
    """Show or change where a tenant's guests may go outside (the host and other tenants
    are closed to them whatever the lists say)."""
    from mvm.services import tenants

    tid = check_id("tenant", tenant)
    if allow is None and deny is None and not clear:
        t = tenants.get(ctx(), tid)
    else:
        t = tenants.set_egress(ctx(), tid, allow if allow is not None else ([] if clear else None),
                               deny if deny is not None else ([] if clear else None))
    show({"allow": list(t.egress_allow), "deny": list(t.egress_deny)}, json_)


@tenant_app.command("list")
def tenant_list(json_: JsonOpt = False) -> None:
    """List tenants."""
    if (a := agent()) is not None:
        ts, ps = a.tenants(), a.pools()
    else:
        from mvm.services import views

        ts, ps = views.tenant_list(ctx()), views.pool_list(ctx())
    present.tenant_list(ts, {t["id"]: sum(1 for p in ps if p["tenant"] == t["id"]) for t in ts}, json_)


@tenant_app.command("info")
def tenant_info(tenant: str, json_: JsonOpt = False) -> None:
    """Show a tenant: network, quotas, usage, secret names (never values)."""
    if (a := agent()) is not None:
        present.show(a.tenant_info(check_id("tenant", tenant)), json_)
        return
    from mvm.services import views

    present.show(views.tenant_info(ctx(), tenant), json_)


@tenant_app.command("destroy")
def tenant_destroy(tenant: str, force: Annotated[bool, typer.Option(
        "--force", help="also destroy the tenant's pools and instances")] = False) -> None:
    """Destroy a tenant (and with --force everything it owns)."""
    from mvm.services import tenants

    tenants.destroy(ctx(), check_id("tenant", tenant), force)
    print(f"tenant {tenant} destroyed")


@secrets_app.command("set")
def secrets_set(tenant: str, from_file: Annotated[Path, typer.Option("--from-file")]) -> None:
    """Replace the tenant's secrets with a JSON object read from a file."""
    from mvm.services import tenants

    version = tenants.set_secrets(ctx(), check_id("tenant", tenant), from_file)
    print(f"secrets of {tenant} set (version {version}); running instances keep their copy"
          " until restarted or woken")


@secrets_app.command("rotate")
def secrets_rotate(tenant: str, restart: Annotated[bool, typer.Option(
        "--restart", help="restart running and warm instances that hold old secrets")] = False,
        json_: JsonOpt = False) -> None:
    """Say which instances hold old secrets; with --restart, re-deliver by restarting them."""
    from mvm.services import tenants

    stale = tenants.stale_instances(ctx(), check_id("tenant", tenant))
    restarted: list[str] = []
    if restart and stale:
        from mvm.services import instances

        restarted = instances.redeliver_secrets(ctx(), tenant, progress=output.StepPrinter("rotate"))
    if json_:
        emit_json({"stale": stale, "restarted": restarted})
        return
    if not stale:
        print(f"every instance of {tenant} holds the current secrets")
    for s in stale:
        print(f"{s}: holds old secrets" + (" -> restarted" if s in restarted else ""))
