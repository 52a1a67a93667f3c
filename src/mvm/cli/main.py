"""The `mvm` command line. It parses, calls the library, and prints; nothing else."""

from __future__ import annotations

import os
import re
import sys
import traceback
from collections.abc import Iterable
from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import click
import typer

from mvm import __version__
from mvm.cli import output, present
from mvm.cli.output import emit_json, table
from mvm.errors import EXEC_LOST, EXEC_NOT_STARTED, ExecLost, InvalidInput, MvmError
from mvm.model import PoolRef, Quotas, check_id
from mvm.util.private import PRIVATE_UMASK

if TYPE_CHECKING:
    from mvm.cli import remote
    from mvm.config.paths import Layout
    from mvm.context import Host
    from mvm.store import Store

app = typer.Typer(no_args_is_help=True, add_completion=False, pretty_exceptions_enable=False,
                  rich_markup_mode=None, help="Fleets of microVMs for many tenants, built from Nix flakes.")
tenant_app = typer.Typer(no_args_is_help=True, help="Tenants: quota, secrets and network boundary.")
secrets_app = typer.Typer(no_args_is_help=True, help="A tenant's secrets (values are never printed).")
pool_app = typer.Typer(no_args_is_help=True, help="Pools: a flake profile, its revisions and instances.")
config_app = typer.Typer(no_args_is_help=True, help="Host settings.")
app.add_typer(tenant_app, name="tenant")
tenant_app.add_typer(secrets_app, name="secrets")
app.add_typer(pool_app, name="pool")
app.add_typer(config_app, name="config")

JsonOpt = Annotated[bool, typer.Option("--json", help="Print JSON instead of a table.")]
STATE: dict[str, object] = {"debug": False}
_host: Host | None = None


def show(info: dict[str, object], json_: bool) -> None:
    """One object: JSON, or `key: value` lines."""
    present.show(info, json_)


def agent() -> remote.Agent | None:
    """The agent this command goes through (`--agent` / MVM_AGENT), if any."""
    where = STATE.get("agent")
    if not where:
        return None
    from mvm.cli import remote

    return remote.Agent(str(where))


def _not_through_agent() -> None:
    if STATE.get("agent"):
        cmd = click.get_current_context(silent=True)
        name = cmd.command_path if cmd else "this command"
        raise InvalidInput(f"`{name}` does not go through the agent",
                           "run it without --agent / MVM_AGENT, on the agent's host")


def ctx() -> Host:
    """The host context of this command, made once at the edge."""
    global _host
    _not_through_agent()
    if _host is None:
        from mvm.context.compose import compose

        _host = compose(waiting=output.note)  # a wait for another command is never silent
    return _host


def store() -> Store:
    return ctx().store


def _layout() -> Layout:
    """The state layout, without opening the store (set-up and doctor run before there is one)."""
    from mvm.config.paths import Layout

    _not_through_agent()
    return _host.layout if _host is not None else Layout.from_env()


@app.callback()
def _root(debug: Annotated[bool, typer.Option("--debug", help="Show tracebacks.")] = False,
          agent: Annotated[str | None, typer.Option(
              "--agent", envvar="MVM_AGENT", metavar="SOCKET",
              help="Go through the agent's API at this Unix socket (or http://HOST:PORT, token in"
              " MVM_AGENT_TOKEN).")] = None) -> None:
    STATE["debug"] = debug
    STATE["agent"] = agent


@app.command()
def version() -> None:
    """Print mvm's version."""
    print(__version__)


# -- setup, doctor, config ---------------------------------------------------

@app.command()
def setup(
    offline: Annotated[bool | None, typer.Option(
        "--offline/--online", help="Point flakes' nixpkgs at mvm's offline package set "
        "(default: only when github.com is unreachable).")] = None,
) -> None:
    """Install mvm's host assets: default guest kernel, built-in flake, offline nixpkgs."""
    from mvm.services import host_setup

    host_setup.setup(_layout(), offline, progress=output.Steps("setup"))


