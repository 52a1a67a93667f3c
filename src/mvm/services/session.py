"""What an edge (an API worker thread) does with its host context besides calling services:
it closes the store connection of a thread that ends."""

from __future__ import annotations

from mvm.context import Host


def close(ctx: Host) -> None:
    """The end of a thread's host context: its store connection closed."""
    ctx.store.close()
