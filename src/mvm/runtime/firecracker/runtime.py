"""The Firecracker backend: one `firecracker` process per VM, driven over its REST API.

The API is HTTP on a Unix socket (`--api-sock`), here through httpx's UDS transport. What a
VM is, is declared as requests, one resource per line (`boot_requests`, `load_request`); an
error answer is Firecracker's own `fault_message`, surfaced as one line (RuntimeFailure).

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
its files hard-linked (or bound) into its chroot: see `jailer_argv` and `chroot_links`.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import itertools
import os
import re
import shutil
import subprocess
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx

from mvm.errors import RuntimeFailure
from mvm.guest.agent_client import AgentClient
from mvm.guest.channels import VSOCK_AGENT_PORT, VsockChannel
from mvm.runtime import base as runtime_base
from mvm.runtime import console, jail, rundir
from mvm.runtime.base import (
    MANIFEST,
    Progress,
    Runtime,
    SnapshotInfo,
    Steps,
    VmSpec,
    VmStatus,
    checksum,
)
from mvm.util import pids, private
from mvm.util.proc import run
from mvm.util.proc import which as proc_which
from mvm.util.retry import until
from mvm.util.text import printable

BINARY = "firecracker"
JAILER = "jailer"

# Files in spec.run_dir.
API_SOCK = "firecracker.sock"
VSOCK_SOCK = "vsock.sock"
PID_FILE = "firecracker.pid"
CONSOLE_LOG = "console.log"
#: Firecracker's own messages (its stderr).
FC_LOG = "firecracker.log"
#: The jailer's chroot base (`<base>/firecracker/<id>/root`).
JAIL_DIR = "jail"

# Files in a snapshot directory.
MEMORY_FILE = "memory"
STATE_FILE = "vmstate"

#: The guest's vsock context id (any ≥ 3: each VM has its own device).
GUEST_CID = 3
IFACE = "eth0"

#: Hypervisor-specific guest parameters: Firecracker's serial console, `reboot=k` so that a
#: reboot or Ctrl-Alt-Del ends the process, `panic=1` (a panic reboots: the process ends);
#: the rest as QEMU's (fast i8042 probe, no PCI). Firecracker adds `virtio_mmio.device=` for
#: each device, and `root=/dev/vda` for the root drive.
BASE_PARAMS = (
    "console=ttyS0",
    "quiet",
    "reboot=k",
    "panic=1",
    "pci=off",
    "i8042.noaux",
    "i8042.nomux",
    "i8042.nopnp",
    "i8042.dumbkbd",
    "8250.nr_uarts=1",
    "random.trust_cpu=on",
)

SPAWN_TIMEOUT = 30.0
API_TIMEOUT = 30.0
KILL_TIMEOUT = 10.0
_HINT = "see the instance's firecracker.log and console (`mvm instance logs`)"
_ID_OK = re.compile(r"[^A-Za-z0-9-]")

#: A request: method, path, JSON body.
Request = tuple[str, str, dict[str, Any]]


def kernel_cmdline(cmdline: str) -> str:
    return " ".join([*BASE_PARAMS, cmdline]).strip()


def vm_id(spec: VmSpec) -> str:
    """Firecracker's `--id` (and the jailer's): letters, digits and '-', at most 64; unique per
    run directory, which is how mvm tells its own process in /proc (`--id <id>`)."""
    digest = hashlib.sha256(os.path.abspath(spec.run_dir).encode()).hexdigest()[:12]
    return f"{_ID_OK.sub('-', spec.name)[:40]}-{digest}"


@dataclass(frozen=True)
class Paths:
    """The VM's files as Firecracker names them: host paths, or names inside its chroot."""

    kernel: str
    initrd: str | None
    disks: tuple[str, ...]
    vsock: str
    serial: str | None = None


