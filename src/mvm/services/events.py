"""What happened, as `mvm events` and the API's `/events` read it: the newest events, those
after an id, and a follow loop that keeps asking for new ones."""

from __future__ import annotations

import time
from collections.abc import Iterator, Sequence
from typing import Any, Protocol

from mvm.context import Host
from mvm.errors import InvalidInput, NotFound
from mvm.model import Tenant, check_id

#: At most this many events are read at once (`mvm events -n`).
MAX = 10_000
#: How often a follower looks for new events (seconds).
POLL = 0.2

Row = dict[str, object]


class Source(Protocol):
    """Where events are read: the store (`local`), or the agent's API (`cli.remote`)."""

    def tenants(self) -> Sequence[Tenant]: ...

    def events(self, tenant: str | None = None, limit: int = 100,
               after: int | None = None) -> list[Row]:
        """The newest `limit` (newest first), or with `after` the first `limit` after that id
        (oldest first)."""
        ...


def local(ctx: Host) -> Source:
    return ctx.store


def after(ctx: Host, tenant: str | None, after: int | None, limit: int) -> list[dict[str, Any]]:
    """Events oldest first: the newest `limit`, or with `after` the first `limit` after that id."""
    if tenant is not None:
        check_id("tenant", tenant)
    rows: list[dict[str, Any]] = ctx.store.events(tenant, limit, after=after)
    return rows if after is not None else rows[::-1]


def check_count(n: int) -> None:
    if not 0 <= n <= MAX:
        raise InvalidInput(f"-n must be between 0 and {MAX} (got {n})")


def newest(source: Source, tenant: str | None, n: int) -> list[Row]:
    """The newest `n` events (of a tenant that is, or was, there), oldest first."""
    check_count(n)
    if tenant is not None:
        check_id("tenant", tenant)
        if tenant not in {t.id for t in source.tenants()} and not source.events(tenant, limit=1):
            raise NotFound(f"no tenant {tenant!r} (and no events of one)", "see `mvm tenant list`")
    return list(reversed(source.events(tenant, limit=n)))


def last_id(source: Source, tenant: str | None, shown: Sequence[Row]) -> int:
    """Where following starts: after what was shown, or (nothing shown) after the newest there is."""
    if shown:
        return max(int(e["id"]) for e in shown)  # type: ignore[call-overload]
    newest_ = source.events(tenant, limit=1)
    return int(newest_[0]["id"]) if newest_ else 0  # type: ignore[call-overload]


def follow(source: Source, tenant: str | None, last: int, poll: float = POLL) -> Iterator[list[Row]]:
    """New events as they happen, a batch (oldest first, maybe empty) every `poll` seconds; never ends."""
    while True:
        time.sleep(poll)
        rows = source.events(tenant, limit=MAX, after=last)
        if rows:
            last = int(rows[-1]["id"])  # type: ignore[call-overload]
        yield rows
