"""The QEMU backend: `qemu-system-x86_64 -M microvm`, driven over QMP (qmp.py), its command
line built by cmdline.py, its snapshots QEMU's migration stream (snapshot.py); what it shares
with Firecracker's backend is runtime/process.py.
"""

from __future__ import annotations

import contextlib
import itertools
import os
import shlex
import time
from collections.abc import Callable
from pathlib import Path

from mvm.errors import CommandFailed, RuntimeFailure
from mvm.guest.channels import VirtioSerialChannel
from mvm.runtime import console, jail
from mvm.runtime.base import SnapshotInfo, UndoSteps, VmSpec, VmStatus
from mvm.runtime.process import MEMORY_FILE, HypervisorRuntime, log_tail
from mvm.runtime.qemu import snapshot
from mvm.runtime.qemu.cmdline import (
    AGENT_SOCK,
    BINARY,
    PID_FILE,
    QEMU_LOG,
    QMP_SOCK,
    TCG_TB_MIB,
    argv,
    check_accel,
    host_tsc_khz,
    qemu_message,
)
from mvm.runtime.qemu.qmp import Qmp
from mvm.util import pids
from mvm.util.proc import run
from mvm.util.proc import which as proc_which
from mvm.util.progress import StepTimes

SPAWN_TIMEOUT = 30.0
QUIT_TIMEOUT = 5.0

# QEMU's RunState (qapi/run-state.json) as the runtime interface sees it; the rest are paused.
STATUS = {
    "running": VmStatus.RUNNING,
    "io-error": VmStatus.IO_ERROR,
    "internal-error": VmStatus.BROKEN,
    "guest-panicked": VmStatus.BROKEN,
    "shutdown": VmStatus.BROKEN,
    "watchdog": VmStatus.BROKEN,
}


