"""The host's commands: `setup`, `doctor`, `config`, `net` and `builder`."""

from __future__ import annotations

from typing import Annotated

import typer

from mvm.cli import output
from mvm.cli.common import JsonOpt, ctx, layout, show
from mvm.cli.output import emit_json, table

config_app = typer.Typer(no_args_is_help=True, help="Host settings.")
net_app = typer.Typer(no_args_is_help=True, help="Tenant networks.")
builder_app = typer.Typer(no_args_is_help=True, help="The builder microVM that runs `pool build`.")


def setup(
    offline: Annotated[bool | None, typer.Option(
        "--offline/--online", help="Point flakes' nixpkgs at mvm's offline package set "
        "(default: only when github.com is unreachable).")] = None,
) -> None:
    """Install mvm's host assets: default guest kernel, built-in flake, offline nixpkgs."""
    from mvm.services import host_setup

    host_setup.setup(layout(), offline, progress=output.StepPrinter("setup"))


def doctor(json_: JsonOpt = False) -> None:
    """Check what the host has: QEMU, a usable and fast KVM, Nix, mkfs.ext4, TUN, bridges, kernel."""
    from mvm.services import host_setup

    checks = host_setup.doctor(layout())
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

    values = settings.raw(layout())
    if json_:
        emit_json(values)
    else:
        table(["setting", "value", "meaning"],
              [(k, values[k], s.help) for k, s in settings.SETTINGS.items()])


@config_app.command("get")
def config_get(key: str) -> None:
    """Print one setting."""
    from mvm.config import settings

    print(settings.get(layout(), key))


@config_app.command("set")
def config_set(key: str, value: str) -> None:
    """Change one setting (an empty string restores the default)."""
    from mvm.config import settings

    settings.set_value(layout(), key, value)


@builder_app.command("init")
def builder_init(force: Annotated[bool, typer.Option(
        "--force", help="make the image again even when it is current")] = False) -> None:
    """Make the builder image (Debian with Nix, by mmdebstrap from apt's mirror); idempotent."""
    from mvm.services import builder as builder_vm

    info, made = builder_vm.init(ctx(), output.StepPrinter("builder init"), force)
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


@net_app.command("verify")
def net_verify(repair: Annotated[bool, typer.Option("--repair", help="put drifted parts back")] = False,
               json_: JsonOpt = False) -> None:
    """Compare bridges, TAPs and firewall rules with the database; --repair puts them back."""
    from mvm.services import network

    report = network.verify(ctx(), repair)
    if json_:
        emit_json(report)
    else:
        for line in report["problems"]:  # type: ignore[attr-defined]
            print(line)
        if report["ok"]:
            print("network matches the database")
    if not report["ok"] and not repair:
        raise typer.Exit(1)
