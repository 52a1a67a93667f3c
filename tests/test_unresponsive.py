"""Hypervisors that do not answer, run directories removed under them, and observing on a full
disk: on the fake runtime (whose VM stopped with `kill -STOP` answers nothing, as a hung QEMU)
and the QMP and agent-socket doubles (Firecracker's API double: tests/test_firecracker.py; a
real QEMU: tests/test_agent.py)."""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from mvm.errors import GuestError, HostUnsupported, RuntimeFailure
from mvm.lifecycle import apply, observe, specs
from mvm.lifecycle.apply import pool_locked
from mvm.model import Action, Instance, Quotas, Reason, State
from mvm.runtime import base
from mvm.runtime.base import VmSpec
from mvm.runtime.qemu import QemuRuntime
from mvm.services import instances, tenants
from mvm.services.agent import Agent
from mvm.util import pids
from tests.doubles.fake_runtime import _DETACHED, FakeRuntime, _stopped
from tests.doubles.qmp import Monitor
from tests.test_agent import Fleet


@pytest.fixture
def fleet(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Fleet]:
    monkeypatch.delenv("MVM_HOME", raising=False)
    monkeypatch.setenv("MVM_RUNTIME_DIR", "/nonexistent-mvm-runtime-dir")
    monkeypatch.setattr(base, "CONTROL_DEADLINE", 0.3)  # (a hung hypervisor's probe: 0.3 s)
    yield from _fleet(tmp_path)


def _fleet(root: Path) -> Iterator[Fleet]:
    f = Fleet(root)
    f.agent.probes.wait = 30.0  # (a pass takes every answer: each comes by the 0.3 s deadline)
    tenants.create(f.ctx, "acme", quotas=Quotas(max_warm=1))
    try:
        yield f
    finally:
        for i in f.ctx.store.instances():
            pid = f.ctx.runtime().pid(specs.control_spec(f.ctx.layout, i))
            if pid is not None:
                os.kill(pid, signal.SIGCONT)
            FakeRuntime(f.ledger).stop(specs.control_spec(f.ctx.layout, i), 0)
        for proc in _DETACHED:
            if proc.poll() is None:
                proc.kill()


def _pid(f: Fleet, i: Instance) -> int | None:
    return f.ctx.runtime().pid(specs.control_spec(f.ctx.layout, i))


def _hang(f: Fleet, i: Instance) -> int:
    pid = _pid(f, i)
    assert pid is not None
    os.kill(pid, signal.SIGSTOP)
    deadline = time.monotonic() + 30
    while not _stopped(pid) and time.monotonic() < deadline:  # (it stops once scheduled)
        time.sleep(0.005)
    return pid


def _now(f: Fleet, i: Instance) -> Instance:
    return f.ctx.store.instance(i.tenant, i.pool, i.id)


# -- item 9: a hung hypervisor -------------------------------------------------------------------

def test_a_hung_hypervisor_is_unresponsive_then_ended_and_started_again_after_the_grace(fleet: Fleet) -> None:
    ref = fleet.pool("w", running=2, unresponsive_grace=20.0)
    hung, other = fleet.live(ref)
    old = _hang(fleet, hung)
    lines = fleet.passes()
    assert any(f"{hung.id}: unresponsive: the fake hypervisor of {hung.id} did not answer within 0.3s" in ln
               for ln in lines), lines
    [e] = fleet.events("instance.unresponsive")
    assert e["instance"] == hung.id and e["reason"] == Reason.CRASH.value
    assert e["cause"] == f"the fake hypervisor of {hung.id} did not answer within 0.3s"
    assert "after 20 s" in str(e["message"])
    i = _now(fleet, hung)
    assert i.state is State.RUNNING and i.unresponsive_since is not None and _pid(fleet, hung) == old
    fleet.passes(advance=10)  # within the grace: left as it is
    assert _now(fleet, hung).state is State.RUNNING and _pid(fleet, hung) == old
    assert not fleet.events("instance.replaced") and len(fleet.events("instance.unresponsive")) == 1
    fleet.passes(advance=11)  # silent for 21 s: ended, failed and started again, itself
    i = _now(fleet, hung)
    assert i.state is State.RUNNING and i.unresponsive_since is None
    assert _pid(fleet, hung) not in (None, old) and not pids.is_running(old)
    [failed] = fleet.events("instance.failed")
    assert failed["instance"] == hung.id
    assert str(failed["cause"]).startswith("its hypervisor did not answer for 2")
    [replaced] = fleet.events("instance.replaced")
    assert replaced["instance"] == hung.id and replaced["cause"] == failed["cause"]
    assert _now(fleet, other).state is State.RUNNING


def test_a_hypervisor_that_answers_again_is_left_running(fleet: Fleet) -> None:
    ref = fleet.pool("w", running=1)
    [i] = fleet.live(ref)
    pid = _hang(fleet, i)
    fleet.passes()
    assert _now(fleet, i).unresponsive_since is not None
    os.kill(pid, signal.SIGCONT)
    fleet.passes(advance=60)  # (past the grace: it answers, so nothing is ended)
    assert _now(fleet, i).unresponsive_since is None and _pid(fleet, i) == pid
    [e] = fleet.events("instance.responsive")
    assert e["instance"] == i.id and "answers again" in str(e["message"])
    assert not fleet.events("instance.failed")