@app.command()
def doctor(json_: JsonOpt = False) -> None:
    """Check what the host has: QEMU, a usable and fast KVM, Nix, mkfs.ext4, TUN, bridges, kernel."""
    from mvm.services import host_setup

    checks = host_setup.doctor(_layout())
    if json_:
        emit_json(checks)
    else:
        table(["check", "ok", "detail"],
              [(c["check"], "yes" if c["ok"] else "NO" if c["required"] else "warn", c["detail"])
               for c in checks])
    if not all(c["ok"] or not c["required"] for c in checks):
        raise typer.Exit(1)


@config_app.command("list")
def config_list(json_: JsonOpt = False) -> None:
    """Show every setting."""
    from mvm.config import settings

    values = settings.raw(_layout())
    if json_:
        emit_json(values)
    else:
        table(["setting", "value", "meaning"],
              [(k, values[k], s.help) for k, s in settings.SETTINGS.items()])


@config_app.command("get")
def config_get(key: str) -> None:
    """Print one setting."""
    from mvm.config import settings

    print(settings.get(_layout(), key))


@config_app.command("set")
def config_set(key: str, value: str) -> None:
    """Change one setting (an empty string restores the default)."""
    from mvm.config import settings

    settings.set_value(_layout(), key, value)


# -- tenants -------------------------------------------------------------------

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
        t = store().tenant(tid)
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

    stale = tenants.stale_instances(store(), check_id("tenant", tenant))
    restarted: list[str] = []
    if restart and stale:
        from mvm.services import instances

        restarted = instances.redeliver_secrets(ctx(), tenant, progress=output.Steps("rotate"))
    if json_:
        emit_json({"stale": stale, "restarted": restarted})
        return
    if not stale:
        print(f"every instance of {tenant} holds the current secrets")
    for s in stale:
        print(f"{s}: holds old secrets" + (" -> restarted" if s in restarted else ""))


# -- pools ---------------------------------------------------------------------

IdleWarmOpt = Annotated[str | None, typer.Option(
    "--idle-warm", help="idle time before a running instance goes warm (e.g. 30s, 5m, 1h; 0 or off:"
    " never); applied by `mvm agent serve`")]
IdleSleepOpt = Annotated[str | None, typer.Option(
    "--idle-sleep", help="idle time before a warm instance goes to sleep (0 or off: never)")]
MinRunningOpt = Annotated[int | None, typer.Option(
    "--min-running", help="instances the idle policy always leaves running")]
GraceOpt = Annotated[str | None, typer.Option(
    "--unresponsive-grace", help="how long a hypervisor that does not answer its control socket"
    " is given before it is ended and its instance started again (default 30s)")]


@pool_app.command("create")
def pool_create(
    pool: str,
    flake: Annotated[str | None, typer.Option(help="flake reference; omitted: mvm's built-in flake")] = None,
    profile: Annotated[str, typer.Option(help="the flake's package to build")] = "minimal",
    cpus: Annotated[int, typer.Option(help="vCPUs per instance")] = 1,
    mem: Annotated[int, typer.Option(help="MiB per instance")] = 256,
    data_disk: Annotated[int, typer.Option("--data-disk", help="MiB of /data per instance (0: none)")] = 0,
    network: Annotated[str, typer.Option(help="tenant (default) or none")] = "tenant",
    idle_warm: IdleWarmOpt = None,
    idle_sleep: IdleSleepOpt = None,
    min_running: MinRunningOpt = None,
    pin: Annotated[bool, typer.Option("--pin", help="the idle policy never moves this pool's instances")] = False,
    backend: Annotated[str, typer.Option(help="qemu or firecracker; omitted: the host's (setting backend)")] = "",
    unresponsive_grace: GraceOpt = None,
) -> None:
    """Create a pool from a flake profile."""
    from mvm.services import pools

    p = pools.create(ctx(), PoolRef.parse(pool), flake, profile, cpus, mem, data_disk, network,
                     idle_warm=pools.parse_duration(idle_warm, "--idle-warm") if idle_warm else None,
                     idle_sleep=pools.parse_duration(idle_sleep, "--idle-sleep") if idle_sleep else None,
                     min_running=min_running or 0, pinned=pin,
                     backend=backend,
                     unresponsive_grace=pools.parse_grace(unresponsive_grace) if unresponsive_grace else None)
    print(f"pool {p.ref} created ({p.flake}#{p.profile}, {p.cpus} vCPU, {p.mem} MiB"
          f"{f', data disk {p.data_disk} MiB' if p.data_disk else ''})")


