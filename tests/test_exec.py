# ruff: noqa: F811  (the fixtures, imported from test_api and test_agent, are parameters)
"""`exec` against transitions that stop a guest's vCPUs, and what its failures say: on the fake
runtime, whose guest runs `wait FILE` until FILE exists (an exec in flight) and `exit N`.

A warm, sleep or stop waits for the execs in flight (at most `execs.DRAIN_TIMEOUT`); an exec
arriving while one is in flight is refused before it starts. Exit codes: the command's own
status; 125 when mvm failed and the command did not start; 126 when it started and its result
was lost. (Before: an exec cut by a sleep said "the hypervisor exited during exec", exit 9,
although its command had run, and a client that retried ran it twice.)
"""

from __future__ import annotations

import json
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path

import pytest
from fastapi.testclient import TestClient

from mvm.errors import Conflict
from mvm.lifecycle import apply, execs
from mvm.model import Action, Instance, InstanceRef, State
from mvm.services import instances
from tests.test_agent import Fleet, fleet  # noqa: F401 (a fixture)
from tests.test_api import World, cli, client, env_of, errors_of, world  # noqa: F401 (fixtures)


def until(fn: Callable[[], object], what: str, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while not fn():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.01)


def in_flight(world: World, ref: InstanceRef) -> bool:
    return execs.in_flight(world.ctx, world.instance(ref))


def op_of(world: World, ref: InstanceRef) -> str | None:
    i: Instance = world.instance(ref)
    return i.op.action.value if i.op else None


class Background:
    """A call in a thread of its own (with a store connection of its own): its result or error."""

    def __init__(self, world: World, fn: Callable[..., object]) -> None:
        self.result: object = None
        self.error: BaseException | None = None

        def run() -> None:
            try:
                self.result = fn(world.ctx.for_thread())
            except BaseException as e:
                self.error = e

        self.thread = threading.Thread(target=run)
        self.thread.start()

    def join(self) -> Background:
        self.thread.join(60)
        assert not self.thread.is_alive()
        return self


def errors_of_text(err: str) -> list[str]:
    return [ln for ln in err.splitlines() if ln.startswith("error:")]


