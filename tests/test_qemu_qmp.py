"""The QMP wrapper, and QemuRuntime's refusals and status mapping, against the strict QMP
double (tests/doubles/qmp.py): no QEMU needed, no guest booted.

qemu.qmp sends each message as JSON without a trailing newline, so the double splits the
stream with `JSONDecoder.raw_decode`, not `readline()`.
"""

from __future__ import annotations

import json
import os
import socket
import stat
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest

from mvm.errors import RuntimeFailure
from mvm.runtime.base import MANIFEST, Disk, SnapshotInfo, VmSpec, VmStatus
from mvm.runtime.qemu import QemuRuntime
from mvm.runtime.qemu.qmp import Qmp, call
from mvm.util import pids
from tests.doubles.qmp import GREETING, Handler, Monitor, Vm

DOUBLE = Path(__file__).resolve().parent / "doubles" / "qmp.py"


@pytest.fixture
def double(tmp_path: Path) -> Iterator[Callable[..., Monitor]]:
    made: list[Monitor] = []

    def make(handler: Handler | None = None, vm: Vm | None = None) -> Monitor:
        d = Monitor(tmp_path / "qmp.sock", handler, vm=vm)
        made.append(d)
        return d

    yield make
    for d in made:
        d.close()


def raw_session(path: Path, *messages: dict[str, Any]) -> list[dict[str, Any]]:
    """What the double answers to `messages`, sent as qemu.qmp sends them (no newline)."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        s.connect(str(path))
        f = s.makefile("rb")
        out = [json.loads(f.readline())]
        for m in messages:
            s.sendall(json.dumps(m).encode())
            out.append(json.loads(f.readline()))
        return out


def test_the_double_greets_and_refuses_what_qmp_refuses(double: Callable[..., Monitor]) -> None:
    d = double()
    got = raw_session(d.path,
                      {"execute": "query-status", "id": 1},
                      {"execute": "qmp_capabilities", "id": 2},
                      {"execute": "qmp_capabilities", "id": 3},
                      {"execute": "no-such-command", "id": 4},
                      {"execute": "migrate", "arguments": {"uri": "fd:x", "speed": 1}, "id": 5},
                      {"execute": "migrate", "arguments": {}, "id": 6},
                      {"execute": "migrate-set-parameters", "arguments": {"max-bandwidth": "1"}, "id": 7},
                      {"execute": "query-status", "id": 8})
    assert got[0] == GREETING
    assert [r.get("error", {}).get("class") for r in got[1:]] == [
        "CommandNotFound", None, "CommandNotFound", "CommandNotFound", "GenericError", "GenericError",
        "GenericError", None]
    assert got[1]["error"]["desc"] == "Expecting capabilities negotiation with 'qmp_capabilities'"
    assert got[4]["error"]["desc"] == "The command no-such-command has not been found"
    assert got[5]["error"]["desc"] == "Parameter 'speed' is unexpected"
    assert got[6]["error"]["desc"] == "Parameter 'uri' is missing"
    assert got[8] == {"return": {"status": "running", "running": True, "singlestep": False}, "id": 8}
    assert [r["id"] for r in got[1:]] == list(range(1, 9))


def test_execute_returns_the_return_value(double: Callable[..., Monitor]) -> None:
    d = double()
    with Qmp(d.path) as q:
        assert q.execute("query-status") == {"status": "running", "running": True, "singlestep": False}
        assert q.execute("stop", timeout=1) == {}
        assert q.execute("query-status")["status"] == "paused"
    assert d.commands() == ["qmp_capabilities", "query-status", "stop", "query-status"]


def test_arguments_are_sent(double: Callable[..., Monitor]) -> None:
    d = double()
    assert call(d.path, "migrate-set-parameters", {"max-bandwidth": 1 << 30}) == {}
    assert d.received[-1]["arguments"] == {"max-bandwidth": 1 << 30}
    assert d.vm.bandwidth == 1 << 30


def test_qemu_error_text_is_kept(double: Callable[..., Monitor]) -> None:
    d = double()
    with pytest.raises(RuntimeFailure, match="QEMU refused migrate: File descriptor named 'x' has not "
                                             "been found"):
        call(d.path, "migrate", {"uri": "fd:x"})
    with pytest.raises(RuntimeFailure, match="QEMU refused migrate: Parameter 'speed' is unexpected"):
        call(d.path, "migrate", {"uri": "fd:x", "speed": 1})


def test_every_call_has_a_deadline(double: Callable[..., Monitor]) -> None:
    d = double(lambda cmd, args, fds: {"mute": True})  # never answers
    start = time.monotonic()
    with pytest.raises(RuntimeFailure, match=r"did not answer query-migrate within 0\.2s"):
        call(d.path, "query-migrate", timeout=0.2)
    assert time.monotonic() - start < 2


def test_no_socket_is_a_clear_failure(tmp_path: Path) -> None:
    with pytest.raises(RuntimeFailure, match="cannot connect to QEMU"):
        call(tmp_path / "nothing.sock", "query-status")


def test_silent_server_hits_the_connect_deadline(tmp_path: Path) -> None:
    path = tmp_path / "mute.sock"
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as mute:
        mute.bind(str(path))
        mute.listen(1)  # accepts the connection but never greets
        start = time.monotonic()
        with pytest.raises(RuntimeFailure, match="did not answer"):
            Qmp(path, connect_timeout=0.3).connect()
        assert time.monotonic() - start < 2


def test_hang_up_mid_command(double: Callable[..., Monitor]) -> None:
    d = double(lambda cmd, args, fds: {"close": True})
    with pytest.raises(RuntimeFailure, match="closed the connection during cont"):
        call(d.path, "cont")


def test_quit_tolerates_the_hang_up(double: Callable[..., Monitor]) -> None:
    d = double(lambda cmd, args, fds: {"close": True} if cmd == "quit" else None)
    with Qmp(d.path) as q:
        q.quit()
    assert d.commands()[-1] == "quit"


def test_send_fd_passes_a_working_descriptor(double: Callable[..., Monitor], tmp_path: Path) -> None:
    d = double()
    target = tmp_path / "memory"
    fd = os.open(target, os.O_WRONLY | os.O_CREAT, 0o600)
    try:
        with Qmp(d.path) as q:
            q.send_fd(fd, "mvm-snapshot")
            q.execute("migrate", {"uri": "fd:mvm-snapshot"})  # the "hypervisor" writes through its copy
    finally:
        os.close(fd)
    assert target.read_bytes()[:4] == b"QEVM"
    with pytest.raises(RuntimeFailure, match="No file descriptor supplied via SCM_RIGHTS"):
        call(d.path, "getfd", {"fdname": "none"})


def test_concurrent_clients_queue_instead_of_failing(double: Callable[..., Monitor]) -> None:
    # Like QEMU, the double serves one client at a time with a backlog of one: the others
    # must wait their turn (each connection also has its own event loop, per thread).
    d = double(vm=Vm("paused"))
    results = []

    def worker() -> None:
        for _ in range(5):
            results.append(call(d.path, "query-status")["status"])

    threads = [threading.Thread(target=worker) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    assert results == ["paused"] * 40


# -- QemuRuntime on the double, run as QEMU is (what needs no guest) ---------------------------


class Fake:
    """QemuRuntime whose QEMU is the double (a script running tests/doubles/qmp.py); specs whose
    kernel and disks are empty files (nothing boots)."""

    def __init__(self, tmp: Path) -> None:
        script = tmp / "qemu-double"
        script.write_text(f'#!/bin/sh\nexec "{sys.executable}" "{DOUBLE}" "$@"\n')
        script.chmod(script.stat().st_mode | stat.S_IXUSR)
        self.rt = QemuRuntime("tcg", binary=str(script))
        self.tmp = tmp
        self.specs: list[VmSpec] = []
        for f in ("vmlinux", "rootfs.ext4", "data.ext4"):
            (tmp / f).touch()

    def spec(self, name: str = "vm", **changes: Any) -> VmSpec:
        s = VmSpec(name=name, vcpus=1, mem_mib=256, kernel=self.tmp / "vmlinux", initrd=None,
                   cmdline="root=/dev/vda", run_dir=self.tmp / name / "run", net=None,
                   disks=(Disk("rootfs", self.tmp / "rootfs.ext4", True), Disk("data", self.tmp / "data.ext4", False)))
        s = replace(s, **changes)
        self.specs.append(s)
        return s

    def leftovers(self, spec: VmSpec) -> list[str]:
        out = [p.name for p in (self.rt.qmp_socket(spec), self.rt.agent_socket(spec), self.rt.pid_file(spec))
               if p.exists()]
        return [*out, *(["process"] if self.rt.is_alive(spec) else [])]


@pytest.fixture
def fake(tmp_path: Path) -> Iterator[Fake]:
    f = Fake(tmp_path)
    yield f
    for s in f.specs:
        f.rt.stop(s, 0)


def test_booting_twice_is_refused_without_harm(fake: Fake) -> None:
    spec = fake.spec()
    fake.rt.boot(spec)
    pid = fake.rt.pid(spec)
    with pytest.raises(RuntimeFailure, match=rf"vm already runs \(QEMU pid {pid}\)"):
        fake.rt.boot(spec)
    assert fake.rt.status(spec) is VmStatus.RUNNING
    assert fake.rt.pid(spec) == pid and fake.rt.qmp_socket(spec).exists()


def test_a_guest_that_is_not_running_after_boot_is_refused_and_its_process_killed(
        fake: Fake, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("QMP_DOUBLE_STATE", "internal-error")
    spec = fake.spec()
    with pytest.raises(RuntimeFailure, match="vm: QEMU is internal-error, expected running"):
        fake.rt.boot(spec)
    assert fake.leftovers(spec) == []
    assert not spec.run_dir.exists()


@pytest.mark.parametrize(("state", "status"), [
    ("running", VmStatus.RUNNING), ("paused", VmStatus.PAUSED), ("postmigrate", VmStatus.PAUSED),
    ("prelaunch", VmStatus.PAUSED), ("io-error", VmStatus.IO_ERROR), ("guest-panicked", VmStatus.BROKEN),
    ("shutdown", VmStatus.BROKEN), ("internal-error", VmStatus.BROKEN), ("watchdog", VmStatus.BROKEN)])
def test_qemu_s_run_states_as_the_runtime_reports_them(fake: Fake, monkeypatch: pytest.MonkeyPatch,
                                                       state: str, status: VmStatus) -> None:
    spec = fake.spec()
    spec.run_dir.mkdir(parents=True)
    monkeypatch.setenv("QMP_DOUBLE_STATE", state)
    subprocess.run(fake.rt.argv(spec), check=True, timeout=30)  # (as boot spawns it, without its check)
    assert fake.rt.status(spec) is status
    if status.is_error():
        with pytest.raises(RuntimeFailure, match=f"cannot snapshot vm while QEMU is {state}"):
            fake.rt.snapshot(spec, fake.tmp / "snapshot")
        assert fake.rt.status(spec) is status  # as it was
        assert not (fake.tmp / "snapshot" / MANIFEST).exists()


def test_pause_resume_and_stop_on_a_vm_whose_guest_ignores_the_power_button(fake: Fake) -> None:
    spec = fake.spec()
    fake.rt.boot(spec)
    fake.rt.pause(spec)
    assert fake.rt.status(spec) is VmStatus.PAUSED
    fake.rt.resume(spec)
    assert fake.rt.status(spec) is VmStatus.RUNNING
    pid = fake.rt.pid(spec)
    assert pid is not None
    fake.rt.stop(spec, timeout=0.5)  # powerdown unheard: then quit
    assert not pids.is_running(pid)
    assert fake.leftovers(spec) == []
    fake.rt.stop(spec, 0.5)  # nothing runs: still fine
    with pytest.raises(RuntimeFailure, match="vm has no running hypervisor"):
        fake.rt.pause(spec)


def test_a_foreign_pid_in_the_pid_file_is_not_ours(fake: Fake) -> None:
    spec = fake.spec()
    spec.run_dir.mkdir(parents=True)
    fake.rt.pid_file(spec).write_text(f"{os.getpid()}\n")  # alive, but not our QEMU
    assert not fake.rt.is_alive(spec)
    assert fake.rt.status(spec) is VmStatus.GONE
    fake.rt.stop(spec, 0)  # cleans the stale file, kills nothing
    assert not fake.rt.pid_file(spec).exists()


def test_restore_refuses_a_snapshot_that_does_not_fit_and_loads_one_that_does(fake: Fake) -> None:
    spec = fake.spec()
    fake.rt.boot(spec)
    snap = fake.tmp / "snapshot"
    info = fake.rt.snapshot(spec, snap)
    assert not fake.rt.is_alive(spec) and fake.leftovers(spec) == []
    assert SnapshotInfo.load(snap) == info and info.checksums.keys() == {"memory"}
    with pytest.raises(RuntimeFailure, match="memory 256 MiB at snapshot, 512 MiB now"):
        fake.rt.restore(replace(spec, mem_mib=512), snap)
    with pytest.raises(RuntimeFailure, match="devices"):
        fake.rt.restore(replace(spec, disks=spec.disks[:1]), snap)
    assert not fake.rt.is_alive(spec)
    fake.rt.restore(spec, snap)
    assert fake.rt.status(spec) is VmStatus.PAUSED  # loaded, the vCPUs not yet running
    fake.rt.resume(spec)
    assert fake.rt.status(spec) is VmStatus.RUNNING