@pool_app.command("update")
def pool_update(
    pool: str,
    idle_warm: IdleWarmOpt = None,
    idle_sleep: IdleSleepOpt = None,
    min_running: MinRunningOpt = None,
    pin: Annotated[bool | None, typer.Option(
        "--pin/--no-pin", help="whether the idle policy leaves this pool's instances alone")] = None,
    unresponsive_grace: GraceOpt = None,
) -> None:
    """Change a pool's idle policy and unresponsive grace (what is not given stays); the agent
    applies them."""
    from mvm.services import pools

    ref = PoolRef.parse(pool)
    changes: dict[str, object] = {}
    if idle_warm is not None:
        changes["idle_warm"] = pools.parse_duration(idle_warm, "--idle-warm")
    if idle_sleep is not None:
        changes["idle_sleep"] = pools.parse_duration(idle_sleep, "--idle-sleep")
    grace = pools.parse_grace(unresponsive_grace) if unresponsive_grace is not None else None
    p = pools.update_policy(ctx(), ref, min_running=min_running, pinned=pin,
                            unresponsive_grace=grace, **changes)
    print(f"{ref}: {pools.describe_policy(p)}")
    if grace is not None:
        print(f"{ref}: {pools.describe_grace(p)}")


@pool_app.command("list")
def pool_list(tenant: Annotated[str | None, typer.Argument()] = None, json_: JsonOpt = False) -> None:
    """List pools."""
    if (a := agent()) is not None:
        if tenant:
            check_id("tenant", tenant)
        ps = a.pools(tenant)
        counts: dict[str, int] = {}
        for i in (a.instances(tenant) if ps and not json_ else []):
            counts[i["pool"]] = counts.get(i["pool"], 0) + 1
    else:
        from mvm.services import views

        ps, counts = views.pool_list(ctx(), tenant), views.instance_counts(ctx(), tenant)
    present.pool_list(ps, counts, json_)


@pool_app.command("info")
def pool_info(pool: str, json_: JsonOpt = False) -> None:
    """Show a pool."""
    ref = PoolRef.parse(pool)
    if (a := agent()) is not None:
        present.pool_info(a.pool_info(str(ref)), json_)
        return
    from mvm.services import views

    present.pool_info(views.pool_info(ctx(), ref), json_)


@pool_app.command("build")
def pool_build(
    pool: str,
    force: Annotated[bool, typer.Option("--force", help="rebuild even when nothing changed")] = False,
    builder: Annotated[str | None, typer.Option(
        help="vm: the ephemeral builder microVM; host: the host's Nix (trusted hosts only);"
        " default: the `builder` setting")] = None,
    builder_cpus: Annotated[int, typer.Option("--builder-cpus", help="vCPUs of the builder VM")] = 2,
    builder_mem: Annotated[int, typer.Option("--builder-mem", help="MiB of the builder VM")] = 1024,
    timeout: Annotated[float, typer.Option(help="seconds before the builder VM is stopped")] = 1800,
) -> None:
    """Build the pool's flake profile into a new revision and make it current."""
    from mvm.services import builder as builder_vm
    from mvm.services import pools

    ref = PoolRef.parse(pool)
    if (a := agent()) is not None:
        r = a.build(str(ref), {"force": force, "builder": builder, "builder_cpus": builder_cpus,
                               "builder_mem": builder_mem, "timeout": timeout},
                    report=lambda line: output.note(f"build {ref} {line}"))
        present.built(str(ref), r["revision"], r["cached"])
        return
    opts = builder_vm.Options(builder_cpus, builder_mem, timeout)
    rev, cached = pools.build(ctx(), ref, force, progress=output.Steps(f"build {ref}"),
                              builder_kind=builder, options=opts)
    present.built(str(ref), rev.hash, cached)


@pool_app.command("revisions")
def pool_revisions(pool: str, json_: JsonOpt = False) -> None:
    """List a pool's revisions; * marks current."""
    ref = PoolRef.parse(pool)
    if (a := agent()) is not None:
        present.revisions(a.revisions(str(ref)), json_)
        return
    from mvm.services import views

    present.revisions(views.revisions(ctx(), ref), json_)