def test_a_hung_hypervisor_holds_up_no_other_instance(fleet: Fleet, monkeypatch: pytest.MonkeyPatch) -> None:
    """The agent's pass goes on while the silent hypervisor's probe is out (here: for as long as
    the test keeps it stopped) and replaces a crashed sibling meanwhile."""
    monkeypatch.setattr(base, "CONTROL_DEADLINE", 600.0)
    ref = fleet.pool("w", running=2)
    hung, crashed = fleet.live(ref)
    pid = _hang(fleet, hung)
    fleet.kill(crashed)
    agent = Agent(fleet.ctx, 3600.0, sampler=fleet.sampler)
    stop = threading.Event()
    t = threading.Thread(target=agent.run, args=(stop,))
    t.start()
    try:
        deadline = time.monotonic() + 60
        while not fleet.events("instance.replaced") and time.monotonic() < deadline:
            time.sleep(0.05)
        [e] = fleet.events("instance.replaced")
        assert e["instance"] == crashed.id and _now(fleet, crashed).state is State.RUNNING
        assert agent.probes.waiting(hung.id)  # (still stopped: its probe is still out)
        assert _now(fleet, hung).state is State.RUNNING and not fleet.events("instance.unresponsive")
    finally:
        os.kill(pid, signal.SIGCONT)
        stop.set()
        agent.poke()
        t.join(60)
    assert not t.is_alive()
    assert not fleet.events("instance.unresponsive")  # it answered in the end


def test_commands_that_need_a_hung_hypervisor_fail_in_one_line_and_stop_ends_it(fleet: Fleet) -> None:
    ref = fleet.pool("w", running=1)
    [i] = fleet.live(ref)
    pid = _hang(fleet, i)
    for action in (Action.WARM, Action.SLEEP):
        with pytest.raises(RuntimeFailure) as refused:
            apply(fleet.ctx, i.ref, action)
        line = refused.value.line()
        assert f"cannot {action.value} {i.ref}: its hypervisor does not answer (the fake hypervisor" in line
        assert "\n" not in refused.value.message
    with pytest.raises(GuestError, match="the hypervisor does not answer"):
        instances.exec_(fleet.ctx, i.ref, ["read"])
    assert _now(fleet, i).state is State.RUNNING and pids.is_running(pid)
    apply(fleet.ctx, i.ref, Action.STOP)  # asks it nothing: ends it
    assert _now(fleet, i).state is State.STOPPED and not pids.is_running(pid)


def test_pool_grace_is_set_at_create_and_update_and_shown(fleet: Fleet) -> None:
    from mvm.errors import InvalidInput
    from mvm.services import pools

    ref = fleet.pool("w")
    assert fleet.ctx.store.pool("acme", "w").unresponsive_grace == 30.0
    p = pools.update_policy(fleet.ctx, ref, unresponsive_grace=pools.parse_grace("2m"))
    assert p.unresponsive_grace == 120.0 and pools.describe_grace(p) == "unresponsive-grace 2m"
    with pytest.raises(InvalidInput, match="--unresponsive-grace 'off' is not a positive duration"):
        pools.parse_grace("off")


def test_cli_pool_grace(mvm) -> None:  # type: ignore[no-untyped-def]
    from mvm.model import Pool
    from mvm.store import SqliteStore

    mvm.ok("tenant", "create", "acme")
    SqliteStore(mvm.home / "mvm.db").add_pool(Pool("acme", "w", "path:/x", "minimal", 1, 128))
    assert json.loads(mvm.ok("pool", "info", "acme/w", "--json").out)["unresponsive_grace"] == 30
    r = mvm.ok("pool", "update", "acme/w", "--unresponsive-grace", "45s")
    assert r.out.splitlines()[-1] == "acme/w: unresponsive-grace 45s"
    assert json.loads(mvm.ok("pool", "info", "acme/w", "--json").out)["unresponsive_grace"] == 45
    bad = mvm("pool", "update", "acme/w", "--unresponsive-grace", "0")
    assert bad.rc == 2 and len(bad.errors) == 1 and "not a positive duration" in bad.errors[0], bad.err
    assert json.loads(mvm.ok("pool", "info", "acme/w", "--json").out)["unresponsive_grace"] == 45


# -- item 10: a removed run directory ------------------------------------------------------------

def test_a_removed_run_directory_is_unresponsive_and_recovered(fleet: Fleet) -> None:
    ref = fleet.pool("w", running=1, unresponsive_grace=5.0)
    [i] = fleet.live(ref)
    old = _pid(fleet, i)
    assert old is not None
    shutil.rmtree(fleet.ctx.layout.runtime_dir())
    fleet.passes()
    [e] = fleet.events("instance.unresponsive")
    assert e["instance"] == i.id and "is gone" in str(e["cause"])
    assert pids.is_running(old)  # (still running its guest: within the grace)
    fleet.passes(advance=6)
    now = _now(fleet, i)
    assert now.state is State.RUNNING and _pid(fleet, i) not in (None, old) and not pids.is_running(old)
    [r] = fleet.events("instance.replaced")
    assert r["instance"] == i.id and "is gone" in str(r["cause"])
    assert fleet.guest(i.ref, "read") == ""  # its new hypervisor answers


