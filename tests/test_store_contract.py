"""The contract of the `Store` and `Locks` protocols (`store/base.py`): what every
implementation must do. SQLite + flock today; the etcd implementation joins `BACKENDS`.

- compare-and-set: `begin_op` only from the transition's source state and with none in
  flight; `op_step` and `end_op` only while the caller's transition (its action, owner and
  start) is the one in flight; a refusal changes nothing;
- events in the same transaction: every change takes its event, which is there after the
  change and absent when the change is refused;
- fencing: each grant of a lock has a greater token; a change made under a lease whose lock
  was granted again since is refused ("lost its lock") and writes nothing;
- locks: exclusive across processes, released when the holder dies, a waiter told who holds
  it, `remove()` never letting two holders share a lock.
"""

from __future__ import annotations

import os
import select
import signal
import time
import traceback
from collections.abc import Callable, Iterator
from dataclasses import dataclass, replace
from pathlib import Path

import pytest

from mvm.errors import Conflict
from mvm.model import Action, Event, Instance, Op, Pool, Quotas, Revision, State, Tenant
from mvm.store import FileLocks, Lease, Locks, SqliteFences, SqliteStore, Store


@dataclass(frozen=True)
class Backend:
    """One implementation, as the tests reach it. Each call opens a new client, as another
    command (process or thread) would; a forked child opens its own."""

    store: Callable[[], Store]
    locks: Callable[[str], Locks]  # for an owner ("pid N (mvm …)"), as told to waiters
    lose: Callable[[str], None]  # make whoever holds lock `name` lose it, while it goes on


def _sqlite(tmp: Path) -> Backend:
    db, locks = tmp / "mvm.db", tmp / "locks"
    SqliteStore(db).close()
    return Backend(store=lambda: SqliteStore(db),
                   locks=lambda owner: FileLocks(locks, SqliteFences(db), owner),
                   lose=lambda name: (locks / f"{name}.lock").unlink())  # (removed under it)


BACKENDS: dict[str, Callable[[Path], Backend]] = {"sqlite": _sqlite}


@pytest.fixture(params=sorted(BACKENDS))
def backend(request: pytest.FixtureRequest, tmp_path: Path) -> Backend:
    factory: Callable[[Path], Backend] = BACKENDS[request.param]
    return factory(tmp_path)


@pytest.fixture
def store(backend: Backend) -> Iterator[Store]:
    s = backend.store()
    _world(s)
    yield s
    s.close()


# -- a small fleet: two tenants, two pools, an instance at rest and one in the middle of a start --

IDLE, BUSY = "i-00000001", "i-00000002"
LOCK = "pool-acme--w"
#: The start in flight on BUSY, as the command running it holds it.
HELD = Op(Action.START, State.RUNNING, State.CREATED, owner="pid 1 (mvm instance start)",
          started=1000.0)


def _world(s: Store) -> None:
    s.add_tenant(Tenant("acme", 1, "10.100.1.0/24", Quotas(), 0, 1.0))
    s.add_tenant(Tenant("gone", 2, "10.100.2.0/24", Quotas(), 0, 1.0))
    s.add_pool(Pool("acme", "w", "path:/x", "p", 1, 128))
    s.add_pool(Pool("acme", "old", "path:/x", "p", 1, 128))
    s.add_revision(Revision("acme", "w", "r1", "/nix/store/r1", {}, 1.0))
    s.start_build("acme", "w", "/dev/null")
    s.add_instance(Instance(IDLE, "acme", "w", State.CREATED, None, 10, "10.100.1.10", "02:00:00:00:00:0a"))
    s.add_instance(Instance(BUSY, "acme", "w", State.CREATED, None, 11, "10.100.1.11", "02:00:00:00:00:0b"))
    s.begin_op(BUSY, HELD)


def dump(s: Store) -> object:
    """Everything a user can read of the store."""
    pools = s.pools()
    return (s.tenants(), pools, [s.revisions(p.tenant, p.id) for p in pools],
            [s.builds(p.tenant, p.id) for p in pools], s.instances(), s.events(limit=10_000))