@pool_app.command("rollback")
def pool_rollback(pool: str, revision: Annotated[str | None, typer.Option(
        help="revision hash (or unique prefix); omitted: the previous one")] = None) -> None:
    """Point `current` at another revision without building."""
    from mvm.services import pools

    ref = PoolRef.parse(pool)
    a = agent()
    target = a.rollback(str(ref), revision) if a is not None else pools.rollback(ctx(), ref, revision)
    present.rolled_back(str(ref), target)


@pool_app.command("gc")
def pool_gc(pool: str, keep: Annotated[int, typer.Option(help="newest revisions to keep")] = 3) -> None:
    """Delete old revisions (never current, never one an instance uses)."""
    from mvm.services import pools

    removed = pools.gc(ctx(), PoolRef.parse(pool), keep)
    print(f"removed {len(removed)} revision(s)" + (": " + ", ".join(removed) if removed else ""))


@pool_app.command("destroy")
def pool_destroy(pool: str, force: Annotated[bool, typer.Option(
        "--force", help="also destroy the pool's instances")] = False) -> None:
    """Destroy a pool, its revisions and (with --force) its instances."""
    from mvm.services import pools

    ref = PoolRef.parse(pool)
    pools.destroy(ctx(), ref, force)
    print(f"pool {ref} destroyed")


@pool_app.command("scale")
def pool_scale(
    pool: str,
    running: Annotated[int, typer.Option(help="instances running")] = 0,
    warm: Annotated[int, typer.Option(help="instances with vCPUs paused (instant resume)")] = 0,
    sleeping: Annotated[int, typer.Option(help="instances snapshotted to disk (~1s wake)")] = 0,
    json_: JsonOpt = False,
) -> None:
    """Converge the pool to these counts now (reusing instances before creating new ones)."""
    from mvm.services import views

    ref = PoolRef.parse(pool)
    if (a := agent()) is not None:
        for name, n in (("--running", running), ("--warm", warm), ("--sleeping", sleeping)):
            if n < 0:
                raise InvalidInput(f"{name} must not be negative (got {n})")
        present.scaled(str(ref), a.scale(str(ref), running, warm, sleeping, report=output.note), json_)
        return
    from mvm.services import scale

    result = scale.scale(ctx(), ref, running, warm, sleeping, report=output.note,
                         progress=output.Steps("scale"))
    present.scaled(str(ref), [views.instance(i) for i in result], json_)


# -- instances -------------------------------------------------------------------

builder_app = typer.Typer(no_args_is_help=True, help="The builder microVM that runs `pool build`.")
app.add_typer(builder_app, name="builder")


@builder_app.command("init")
def builder_init(force: Annotated[bool, typer.Option(
        "--force", help="make the image again even when it is current")] = False) -> None:
    """Make the builder image (Debian with Nix, by mmdebstrap from apt's mirror); idempotent."""
    from mvm.services import builder as builder_vm

    info, made = builder_vm.init(ctx(), output.Steps("builder init"), force)
    print(f"builder {info.version} {'made' if made else 'is current'}: {info.image}")


@builder_app.command("info")
def builder_info(json_: JsonOpt = False) -> None:
    """Show the builder image: version, size, Debian packages."""
    from mvm.services import builder as builder_vm

    data = builder_vm.info(ctx()).to_json()
    if not json_:
        keep = ("nix-bin", "e2fsprogs", "busybox-static", "python3")
        data["packages"] = ", ".join(f"{k} {v}" for k, v in data["packages"].items() if k in keep)
    show(data, json_)


instance_app = typer.Typer(no_args_is_help=True, help="Instances: one microVM each.")
app.add_typer(instance_app, name="instance")


def _instance_json(i: object, observed: str | None = None) -> dict[str, object]:
    from mvm.model import Instance
    from mvm.services import views

    assert isinstance(i, Instance)
    return views.instance(i, observed)


def _iref(text: str):  # type: ignore[no-untyped-def]
    from mvm.model import InstanceRef

    return InstanceRef.parse(text)


