"""The Firecracker backend: one `firecracker` process per VM, driven over its REST API
(api.py), jailed by Firecracker's jailer (jailer.py); what it shares with QEMU's backend is
runtime/process.py.

- boot: spawn, /machine-config, /boot-source (an uncompressed vmlinux), /drives/{id} (the
  first disk is the root device), /network-interfaces/eth0 (TAP, MAC), /vsock (the guest
  agent's channel), /actions InstanceStart.
- pause/resume: PATCH /vm Paused/Resumed (idempotent in Firecracker too).
- snapshot: pause, PUT /snapshot/create (Full) into temporary names, fsync, rename, manifest,
  then the process is killed (the VM must never run again: its disks belong to the snapshot).
- restore: a new process whose first call is PUT /snapshot/load (File memory backend,
  resume_vm false, network_overrides when the TAP changed, vsock_override), leaving the vCPUs
  paused; the lifecycle records that the snapshot is consumed, then resumes. Firecracker maps
  the memory file privately for the life of the VM: `maps_snapshot_while_running`.
- stop: SendCtrlAltDel (the guest reboots; with `reboot=k` Firecracker then exits), SIGKILL
  after the grace period.

Firecracker writes the guest's serial console on its stdout, which goes into the console FIFO
that mvm's logger keeps within its cap (runtime/console.py); its own messages go to
`firecracker.log`. Jailed (`jailer` on PATH and the `jail` setting allows), it runs under
Firecracker's jailer, from the jail description shared with QEMU's launcher (runtime/jail.py),
its files hard-linked (or bound) into its chroot: see jailer.py.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import subprocess
import time
from collections.abc import Callable, Sequence
from pathlib import Path

from mvm.errors import RuntimeFailure
from mvm.guest.channels import VSOCK_AGENT_PORT, VsockChannel
from mvm.runtime import console, jail
from mvm.runtime.base import SnapshotInfo, UndoSteps, VmSpec, VmStatus
from mvm.runtime.firecracker import jailer as fcjail
from mvm.runtime.firecracker.api import (
    API_SOCK,
    API_TIMEOUT,
    FC_LOG,
    HINT,
    MEMORY_FILE,
    PID_FILE,
    STATE_FILE,
    VSOCK_SOCK,
    Api,
    Paths,
    Request,
    boot_requests,
    host_paths,
    load_request,
)
from mvm.runtime.process import HypervisorRuntime, log_tail
from mvm.util import pids
from mvm.util.proc import run
from mvm.util.proc import which as proc_which
from mvm.util.progress import StepTimes
from mvm.util.retry import until
from mvm.util.text import printable

BINARY = "firecracker"
SPAWN_TIMEOUT = 30.0

#: Children we started and have not reaped (pids.is_running reaps them by pid).
_CHILDREN: list[subprocess.Popen[bytes]] = []

STATUS = {"Running": VmStatus.RUNNING, "Paused": VmStatus.PAUSED}


def _tail(path: Path, lines: int = 3) -> str:
    return "; ".join(ln.strip() for ln in log_tail(path, lines) if ln.strip())


class FirecrackerRuntime(HypervisorRuntime):
    name = "firecracker"
    hypervisor = "Firecracker"
    maps_snapshot_while_running = True
    snapshot_files = (MEMORY_FILE, STATE_FILE)

    def __init__(self, binary: str | Sequence[str] = BINARY, *, jailer: str | None = fcjail.JAILER,
                 jail_config: jail.Config | None = None) -> None:
        """`binary`: the firecracker program, or a command (a double run by Python).
        `jailer`: the jailer program (None: never jailed); used when the `jail` setting allows
        and the host can jail."""
        self.command = [binary] if isinstance(binary, str) else list(binary)
        self.jailer = jailer
        self.jail_config = jail_config or jail.Config(jail.Mode.OFF)
        #: The console FIFO's writer mvm holds while a jailed Firecracker has not opened it yet.
        self._writer: int | None = None

    # -- files ------------------------------------------------------------------------------

    def api_socket(self, spec: VmSpec) -> Path:
        return Path(os.path.abspath(spec.run_dir)) / API_SOCK

    def agent_socket(self, spec: VmSpec) -> Path:
        return Path(os.path.abspath(spec.run_dir)) / VSOCK_SOCK

    def pid_file(self, spec: VmSpec) -> Path:
        return spec.run_dir / PID_FILE

    def fc_log(self, spec: VmSpec) -> Path:
        return spec.run_dir / FC_LOG

    def hypervisor_log(self, spec: VmSpec) -> Path:
        return self.fc_log(spec)

    def mem_overhead(self) -> int:
        """What the jail's memory limit allows beyond guest RAM (Firecracker itself: small; no
        translation cache)."""
        return jail.MEM_OVERHEAD_MIB

    def argv(self, spec: VmSpec) -> list[str]:
        return [*self.command, "--api-sock", str(self.api_socket(spec)), "--id", fcjail.vm_id(spec)]

    def _identity(self, spec: VmSpec) -> tuple[str, str]:
        return "--id", fcjail.vm_id(spec)

    def _sockets(self, spec: VmSpec) -> tuple[Path, ...]:
        return self.api_socket(spec), self.agent_socket(spec)

    def _said(self, spec: VmSpec) -> str:
        return printable(_tail(self.fc_log(spec)))

    def _channel(self, spec: VmSpec, *, alive: Callable[[], bool], last_words: Callable[[], str],
                 unanswered: Callable[[], str]) -> VsockChannel:
        return VsockChannel(self.agent_socket(spec), VSOCK_AGENT_PORT, alive=alive, last_words=last_words,
                            unanswered=unanswered)

    # -- queries ----------------------------------------------------------------------------

    def _api(self, spec: VmSpec, timeout: float = API_TIMEOUT) -> Api:
        def died() -> str:
            if self.is_alive(spec):
                return ""
            return printable(_tail(self.fc_log(spec), lines=1)) or "no message"

        return Api(self._api_path(spec), spec.name, timeout, died)

    def _state(self, spec: VmSpec, deadline: float) -> VmStatus:
        with self._api(spec, timeout=deadline) as api:
            state = api.call("GET", "/")["state"]
        # "Not started": a process whose boot never finished cannot run a guest.
        return STATUS.get(state, VmStatus.BROKEN)

    # -- lifecycle --------------------------------------------------------------------------

    def boot(self, spec: VmSpec, progress: StepTimes | None = None) -> None:
        try:
            self._boot(spec, progress)
        finally:
            self._release_writer()

    def _release_writer(self) -> None:
        if self._writer is not None:
            os.close(self._writer)
            self._writer = None

    def _boot(self, spec: VmSpec, progress: StepTimes | None) -> None:
        with UndoSteps("boot", progress) as s:
            s.run("check", lambda: self._check_inputs(spec))
            s.run("run-dir", lambda: self._prepare_run_dir(spec, s, fresh=True))
            paths = s.run("spawn", lambda: self._launch(spec, s))
            with self._api(spec) as api:
                for req in boot_requests(spec, paths):
                    s.run(f"{req[0]} {req[1]}", lambda r=req: self._send(spec, api, r))  # type: ignore[misc]
                state = s.run("running", lambda: api.call("GET", "/")["state"])
            s.run("transient", lambda: self._drop_transient(spec))
            if state != "Running":
                raise self._with_logs(spec, RuntimeFailure(
                    f"{spec.name}: Firecracker is {state!r} after InstanceStart, expected Running"))

    def restore(self, spec: VmSpec, snap_dir: Path, progress: StepTimes | None = None) -> None:
        try:
            self._restore(spec, snap_dir, progress)
        finally:
            self._release_writer()

    def _restore(self, spec: VmSpec, snap_dir: Path, progress: StepTimes | None) -> None:
        with UndoSteps("restore", progress) as s:
            info = s.run("check", lambda: self._check_snapshot(spec, snap_dir))
            s.run("run-dir", lambda: self._prepare_run_dir(spec, s, fresh=False))
            paths = s.run("spawn", lambda: self._launch(spec, s, snap_dir=snap_dir))
            with self._api(spec) as api:
                state_file, memory = self._snapshot_paths(spec, snap_dir, paths)
                req = load_request(spec, state_file, memory, paths.vsock, info.extra.get("tap"))
                s.run("load", lambda: self._send(spec, api, req))
                state = s.run("paused", lambda: api.call("GET", "/")["state"])
            s.run("transient", lambda: self._drop_transient(spec))
            if state != "Paused":
                raise self._with_logs(spec, RuntimeFailure(
                    f"{spec.name}: Firecracker is {state!r} after loading the snapshot, expected Paused"))

    def pause(self, spec: VmSpec) -> None:
        self._require_alive(spec)
        with self._api(spec) as api:
            api.call("PATCH", "/vm", {"state": "Paused"})

    def resume(self, spec: VmSpec) -> None:
        self._require_alive(spec)
        with self._api(spec) as api:
            api.call("PATCH", "/vm", {"state": "Resumed"})

    def snapshot(self, spec: VmSpec, snap_dir: Path, progress: StepTimes | None = None) -> SnapshotInfo:
        pid = self._require_alive(spec)
        started = time.monotonic()
        with self._api(spec) as api, UndoSteps("snapshot", progress) as s:
            state = s.run("status", lambda: api.call("GET", "/")["state"])
            if state == "Running":
                s.run("pause", lambda: api.call("PATCH", "/vm", {"state": "Paused"}))
                s.on_undo("pause", lambda: api.call("PATCH", "/vm", {"state": "Resumed"}))
            elif state != "Paused":
                raise RuntimeFailure(f"cannot snapshot {spec.name} while Firecracker is {state!r}")
            s.run("prepare", lambda: self._prepare_snap_dir(snap_dir, s))
            where = self._write_paths(spec, snap_dir)
            s.run("save", lambda: api.call("PUT", "/snapshot/create", {
                "snapshot_path": where[0], "mem_file_path": where[1], "snapshot_type": "Full"}))
            extra = {"state": STATE_FILE, **({"tap": spec.net.tap} if spec.net is not None else {})}
            info = s.run("commit", lambda: self._commit(spec, snap_dir, started, extra))
        # Committed: the VM must never run again (its disks now belong to the snapshot).
        UndoSteps("snapshot", progress).run("quit", lambda: self._end(spec, pid))
        return info

    def stop(self, spec: VmSpec, timeout: float) -> None:
        pid = self._pid(spec)
        if pid is not None and timeout > 0:
            with contextlib.suppress(RuntimeFailure), self._api(spec, timeout=min(timeout, 5.0)) as api:
                if api.call("GET", "/")["state"] == "Paused":
                    api.call("PATCH", "/vm", {"state": "Resumed"})  # a paused guest hears nothing
                api.call("PUT", "/actions", {"action_type": "SendCtrlAltDel"})
            if pids.wait_gone(pid, timeout):
                return self._cleanup(spec)
        self._kill(spec)

    # -- steps ------------------------------------------------------------------------------

    def _send(self, spec: VmSpec, api: Api, req: Request) -> None:
        try:
            api.send(req)
        except RuntimeFailure as e:
            if not self.is_alive(spec):  # it died on it: say what it said last
                raise self._with_logs(spec, e) from e
            raise

    def _launch(self, spec: VmSpec, steps: UndoSteps, snap_dir: Path | None = None) -> Paths:
        """Spawn Firecracker (jailed or not) and wait for its API; returns how it names files."""
        return self._start(spec, steps, lambda: self._spawn(spec),
                           lambda cgroups: self._spawn_jailed(spec, snap_dir, cgroups))

    def _spawn(self, spec: VmSpec) -> Paths:
        with self._console_reader(spec):
            writer = os.open(console.pipe_path(self.console_log(spec)),
                             os.O_WRONLY | os.O_NONBLOCK | os.O_CLOEXEC)
            os.set_blocking(writer, True)
            log = os.open(self.fc_log(spec), os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)
            try:
                proc = subprocess.Popen(self.argv(spec), stdin=subprocess.DEVNULL, stdout=writer,
                                        stderr=log, start_new_session=True)
            except OSError as e:
                raise RuntimeFailure(f"cannot run {self.command[0]}: {e.strerror}",
                                     "install Firecracker, or `mvm config set backend qemu`") from e
            finally:
                os.close(writer)
                os.close(log)
        _CHILDREN.append(proc)
        self.pid_file(spec).write_text(f"{proc.pid}\n")
        self._wait_api(spec, proc.pid)
        return host_paths(spec)

    def _wait_api(self, spec: VmSpec, pid: int) -> None:
        def ready() -> bool | None:
            if not pids.is_running(pid):
                raise self._with_logs(spec, RuntimeFailure(
                    f"Firecracker for {spec.name} exited right after starting"))
            if not self._api_path(spec).exists():
                return None
            try:
                with self._api(spec, timeout=2.0) as api:
                    api.call("GET", "/")
            except RuntimeFailure:
                return None
            return True

        try:
            until(ready, SPAWN_TIMEOUT, interval=0.01, what="Firecracker's API socket")
        except TimeoutError:
            raise self._with_logs(spec, RuntimeFailure(
                f"Firecracker for {spec.name} did not serve its API within {SPAWN_TIMEOUT:g}s")) from None

    def _api_path(self, spec: VmSpec) -> Path:
        if self._jail_root(spec).is_dir():
            return self._jail_root(spec) / fcjail.JAILED_API_SOCK.lstrip("/")
        return self.api_socket(spec)

    def _snapshot_names(self, info: SnapshotInfo) -> tuple[str, ...]:
        return info.memory_file, info.extra.get("state", STATE_FILE)

    def _snapshot_paths(self, spec: VmSpec, snap_dir: Path, paths: Paths) -> tuple[str, str]:
        if paths.kernel.startswith("/"):
            return str((snap_dir / STATE_FILE).absolute()), str((snap_dir / MEMORY_FILE).absolute())
        return STATE_FILE, MEMORY_FILE  # linked into the chroot by _spawn_jailed

    def _write_paths(self, spec: VmSpec, snap_dir: Path) -> tuple[str, str]:
        if self._jail_root(spec).is_dir():
            return STATE_FILE + ".tmp", MEMORY_FILE + ".tmp"  # inside the chroot; moved at commit
        return str((snap_dir / (STATE_FILE + ".tmp")).absolute()), str((snap_dir / (MEMORY_FILE + ".tmp")).absolute())

    def _commit(self, spec: VmSpec, snap_dir: Path, started: float, extra: dict[str, str]) -> SnapshotInfo:
        root = self._jail_root(spec)
        if root.is_dir():  # written inside the chroot
            for name in self.snapshot_files:
                shutil.move(root / f"{name}.tmp", snap_dir / f"{name}.tmp")
        return super()._commit(spec, snap_dir, started, extra)

    def _end(self, spec: VmSpec, pid: int) -> None:
        self._kill(spec)

    def _remove_jail(self, spec: VmSpec) -> bool:
        base = spec.run_dir / fcjail.JAIL_DIR
        if not base.is_dir():
            return False
        fcjail.unbind_chroot(self._jail_root(spec))
        shutil.rmtree(base, ignore_errors=True)
        return True

    def _with_logs(self, spec: VmSpec, e: RuntimeFailure) -> RuntimeFailure:
        said = _tail(self.fc_log(spec), lines=1)
        return RuntimeFailure(e.message + (f": {printable(said)}" if said else ""), e.hint or HINT)

    # -- the jailer -------------------------------------------------------------------------

    def jailing(self) -> jail.Jailing:
        """Whether the Firecracker starting now runs under its jailer: the setting, the host's
        recorded verdict (which says whether the jailer was on PATH), the jailer and what this
        process can do now; refuses as `jail.decide` says. `jailer=None`: never jailed."""
        if self.jailer is None:
            return jail.Jailing(False, "this runtime was made without Firecracker's jailer")
        now = None if proc_which(self.jailer) else f"{self.jailer} is not on PATH"
        return jail.decide(self.jail_config, self.name, now)

    def _jail_root(self, spec: VmSpec) -> Path:
        return fcjail.chroot_dir(spec.run_dir / fcjail.JAIL_DIR, Path(self.command[0]).name, fcjail.vm_id(spec))

    def _drop_transient(self, spec: VmSpec) -> None:
        """A jailed Firecracker holds its disks open once it runs (or has loaded a snapshot):
        the names its chroot gave the transient ones (the clear-text secrets) go now, not at
        its end."""
        fcjail.drop_transient(self._jail_root(spec), spec)

    def _spawn_jailed(self, spec: VmSpec, snap_dir: Path | None, cgroups: jail.Cgroups) -> Paths:
        desc = self._describe_jail(spec, jail.MEM_OVERHEAD_MIB)
        root = self._jail_root(spec)
        root.mkdir(parents=True, mode=0o700)
        # The console FIFO, linked in too (same filesystem): Firecracker opens it at PUT /serial
        # (a restored VM has no console: /snapshot/load must come first). mvm holds a writer
        # until then, so that the logger does not see an end before Firecracker opened it.
        log = self.console_log(spec)
        with self._console_reader(spec, owner=(desc.ids.uid, desc.ids.gid)):
            self._writer = os.open(console.pipe_path(log), os.O_WRONLY | os.O_NONBLOCK | os.O_CLOEXEC)
        links = {**fcjail.chroot_links(spec, snap_dir), console.PIPE: console.pipe_path(log)}
        fcjail.link_into_chroot(root, links, desc.ids.uid, desc.ids.gid)
        netns = None  # the instance's TAP lives in the host's namespace
        args = fcjail.jailer_argv(self.jailer or fcjail.JAILER, proc_which(self.command[0]) or self.command[0],
                                  spec, desc, cgroups.version, spec.run_dir / fcjail.JAIL_DIR, netns)
        with open(self.fc_log(spec), "ab") as out:
            run(args, timeout=SPAWN_TIMEOUT, stdout=out.fileno())
        pid_in_chroot = root / f"{Path(self.command[0]).name}.pid"
        try:
            until(lambda: pids.read_pid(pid_in_chroot), SPAWN_TIMEOUT, what="the jailer's pid file")
        except TimeoutError:
            raise RuntimeFailure(f"the jailer of {spec.name} wrote no pid file", HINT) from None
        self.pid_file(spec).write_text(f"{pids.read_pid(pid_in_chroot)}\n")
        self._wait_api(spec, pids.read_pid(pid_in_chroot) or 0)
        return fcjail.chroot_paths(spec)


def version(binary: str) -> str | None:
    """`firecracker --version`'s first line, or None when it is not on PATH."""
    path = proc_which(binary)
    if path is None:
        return None
    try:
        out = run([path, "--version"], timeout=10).stdout.decode(errors="replace")
    except Exception as e:
        return f"present but `{binary} --version` failed: {e}"
    return out.strip().splitlines()[0] if out.strip() else "unknown version"


def available(binary: str = BINARY) -> str | None:
    """Why this host cannot run Firecracker VMs, or None."""
    if proc_which(binary) is None:
        return f"{binary} is not on PATH"
    return None