def _build(s: Store) -> int:
    return int(str(s.builds("acme", "w")[0]["id"]))


Change = Callable[[Store, Event, Lease | None], object]

#: Every change the protocol has, each made with its event and under a lease.
CHANGES: dict[str, Change] = {
    "add_tenant": lambda s, e, f: s.add_tenant(Tenant("beta", 3, "10.100.3.0/24", Quotas(), 0, 1.0), e,
                                               fence=f),
    "bump_secrets_version": lambda s, e, f: s.bump_secrets_version("acme", e, fence=f),
    "set_tenant_egress": lambda s, e, f: s.set_tenant_egress("acme", ("10.0.0.0/8",), (), e, fence=f),
    "remove_tenant": lambda s, e, f: s.remove_tenant("gone", e, fence=f),
    "add_pool": lambda s, e, f: s.add_pool(Pool("acme", "v", "path:/x", "p", 1, 128), e, fence=f),
    "set_pool_current": lambda s, e, f: s.set_pool_current("acme", "w", "r1", e, fence=f),
    "set_pool_desired": lambda s, e, f: s.set_pool_desired("acme", "w", 2, 1, 0, e, fence=f),
    "set_pool_policy": lambda s, e, f: s.set_pool_policy("acme", "w", 60.0, None, 1, True, e, fence=f),
    "remove_pool": lambda s, e, f: s.remove_pool("acme", "old", e, fence=f),
    "add_revision": lambda s, e, f: s.add_revision(Revision("acme", "w", "r2", "/nix/store/r2", {}, 2.0), e,
                                                   fence=f),
    "remove_revisions": lambda s, e, f: s.remove_revisions("acme", "w", ["r1"], e, fence=f),
    "start_build": lambda s, e, f: s.start_build("acme", "w", "/dev/null", "host", e, fence=f),
    "finish_build": lambda s, e, f: s.finish_build(_build(s), "ok", "r1", True, None, e, fence=f),
    "add_instance": lambda s, e, f: s.add_instance(
        Instance("i-00000003", "acme", "w", State.CREATED, None, 12, "10.100.1.12", "02:00:00:00:00:0c"), e,
        fence=f),
    "update_instance": lambda s, e, f: s.update_instance(IDLE, expect=State.CREATED, event=e, fence=f,
                                                         state=State.FAILED, error="it broke"),
    "remove_instance": lambda s, e, f: s.remove_instance(IDLE, e, fence=f),
    "begin_op": lambda s, e, f: s.begin_op(IDLE, replace(HELD, owner="pid 2 (mvm scale)"), e, fence=f),
    "op_step": lambda s, e, f: s.op_step(BUSY, "boot", expect=HELD, fence=f, pid=4242),
    "end_op": lambda s, e, f: s.end_op(BUSY, State.RUNNING, e, expect=HELD, fence=f, pid=4242),
}
#: A step is not an event of its own (the transition's end is).
WITHOUT_EVENT = {"op_step"}


def _event(name: str) -> Event:
    return Event(f"contract.{name}", f"made {name}", tenant="acme", pool="w")


def _newest(s: Store) -> tuple[object, object]:
    e = s.events(limit=1)[0]
    return e["kind"], e["message"]


@pytest.mark.parametrize("name", sorted(CHANGES))
def test_a_change_and_its_event_are_written_together(store: Store, name: str) -> None:
    before = dump(store)
    CHANGES[name](store, _event(name), None)
    after = dump(store)
    assert after != before
    if name in WITHOUT_EVENT:
        assert after[-1] == before[-1]  # type: ignore[index]
    else:
        assert _newest(store) == (f"contract.{name}", f"made {name}")