def host_paths(spec: VmSpec) -> Paths:
    return Paths(os.path.abspath(spec.kernel),
                 os.path.abspath(spec.initrd) if spec.initrd is not None else None,
                 tuple(os.path.abspath(d.path) for d in spec.disks),
                 os.path.abspath(spec.run_dir / VSOCK_SOCK))


def boot_requests(spec: VmSpec, p: Paths) -> list[Request]:
    """A fresh VM, one resource per line, in the order Firecracker takes them. A jailed
    Firecracker has no stdout (the jailer daemonizes it): its serial goes to the console FIFO
    linked into its chroot."""
    initrd = {"initrd_path": p.initrd} if p.initrd is not None else {}
    return [
        *[("PUT", "/serial", {"serial_out_path": p.serial}) for _ in [p.serial] if p.serial],
        ("PUT", "/machine-config", {"vcpu_count": spec.vcpus, "mem_size_mib": spec.mem_mib, "smt": False}),
        ("PUT", "/boot-source", {"kernel_image_path": p.kernel, **initrd,
                                 "boot_args": kernel_cmdline(spec.cmdline)}),
        *[("PUT", f"/drives/{d.id}", {"drive_id": d.id, "path_on_host": p.disks[n],
                                      "is_root_device": n == 0, "is_read_only": d.read_only})
          for n, d in enumerate(spec.disks)],
        *[("PUT", f"/network-interfaces/{IFACE}", {"iface_id": IFACE, "host_dev_name": net.tap,
                                                   "guest_mac": net.mac})
          for net in ([spec.net] if spec.net is not None else [])],
        ("PUT", "/vsock", {"guest_cid": GUEST_CID, "uds_path": p.vsock}),
        ("PUT", "/actions", {"action_type": "InstanceStart"}),
    ]


def load_request(spec: VmSpec, state: str, memory: str, vsock: str, tap_at_snapshot: str | None) -> Request:
    """The first and only call of a restoring process: the vCPUs stay paused."""
    body: dict[str, Any] = {"snapshot_path": state,
                            "mem_backend": {"backend_type": "File", "backend_path": memory},
                            "resume_vm": False,
                            "vsock_override": {"uds_path": vsock}}
    if spec.net is not None and spec.net.tap != tap_at_snapshot:
        body["network_overrides"] = [{"iface_id": IFACE, "host_dev_name": spec.net.tap}]
    return ("PUT", "/snapshot/load", body)


class Api:
    """Firecracker's REST API on its Unix socket; errors as one line with its fault_message."""

    def __init__(self, sock: Path, what: str, timeout: float = API_TIMEOUT,
                 died: Callable[[], str] | None = None) -> None:
        """`died`: what the process said last, if it is gone (else "")."""
        self.sock = sock
        self.what = what
        self.died = died
        self.client = httpx.Client(transport=httpx.HTTPTransport(uds=os.fspath(sock)),
                                   base_url="http://localhost", timeout=timeout)

    def __enter__(self) -> Api:
        return self

    def __exit__(self, *exc: object) -> None:
        self.client.close()

    def call(self, method: str, path: str, body: dict[str, Any] | None = None) -> Any:
        try:
            r = self.client.request(method, path, json=body)
        except httpx.HTTPError as e:
            said = self.died() if self.died is not None else ""
            raise RuntimeFailure(f"Firecracker of {self.what} did not answer {method} {path}: "
                                 + (f"it exited: {said}" if said else f"{e or type(e).__name__}"),
                                 _HINT) from e
        if r.status_code >= 300:
            try:
                fault = str(r.json().get("fault_message", r.text))
            except ValueError:
                fault = r.text
            fault = " ".join(printable(fault).split()) or f"HTTP {r.status_code}"
            raise RuntimeFailure(f"Firecracker refused {method} {path} for {self.what}: {fault}", _HINT)
        return r.json() if r.content else None

    def send(self, req: Request) -> Any:
        return self.call(*req)