class QemuRuntime(HypervisorRuntime):
    name = "qemu"
    hypervisor = "QEMU"

    def __init__(self, accel: str | Callable[[], str] = "tcg", *, binary: str = BINARY,
                 tb_size_mib: int | None = TCG_TB_MIB, jail_config: jail.Config | None = None) -> None:
        """`accel`: tcg or kvm, or a function choosing one (e.g. by a timed KVM probe), called
        on the first boot or snapshot only: observing and stopping VMs never probe.
        `jail_config`: whether and how hypervisors are jailed (None: never)."""
        if isinstance(accel, str):
            check_accel(accel)
        self._accel = accel
        self.binary = binary
        self.tb_size_mib = tb_size_mib
        self.jail_config = jail_config or jail.Config(jail.Mode.OFF)

    @property
    def accel(self) -> str:
        if not isinstance(self._accel, str):
            self._accel = check_accel(self._accel())
        return self._accel

    # -- files ------------------------------------------------------------------------------

    def agent_socket(self, spec: VmSpec) -> Path:
        return spec.run_dir / AGENT_SOCK

    def qmp_socket(self, spec: VmSpec) -> Path:
        return spec.run_dir / QMP_SOCK

    def pid_file(self, spec: VmSpec) -> Path:
        return Path(os.path.abspath(spec.run_dir)) / PID_FILE

    def qemu_log(self, spec: VmSpec) -> Path:
        return spec.run_dir / QEMU_LOG

    def hypervisor_log(self, spec: VmSpec) -> Path:
        return self.qemu_log(spec)

    def argv(self, spec: VmSpec, accel: str | None = None, incoming: bool = False) -> list[str]:
        return argv(spec, accel or self.accel, incoming, tsc_khz=host_tsc_khz(),
                    binary=self.binary, tb_size_mib=self.tb_size_mib)

    def _identity(self, spec: VmSpec) -> tuple[str, str]:
        return "-pidfile", str(self.pid_file(spec))

    def _sockets(self, spec: VmSpec) -> tuple[Path, ...]:
        return self.qmp_socket(spec), self.agent_socket(spec)

    def _said(self, spec: VmSpec) -> str:
        return qemu_message("\n".join(log_tail(self.qemu_log(spec), 8)))

    def _channel(self, spec: VmSpec, *, alive: Callable[[], bool], last_words: Callable[[], str],
                 unanswered: Callable[[], str]) -> VirtioSerialChannel:
        return VirtioSerialChannel(self.agent_socket(spec), alive=alive, last_words=last_words,
                                   unanswered=unanswered)

    # -- queries ----------------------------------------------------------------------------

    def _state(self, spec: VmSpec, deadline: float) -> VmStatus:
        ends = time.monotonic() + deadline
        with Qmp(self.qmp_socket(spec), connect_timeout=deadline) as q:
            state = q.execute("query-status", timeout=max(ends - time.monotonic(), 0.01))["status"]
        return STATUS.get(state, VmStatus.PAUSED)

    # -- lifecycle --------------------------------------------------------------------------

    def boot(self, spec: VmSpec, progress: StepTimes | None = None) -> None:
        with UndoSteps("boot", progress) as s:
            s.run("check", lambda: self._check_inputs(spec))
            s.run("run-dir", lambda: self._prepare_run_dir(spec, s, fresh=True))
            s.run("spawn", lambda: self._launch(spec, self.accel, False, s))
            s.run("running", lambda: self._expect_state(spec, "running"))

    def restore(self, spec: VmSpec, snap_dir: Path, progress: StepTimes | None = None) -> None:
        with UndoSteps("restore", progress) as s:
            info = s.run("check", lambda: self._check_snapshot(spec, snap_dir))
            accel = info.extra.get("accel", self.accel)
            s.run("run-dir", lambda: self._prepare_run_dir(spec, s, fresh=False))
            s.run("spawn", lambda: self._launch(spec, accel, True, s))
            with Qmp(self.qmp_socket(spec)) as q:
                # Loaded and left paused (-S): the guest runs only at resume().
                s.run("load", lambda: self._load(spec, q, snap_dir / info.memory_file, info))

    def pause(self, spec: VmSpec) -> None:
        self._require_alive(spec)
        with Qmp(self.qmp_socket(spec)) as q:
            q.execute("stop")

    def resume(self, spec: VmSpec) -> None:
        self._require_alive(spec)
        with Qmp(self.qmp_socket(spec)) as q:
            snapshot.run_vcpus(q)

    def snapshot(self, spec: VmSpec, snap_dir: Path,
                 progress: StepTimes | None = None) -> SnapshotInfo:
        pid = self._require_alive(spec)
        started = time.monotonic()
        tmp = snap_dir / (MEMORY_FILE + ".tmp")
        with Qmp(self.qmp_socket(spec)) as q:
            with UndoSteps("snapshot", progress) as s:
                state = s.run("status", lambda: q.execute("query-status")["status"])
                if state == "running":
                    s.run("pause", lambda: q.execute("stop"))
                    s.on_undo("pause", lambda: snapshot.run_vcpus(q))
                elif state != "paused":
                    raise RuntimeFailure(f"cannot snapshot {spec.name} while QEMU is {state}")
                s.run("prepare", lambda: self._prepare_snap_dir(snap_dir, s))
                s.run("save", lambda: snapshot.save(q, tmp, spec.name, spec.mem_mib))
                extra = {"accel": _running_accel(pid) or self.accel, "machine": "microvm"}
                info = s.run("commit", lambda: self._commit(spec, snap_dir, started, extra))
            # Committed: from here the VM must never run again (its disks now belong to the
            # snapshot), so failures below end in SIGKILL, not in a resume.
            UndoSteps("snapshot", progress).run("quit", lambda: self._end(spec, pid, q))
        return info

    def stop(self, spec: VmSpec, timeout: float) -> None:
        pid = self._pid(spec)
        if pid is not None:
            try:
                if timeout > 0:
                    with Qmp(self.qmp_socket(spec), connect_timeout=2.0) as q:
                        if q.execute("query-status")["status"] != "running":
                            snapshot.run_vcpus(q)  # a paused guest cannot see the power button
                        q.execute("system_powerdown")
                    # Waiting without holding QMP: QEMU serves one client at a time.
                    if pids.wait_gone(pid, timeout):
                        return self._cleanup(spec)
                with Qmp(self.qmp_socket(spec), connect_timeout=2.0) as q:
                    q.quit()
            except RuntimeFailure:
                pass  # QMP is gone or hung: fall through to the signal
            if not pids.wait_gone(pid, QUIT_TIMEOUT):
                self._kill(spec)
        self._cleanup(spec)

    # -- the jail ---------------------------------------------------------------------------

    def jailing(self) -> jail.Jailing:
        """Whether the hypervisor starting now is jailed (setting `jail`, the host's recorded
        verdict, what this process can do now), or refuses: see `jail.decide`."""
        return jail.decide(self.jail_config, self.name)

    def mem_overhead_mib(self, accel: str) -> int:
        """What the jail's memory limit allows beyond guest RAM: QEMU itself and, under TCG,
        its translation cache."""
        tb = (self.tb_size_mib or 1024) if accel == "tcg" else 0
        return jail.MEM_OVERHEAD_MIB + tb

    def mem_overhead(self) -> int:
        """The jail's memory limit beyond guest RAM, on this host's accelerator (admission)."""
        return self.mem_overhead_mib(self.accel)

    def _remove_jail(self, spec: VmSpec) -> bool:
        with contextlib.suppress(OSError):
            jail.jail_root(spec).rmdir()
        return True

    # -- steps ------------------------------------------------------------------------------

    def _launch(self, spec: VmSpec, accel: str, incoming: bool, steps: UndoSteps) -> int:
        return self._start(spec, steps, lambda: self._spawn(spec, self.argv(spec, accel, incoming)),
                           lambda cgroups: self._spawn_jailed(spec, accel, incoming, cgroups))

    def _spawn_jailed(self, spec: VmSpec, accel: str, incoming: bool, cgroups: jail.Cgroups) -> int:
        desc = self._describe_jail(spec, self.mem_overhead_mib(accel))
        procs = jail.create_cgroup(cgroups, desc.cgroup, desc.limits)
        binary = proc_which(self.binary) or self.binary
        # The console's descriptor is the write end of the FIFO the logger reads (runtime/console.py).
        with self._console_reader(spec):
            fds = jail.open_fds(spec, self.agent_socket(spec), self.qmp_socket(spec),
                                console.pipe_path(self.console_log(spec)))
            try:
                args = argv(spec, accel, incoming, tsc_khz=host_tsc_khz(), binary=binary,
                            tb_size_mib=self.tb_size_mib, fds=fds)
                plan = jail.plan(spec, args, desc.ids, fds, cgroup_procs=procs, pid_file=self.pid_file(spec),
                                 qmp_socket=self.qmp_socket(spec), log=self.qemu_log(spec),
                                 kvm=accel == "kvm")
                try:
                    jail.spawn(plan)
                except RuntimeFailure as e:
                    why = self._said(spec) or e.message
                    raise RuntimeFailure(f"QEMU could not start {spec.name} in its jail: {why}",
                                         f"full command: {shlex.join(args)}") from e
            finally:
                jail.close(fds.all())
        return self._started(spec)

    def _spawn(self, spec: VmSpec, args: list[str]) -> int:
        # QEMU opens the console FIFO for writing: it finds this read end there, then the logger.
        with self._console_reader(spec):
            try:
                run(args, timeout=SPAWN_TIMEOUT)
            except CommandFailed as e:
                why = qemu_message("\n".join(log_tail(self.qemu_log(spec), 8)) or e.stderr) or e.message
                raise RuntimeFailure(f"QEMU could not start {spec.name}: {why}",
                                     f"full command: {e.message.split(' failed (')[0]}") from e
        return self._started(spec)

    def _started(self, spec: VmSpec) -> int:
        """The pid of a QEMU that started and is still there, or its log's last words."""
        pid = self._pid(spec)
        if pid is None:
            raise RuntimeFailure(f"QEMU for {spec.name} exited right after starting: {self._said(spec)}")
        return pid

    def _expect_state(self, spec: VmSpec, want: str) -> None:
        try:
            with Qmp(self.qmp_socket(spec)) as q:
                state = q.execute("query-status")["status"]
        except RuntimeFailure as e:
            raise self._with_logs(spec, e) from e
        if state != want:
            raise self._with_logs(spec, RuntimeFailure(
                f"{spec.name}: QEMU is {state}, expected {want}"))

    def _with_logs(self, spec: VmSpec, e: RuntimeFailure) -> RuntimeFailure:
        """Attach what QEMU and the guest said, before the undo removes the logs."""
        words = self._last_words(spec)
        return RuntimeFailure(e.message + (f"\n{words}" if words else ""), e.hint)

    def _check_memory(self, memory: Path) -> None:
        snapshot.check_stream(memory)

    def _load(self, spec: VmSpec, q: Qmp, memory: Path, info: SnapshotInfo) -> None:
        try:
            snapshot.load(q, memory, spec.name, info.mem_mib)
        except RuntimeFailure as e:
            raise self._with_logs(spec, e) from e  # (QEMU exits on a failed load: its reason is in its log)

    def _end(self, spec: VmSpec, pid: int, q: Qmp) -> None:
        with contextlib.suppress(RuntimeFailure):
            q.quit()
        if not pids.wait_gone(pid, QUIT_TIMEOUT):
            self._kill(spec)
        self._cleanup(spec)


def _running_accel(pid: int) -> str | None:
    """The accelerator a running QEMU was started with (it may predate a settings change)."""
    args = pids.cmdline(pid)
    for flag, value in itertools.pairwise(args):
        if flag == "-accel":
            return value.split(",")[0]
    return None