#: Changes the store refuses by itself (a name taken, compare-and-set on a state or transition).
REFUSED: dict[str, Callable[[Store, Event], object]] = {
    "add_tenant: the name is taken": lambda s, e: s.add_tenant(
        Tenant("acme", 9, "10.100.9.0/24", Quotas(), 0, 1.0), e),
    "add_pool: the name is taken": lambda s, e: s.add_pool(Pool("acme", "w", "path:/y", "p", 1, 128), e),
    "add_instance: the address is taken": lambda s, e: s.add_instance(
        Instance("i-00000009", "acme", "w", State.CREATED, None, 10, "10.100.1.10", "02:00:00:00:00:09"), e),
    "update_instance: from another state": lambda s, e: s.update_instance(
        IDLE, expect=State.RUNNING, event=e, state=State.FAILED),
    "begin_op: from another state": lambda s, e: s.begin_op(
        IDLE, Op(Action.WARM, State.WARM, State.RUNNING, owner="pid 3 (mvm instance warm)", started=5.0), e),
    "begin_op: one in flight": lambda s, e: s.begin_op(BUSY, replace(HELD, owner="pid 3 (mvm x)"), e),
    "end_op: another owner's": lambda s, e: s.end_op(
        BUSY, State.RUNNING, e, expect=replace(HELD, owner="pid 3 (mvm instance start)")),
    "end_op: another start": lambda s, e: s.end_op(BUSY, State.RUNNING, e, expect=replace(HELD, started=1001.0)),
    "end_op: another action": lambda s, e: s.end_op(
        BUSY, State.STOPPED, e, expect=replace(HELD, action=Action.STOP, target=State.STOPPED)),
    "end_op: none in flight": lambda s, e: s.end_op(IDLE, State.RUNNING, e, expect=HELD),
}


@pytest.mark.parametrize("name", sorted(REFUSED))
def test_a_refused_change_writes_no_event(store: Store, name: str) -> None:
    before = dump(store)
    with pytest.raises(Conflict):
        REFUSED[name](store, _event("refused"))
    assert dump(store) == before


def test_begin_op_is_compare_and_set(store: Store) -> None:
    before = dump(store)
    with pytest.raises(Conflict, match="is created, not running"):
        store.begin_op(IDLE, Op(Action.STOP, State.STOPPED, State.RUNNING, owner="pid 3 (mvm x)"))
    with pytest.raises(Conflict, match=r"in the middle of start \(pid 1 \(mvm instance start\)\)"):
        store.begin_op(BUSY, replace(HELD, owner="pid 3 (mvm x)"))
    assert dump(store) == before
    i = store.begin_op(IDLE, HELD)
    assert i.op is not None and (i.op.action, i.op.owner, i.op.started) == (Action.START, HELD.owner, 1000.0)


def test_steps_and_end_only_by_the_transition_in_flight(store: Store) -> None:
    # The holder's own steps go through (its Op as it first held it: steps do not count).
    i = store.op_step(BUSY, "network", expect=HELD)
    i = store.op_step(BUSY, "boot", expect=HELD, pid=4242)
    assert i.op is not None and i.op.steps == ("network", "boot") and i.pid == 4242
    before = dump(store)
    for other in (replace(HELD, owner="pid 3 (mvm instance start)"), replace(HELD, started=1000.5),
                  replace(HELD, action=Action.WAKE)):
        with pytest.raises(Conflict, match="another transition"):
            store.op_step(BUSY, "agent", expect=other, pid=1)
        with pytest.raises(Conflict, match="another transition"):
            store.end_op(BUSY, State.RUNNING, _event("end"), expect=other)
    assert dump(store) == before
    # Another command finished it (rolled back) and began its own: the first may not write.
    store.end_op(BUSY, State.CREATED, expect=HELD)
    with pytest.raises(Conflict, match="no start in flight"):
        store.op_step(BUSY, "agent", expect=HELD)
    takeover = replace(HELD, owner="pid 7 (mvm instance start)", started=2000.0)
    store.begin_op(BUSY, takeover)
    before = dump(store)
    with pytest.raises(Conflict, match=r"start \(pid 7 \(mvm instance start\)\)"):
        store.end_op(BUSY, State.RUNNING, _event("end"), expect=HELD)
    assert dump(store) == before
    i = store.end_op(BUSY, State.RUNNING, _event("end"), expect=takeover)
    assert i.state is State.RUNNING and i.op is None and _newest(store) == ("contract.end", "made end")