def _tail(path: Path, lines: int = 3, max_bytes: int = 4096) -> str:
    try:
        with open(path, "rb") as f:
            f.seek(0, os.SEEK_END)
            f.seek(max(0, f.tell() - max_bytes))
            text = f.read().decode(errors="replace")
    except OSError:
        return ""
    return "; ".join(ln.strip() for ln in text.strip().splitlines()[-lines:] if ln.strip())


#: Children we started and have not reaped (pids.is_running reaps them by pid).
_CHILDREN: list[subprocess.Popen[bytes]] = []

STATUS = {"Running": VmStatus.RUNNING, "Paused": VmStatus.PAUSED}


class FirecrackerRuntime(Runtime):
    name = "firecracker"
    maps_snapshot_while_running = True

    def __init__(self, binary: str | Sequence[str] = BINARY, *, jailer: str | None = JAILER,
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

    def console_log(self, spec: VmSpec) -> Path:
        return spec.run_dir / CONSOLE_LOG

    def pid_file(self, spec: VmSpec) -> Path:
        return spec.run_dir / PID_FILE

    def fc_log(self, spec: VmSpec) -> Path:
        return spec.run_dir / FC_LOG

    def mem_overhead(self) -> int:
        """What the jail's memory limit allows beyond guest RAM (Firecracker itself: small; no
        translation cache)."""
        return jail.MEM_OVERHEAD_MIB

    def argv(self, spec: VmSpec) -> list[str]:
        return [*self.command, "--api-sock", str(self.api_socket(spec)), "--id", vm_id(spec)]

    # -- queries ----------------------------------------------------------------------------

    def _pid(self, spec: VmSpec) -> int | None:
        """Our Firecracker: by its pid file, if that process has our `--id`; else by /proc."""
        pid = pids.read_pid(self.pid_file(spec))
        if pid is not None and pids.is_running(pid) and _has_id(pid, vm_id(spec)):
            return pid
        return pids.find_by_arg("--id", vm_id(spec))

    def kill(self, spec: VmSpec) -> None:
        self._kill(spec)

    def is_alive(self, spec: VmSpec) -> bool:
        return self._pid(spec) is not None

    def pid(self, spec: VmSpec) -> int | None:
        return self._pid(spec)

    def _require_alive(self, spec: VmSpec) -> int:
        pid = self._pid(spec)
        if pid is None:
            raise RuntimeFailure(f"{spec.name} has no running hypervisor",
                                 "start or wake the instance first")
        return pid

    def _api(self, spec: VmSpec, timeout: float = API_TIMEOUT) -> Api:
        def died() -> str:
            if self.is_alive(spec):
                return ""
            return printable(_tail(self.fc_log(spec), lines=1)) or "no message"

        return Api(self._api_path(spec), spec.name, timeout, died)

    def status(self, spec: VmSpec) -> VmStatus:
        if not self.is_alive(spec):
            return VmStatus.GONE
        try:
            with self._api(spec, timeout=runtime_base.CONTROL_DEADLINE) as api:
                state = api.call("GET", "/")["state"]
        except RuntimeFailure:
            if not self.is_alive(spec):
                return VmStatus.GONE
            raise
        # "Not started": a process whose boot never finished cannot run a guest.
        return STATUS.get(state, VmStatus.BROKEN)

    # -- lifecycle --------------------------------------------------------------------------

    def boot(self, spec: VmSpec, progress: Progress | None = None) -> None:
        try:
            self._boot(spec, progress)
        finally:
            self._release_writer()

    def _release_writer(self) -> None:
        if self._writer is not None:
            os.close(self._writer)
            self._writer = None

    def _boot(self, spec: VmSpec, progress: Progress | None) -> None:
        with Steps("boot", progress) as s:
            s.run("check", lambda: self._check_inputs(spec))
            s.run("run-dir", lambda: self._prepare_run_dir(spec, s, fresh=True))
            paths = s.run("spawn", lambda: self._start(spec, s))
            with self._api(spec) as api:
                for req in boot_requests(spec, paths):
                    s.run(f"{req[0]} {req[1]}", lambda r=req: self._send(spec, api, r))  # type: ignore[misc]
                state = s.run("running", lambda: api.call("GET", "/")["state"])
            if state != "Running":
                raise self._with_logs(spec, RuntimeFailure(
                    f"{spec.name}: Firecracker is {state!r} after InstanceStart, expected Running"))

    def restore(self, spec: VmSpec, snap_dir: Path, progress: Progress | None = None) -> None:
        try:
            self._restore(spec, snap_dir, progress)
        finally:
            self._release_writer()

    def _restore(self, spec: VmSpec, snap_dir: Path, progress: Progress | None) -> None:
        with Steps("restore", progress) as s:
            info = s.run("check", lambda: self._check_snapshot(spec, snap_dir))
            s.run("run-dir", lambda: self._prepare_run_dir(spec, s, fresh=False))
            paths = s.run("spawn", lambda: self._start(spec, s, snap_dir=snap_dir))
            with self._api(spec) as api:
                state_file, memory = self._snapshot_paths(spec, snap_dir, paths)
                req = load_request(spec, state_file, memory, paths.vsock, info.extra.get("tap"))
                s.run("load", lambda: self._send(spec, api, req))
                state = s.run("paused", lambda: api.call("GET", "/")["state"])
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

    def snapshot(self, spec: VmSpec, snap_dir: Path, progress: Progress | None = None) -> SnapshotInfo:
        pid = self._require_alive(spec)
        started = time.monotonic()
        with self._api(spec) as api, Steps("snapshot", progress) as s:
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
            info = s.run("commit", lambda: self._commit(spec, snap_dir, started))
        # Committed: the VM must never run again (its disks now belong to the snapshot).
        Steps("snapshot", progress).run("quit", lambda: self._end(spec, pid))
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

    def agent(self, spec: VmSpec) -> AgentClient:
        return AgentClient(VsockChannel(
            self.agent_socket(spec), VSOCK_AGENT_PORT, alive=lambda: self.is_alive(spec),
            last_words=lambda: self._last_words(spec), unanswered=lambda: self.unanswered(spec)))

    # -- steps ------------------------------------------------------------------------------

    def _send(self, spec: VmSpec, api: Api, req: Request) -> None:
        try:
            api.send(req)
        except RuntimeFailure as e:
            if not self.is_alive(spec):  # it died on it: say what it said last
                raise self._with_logs(spec, e) from e
            raise

    def _check_inputs(self, spec: VmSpec) -> None:
        rundir.check_inputs(spec)

    def _prepare_run_dir(self, spec: VmSpec, steps: Steps, fresh: bool) -> None:
        rundir.prepare(spec, steps, fresh, hypervisor="Firecracker", pid=self._pid(spec), log=self.fc_log(spec),
                       console_log=self.console_log(spec), cleanup=lambda: self._cleanup(spec))

    def _start(self, spec: VmSpec, steps: Steps, snap_dir: Path | None = None) -> Paths:
        """Spawn Firecracker (jailed or not) and wait for its API; returns how it names files."""
        steps.on_undo("spawn", lambda: self._kill(spec))
        how = self.jailing()
        rundir.note_jail(spec, how.line())
        if how.cgroups is not None:
            return self._spawn_jailed(spec, snap_dir, how.cgroups)
        reader = console.open_pipe(self.console_log(spec))
        try:
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
        except BaseException:
            os.close(reader)
            raise
        _CHILDREN.append(proc)
        self.pid_file(spec).write_text(f"{proc.pid}\n")
        console.start_logger(reader, self.console_log(spec))  # (and closes the reader here)
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
            return self._jail_root(spec) / JAILED_API_SOCK.lstrip("/")
        return self.api_socket(spec)

    def _check_snapshot(self, spec: VmSpec, snap_dir: Path) -> SnapshotInfo:
        info = SnapshotInfo.load(snap_dir)
        info.check_matches(spec, self.name)
        self._check_inputs(spec)
        for name in (info.memory_file, info.extra.get("state", STATE_FILE)):
            if not (snap_dir / name).is_file():
                raise RuntimeFailure(f"snapshot file {snap_dir / name} is missing",
                                     "restart the instance cold instead of waking it")
        size = (snap_dir / info.memory_file).stat().st_size
        if size != info.size_bytes:
            raise RuntimeFailure(f"snapshot memory file {snap_dir / info.memory_file} has {size} bytes, "
                                 f"the manifest says {info.size_bytes}",
                                 "restart the instance cold instead of waking it")
        # Before Firecracker maps it (it reads the memory file lazily, as the guest touches it).
        info.verify(snap_dir, spec.name)
        return info

    def _snapshot_paths(self, spec: VmSpec, snap_dir: Path, paths: Paths) -> tuple[str, str]:
        if paths.kernel.startswith("/"):
            return str((snap_dir / STATE_FILE).absolute()), str((snap_dir / MEMORY_FILE).absolute())
        return STATE_FILE, MEMORY_FILE  # linked into the chroot by _spawn_jailed

    def _write_paths(self, spec: VmSpec, snap_dir: Path) -> tuple[str, str]:
        if self._jail_root(spec).is_dir():
            return STATE_FILE + ".tmp", MEMORY_FILE + ".tmp"  # inside the chroot; moved at commit
        return str((snap_dir / (STATE_FILE + ".tmp")).absolute()), str((snap_dir / (MEMORY_FILE + ".tmp")).absolute())

    def _prepare_snap_dir(self, snap_dir: Path, steps: Steps) -> None:
        private.mkdirs(snap_dir)
        rundir.unlink(snap_dir / MANIFEST)  # a manifest must never describe a half-written file
        steps.on_undo("prepare", lambda: rundir.unlink(
            *(snap_dir / f"{n}{t}" for n in (STATE_FILE, MEMORY_FILE) for t in ("", ".tmp")),
            snap_dir / MANIFEST))

    def _commit(self, spec: VmSpec, snap_dir: Path, started: float) -> SnapshotInfo:
        root = self._jail_root(spec)
        for name in (STATE_FILE, MEMORY_FILE):
            tmp = snap_dir / f"{name}.tmp"
            if root.is_dir():
                shutil.move(root / f"{name}.tmp", tmp)
            with open(tmp, "rb") as f:
                os.fsync(f.fileno())
            os.chmod(tmp, 0o600)
            os.replace(tmp, snap_dir / name)
        extra = {"state": STATE_FILE}
        if spec.net is not None:
            extra["tap"] = spec.net.tap
        info = SnapshotInfo(backend=self.name, memory_file=MEMORY_FILE, mem_mib=spec.mem_mib,
                            vcpus=spec.vcpus, devices=spec.devices(),
                            size_bytes=(snap_dir / MEMORY_FILE).stat().st_size, created=time.time(),
                            extra=extra, seconds=round(time.monotonic() - started, 4),
                            checksums={n: checksum(snap_dir / n) for n in (STATE_FILE, MEMORY_FILE)})
        info.write(snap_dir)
        return info

    def _end(self, spec: VmSpec, pid: int) -> None:
        self._kill(spec)

    def _kill(self, spec: VmSpec) -> None:
        rundir.kill(spec, "Firecracker", self._pid(spec), KILL_TIMEOUT, cleanup=lambda: self._cleanup(spec))

    def _cleanup(self, spec: VmSpec) -> None:
        """Remove what a dead Firecracker leaves (sockets, pid file, FIFO, chroot, cgroup)."""
        if self._pid(spec) is not None:
            return
        rundir.unlink(self.api_socket(spec), self.agent_socket(spec), self.pid_file(spec),
                      rundir.jail_note_path(spec))
        console.settle(self.console_log(spec))
        console.remove_pipe(self.console_log(spec))
        base = spec.run_dir / JAIL_DIR
        if base.is_dir():
            unbind_chroot(self._jail_root(spec))
            shutil.rmtree(base, ignore_errors=True)
            with contextlib.suppress(RuntimeFailure):
                jail.remove_cgroup(jail.cgroups(self.jail_config.cgroup_root), jail.cgroup_name(spec))

    def _last_words(self, spec: VmSpec) -> str:
        parts = []
        if said := _tail(self.fc_log(spec)):
            parts.append(f"Firecracker: {printable(said)}")
        log = self.console_log(spec)
        if not self.is_alive(spec):
            console.settle(log)
        if tail := printable(console.tail(log)).strip():
            parts.append("console:\n" + "\n".join(tail.splitlines()[-5:]))
        return "\n".join(parts)

    def _with_logs(self, spec: VmSpec, e: RuntimeFailure) -> RuntimeFailure:
        said = _tail(self.fc_log(spec), lines=1)
        return RuntimeFailure(e.message + (f": {printable(said)}" if said else ""), e.hint or _HINT)

    # -- the jailer -------------------------------------------------------------------------

    def jailing(self) -> jail.Jailing:
        """Whether the Firecracker starting now runs under its jailer: the setting, the host's
        recorded verdict (which says whether the jailer was on PATH), the jailer and what this
        process can do now; refuses as `jail.decide` says. `jailer=None`: never jailed."""
        if self.jailer is None:
            return jail.Jailing(False, "this runtime was made without Firecracker's jailer")
        now = None if proc_which(self.jailer) else f"{self.jailer} is not on PATH"
        return jail.decide(self.jail_config, self.name, now)

    def jailed(self) -> bool:
        return self.jailing().jailed

    def jail_of(self, spec: VmSpec) -> str | None:
        return rundir.jail_note(spec) if self.is_alive(spec) else None

    def _jail_root(self, spec: VmSpec) -> Path:
        return chroot_dir(spec.run_dir / JAIL_DIR, Path(self.command[0]).name, vm_id(spec))

    def _spawn_jailed(self, spec: VmSpec, snap_dir: Path | None, cgroups: jail.Cgroups) -> Paths:
        desc = jail.describe(spec, self.jail_config.uid_base, jail.MEM_OVERHEAD_MIB)
        root = self._jail_root(spec)
        root.mkdir(parents=True, mode=0o700)
        if desc.ids.groups:
            for f in (spec.kernel, spec.initrd):
                if f is not None:
                    jail.share_with_group(f, desc.ids.groups[0])
        # The console FIFO, linked in too (same filesystem): Firecracker opens it at PUT /serial
        # (a restored VM has no console: /snapshot/load must come first). mvm holds a writer
        # until then, so that the logger does not see an end before Firecracker opened it.
        log = self.console_log(spec)
        reader = console.open_pipe(log, owner=(desc.ids.uid, desc.ids.gid))
        self._writer = os.open(console.pipe_path(log), os.O_WRONLY | os.O_NONBLOCK | os.O_CLOEXEC)
        console.start_logger(reader, log)
        links = {**chroot_links(spec, snap_dir), console.PIPE: console.pipe_path(log)}
        link_into_chroot(root, links, desc.ids.uid, desc.ids.gid)
        netns = None  # the instance's TAP lives in the host's namespace
        args = jailer_argv(self.jailer or JAILER, proc_which(self.command[0]) or self.command[0], spec, desc,
                           cgroups.version, spec.run_dir / JAIL_DIR, netns)
        with open(self.fc_log(spec), "ab") as out:
            run(args, timeout=SPAWN_TIMEOUT, stdout=out.fileno())
        pid_in_chroot = root / f"{Path(self.command[0]).name}.pid"
        try:
            until(lambda: pids.read_pid(pid_in_chroot), SPAWN_TIMEOUT, what="the jailer's pid file")
        except TimeoutError:
            raise RuntimeFailure(f"the jailer of {spec.name} wrote no pid file", _HINT) from None
        self.pid_file(spec).write_text(f"{pids.read_pid(pid_in_chroot)}\n")
        self._wait_api(spec, pids.read_pid(pid_in_chroot) or 0)
        return chroot_paths(spec)


# -- the jailer's description (pure) ----------------------------------------------------------------

#: Firecracker's API socket inside its chroot, as the jailer starts it.
JAILED_API_SOCK = "/run/firecracker.socket"


def chroot_dir(base: Path, exec_name: str, instance_id: str) -> Path:
    """`<chroot base>/<exec file name>/<id>/root`, as jailer.md lays it out."""
    return base / exec_name / instance_id / "root"


def chroot_paths(spec: VmSpec) -> Paths:
    """How Firecracker names the VM's files inside its chroot (see `chroot_links`)."""
    return Paths("vmlinux", "initrd" if spec.initrd is not None else None,
                 tuple(f"disk-{d.id}" for d in spec.disks), VSOCK_SOCK, console.PIPE)


def chroot_links(spec: VmSpec, snap_dir: Path | None = None) -> dict[str, Path]:
    """What is linked into the chroot: chroot name -> host file. Nothing else is there."""
    out = {"vmlinux": spec.kernel}
    if spec.initrd is not None:
        out["initrd"] = spec.initrd
    out.update({f"disk-{d.id}": d.path for d in spec.disks})
    if snap_dir is not None:
        out[STATE_FILE] = snap_dir / STATE_FILE
        out[MEMORY_FILE] = snap_dir / MEMORY_FILE
    return out


def jailer_argv(jailer_bin: str, exec_file: str, spec: VmSpec, desc: jail.Description,
                cgroup_version: int, chroot_base: Path, netns: str | None) -> list[str]:
    """The jailer's command line (docs/jailer.md), then Firecracker's own arguments after `--`."""
    args = [jailer_bin, "--id", vm_id(spec), "--exec-file", exec_file,
            "--uid", str(desc.ids.uid), "--gid", str(desc.ids.gid),
            "--cgroup-version", str(cgroup_version)]
    cg = jail.Cgroups(cgroup_version, {})
    for fname, value in jail.cgroup_files(cg, desc.limits).items():
        if fname not in jail.OPTIONAL_FILES:
            args += ["--cgroup", f"{fname}={value}"]
    args += ["--parent-cgroup", jail.CGROUP_PARENT, "--chroot-base-dir", os.path.abspath(chroot_base)]
    if netns is not None:
        args += ["--netns", netns]
    args += ["--new-pid-ns", "--daemonize", "--", "--api-sock", JAILED_API_SOCK]
    return args


def link_into_chroot(root: Path, links: dict[str, Path], uid: int, gid: int) -> None:
    """Hard-link each file into the chroot (bind-mount where it lives on another filesystem),
    owned so the jailed Firecracker can open it."""
    for name, src in links.items():
        dst = root / name
        try:
            os.link(src, dst)
        except OSError as e:
            if e.errno != errno.EXDEV:
                raise RuntimeFailure(f"cannot link {src} into the jail: {e.strerror}") from e
            dst.touch(0o600)
            run(["mount", "--bind", os.fspath(src), os.fspath(dst)])
        with contextlib.suppress(OSError):
            os.chown(dst, uid, gid)


def unbind_chroot(root: Path) -> None:
    if not root.is_dir():
        return
    for f in root.iterdir():
        if os.path.ismount(f):
            run(["umount", "-l", os.fspath(f)], check=False)


def _has_id(pid: int, want: str) -> bool:
    args = pids.cmdline(pid)
    return any(a == "--id" and b == want for a, b in itertools.pairwise(args))


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

