"""Tenant networks as `mvm net` sees them."""

from __future__ import annotations

from mvm.context import Host
from mvm.lifecycle import netops


def verify(ctx: Host, repair: bool) -> dict[str, object]:
    """Compare bridges, TAPs and firewall rules with the store; `repair` puts drifted parts back.
    Keys: ok, problems (lines) and what was repaired."""
    return netops.verify(ctx, repair)
