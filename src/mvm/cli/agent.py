"""`mvm agent`: the agent that keeps pools converged and serves the API."""

from __future__ import annotations

import threading
from collections.abc import Callable
from pathlib import Path
from typing import Annotated

import typer

from mvm.cli import output
from mvm.cli.common import ctx

agent_app = typer.Typer(no_args_is_help=True, help="The agent: keeps pools converged, sleeps idle instances.")


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
    from mvm.context.compose import compose
    from mvm.services import serve

    if interval <= 0 or interval > 86400:
        raise typer.BadParameter(f"{interval:g} is not in (0, 86400] seconds", param_hint="'--interval'")

    def api_server(stop: threading.Event, on_ready: Callable[[], None]) -> None:
        from mvm.api import server

        server.serve(compose, socket=socket, listen=listen, token_file=token_file,
                     on_ready=on_ready, stop=stop)

    serve.serve(ctx(), interval, output.note, api=api_server if api else None, socket=socket, listen=listen)
