"""DOUBLES (not the real thing): a fake hypervisor runtime and a fake guest agent.

They stand in for QEMU and the guest so that the quick suite can take every transition, every
undo and every crash point in milliseconds. They are strict where the lifecycle depends on it:
a VM is a real process (found by pid file and /proc, killed by SIGKILL, so a crash of the
command leaves it running as a real hypervisor would); pause, resume, snapshot and exec need
a live one; a restore refuses an uncommitted snapshot; a snapshot refuses a VM that is not
running or paused; the guest's memory lives only in its process's state and its snapshots.
Its "control socket" is its state file in the run directory: a VM whose process is stopped
(`kill -STOP`: hung) answers nothing for `base.CONTROL_DEADLINE` seconds, then fails as a
hung QEMU does; one whose run directory was removed cannot be reached (its process is still
found by its command line, as QEMU's is).

The fake guest: `write X` appends X to its page cache (memory); `sync` (and sleep-prep, and a
graceful stop) moves the cache to its data disk (a file beside the data image); `read` prints
disk then cache; `exit N` exits N; `wait FILE` makes FILE.started, then runs until FILE
exists on the host (an exec in flight: when its VM goes meanwhile, its result is lost,
`ExecLost`, as the real agent client says). Every restored guest that then runs appends its snapshot to a ledger, so a
test can show that no snapshot was restored twice (a restore whose guest never ran does not
count: it consumed nothing).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from mvm.errors import ExecLost, GuestError, RuntimeFailure
from mvm.guest.agent_client import ExecResult
from mvm.runtime import base
from mvm.runtime.base import Runtime, SnapshotInfo, VmSpec, VmStatus
from mvm.util import pids, private
from mvm.util.progress import StepTimes

MEMORY = "memory.json"


class FakeRuntime(Runtime):
    name = "fake"
    #: How long a boot or restore takes (a real one: ~2 s under TCG); concurrency tests set it.
    boot_seconds = 0.0

    def __init__(self, ledger: Path | str) -> None:
        self.ledger = Path(ledger)  # one line per restored guest that ran: its snapshot directory
        #: One line per VM started: how many VMs of this home run then, their vCPUs and MiB.
        self.live_log = self.ledger.with_name("live-vms.txt")

    @classmethod
    def seam(cls, ledger: Path) -> str:
        """The test seam MVM_TEST_RUNTIME (`mvm/context/compose.py`) that runs a process a test
        starts (a CLI command, the API server) on this double, with `ledger`."""
        return f"{cls.__module__}:{cls.__qualname__}:{ledger}"

    # -- files
    PID_FILE = "fake.pid"

    def pid_file(self, spec: VmSpec) -> Path:
        return spec.run_dir / self.PID_FILE

    def _state_file(self, spec: VmSpec) -> Path:
        return spec.run_dir / "fake-vm.json"

    def agent_socket(self, spec: VmSpec) -> Path:
        return spec.run_dir / "agent.sock"

    def console_log(self, spec: VmSpec) -> Path:
        return spec.run_dir / "console.log"

    def _vm(self, spec: VmSpec) -> dict[str, object]:
        data: dict[str, object] = json.loads(self._state_file(spec).read_text())
        return data

    def _save_vm(self, spec: VmSpec, vm: dict[str, object]) -> None:
        tmp = self._state_file(spec).with_suffix(".tmp")
        tmp.write_text(json.dumps(vm))
        os.replace(tmp, self._state_file(spec))

    # -- processes
    def _pid(self, spec: VmSpec) -> int | None:
        if self.pid_file(spec).exists() or spec.run_dir.exists():
            return pids.owned_pid(self.pid_file(spec))
        # (its run directory removed under it: found by its command line, as QEMU is)
        return pids.find_by_arg("-pidfile", str(self.pid_file(spec)))

    def _answer(self, spec: VmSpec) -> dict[str, object]:
        """The VM's state, as its control socket would tell it: within the deadline or never."""
        pid = self._need(spec)
        deadline = time.monotonic() + base.CONTROL_DEADLINE
        while _stopped(pid):
            if time.monotonic() >= deadline:
                raise RuntimeFailure(f"the fake hypervisor of {spec.name} did not answer within "
                                     f"{base.CONTROL_DEADLINE:g}s")
            time.sleep(0.005)
        try:
            return self._vm(spec)
        except FileNotFoundError:
            raise RuntimeFailure(f"cannot reach the fake hypervisor of {spec.name}: "
                                 f"{self._state_file(spec)} is gone") from None

    def is_alive(self, spec: VmSpec) -> bool:
        return self._pid(spec) is not None

    def pid(self, spec: VmSpec) -> int | None:
        return self._pid(spec)

    def _spawn(self, spec: VmSpec, vm: dict[str, object]) -> None:
        if self.is_alive(spec):
            raise RuntimeFailure(f"{spec.name} already runs (fake pid {self._pid(spec)})")
        private.mkdirs(spec.run_dir)
        self._save_vm(spec, vm)
        proc = subprocess.Popen(
            [sys.executable, "-S", "-c", "import time\nwhile True: time.sleep(3600)",
             "-pidfile", str(self.pid_file(spec))],
            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
            start_new_session=True)
        self.pid_file(spec).write_text(f"{proc.pid}\n")
        _DETACHED.append(proc)
        with self.live_log.open("a") as f:
            f.write(" ".join(map(str, self.live(spec.run_dir.parent))) + "\n")
        time.sleep(self.boot_seconds)

    @staticmethod
    def live(runtime_dir: Path) -> tuple[int, int, int]:
        """VMs alive now under a home's runtime directory (seen from outside: pid files and
        /proc), with their vCPUs and memory."""
        count = vcpus = mem = 0
        for pid_file in runtime_dir.glob(f"*/{FakeRuntime.PID_FILE}"):
            if pids.owned_pid(pid_file) is None:
                continue
            try:
                vm = json.loads((pid_file.parent / "fake-vm.json").read_text())
            except (OSError, ValueError):
                continue
            count, vcpus, mem = count + 1, vcpus + vm.get("vcpus", 0), mem + vm.get("mem", 0)
        return count, vcpus, mem

    def _need(self, spec: VmSpec) -> int:
        pid = self._pid(spec)
        if pid is None:
            raise RuntimeFailure(f"{spec.name} has no running hypervisor (fake)")
        return pid

    def _kill(self, spec: VmSpec) -> None:
        pid = self._pid(spec)
        if pid is not None:
            os.kill(pid, signal.SIGKILL)
            pids.wait_gone(pid, 5)
        self.pid_file(spec).unlink(missing_ok=True)

    # -- the interface
    def boot(self, spec: VmSpec, progress: StepTimes | None = None) -> None:
        for d in spec.disks:
            if not d.path.is_file():
                raise RuntimeFailure(f"{spec.name}: disk {d.id!r} {d.path} does not exist")
        self._spawn(spec, {"status": "running", "cache": [], "disk": _disk_file(spec),
                           "vcpus": spec.vcpus, "mem": spec.mem_mib})

    def pause(self, spec: VmSpec) -> None:
        vm = self._answer(spec)
        vm["status"] = "paused"
        self._save_vm(spec, vm)

    def resume(self, spec: VmSpec) -> None:
        vm = self._answer(spec)
        if vm["status"] not in ("running", "paused"):
            raise RuntimeFailure(f"{spec.name}: cannot resume a VM that is {vm['status']}")
        if vm.get("restored_from"):
            with self.ledger.open("a") as f:
                f.write(f"{vm['restored_from']}\n")
            vm["restored_from"] = ""
        vm["status"] = "running"
        self._save_vm(spec, vm)

    def status(self, spec: VmSpec) -> VmStatus:
        if not self.is_alive(spec):
            return VmStatus.GONE
        return VmStatus(self._answer(spec)["status"])

    def snapshot(self, spec: VmSpec, snap_dir: Path, progress: StepTimes | None = None) -> SnapshotInfo:
        vm = self._answer(spec)
        if vm["status"] not in ("running", "paused"):
            raise RuntimeFailure(f"cannot snapshot {spec.name} while it is {vm['status']}")
        private.mkdirs(snap_dir)  # as a real runtime: 0700
        mem = snap_dir / MEMORY
        mem.write_text(json.dumps({"cache": vm["cache"]}))
        info = SnapshotInfo(backend=self.name, memory_file=MEMORY, mem_mib=spec.mem_mib,
                            vcpus=spec.vcpus, devices=spec.devices(), size_bytes=mem.stat().st_size,
                            created=time.time())
        info.write(snap_dir)  # committed: the VM must never run again
        self._kill(spec)
        return info

    def restore(self, spec: VmSpec, snap_dir: Path, progress: StepTimes | None = None) -> None:
        if not SnapshotInfo.committed(snap_dir):
            raise RuntimeFailure(f"no committed snapshot in {snap_dir}")
        SnapshotInfo.load(snap_dir).check_matches(spec, self.name)
        cache = json.loads((snap_dir / MEMORY).read_text())["cache"]
        self._spawn(spec, {"status": "paused", "cache": cache, "disk": _disk_file(spec),
                           "restored_from": str(snap_dir), "vcpus": spec.vcpus,
                           "mem": spec.mem_mib})

    def stop(self, spec: VmSpec, timeout: float) -> None:
        pid = self._pid(spec)
        if (pid is not None and timeout > 0 and not _stopped(pid) and self._state_file(spec).exists()
                and self._vm(spec)["status"] == "running"):
            _sync(self._vm(spec))  # the guest heard the power button
        self.kill(spec)

    def kill(self, spec: VmSpec) -> None:
        self._kill(spec)
        self._state_file(spec).unlink(missing_ok=True)

    def agent(self, spec: VmSpec) -> FakeAgent:  # type: ignore[override]
        return FakeAgent(self, spec)