# -- fencing -------------------------------------------------------------------------------------

def test_each_grant_has_a_greater_token(backend: Backend) -> None:
    one, two = backend.locks("pid 1 (mvm a)"), backend.locks("pid 2 (mvm b)")
    tokens = []
    for locks in (one, two, one):
        with locks.lock(LOCK) as lease:
            assert lease.name == LOCK
            tokens.append(lease.token)
    child = Child(lambda say: _hold_and_say(backend, LOCK, say, 0))
    tokens.append(int(child.hear()))
    assert child.wait() == 0
    with one.lock(LOCK) as lease:
        tokens.append(lease.token)
    assert tokens == sorted(tokens) and len(set(tokens)) == len(tokens), tokens


@pytest.mark.parametrize("name", sorted(CHANGES))
def test_a_change_under_a_lease_granted_again_writes_nothing(backend: Backend, store: Store,
                                                             name: str) -> None:
    with backend.locks("pid 1 (mvm a)").lock(LOCK) as old:
        pass
    with backend.locks("pid 2 (mvm b)").lock(LOCK) as new:
        assert new.token > old.token
        before = dump(store)
        with pytest.raises(Conflict, match=f"lost its lock {LOCK}"):
            CHANGES[name](store, _event(name), old)
        assert dump(store) == before
        CHANGES[name](store, _event(name), new)  # the holder's own change goes through
        assert dump(store) != before


def test_a_holder_that_lost_its_lock_cannot_write(backend: Backend, store: Store) -> None:
    """It goes on as if it held the lock; another process got the lock meanwhile."""
    with backend.locks("pid 1 (mvm a)").lock(LOCK) as mine:
        store.set_pool_desired("acme", "w", 1, 0, 0, _event("mine"), fence=mine)
        backend.lose(LOCK)
        child = Child(lambda say: _hold_and_say(backend, LOCK, say, 0, write=True))
        theirs = int(child.hear())
        assert child.wait() == 0 and theirs > mine.token
        before = dump(store)
        with pytest.raises(Conflict, match="lost its lock"):
            store.set_pool_desired("acme", "w", 5, 0, 0, _event("stale"), fence=mine)
        with pytest.raises(Conflict, match="lost its lock"):
            store.end_op(BUSY, State.RUNNING, _event("stale"), expect=HELD, fence=mine)
        assert dump(store) == before
    assert store.pool("acme", "w").desired_running == 3  # what the new holder wrote
    assert _newest(store) == ("contract.theirs", "made theirs")


# -- locks -----------------------------------------------------------------------------------------

def test_a_lock_is_exclusive_across_processes(backend: Backend) -> None:
    with backend.locks("pid 1 (mvm pool scale)").lock(LOCK):
        child = Child(lambda say: _try_lock(backend, LOCK, say))
        assert child.hear() == "busy: pool-acme--w is busy: pid 1 (mvm pool scale) holds its lock"
        assert child.wait() == 0
    child = Child(lambda say: _try_lock(backend, LOCK, say))
    assert child.hear() == "got it"
    assert child.wait() == 0


def test_a_lock_is_released_when_its_holder_dies(backend: Backend) -> None:
    child = Child(lambda say: _hold_and_say(backend, LOCK, say, 3600))
    theirs = int(child.hear())
    with pytest.raises(Conflict), backend.locks("pid 1 (mvm a)").lock(LOCK, timeout=0.2):
        pass
    child.kill()
    with backend.locks("pid 1 (mvm a)").lock(LOCK, timeout=10) as mine:
        assert mine.token > theirs


def test_a_waiter_is_told_who_holds_the_lock(backend: Backend) -> None:
    child = Child(lambda say: _hold_and_say(backend, LOCK, say, 2.5, owner="pid 9 (mvm pool scale)"))
    child.hear()
    told: list[str] = []
    with backend.locks("pid 1 (mvm a)").lock(LOCK, timeout=30, waiting=told.append):
        pass
    assert child.wait() == 0
    assert told == [f"waiting for {LOCK}: pid 9 (mvm pool scale) holds it"]


