"""UndoSteps: named, timed, and on failure undone once, in reverse."""

from __future__ import annotations

import time

import pytest

from mvm.errors import RuntimeFailure
from mvm.runtime.base import UndoSteps


class FakeClock:
    """A monotonic clock that moves only when a step says it took time."""

    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now

    def take(self, seconds: float) -> None:
        self.now += seconds


def test_success_runs_in_order_reports_timings_and_keeps_everything() -> None:
    log: list[str] = []
    reported: list[tuple[str, float]] = []
    clock = FakeClock()

    def step(name: str, seconds: float, value: object = None) -> object:
        log.append(name)
        clock.take(seconds)
        return value

    with UndoSteps("boot", lambda name, took: reported.append((name, took)), clock=clock) as s:
        clock.take(0.5)  # between steps: counts in the total, not in any step
        assert s.run("spawn", lambda: step("spawn", 1.5, 1)) == 1
        s.on_undo("spawn", lambda: log.append("undo spawn"))
        s.run("load", lambda: step("load", 0.25))
    assert log == ["spawn", "load"]  # in order; the undo was dropped on success
    # Each step's own time, reported as it ends, in the order the steps ran.
    assert reported == [("spawn", 1.5), ("load", 0.25)]
    assert s.timings == reported
    assert s.total() == 2.25


def test_default_clock_measures_wall_time() -> None:
    reported: list[tuple[str, float]] = []
    with UndoSteps("boot", lambda name, took: reported.append((name, took))) as s:
        s.run("nap", lambda: time.sleep(0.05))
    [(name, took)] = reported
    assert name == "nap" and 0.05 <= took < 2
    assert s.total() >= took


def test_failure_undoes_in_reverse_once_and_propagates() -> None:
    log: list[str] = []

    def fail() -> None:
        raise RuntimeFailure("spawn failed")

    s = UndoSteps("boot")
    with pytest.raises(RuntimeFailure, match="spawn failed"), s:
        s.run("dir", lambda: log.append("dir"))
        s.on_undo("dir", lambda: log.append("undo dir"))
        s.run("sock", lambda: log.append("sock"))
        s.on_undo("sock", lambda: log.append("undo sock"))
        s.run("spawn", fail)
    assert log == ["dir", "sock", "undo sock", "undo dir"]
    s.rollback()  # already rolled back: nothing runs twice
    assert log.count("undo dir") == 1


def test_undo_registered_before_a_failing_step_runs() -> None:
    # A step that may half-create something (e.g. a daemon that started, then timed out)
    # registers its undo first.
    log: list[str] = []

    def spawn() -> None:
        s.on_undo("spawn", lambda: log.append("kill"))
        raise TimeoutError("timed out")

    s = UndoSteps("boot")
    with pytest.raises(TimeoutError), s:
        s.run("spawn", spawn)
    assert log == ["kill"]


def test_a_failing_undo_does_not_hide_the_error_or_stop_the_others() -> None:
    log: list[str] = []

    def bad_undo() -> None:
        raise OSError("busy")

    s = UndoSteps("restore")
    with pytest.raises(RuntimeFailure) as e, s:
        s.on_undo("first", lambda: log.append("undo first"))
        s.on_undo("second", bad_undo)
        raise RuntimeFailure("load failed")
    assert log == ["undo first"]
    assert e.value.message == "load failed"
    assert any("second" in n and "busy" in n for n in e.value.__notes__)


def test_interrupt_also_undoes() -> None:
    log: list[str] = []
    s = UndoSteps("boot")
    with pytest.raises(KeyboardInterrupt), s:
        s.on_undo("x", lambda: log.append("undo x"))
        raise KeyboardInterrupt
    assert log == ["undo x"]
