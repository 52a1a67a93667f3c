"""`pool scale`'s plan: which instance fills which slot, and the actions that take it there."""

from __future__ import annotations

import pytest

from mvm.model import Action, Instance, State
from mvm.services.scale import path, plan

A = Action


def inst(n: int, state: State) -> Instance:
    return Instance(f"i-{n:08x}", "acme", "w", state, "abc123")


@pytest.mark.parametrize(("source", "target", "actions"), [
    (State.WARM, State.RUNNING, (A.RESUME,)),
    (State.SLEEPING, State.RUNNING, (A.WAKE,)),
    (State.STOPPED, State.RUNNING, (A.START,)),
    (State.CREATED, State.RUNNING, (A.START,)),
    (State.FAILED, State.RUNNING, (A.START,)),
    (State.RUNNING, State.WARM, (A.WARM,)),
    (State.SLEEPING, State.WARM, (A.WAKE, A.WARM)),
    (State.STOPPED, State.WARM, (A.START, A.WARM)),
    (State.RUNNING, State.SLEEPING, (A.SLEEP,)),
    (State.WARM, State.SLEEPING, (A.SLEEP,)),
    (State.CREATED, State.SLEEPING, (A.START, A.SLEEP)),
    (State.RUNNING, State.STOPPED, (A.STOP,)),
    (State.SLEEPING, State.STOPPED, (A.STOP,)),
    (State.FAILED, State.STOPPED, (A.STOP,)),
])
def test_paths_come_from_the_transition_table(source: State, target: State, actions: tuple[Action, ...]) -> None:
    assert path(source, target) == actions


def test_existing_instances_fill_slots_cheapest_first_and_surplus_is_stopped() -> None:
    current = [inst(1, State.RUNNING), inst(2, State.WARM), inst(3, State.SLEEPING),
               inst(4, State.STOPPED), inst(5, State.FAILED), inst(6, State.RUNNING)]
    p = plan(current, running=3, warm=0, sleeping=1)
    moves = {(i.id if i else "new"): t for i, t in p.moves}
    # both running stay; the warm one is the cheapest third (a resume); the sleeping one stays
    assert moves == {"i-00000001": State.RUNNING, "i-00000006": State.RUNNING,
                     "i-00000002": State.RUNNING, "i-00000003": State.SLEEPING,
                     "i-00000005": State.STOPPED}
    assert p.actions() == [("i-00000005", (A.STOP,)), ("i-00000002", (A.RESUME,))]
    # what frees resources comes first
    assert p.moves[0][1] in (State.STOPPED, State.SLEEPING)


def test_a_failed_instance_takes_its_slot_before_a_stopped_one() -> None:
    """A crashed instance comes back itself (its address, its data disk), not a stopped sibling."""
    p = plan([inst(1, State.STOPPED), inst(2, State.FAILED)], running=1, warm=0, sleeping=0)
    assert p.actions() == [("i-00000002", (A.START,))]
    p = plan([inst(1, State.STOPPED), inst(2, State.FAILED)], running=0, warm=0, sleeping=1)
    assert p.actions() == [("i-00000002", path(State.FAILED, State.SLEEPING))]


def test_new_instances_only_when_none_can_be_reused() -> None:
    p = plan([inst(1, State.STOPPED)], running=2, warm=1, sleeping=0)
    assert sorted((i.id if i else "new", t.value) for i, t in p.moves) == [
        ("i-00000001", "running"), ("new", "running"), ("new", "warm")]
    assert ("new", (A.START, A.WARM)) in p.actions()


def test_nothing_to_do() -> None:
    current = [inst(1, State.RUNNING), inst(2, State.SLEEPING)]
    assert plan(current, running=1, warm=0, sleeping=1).actions() == []