@instance_app.command("list")
def instance_list(where: Annotated[str | None, typer.Argument(help="<tenant> or <tenant>/<pool>")] = None,
                  json_: JsonOpt = False) -> None:
    """List instances, with what their hypervisors say (reading only: nothing is changed)."""
    if (a := agent()) is not None:
        present.instance_list(a.instances(where), json_)
        return
    from mvm.services import views

    present.instance_list(views.instance_list(ctx(), where), json_)


@instance_app.command("info")
def instance_info(instance: str, json_: JsonOpt = False) -> None:
    """Show one instance, including the revision it runs (reading only)."""
    ref = _iref(instance)
    if (a := agent()) is not None:
        present.show(a.instance_info(str(ref)), json_)
        return
    from mvm.services import views

    present.show(views.instance_info(ctx(), ref), json_)


@instance_app.command("create")
def instance_create(pool: str) -> None:
    """Create an instance (state created) in a pool."""
    from mvm.lifecycle import create

    i = create(ctx(), PoolRef.parse(pool))
    print(str(i.ref))


def _transition_cmd(name: str, doc: str) -> None:
    def cmd(instance: str) -> None:
        ref = _iref(instance)
        if (a := agent()) is not None:
            r = a.transition(str(ref), name)
            present.transitioned(r["address"], r["state"])
            return
        from mvm.lifecycle import apply
        from mvm.model import Action

        i = apply(ctx(), ref, Action(name), progress=output.Steps(f"{name} {instance}"))
        present.transitioned(str(i.ref), i.state.value)

    cmd.__doc__ = doc
    instance_app.command(name)(cmd)


for _name, _doc in (
    ("start", "Cold-boot the instance on its pool's current revision."),
    ("stop", "Shut the instance down (data disk kept)."),
    ("warm", "Pause the instance's vCPUs (RAM stays; instant resume)."),
    ("resume", "Un-pause a warm instance."),
    ("sleep", "Snapshot the instance to disk and end its hypervisor (RAM freed)."),
    ("wake", "Restore a sleeping instance from its snapshot."),
):
    _transition_cmd(_name, _doc)


@instance_app.command("destroy")
def instance_destroy(instance: str, keep_data: Annotated[bool, typer.Option(
        "--keep-data", help="keep the data disk file")] = False) -> None:
    """Stop the instance and remove everything it has (unless --keep-data, its data disk)."""
    from mvm.lifecycle import apply
    from mvm.model import Action

    ref = _iref(instance)
    apply(ctx(), ref, Action.DESTROY, keep_data=keep_data)
    kept = ctx().layout.tenant_dir(ref.tenant) / "kept-data" / f"{ref.pool}-{ref.instance}.ext4"
    print(f"{instance} destroyed" + (f"; data disk kept at {kept}" if keep_data and kept.exists() else ""))


@instance_app.command("observe")
def instance_observe(pool: str) -> None:
    """Reconcile a pool's instances with their hypervisors: finish transitions that dead
    commands left, fail instances whose hypervisor exited, end hypervisors nobody records."""
    from mvm.lifecycle import observe
    from mvm.lifecycle.apply import pool_locked

    ref = PoolRef.parse(pool)
    store().pool(ref.tenant, ref.pool)
    with pool_locked(ctx(), ref, None) as lease:
        done = observe.pool(ctx(), ref, lease)
    for line in done:
        print(line)
    if not done:
        print(f"{ref}: every instance is as the store says")


def _size(value: str) -> int:
    """Bytes, with an optional binary suffix: 4096, 64K, 16M, 1G."""
    units = {"": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30}
    text = value.strip().upper().removesuffix("IB").removesuffix("B")
    digits, unit = (text[:-1], text[-1]) if text[-1:] in units else (text, "")
    if not digits.isdigit():
        raise typer.BadParameter(f"{value!r} is not a size: give bytes, or a number with K, M or G",
                                 param_hint="'--max-output'")
    return int(digits) * units[unit]


