"""`mvm events`: what happened, as a table or JSON, and `--follow`."""

from __future__ import annotations

import json
import os
import signal
import sys
import time
from typing import Annotated

import typer

from mvm.cli.common import agent, ctx
from mvm.cli.output import emit_json
from mvm.services import events as event_log
from mvm.util.text import printable

HEADER = f"{'time':<19}  {'tenant/pool/instance':<34} {'kind':<24} {'reason':<9} {'took':>8}  message"


def line(e: dict[str, object]) -> str:
    """One event as a line of the table: text from outside escaped."""
    when = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(float(e["ts"])))  # type: ignore[arg-type]
    where = "/".join(str(e[k]) for k in ("tenant", "pool", "instance") if e.get(k)) or "-"
    took = f"{float(e['duration']):.2f}s" if e.get("duration") is not None else "-"  # type: ignore[arg-type]
    message = str(e["message"])
    if e.get("cause") and str(e["cause"]) not in message:
        message += f" (cause: {e['cause']})"
    text = f"{when}  {where:<34} {e['kind']!s:<24} {e['reason']!s:<9} {took:>8}  {message}"
    return printable(" ".join(text.splitlines()))


def events(
    tenant: Annotated[str | None, typer.Argument(help="only this tenant's events")] = None,
    n: Annotated[int, typer.Option("-n", "--count", help=f"how many of the newest events to show "
                                   f"(at most {event_log.MAX})")] = 20,
    json_: Annotated[bool, typer.Option("--json", help="Print a JSON array (oldest first); with "
                                        "--follow, one JSON object per line.")] = False,
    follow: Annotated[bool, typer.Option("--follow", "-f", help="keep printing events as they "
                                         "happen, until Ctrl-C")] = False,
) -> None:
    """Show what happened: every state change, build, rollback, secrets change, refusal and
    policy move, with its time, reason code, cause and duration (oldest first)."""
    event_log.check_count(n)
    source = a.event_store() if (a := agent()) is not None else event_log.local(ctx())
    shown = event_log.newest(source, tenant, n)
    if json_ and not follow:
        emit_json(shown)
        return

    def write(e: dict[str, object]) -> None:
        sys.stdout.write((json.dumps(e, sort_keys=True) if json_ else line(e)) + "\n")

    if follow:  # Ctrl-C or SIGTERM end it, even where the shell started it with SIGINT ignored
        last = event_log.last_id(source, tenant, shown)

        def stop(signum: int, frame: object) -> None:
            raise KeyboardInterrupt

        signal.signal(signal.SIGINT, stop)
        signal.signal(signal.SIGTERM, stop)
    try:
        if not json_:
            sys.stdout.write(HEADER + "\n")
        for e in shown:
            write(e)
        sys.stdout.flush()
        if follow:
            for batch in event_log.follow(source, tenant, last):
                for e in batch:
                    write(e)
                sys.stdout.flush()
    except KeyboardInterrupt:  # how --follow ends: not an error
        sys.stdout.flush()
    except BrokenPipeError:  # (piped into `head`)
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
