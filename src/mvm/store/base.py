"""What the rest of mvm needs from a store of desired and observed state, and from locks.

The embedded implementation is SQLite plus flock (`sqlite.py`, `locks.py`); a distributed one
(etcd, DESIGN §9) implements the same protocols, and passes the same contract tests
(`tests/test_store_contract.py`):

- compare-and-set on an instance's state and on its transition in flight: `begin_op` only from
  the state the transition leaves and with none in flight, `op_step` and `end_op` only while the
  transition the caller holds (`expect`: its action, owner and start) is the one in flight;
- every change takes the event that describes it and writes both in one transaction (a change
  that is refused writes no event);
- locks are leases by name with an owner (told to waiters) and a fencing token that grows with
  each grant; a change made under a lease passes it (`fence`) and is refused once the lock was
  granted again, so a holder that lost its lock cannot write.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from contextlib import AbstractContextManager
from dataclasses import dataclass
from typing import Protocol

from mvm.model import Event, Instance, Op, Pool, Revision, State, Tenant


@dataclass(frozen=True)
class Lease:
    """A lock as granted: its name and its fencing token, a number that grows with each grant
    of that name. Writes made under the lock pass it (`fence=lease`); the store refuses them
    once the lock was granted again (the holder lost it: its lease expired, its lock file was
    removed), and writes nothing."""

    name: str
    token: int


class Store(Protocol):
    # Every change takes `event` (written in the same transaction) and `fence` (the lease it is
    # made under, checked in that transaction); a refused change writes neither.

    # tenants
    def add_tenant(self, t: Tenant, event: Event | None = None, *,
                   fence: Lease | None = None) -> None: ...
    def tenants(self) -> list[Tenant]: ...
    def tenant(self, tid: str) -> Tenant: ...
    def bump_secrets_version(self, tid: str, event: Event | None = None, *,
                             fence: Lease | None = None) -> int: ...
    def remove_tenant(self, tid: str, event: Event | None = None, *,
                      fence: Lease | None = None) -> None: ...
    def set_tenant_egress(self, tid: str, allow: tuple[str, ...], deny: tuple[str, ...],
                          event: Event | None = None, *, fence: Lease | None = None) -> Tenant: ...

    # pools, revisions, builds
    def add_pool(self, p: Pool, event: Event | None = None, *,
                 fence: Lease | None = None) -> None: ...
    def pools(self, tenant: str | None = None) -> list[Pool]: ...
    def pool(self, tenant: str, pid: str) -> Pool: ...
    def set_pool_current(self, tenant: str, pid: str, rev: str | None,
                         event: Event | None = None, *, fence: Lease | None = None) -> None: ...
    def set_pool_desired(self, tenant: str, pid: str, running: int, warm: int, sleeping: int,
                         event: Event | None = None, *, fence: Lease | None = None) -> None: ...
    def remove_pool(self, tenant: str, pid: str, event: Event | None = None, *,
                    fence: Lease | None = None) -> None: ...
    def set_pool_policy(self, tenant: str, pid: str, idle_warm: float | None,
                        idle_sleep: float | None, min_running: int, pinned: bool,
                        event: Event | None = None, *, fence: Lease | None = None,
                        unresponsive_grace: float | None = None) -> None: ...
    # measurements, not changes of what is desired (no event)
    def set_pool_flake_id(self, tenant: str, pid: str, flake_id: str) -> None: ...
    def set_pool_build_disk(self, tenant: str, pid: str, mib: int) -> None: ...
    def add_revision(self, r: Revision, event: Event | None = None, *,
                     fence: Lease | None = None) -> None: ...
    def revisions(self, tenant: str, pid: str) -> list[Revision]: ...
    def remove_revisions(self, tenant: str, pid: str, revs: Sequence[str],
                         event: Event | None = None, *, fence: Lease | None = None) -> None: ...
    def start_build(self, tenant: str, pid: str, log: str, builder: str = "host",
                    event: Event | None = None, *, fence: Lease | None = None) -> int: ...
    def finish_build(self, build_id: int, status: str, revision: str | None = None,
                     cache_hit: bool = False, error: str | None = None,
                     event: Event | None = None, *, fence: Lease | None = None) -> None: ...
    def builds(self, tenant: str, pid: str) -> list[dict[str, object]]: ...
    def interrupt_builds(self, tenant: str, pid: str, event: Event | None = None, *,
                         fence: Lease | None = None) -> int:
        """Record the builds whose command died as interrupted (and `event`, when there were
        any; builds recorded so before count no more); returns how many."""
        ...

    # instances
    def add_instance(self, i: Instance, event: Event | None = None, *,
                     fence: Lease | None = None) -> None: ...
    def instances(self, tenant: str | None = None, pool: str | None = None) -> list[Instance]: ...
    def instance(self, tenant: str, pool: str, iid: str) -> Instance: ...
    def update_instance(self, iid: str, *, expect: State | None = None, event: Event | None = None,
                        fence: Lease | None = None, **fields: object) -> None: ...
    def remove_instance(self, iid: str, event: Event | None = None, *,
                        fence: Lease | None = None) -> None: ...

    # transitions in flight: compare-and-set, each with its event in the same transaction
    def begin_op(self, iid: str, op: Op, event: Event | None = None, *,
                 fence: Lease | None = None) -> Instance:
        """Only from `op.source` and with no transition in flight (else Conflict)."""
        ...
    def op_step(self, iid: str, step: str, *, expect: Op, fence: Lease | None = None,
                **fields: object) -> Instance:
        """Only while `expect` (its action, owner and start) is the transition in flight."""
        ...
    def end_op(self, iid: str, state: State, event: Event | None = None, *, expect: Op,
               fence: Lease | None = None, **fields: object) -> Instance:
        """Only while `expect` (its action, owner and start) is the transition in flight."""
        ...

    # the jail's ids: a number per tenant and per instance, kept until it is removed
    def jail_number(self, owner: str) -> int: ...

    # events: one that records no change of its own (a refusal, an observation)
    def event(self, e: Event) -> None: ...
    def events(self, tenant: str | None = None, limit: int = 100,
               after: int | None = None) -> list[dict[str, object]]:
        """Dicts with keys id, ts, tenant, pool, instance, kind, message, reason, cause,
        duration: the newest `limit` (newest first), or with `after` the first `limit` whose id
        is greater (oldest first)."""
        ...
    def version(self) -> int: ...

    def close(self) -> None: ...


Waiting = Callable[[str], None]  # told once when a lock is not free at once: who holds it


class Locks(Protocol):
    """Exclusive leases by name. The holder is recorded so that a waiter can say who it waits
    for; a lease ends when its holder releases it or dies. Each grant has a fencing token
    greater than the last grant's of that name (`Lease.token`)."""

    @property
    def owner(self) -> str:
        """Who takes these locks ("pid N (mvm pool scale)"): told to waiters, and recorded
        on each transition begun under them (`Op.owner`)."""
        ...

    def lock(self, name: str, timeout: float = 600.0,
             waiting: Waiting | None = None) -> AbstractContextManager[Lease]: ...

    def shared(self, name: str, timeout: float = 5.0) -> AbstractContextManager[None]:
        """A lease many may hold at once (an exec in flight)."""
        ...

    def drained(self, name: str, timeout: float, waiting: Waiting | None = None) -> bool:
        """Wait, at most `timeout`, until no `shared` lease of `name` is held; False if some are."""
        ...

    def remove(self, name: str) -> None:
        """Forget a lock of something destroyed (the caller holds it). Its tokens go on
        growing: a later lock of the same name never repeats a token."""
        ...


class Fencer(Protocol):
    """Where the embedded locks (flock) keep their fencing tokens: beside the state the store
    compares them with, so that a grant and a fenced write are ordered by one transaction."""

    def grant(self, name: str) -> int:
        """The next token of lock `name` (greater than every earlier one), committed."""
        ...