@instance_app.command("exec")
def instance_exec(
    instance: str,
    command: Annotated[list[str], typer.Argument(help="command and arguments (after --)")],
    timeout: Annotated[float, typer.Option(help="seconds before the command is killed (at most 86400)")] = 60.0,
    max_output: Annotated[str, typer.Option(
        "--max-output", help="bytes of stdout, and of stderr, to keep (e.g. 64K, 16M; at most 256M); "
        "the rest is cut, with a warning")] = "16M",
    json_: Annotated[bool, typer.Option("--json", help="Print exit code, output (as UTF-8 text, "
                                        "invalid bytes replaced) and what was cut, as JSON.")] = False,
) -> None:
    """Run a command in the guest; exits with the command's exit code, or 125 when mvm failed
    and the command did not start, 126 when it started and its result was lost. Through the
    agent (`--agent`), a warm or sleeping instance is resumed or woken first."""
    try:
        ref, limit = _iref(instance), _size(max_output)
        if (a := agent()) is not None:
            from mvm.guest.agent_client import check_exec_limits

            check_exec_limits(timeout, limit)
            d = a.exec(str(ref), list(command), timeout, limit)
            code, timed_out, out, err, cut = d["exit_code"], d["timed_out"], d["stdout"], d["stderr"], d["truncated"]
        else:
            from mvm.services import instances

            r = instances.exec_(ctx(), ref, list(command), timeout, limit)
            code, timed_out, out, err, cut = r.exit_code, r.timed_out, r.stdout, r.stderr, r.truncated
    except MvmError as e:
        # exec's own failures never exit with a code its command could have given
        e.exit_code = EXEC_LOST if isinstance(e, ExecLost) else EXEC_NOT_STARTED
        if json_:
            emit_json({"error": e.message, "hint": e.hint, "started": isinstance(e, ExecLost),
                       "exit_code": e.exit_code})
        raise
    present.exec_result(code, timed_out, out, err, cut, timeout, json_)
    raise typer.Exit(code)


@instance_app.command("logs")
def instance_logs(instance: str, raw: Annotated[bool, typer.Option(
        "--raw", help="the bytes as the guest wrote them, control characters included")] = False) -> None:
    """Print the instance's serial console log (the last 1-2 MiB); control characters are
    shown escaped (\\x1b), unless --raw."""
    from mvm.services import instances
    from mvm.util.text import printable

    data = instances.console(ctx(), _iref(instance))
    sys.stdout.buffer.write(data if raw else printable(data).encode())


# -- network -------------------------------------------------------------------

net_app = typer.Typer(no_args_is_help=True, help="Tenant networks.")
app.add_typer(net_app, name="net")


@net_app.command("verify")
def net_verify(repair: Annotated[bool, typer.Option("--repair", help="put drifted parts back")] = False,
               json_: JsonOpt = False) -> None:
    """Compare bridges, TAPs and firewall rules with the database; --repair puts them back."""
    from mvm.lifecycle import netops

    report = netops.verify(ctx(), repair)
    if json_:
        emit_json(report)
    else:
        for line in report["problems"]:  # type: ignore[attr-defined]
            print(line)
        if report["ok"]:
            print("network matches the database")
    if not report["ok"] and not repair:
        raise typer.Exit(1)


# -- events --------------------------------------------------------------------

#: At most this many events are printed at once (`-n`).
EVENTS_MAX = 10_000
#: How often `mvm events --follow` looks for new events (seconds).
EVENTS_POLL = 0.2


def _event_line(e: dict[str, object]) -> str:
    """One event as a line of the table (`mvm events`): text from outside escaped."""
    import time as time_

    from mvm.util.text import printable

    when = time_.strftime("%Y-%m-%d %H:%M:%S", time_.localtime(float(e["ts"])))  # type: ignore[arg-type]
    where = "/".join(str(e[k]) for k in ("tenant", "pool", "instance") if e.get(k)) or "-"
    took = f"{float(e['duration']):.2f}s" if e.get("duration") is not None else "-"  # type: ignore[arg-type]
    message = str(e["message"])
    if e.get("cause") and str(e["cause"]) not in message:
        message += f" (cause: {e['cause']})"
    line = f"{when}  {where:<34} {e['kind']!s:<24} {e['reason']!s:<9} {took:>8}  {message}"
    return printable(" ".join(line.splitlines()))


EVENTS_HEADER = f"{'time':<19}  {'tenant/pool/instance':<34} {'kind':<24} {'reason':<9} {'took':>8}  message"