# -- item 11: observing on a full disk -----------------------------------------------------------

@pytest.fixture
def small_home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Fleet]:
    if os.geteuid() != 0:
        pytest.skip("mounts a small tmpfs for the state home: needs root")
    monkeypatch.delenv("MVM_HOME", raising=False)
    monkeypatch.setenv("MVM_RUNTIME_DIR", "/nonexistent-mvm-runtime-dir")
    home = tmp_path / "home"
    home.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=4m,mode=0711", "tmpfs", str(home)], check=True)
    try:
        yield from _fleet(tmp_path)
    finally:
        subprocess.run(["umount", "-l", str(home)], check=False)


def _fill(path: Path) -> None:
    with open(path, "wb") as f:
        try:
            while True:
                f.write(b"\0" * 65536)
                f.flush()
        except OSError:
            pass


def test_observe_on_a_full_disk_changes_nothing_and_keeps_the_cause(small_home: Fleet) -> None:
    f = small_home
    ref = f.pool("w", running=1)
    [i] = f.live(ref)
    pid = _pid(f, i)
    spec = specs.control_spec(f.ctx.layout, i)
    vm = json.loads((spec.run_dir / "fake-vm.json").read_text())
    (spec.run_dir / "fake-vm.json").write_text(json.dumps({**vm, "status": "io-error"}))
    f.ctx.store.db.execute("PRAGMA wal_checkpoint(TRUNCATE)")  # (every write now needs new space)
    filler = f.root / "home" / "filler"
    _fill(filler)
    with pool_locked(f.ctx, ref, False), pytest.raises(HostUnsupported, match="cannot write mvm's state"):
        observe.pool(f.ctx, ref)
    assert pid is not None and pids.is_running(pid)  # the hypervisor was left as it was
    assert _now(f, i).state is State.RUNNING
    filler.unlink()
    with pool_locked(f.ctx, ref, False):
        lines = observe.pool(f.ctx, ref)
    assert lines == [f"{i.id}: failed: {observe.CAUSES[base.VmStatus.IO_ERROR]}"]
    now = _now(f, i)
    assert now.state is State.FAILED and now.error == observe.CAUSES[base.VmStatus.IO_ERROR]
    assert not pids.is_running(pid)
    [e] = f.events("instance.failed")
    assert e["cause"] == observe.CAUSES[base.VmStatus.IO_ERROR]


# -- the QMP and Firecracker API doubles -------------------------------------------------------------

def test_qemu_status_has_the_deadline_when_qmp_does_not_answer(tmp_path: Path,
                                                                monkeypatch: pytest.MonkeyPatch) -> None:
    """A QEMU (a stand-in process naming its pid file as QEMU does) whose QMP socket greets and
    then says nothing: `status` gives up at the control deadline, and says so."""
    monkeypatch.setattr(base, "CONTROL_DEADLINE", 0.3)
    run = tmp_path / "run"
    run.mkdir()
    spec = VmSpec("i-00000001", 1, 64, Path("/nonexistent"), None, "", (), None, run)
    rt = QemuRuntime("tcg")
    proc = subprocess.Popen([sys.executable, "-S", "-c", "import time; time.sleep(600)",
                             "-pidfile", str(rt.pid_file(spec))])
    try:
        rt.pid_file(spec).write_text(f"{proc.pid}\n")
        silent = Monitor(rt.qmp_socket(spec), lambda cmd, args, fds: {"mute": True})
        try:
            with pytest.raises(RuntimeFailure, match=r"did not answer query-status within 0\.[0-9]+s"):
                rt.status(spec)
            assert "did not answer" in rt.unanswered(spec)
        finally:
            silent.close()
        rt.qmp_socket(spec).unlink()  # (the run directory's socket removed)
        assert "cannot connect to QEMU" in rt.unanswered(spec)
    finally:
        proc.kill()
        proc.wait()


def test_the_agent_channel_ends_a_wait_on_a_silent_hypervisor(tmp_path: Path,
                                                                monkeypatch: pytest.MonkeyPatch) -> None:
    """An exec whose guest agent never answers ends when the channel says the hypervisor does
    not answer its control socket, not at the exec's timeout."""
    from mvm.guest import agent_client
    from mvm.guest.agent_client import GuestAgentClient
    from mvm.guest.channels import VirtioSerialChannel

    monkeypatch.setattr(agent_client, "SILENCE_CHECK", 0.05)
    path = tmp_path / "agent.sock"
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as mute:
        mute.bind(str(path))
        mute.listen(1)
        channel = VirtioSerialChannel(path, unanswered=lambda: "QEMU did not answer on qmp.sock within 5s")
        with GuestAgentClient(channel) as ag, pytest.raises(GuestError) as e:
            ag.exec(["true"], timeout=30)
    assert e.value.message == ("the hypervisor does not answer (during exec): "
                               "QEMU did not answer on qmp.sock within 5s")
