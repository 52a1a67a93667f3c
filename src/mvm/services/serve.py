"""`mvm agent serve`: the agent's loop in the main thread, the API in a thread of its own,
until SIGTERM or Ctrl-C (a second one aborts the pass; its transitions roll back). The VMs
keep running after it ends."""

from __future__ import annotations

import os
import signal
import threading
from collections.abc import Callable
from pathlib import Path

from mvm.context import Host
from mvm.services.agent import Agent

#: Serves the API until its first argument is set; calls its second once it listens.
ApiServer = Callable[[threading.Event, Callable[[], None]], None]


def serve(ctx: Host, interval: float, report: Callable[[str], None], api: ApiServer | None = None,
          socket: Path | None = None, listen: str | None = None) -> None:
    """Run the agent (and `api`, which listens on `socket`, by default the layout's, and
    `listen`) until a signal. A failure of the API to start is raised before the first pass."""
    stop = threading.Event()
    agent = Agent(ctx, interval, report=report)
    api_stop = threading.Event()
    server: threading.Thread | None = None
    if api is not None:
        ready = threading.Event()
        failed: list[BaseException] = []

        def run_api() -> None:
            try:
                api(api_stop, ready.set)
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
        report(f"agent: {signal.Signals(signum).name}: ending after this pass (the VMs keep running)")
        stop.set()
        api_stop.set()
        agent.poke()

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    where = f"; API on {socket or ctx.layout.agent_socket()}" + (f" and {listen}" if listen else "") \
        if api is not None else ""
    report(f"agent: serving {ctx.home}, a pass every {interval:g} s (pid {os.getpid()}){where}")
    try:
        agent.run(stop)
    finally:
        api_stop.set()
        if server is not None:
            server.join(timeout=10)
    report(f"agent: stopped after {agent.passes} passes ({agent.errors} pool errors);"
           " hypervisors left running")