@app.command()
def events(
    tenant: Annotated[str | None, typer.Argument(help="only this tenant's events")] = None,
    n: Annotated[int, typer.Option("-n", "--count", help=f"how many of the newest events to show "
                                   f"(at most {EVENTS_MAX})")] = 20,
    json_: Annotated[bool, typer.Option("--json", help="Print a JSON array (oldest first); with "
                                        "--follow, one JSON object per line.")] = False,
    follow: Annotated[bool, typer.Option("--follow", "-f", help="keep printing events as they "
                                         "happen, until Ctrl-C")] = False,
) -> None:
    """Show what happened: every state change, build, rollback, secrets change, refusal and
    policy move, with its time, reason code, cause and duration (oldest first)."""
    import json
    import time as time_

    from mvm.errors import InvalidInput, NotFound

    if not 0 <= n <= EVENTS_MAX:
        raise InvalidInput(f"-n must be between 0 and {EVENTS_MAX} (got {n})")
    st = a.event_store() if (a := agent()) is not None else store()
    if tenant is not None:
        check_id("tenant", tenant)
        if tenant not in {t.id for t in st.tenants()} and not st.events(tenant, limit=1):
            raise NotFound(f"no tenant {tenant!r} (and no events of one)", "see `mvm tenant list`")
    shown = list(reversed(st.events(tenant, limit=n)))
    if json_ and not follow:
        emit_json(shown)
        return

    def write(e: dict[str, object]) -> None:
        line = json.dumps(e, sort_keys=True) if json_ else _event_line(e)
        sys.stdout.write(line + "\n")

    last = max([int(e["id"]) for e in shown], default=0)  # type: ignore[call-overload]
    if not shown and follow:  # (nothing shown: follow from the newest there is)
        newest = st.events(tenant, limit=1)
        last = int(newest[0]["id"]) if newest else 0  # type: ignore[call-overload]
    if follow:  # Ctrl-C or SIGTERM end it, even where the shell started it with SIGINT ignored
        import signal

        def stop(signum: int, frame: object) -> None:
            raise KeyboardInterrupt

        signal.signal(signal.SIGINT, stop)
        signal.signal(signal.SIGTERM, stop)
    try:
        if not json_:
            sys.stdout.write(EVENTS_HEADER + "\n")
        for e in shown:
            write(e)
        sys.stdout.flush()
        while follow:
            time_.sleep(EVENTS_POLL)
            for e in st.events(tenant, limit=EVENTS_MAX, after=last):
                write(e)
                last = int(e["id"])  # type: ignore[call-overload]
            sys.stdout.flush()
    except KeyboardInterrupt:  # how --follow ends: not an error
        sys.stdout.flush()
    except BrokenPipeError:  # (piped into `head`)
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())


# -- agent -----------------------------------------------------------------------------------

agent_app = typer.Typer(no_args_is_help=True, help="The agent: keeps pools converged, sleeps idle instances.")
app.add_typer(agent_app, name="agent")


@agent_app.command("serve")
def agent_serve(
    interval: Annotated[float, typer.Option(
        help="seconds between passes (a change in the store starts one at once)")] = 10.0,
    socket: Annotated[Path | None, typer.Option(
        help="the API's Unix socket (root only); default: <state home>/agent/api.sock")] = None,
    listen: Annotated[str | None, typer.Option(
        metavar="HOST:PORT", help="also serve the API on TCP (requires --token-file)")] = None,
    token_file: Annotated[Path | None, typer.Option(
        "--token-file", help="bearer token for TCP clients (a file only root reads)")] = None,
    api: Annotated[bool, typer.Option("--api/--no-api", help="serve the REST API and /metrics")] = True,
) -> None:
    """Keep every pool at its desired counts (replacing crashed instances), apply idle
    policies and serve the REST API, metrics and events, until SIGTERM or Ctrl-C; the VMs keep
    running after it exits."""
    import signal
    import threading

    from mvm.context.compose import compose
    from mvm.services.agent import Agent

    if interval <= 0 or interval > 86400:
        raise typer.BadParameter(f"{interval:g} is not in (0, 86400] seconds", param_hint="'--interval'")
    stop = threading.Event()
    agent = Agent(ctx(), interval, report=output.note)
    api_stop = threading.Event()
    server: threading.Thread | None = None
    if api:
        from mvm.api import server as api_server

        ready = threading.Event()
        failed: list[BaseException] = []

        def run_api() -> None:
            try:
                api_server.serve(compose, socket=socket, listen=listen, token_file=token_file,
                                 on_ready=ready.set, stop=api_stop)
            except BaseException as e:  # told to the main thread, which says it in one line
                failed.append(e)
            finally:
                ready.set()

        server = threading.Thread(target=run_api, name="mvm-api", daemon=True)
        server.start()
        ready.wait()
        if failed:
            raise failed[0]

    def on_signal(signum: int, frame: object) -> None:
        if stop.is_set():  # a second one: abort the pass (its transitions roll back)
            raise KeyboardInterrupt
        output.note(f"agent: {signal.Signals(signum).name}: ending after this pass"
                    " (the VMs keep running)")
        stop.set()
        api_stop.set()
        agent.poke()

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    where = f"; API on {socket or ctx().layout.agent_socket()}" + (f" and {listen}" if listen else "") \
        if api else ""
    output.note(f"agent: serving {ctx().home}, a pass every {interval:g} s (pid {os.getpid()}){where}")
    try:
        agent.run(stop)
    finally:
        api_stop.set()
        if server is not None:
            server.join(timeout=10)
    output.note(f"agent: stopped after {agent.passes} passes ({agent.errors} pool errors);"
                " hypervisors left running")


