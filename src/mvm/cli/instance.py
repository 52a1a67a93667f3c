"""`mvm instance`: instances, their transitions, exec and console."""

from __future__ import annotations

import sys
from typing import Annotated

import typer

from mvm.cli import output, present
from mvm.cli.common import JsonOpt, agent, ctx, iref
from mvm.cli.output import emit_json
from mvm.errors import EXEC_LOST, EXEC_NOT_STARTED, ExecLost, MvmError
from mvm.model import Action, PoolRef

instance_app = typer.Typer(no_args_is_help=True, help="Instances: one microVM each.")


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
    ref = iref(instance)
    if (a := agent()) is not None:
        present.show(a.instance_info(str(ref)), json_)
        return
    from mvm.services import views

    present.show(views.instance_info(ctx(), ref), json_)


@instance_app.command("create")
def instance_create(pool: str) -> None:
    """Create an instance (state created) in a pool."""
    from mvm.services import instances

    i = instances.create(ctx(), PoolRef.parse(pool))
    print(str(i.ref))


def _transition_cmd(name: str, doc: str) -> None:
    def cmd(instance: str) -> None:
        ref = iref(instance)
        if (a := agent()) is not None:
            r = a.transition(str(ref), name)
            present.transitioned(r["address"], r["state"])
            return
        from mvm.services import instances

        i = instances.transition(ctx(), ref, Action(name), progress=output.StepPrinter(f"{name} {instance}"))
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
    from mvm.services import instances

    ref = iref(instance)
    kept = instances.destroy(ctx(), ref, keep_data)
    print(f"{instance} destroyed" + (f"; data disk kept at {kept}" if kept is not None else ""))


@instance_app.command("observe")
def instance_observe(pool: str) -> None:
    """Reconcile a pool's instances with their hypervisors: finish transitions that dead
    commands left, fail instances whose hypervisor exited, end hypervisors nobody records."""
    from mvm.services import instances

    ref = PoolRef.parse(pool)
    done = instances.observe_pool(ctx(), ref)
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
        ref, limit = iref(instance), _size(max_output)
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

    data = instances.console(ctx(), iref(instance))
    sys.stdout.buffer.write(data if raw else printable(data).encode())
