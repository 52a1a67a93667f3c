"""`mvm pool`: pools, their builds and revisions, and scaling."""

from __future__ import annotations

from typing import Annotated

import typer

from mvm.cli import output, present
from mvm.cli.common import JsonOpt, agent, ctx
from mvm.errors import InvalidInput
from mvm.model import PoolRef, check_id

pool_app = typer.Typer(no_args_is_help=True, help="Pools: a flake profile, its revisions and instances.")


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
    rev, cached = pools.build(ctx(), ref, force, progress=output.StepPrinter(f"build {ref}"),
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
                         progress=output.StepPrinter("scale"))
    present.scaled(str(ref), [views.instance(i) for i in result], json_)