#: What Rich's `markup.escape` puts before a `[tag]`: a backslash (and each backslash before it doubled).
_RICH_ESCAPED = re.compile(r"(\\*)\\(\[[a-z#/@][^[]*?])")


def _unescape(text: str) -> str:
    return _RICH_ESCAPED.sub(lambda m: m.group(1)[:len(m.group(1)) // 2] + m.group(2), text)


class _HelpFormatter(click.HelpFormatter):
    """Click's plain help. Typer escapes the `[default: …]`, `[required]` and `[env var: …]` it
    adds to a parameter's help for Rich whenever Rich is installed, even when Rich does not
    render the help (`rich_markup_mode=None`): undone here, or `--help` shows `\\[required]`."""

    def write_dl(self, rows: Iterable[tuple[str, str]], col_max: int = 30, col_spacing: int = 2) -> None:
        super().write_dl([(term, _unescape(text)) for term, text in rows], col_max, col_spacing)


class _Context(click.Context):
    formatter_class = _HelpFormatter


def command() -> click.Command:
    """The click command tree of `app`, every command's help printed by `_HelpFormatter`."""
    root = typer.main.get_command(app)
    todo = [root]
    while todo:
        cmd = todo.pop()
        cmd.context_class = _Context
        if isinstance(cmd, click.Group):
            todo += cmd.commands.values()
    return root


def main(argv: list[str] | None = None) -> int:
    """Entry point: every error becomes one clear line and a non-zero exit code."""
    args = sys.argv[1:] if argv is None else argv
    debug = "--debug" in args
    os.umask(PRIVATE_UMASK)  # what mvm and the programs it starts create, only root reads
    try:
        rc = command().main(args=args, prog_name="mvm", standalone_mode=False)
        return rc if isinstance(rc, int) else 0
    except MvmError as e:
        if debug:
            traceback.print_exc()
        line = e.line()
        line = line[len("error: "):] if line.startswith("error: ") else line  # Nix's own prefix
        output.error(line)
        return e.exit_code
    except click.exceptions.NoArgsIsHelpError as e:
        e.show()
        return 0
    except click.UsageError as e:
        cmd = e.ctx.command_path if e.ctx else "mvm"
        output.error(f"{e.format_message()} (see `{cmd} --help`)")
        return EXEC_NOT_STARTED if cmd == "mvm instance exec" else 2
    except click.exceptions.Exit as e:
        return e.exit_code
    except click.exceptions.Abort:
        output.note("aborted")
        return 130
    except click.ClickException as e:
        output.error(e.format_message())
        return e.exit_code
    except KeyboardInterrupt:
        output.note("interrupted")
        return 130
    except Exception as e:  # a bug: still one line, the traceback with --debug
        if debug:
            traceback.print_exc()
        output.error(f"internal error: {e.__class__.__name__}: {e} (rerun with --debug for a traceback)")
        return 70


if __name__ == "__main__":
    sys.exit(main())