def test_a_removed_lock_is_never_held_twice(backend: Backend) -> None:
    """The holder of something destroyed removes its lock; a waiter then gets the lock (with a
    greater token), and nobody shares it with that waiter."""
    locks = backend.locks("pid 1 (mvm tenant destroy)")
    with locks.lock(LOCK) as first:
        child = Child(lambda say: (say("waiting"), _hold_and_say(backend, LOCK, say, 1.0)))
        assert child.hear() == "waiting"
        time.sleep(0.5)  # (it now waits for the lock)
        locks.remove(LOCK)
    theirs = int(child.hear())
    assert theirs > first.token
    with pytest.raises(Conflict, match="is busy"), locks.lock(LOCK, timeout=0.2):
        pass
    assert child.wait() == 0
    with locks.lock(LOCK, timeout=10) as again:
        assert again.token > theirs


# -- children ----------------------------------------------------------------------------------------

class Child:
    """A forked process running `body(say)`; `say(line)` reaches `hear()` in the parent. Exit
    code 0 when the body returned."""

    def __init__(self, body: Callable[[Callable[[str], None]], object]) -> None:
        r, w = os.pipe()
        self.pid = os.fork()
        if self.pid == 0:
            os.close(r)
            code = 1
            try:
                body(lambda line: os.write(w, line.encode() + b"\n") and None)
                code = 0
            except BaseException:
                traceback.print_exc()
            finally:
                os._exit(code)
        os.close(w)
        self.fd = r
        self.buffer = b""

    def hear(self, timeout: float = 20.0) -> str:
        deadline = time.monotonic() + timeout
        while b"\n" not in self.buffer:
            left = deadline - time.monotonic()
            assert left > 0, "the child said nothing"
            if select.select([self.fd], [], [], left)[0]:
                data = os.read(self.fd, 4096)
                assert data, "the child ended without a word"
                self.buffer += data
        line, self.buffer = self.buffer.split(b"\n", 1)
        return line.decode()

    def wait(self) -> int:
        _, status = os.waitpid(self.pid, 0)
        os.close(self.fd)
        return os.waitstatus_to_exitcode(status)

    def kill(self) -> None:
        os.kill(self.pid, signal.SIGKILL)
        assert self.wait() == -signal.SIGKILL


def _hold_and_say(backend: Backend, name: str, say: Callable[[str], None], seconds: float,
                  owner: str = "pid 8 (mvm child)", write: bool = False) -> None:
    """(In a child.) Take the lock, maybe write under it, say its token, hold it a while."""
    with backend.locks(owner).lock(name, timeout=30) as lease:
        if write:
            backend.store().set_pool_desired("acme", "w", 3, 0, 0, _event("theirs"), fence=lease)
        say(str(lease.token))
        time.sleep(seconds)


def _try_lock(backend: Backend, name: str, say: Callable[[str], None]) -> None:
    try:
        with backend.locks("pid 8 (mvm child)").lock(name, timeout=0.3):
            say("got it")
    except Conflict as e:
        say(f"busy: {e.message}")


def test_a_build_whose_command_died_is_recorded_interrupted_once(backend: Backend, store: Store) -> None:
    """A build still `running` whose command is gone shows as interrupted; the next build
    records it so with its event — once: later builds neither record nor announce it again."""
    child = os.fork()
    if child == 0:  # another command, which starts a build and dies
        try:
            backend.store().start_build("acme", "w", "/dev/null")
        finally:
            os._exit(0)
    os.waitpid(child, 0)
    [dead] = [b for b in store.builds("acme", "w") if b["status"] == "interrupted"]
    assert not dead["finished"]
    assert store.interrupt_builds("acme", "w", _event("interrupt_builds")) == 1
    assert _newest(store) == ("contract.interrupt_builds", "made interrupt_builds")
    [recorded] = [b for b in store.builds("acme", "w") if b["id"] == dead["id"]]
    assert recorded["status"] == "interrupted" and recorded["finished"]
    before = dump(store)
    assert store.interrupt_builds("acme", "w", _event("again")) == 0
    assert dump(store) == before  # no second record, no second event
