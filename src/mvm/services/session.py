"""What an edge (a CLI command, an API worker thread) does with its host context besides
calling services: it says when it waits for another command's lock, and it closes the store
connection of a thread that ends."""

from __future__ import annotations

from collections.abc import Callable

from mvm.config.host import Host


def report_waits(ctx: Host, report: Callable[[str], None]) -> Host:
    """Every wait of `ctx` for a lock another command holds is told to `report` (never silent)."""
    ctx.locks.waiting = report
    return ctx


def close(ctx: Host) -> None:
    """The end of a thread's host context: its store connection closed."""
    ctx.store.close()
