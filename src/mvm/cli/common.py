"""What every command group shares: the root options (`--debug`, `--agent`), the host context
made once at the edge, the agent a command goes through, and the `--json` option."""

from __future__ import annotations

from typing import TYPE_CHECKING, Annotated

import click
import typer

from mvm.cli import output, present
from mvm.errors import InvalidInput
from mvm.model import InstanceRef

if TYPE_CHECKING:
    from mvm.cli import remote
    from mvm.config.paths import Layout
    from mvm.context import Host

JsonOpt = Annotated[bool, typer.Option("--json", help="Print JSON instead of a table.")]
STATE: dict[str, object] = {"debug": False}
_host: Host | None = None


def show(info: dict[str, object], json_: bool) -> None:
    """One object: JSON, or `key: value` lines."""
    present.show(info, json_)


def agent() -> remote.AgentApi | None:
    """The agent this command goes through (`--agent` / MVM_AGENT), if any."""
    where = STATE.get("agent")
    if not where:
        return None
    from mvm.cli import remote

    return remote.AgentApi(str(where))


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

        _host = compose(waiting=output.note)  # a wait for another command's lock is never silent
    return _host


def layout() -> Layout:
    """The state layout, without opening the store (set-up and doctor run before there is one)."""
    from mvm.config.paths import Layout

    _not_through_agent()
    return _host.layout if _host is not None else Layout.from_env()


def iref(text: str) -> InstanceRef:
    return InstanceRef.parse(text)