_DETACHED: list[subprocess.Popen[bytes]] = []


def _stopped(pid: int) -> bool:
    """The process is stopped (`kill -STOP`): it answers nothing until continued."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] in "Tt"
    except (OSError, IndexError):
        return False


def _disk_file(spec: VmSpec) -> str:
    data = [d for d in spec.disks if d.id == "data"]
    return str(data[0].path) + ".fake-content" if data else ""


def _sync(vm: dict[str, object]) -> None:
    cache = list(vm["cache"])  # type: ignore[call-overload]
    if vm["disk"] and cache:
        with open(str(vm["disk"]), "a") as f:
            f.writelines(f"{line}\n" for line in cache)
    vm["cache"] = []


class FakeAgent:
    """The guest agent of a fake VM: answers only while the VM runs (not when paused)."""

    def __init__(self, rt: FakeRuntime, spec: VmSpec) -> None:
        self.rt = rt
        self.spec = spec

    def __enter__(self) -> FakeAgent:
        return self

    def __exit__(self, *exc: object) -> None:
        pass

    def _running(self, verb: str) -> dict[str, object]:
        if not self.rt.is_alive(self.spec):
            raise GuestError(f"the hypervisor exited during {verb}")
        try:
            vm = self.rt._answer(self.spec)
        except RuntimeFailure as e:
            raise GuestError(f"the hypervisor does not answer (during {verb}): {e.message}") from None
        if vm["status"] != "running":
            raise GuestError(f"guest agent did not answer {verb}: the VM is {vm['status']}")
        return vm

    def wait_ready(self, timeout: float) -> None:
        self._running("wait_ready")

    def sleep_prep(self, timeout: float = 30.0) -> None:
        vm = self._running("sleep-prep")
        _sync(vm)
        self.rt._save_vm(self.spec, vm)

    def wake(self, now: float | None = None, timeout: float = 10.0, fresh_secrets: bool = False) -> None:
        self._running("wake")

    def exec(self, argv: list[str], timeout: float = 60.0, output_limit: int = 16 << 20) -> ExecResult:
        vm = self._running("exec")
        verb, *rest = argv
        out = b""
        if verb == "write":
            vm["cache"] = [*vm["cache"], *rest]  # type: ignore[misc]
        elif verb == "sync":
            _sync(vm)
        elif verb == "read":  # (changes nothing: saves nothing over a concurrent command's change)
            disk = Path(str(vm["disk"])).read_text() if vm["disk"] and Path(str(vm["disk"])).exists() else ""
            out = (disk + "".join(f"{x}\n" for x in vm["cache"])).encode()  # type: ignore[attr-defined]
            return ExecResult(0, out, b"")
        elif verb == "exit":
            return ExecResult(int(rest[0]), b"", b"")
        elif verb == "wait":
            Path(rest[0] + ".started").touch()
            deadline = time.monotonic() + timeout
            while not Path(rest[0]).exists():
                if not self.rt.is_alive(self.spec):
                    raise ExecLost("the command's result was lost: the guest was told to start it, "
                                   "then the hypervisor exited during exec (fake)")
                if time.monotonic() > deadline:
                    return ExecResult(124, b"", b"", timed_out=True)
                time.sleep(0.01)
            return ExecResult(0, b"", b"")
        else:
            return ExecResult(127, b"", f"fake guest: no {verb}\n".encode())
        self.rt._save_vm(self.spec, vm)
        return ExecResult(0, out, b"")