def exec_cli(world: World, ref: InstanceRef, *argv: str, json_: bool = False) -> subprocess.Popen[str]:
    return subprocess.Popen([sys.executable, "-m", "mvm.cli.main", "instance", "exec", str(ref),
                             *(["--json"] if json_ else []), "--", *argv], env=env_of(world),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def test_a_sleep_waits_for_the_exec_in_flight_and_refuses_new_ones(world: World, tmp_path: Path) -> None:
    ref = world.new(State.RUNNING)
    done = tmp_path / "done"
    running = exec_cli(world, ref, "wait", str(done))
    until(lambda: in_flight(world, ref), "the exec to be in flight")
    told: list[str] = []
    sleep = Background(world, lambda ctx: apply(ctx, ref, Action.SLEEP, progress=lambda s, m: told.append(m)))
    until(lambda: told, "the sleep to say it waits")
    assert op_of(world, ref) == "sleep" and world.instance(ref).state is State.RUNNING
    assert "waiting for the commands exec runs" in told[0]

    # a second exec meanwhile is refused before its command starts: 125
    late = exec_cli(world, ref, "write", "late")
    _, err = late.communicate(timeout=60)
    assert late.returncode == 125, err
    assert errors_of_text(err) == [f"error: cannot exec in {ref}: a sleep of it is in flight "
                                   f"({world.instance(ref).op.owner}) (the command did not start: run it "  # type: ignore[union-attr]
                                   f"again when that has ended (`mvm instance info {ref}`))"]

    done.touch()
    _, err = running.communicate(timeout=60)
    assert running.returncode == 0, err  # the command's own status: it was not cut
    assert sleep.join().error is None and world.instance(ref).state is State.SLEEPING
    apply(world.ctx, ref, Action.WAKE)
    assert world.guest(ref, "read") == ""  # the refused `write late` never ran


@pytest.mark.parametrize("action", [Action.WARM, Action.STOP])
def test_warm_and_stop_wait_for_an_exec_in_flight(world: World, tmp_path: Path, action: Action) -> None:
    ref = world.new(State.RUNNING)
    done = tmp_path / "done"
    ex = Background(world, lambda ctx: instances.exec_(ctx, ref, ["wait", str(done)]))
    until(lambda: in_flight(world, ref), "the exec to be in flight")
    told: list[str] = []
    move = Background(world, lambda ctx: apply(ctx, ref, action, progress=lambda s, m: told.append(m)))
    until(lambda: told, f"the {action.value} to say it waits")
    with pytest.raises(Conflict, match=f"a {action.value} of it is in flight") as refused:
        instances.exec_(world.ctx, ref, ["write", "x"])
    assert "the command did not start" in (refused.value.hint or "")
    done.touch()
    assert ex.join().error is None and ex.result.exit_code == 0  # type: ignore[attr-defined]
    assert move.join().error is None
    assert world.instance(ref).state is {Action.WARM: State.WARM, Action.STOP: State.STOPPED}[action]


def test_past_the_wait_a_cut_exec_says_its_command_started_126(
        world: World, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(execs, "DRAIN_TIMEOUT", 0.3)
    ref = world.new(State.RUNNING)
    running = exec_cli(world, ref, "wait", str(tmp_path / "never"), json_=True)
    until((tmp_path / "never.started").exists, "the command to start")
    apply(world.ctx, ref, Action.SLEEP)  # goes on after 0.3 s
    out, err = running.communicate(timeout=60)
    assert running.returncode == 126, err
    assert json.loads(out)["started"] is True
    [line] = errors_of_text(err)
    assert "the command's result was lost: the guest was told to start it" in line


def test_exit_codes_the_commands_own_or_125_when_it_did_not_start(world: World) -> None:
    ref = world.new(State.RUNNING)
    for status in (0, 3, 9, 124):
        p = exec_cli(world, ref, "exit", str(status))
        p.communicate(timeout=60)
        assert p.returncode == status
    apply(world.ctx, ref, Action.STOP)
    p = exec_cli(world, ref, "write", "x", json_=True)
    out, err = p.communicate(timeout=60)
    assert p.returncode == 125 and json.loads(out)["started"] is False, err
    # mvm's own refusals, usage errors included: 125, never a status its command could give
    for argv in ([f"{ref.tenant}/{ref.pool}/i-00000000", "--", "exit", "0"],
                 [str(ref), "--timeout", "0", "--", "exit", "0"],
                 [str(ref), "--max-output", "lots", "--", "exit", "0"], [str(ref)]):
        r = cli(world, "instance", "exec", *argv)
        assert r.rc == 125 and len(errors_of(r)) == 1, (argv, r.err)


def test_the_api_says_whether_the_command_started(
        client: TestClient, world: World, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    ref = world.new(State.RUNNING)
    url = f"/tenants/acme/pools/w/instances/{ref.instance}/exec"
    r = client.post(url, json={"argv": ["exit", "3"]})
    assert (r.status_code, r.json()["exit_code"], r.json()["started"]) == (200, 3, True)
    monkeypatch.setattr(execs, "DRAIN_TIMEOUT", 0.3)
    cut = Background(world, lambda ctx: client.post(url, json={"argv": ["wait", str(tmp_path / "never")]}))
    until((tmp_path / "never.started").exists, "the command to start")
    apply(world.ctx, ref, Action.STOP)
    body = cut.join().result.json()  # type: ignore[attr-defined]
    assert (body["kind"], body["exit_code"], body["started"]) == ("ExecLost", 126, True), body
    r = client.post(url, json={"argv": ["exit", "0"]})  # stopped: refused, not started
    assert (r.status_code, r.json()["exit_code"], r.json()["started"]) == (409, 125, False)


def test_the_api_waits_for_a_transition_in_flight_then_brings_the_instance_back(
        client: TestClient, world: World, tmp_path: Path) -> None:
    ref = world.new(State.RUNNING)
    done = tmp_path / "done"
    first = Background(world, lambda ctx: instances.exec_(ctx, ref, ["wait", str(done)]))
    until(lambda: in_flight(world, ref), "the exec to be in flight")
    sleep = Background(world, lambda ctx: apply(ctx, ref, Action.SLEEP))
    until(lambda: op_of(world, ref) == "sleep", "the sleep's intent")
    work = Background(world, lambda ctx: client.post(f"/tenants/acme/pools/w/instances/{ref.instance}/exec",
                                                     json={"argv": ["exit", "5"]}))
    done.touch()
    assert first.join().error is None and sleep.join().error is None
    r = work.join().result
    assert r.status_code == 200 and r.json()["exit_code"] == 5, r.json()  # type: ignore[attr-defined]
    assert r.json()["brought_back"] == "wake"  # type: ignore[attr-defined]


def test_the_idle_policy_leaves_an_instance_with_an_exec_in_flight_running(fleet: Fleet, tmp_path: Path) -> None:
    """A command waiting in the guest uses no CPU, but it is work: no policy warm (which would
    hold the agent's pass for the wait, and then pause the command) until it has ended."""
    ref = fleet.pool("w", running=1, idle_warm=5.0)
    [i] = fleet.live(ref)
    done = tmp_path / "done"
    ex = Background(fleet, lambda ctx: instances.exec_(ctx, i.ref, ["wait", str(done)]))
    until((tmp_path / "done.started").exists, "the command to start")
    fleet.passes()
    fleet.passes(advance=10)  # idle by its CPU and network for 10 s
    assert fleet.states(ref) == ["running"]
    done.touch()
    assert ex.join().error is None
    fleet.passes(advance=10)
    assert fleet.states(ref) == ["warm"]
