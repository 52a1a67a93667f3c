"""The QEMU backend: `qemu-system-x86_64 -M microvm`, driven over QMP.

Facts this relies on are in /work/shared/QEMU-HERE.md. In short: `tsc_early_khz` on the
kernel command line (TCG guests otherwise hang in TSC calibration), `-cpu qemu64,+arat`
under TCG, `console=ttyS0,115200`, ACPI kept on, identical device order on boot and
restore (it fixes each device's virtio-mmio slot), snapshots through QEMU's migration.
"""

from __future__ import annotations

import contextlib
import functools
import itertools
import os
import re
import shlex
import time
from collections.abc import Callable
from pathlib import Path

from mvm.errors import CommandFailed, InvalidInput, RuntimeFailure
from mvm.guest.agent_client import AgentClient
from mvm.guest.channels import VirtioSerialChannel
from mvm.runtime import base, console, jail, rundir
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
from mvm.runtime.qemu import qmp
from mvm.runtime.qemu.qmp import Qmp
from mvm.util import pids, private
from mvm.util.proc import run
from mvm.util.proc import which as proc_which
from mvm.util.retry import until
from mvm.util.text import printable

BINARY = "qemu-system-x86_64"

# Files in spec.run_dir.
QMP_SOCK = "qmp.sock"
AGENT_SOCK = "agent.sock"
PID_FILE = "qemu.pid"
CONSOLE_LOG = "console.log"
#: QEMU's own messages (`-D`): also where errors after daemonizing go.
QEMU_LOG = "qemu.log"

# Files in a snapshot directory.
MEMORY_FILE = "memory"

AGENT_PORT = "mvm.agent"
#: microvm has no PCI: every device is one of at most 8 virtio-mmio slots.
MAX_MMIO_DEVICES = 8
#: TCG translation cache. The default (1 GiB of address space, touched as code is translated)
#: lets each guest keep ~50 MB of translated code resident; memory, not CPU, limits density.
TCG_TB_MIB = 64

SPAWN_TIMEOUT = 30.0
QUIT_TIMEOUT = 5.0
KILL_TIMEOUT = 10.0
#: The default 128 MiB/s migration cap makes a 256 MiB snapshot take 6x longer.
SNAPSHOT_BANDWIDTH = 64 * 1024**3
SNAPSHOT_FD = "mvm-snapshot"
#: QEMU's seccomp filter for a jailed hypervisor: no obsolete syscalls, no setuid & co, no
#: fork/exec, no scheduler or affinity changes.
SANDBOX = "on,obsolete=deny,elevateprivileges=deny,spawn=deny,resourcecontrol=deny"
#: The first bytes of every QEMU migration stream.
QEVM_MAGIC = b"QEVM"

#: Hypervisor-specific guest parameters, the first `console=` wins its options (baud), so ours
#: go first. The rest is the trimmed line measured fastest under TCG (QEMU-HERE.md) plus
#: `panic=-1 reboot=t` so a panicking or rebooting guest ends the process (`-no-reboot`)
#: instead of hanging or looping, as Firecracker does.
BASE_PARAMS = (
    "console=ttyS0,115200",
    "quiet",
    "panic=-1",
    "reboot=t",
    "pci=off",
    "cryptomgr.notests",
    "i8042.noaux",
    "i8042.nomux",
    "i8042.nopnp",
    "i8042.dumbkbd",
    "8250.nr_uarts=1",
    "init_on_alloc=0",
    "random.trust_cpu=on",
)

_QEMU_ID = re.compile(r"[A-Za-z][A-Za-z0-9_.-]{0,63}")


def _opt(value: str | Path) -> str:
    """A value inside a QEMU `key=value,...` option: commas are escaped by doubling."""
    return str(value).replace(",", ",,")


def _abs(path: Path) -> str:
    # QEMU changes to / when it daemonizes; every path it opens later must be absolute.
    return os.path.abspath(path)


def _disk_id(disk_id: str) -> str:
    if not _QEMU_ID.fullmatch(disk_id):
        raise InvalidInput(f"disk id {disk_id!r} is not usable as a device id",
                           "use letters, digits, '-', '_' or '.', starting with a letter")
    return f"disk-{disk_id}"


def kernel_cmdline(cmdline: str, tsc_khz: int | None) -> str:
    params = list(BASE_PARAMS)
    if tsc_khz:
        params.append(f"tsc_early_khz={tsc_khz}")
    return " ".join([*params, cmdline]).strip()


def argv(spec: VmSpec, accel: str, incoming: bool = False, *, tsc_khz: int | None = None,
         binary: str = BINARY, tb_size_mib: int | None = TCG_TB_MIB,
         fds: jail.Fds | None = None) -> list[str]:
    """The complete QEMU command line for spec. Pure: same inputs, same list.

    Device order is fixed (disks in the given order, agent channel, network) and identical
    with or without `incoming`, which only appends `-incoming defer -S`. With `fds` (jailed,
    see runtime/jail.py) QEMU opens nothing of the VM's by path but its kernel and initrd:
    disks and the console come as fdsets, the TAP and the listening QMP and agent sockets as
    descriptors; it runs in the foreground (pid 1 of its PID namespace; the seccomp sandbox
    forbids the fork of `-daemonize`), its messages on stderr, its pid file private to it.
    """
    if accel not in ("tcg", "kvm"):
        raise InvalidInput(f"unknown accelerator {accel!r}", "use tcg or kvm")
    devices = len(spec.disks) + 1 + (1 if spec.net else 0)
    if devices > MAX_MMIO_DEVICES:
        raise InvalidInput(f"{spec.name}: {devices} devices, microvm has "
                           f"{MAX_MMIO_DEVICES} virtio-mmio slots",
                           "attach fewer disks")
    run_dir = Path(_abs(spec.run_dir))
    if accel == "tcg":
        accel_args = ["-accel", f"tcg,tb-size={tb_size_mib}" if tb_size_mib else "tcg",
                      "-cpu", "qemu64,+arat"]
    else:
        accel_args = ["-accel", "kvm", "-cpu", "host"]
    args = [
        binary,
        "-name", _opt(spec.name),
        "-M", "microvm",
        *accel_args,
        "-m", f"{spec.mem_mib}M",
        "-smp", str(spec.vcpus),
        "-nodefaults", "-no-user-config", "-display", "none",
        "-no-reboot",
        "-kernel", _abs(spec.kernel),
    ]
    if spec.initrd is not None:
        args += ["-initrd", _abs(spec.initrd)]
    args += ["-append", kernel_cmdline(spec.cmdline, tsc_khz)]
    if fds is not None:
        args += ["-sandbox", SANDBOX]
    for n, disk in enumerate(spec.disks):
        node = _disk_id(disk.id)
        if fds is not None:
            args += [a for fd in fds.disks[n] for a in ("-add-fd", f"fd={fd},set={n + 1}")]
        path = f"/dev/fdset/{n + 1}" if fds is not None else _opt(_abs(disk.path))
        # Jailed, QEMU's own image locks (OFD locks on each descriptor) guard nothing — it can
        # open no image but the descriptors mvm hands it, and the lifecycle never gives one disk
        # to two hypervisors — and they break a resume after a snapshot ended or was cancelled:
        # re-activating the disk then takes the write lock on the set's other descriptor, which
        # the first still holds ("Failed to get write lock").
        locking = ",file.locking=off" if fds is not None else ""
        args += [
            "-drive",
            f"file={path},if=none,id={node},format=raw,"
            f"readonly={'on' if disk.read_only else 'off'},cache=writeback{locking}",
            "-device", f"virtio-blk-device,drive={node}",
        ]
    agent = f"fd={fds.agent}" if fds is not None else f"path={_opt(run_dir / AGENT_SOCK)}"
    args += [
        "-device", "virtio-serial-device",
        "-chardev", f"socket,id=agent,{agent},server=on,wait=off",
        "-device", f"virtserialport,chardev=agent,name={AGENT_PORT}",
    ]
    if spec.net is not None:
        tap = (f"fd={fds.tap}" if fds is not None and fds.tap is not None
               else f"ifname={_opt(spec.net.tap)},script=no,downscript=no")
        args += [
            "-netdev", f"tap,id=net0,{tap}",
            "-device", f"virtio-net-device,netdev=net0,mac={spec.net.mac}",
        ]
    if fds is not None:
        console_set = len(spec.disks) + 1
        args += ["-add-fd", f"fd={fds.console},set={console_set}"]
        console_out, qmp_sock = f"/dev/fdset/{console_set}", f"fd={fds.qmp}"
    else:
        # a FIFO that mvm's logger keeps within a cap (runtime/console.py)
        console_out, qmp_sock = _opt(run_dir / console.PIPE), f"path={_opt(run_dir / QMP_SOCK)}"
    args += [
        "-chardev", f"file,id=console,path={console_out},append=on",
        "-serial", "chardev:console",
        "-chardev", f"socket,id=qmp,{qmp_sock},server=on,wait=off",
        "-mon", "chardev=qmp,mode=control",
    ]
    if fds is None:
        args += ["-D", str(run_dir / QEMU_LOG)]
    args += ["-pidfile", str(run_dir / PID_FILE)]
    if fds is None:
        args += ["-daemonize"]
    if incoming:
        args += ["-incoming", "defer", "-S"]
    return args


@functools.cache
def host_tsc_khz() -> int | None:
    """The host TSC frequency; a TCG guest's TSC runs at it (see `tsc_early_khz`)."""
    sysfs = Path("/sys/devices/system/cpu/cpu0/tsc_freq_khz")
    with contextlib.suppress(OSError, ValueError):
        return int(sysfs.read_text().strip())
    try:
        cpuinfo = Path("/proc/cpuinfo").read_text()
    except OSError:
        return None
    first = cpuinfo.split("\n\n", 1)[0]
    flags = re.search(r"^flags\s*:(.*)$", first, re.M)
    mhz = re.search(r"^cpu MHz\s*:\s*([0-9.]+)", first, re.M)
    # Without a constant TSC, "cpu MHz" is the current clock, not the TSC's.
    if not mhz or not flags or "constant_tsc" not in flags.group(1).split():
        return None
    return round(float(mhz.group(1)) * 1000)


def _tail(path: Path, lines: int = 8, max_bytes: int = 4096) -> str:
    try:
        with open(path, "rb") as f:
            f.seek(0, os.SEEK_END)
            f.seek(max(0, f.tell() - max_bytes))
            text = f.read().decode(errors="replace")
    except OSError:
        return ""
    return "\n".join(text.strip().splitlines()[-lines:])


def qemu_message(text: str) -> str:
    """What QEMU said went wrong, without its program-name prefix: the first explicit
    `error:` line if there is one, else the last few non-warning lines."""
    lines = [re.sub(r"^qemu-system-\w+:\s*", "", ln.strip())
             for ln in text.strip().splitlines() if ln.strip()]
    flagged = [ln[len("error:"):].strip() for ln in lines if ln.startswith("error:")]
    if flagged:
        return flagged[0]
    errors = [ln for ln in lines if not ln.startswith("warning:")] or lines
    return "; ".join(errors[-3:])


# QEMU's RunState (qapi/run-state.json) as the runtime interface sees it; the rest are paused.
STATUS = {
    "running": VmStatus.RUNNING,
    "io-error": VmStatus.IO_ERROR,
    "internal-error": VmStatus.BROKEN,
    "guest-panicked": VmStatus.BROKEN,
    "shutdown": VmStatus.BROKEN,
    "watchdog": VmStatus.BROKEN,
}


class QemuRuntime(Runtime):
    name = "qemu"

    def __init__(self, accel: str | Callable[[], str] = "tcg", *, binary: str = BINARY,
                 tb_size_mib: int | None = TCG_TB_MIB, jail_config: jail.Config | None = None) -> None:
        """`accel`: tcg or kvm, or a function choosing one (e.g. by a timed KVM probe), called
        on the first boot or snapshot only: observing and stopping VMs never probe.
        `jail_config`: whether and how hypervisors are jailed (None: never)."""
        if isinstance(accel, str):
            _check_accel(accel)
        self._accel = accel
        self.binary = binary
        self.tb_size_mib = tb_size_mib
        self.jail_config = jail_config or jail.Config(jail.Mode.OFF)

    @property
    def accel(self) -> str:
        if not isinstance(self._accel, str):
            self._accel = _check_accel(self._accel())
        return self._accel

    # -- files ------------------------------------------------------------------------------

    def agent_socket(self, spec: VmSpec) -> Path:
        return spec.run_dir / AGENT_SOCK

    def console_log(self, spec: VmSpec) -> Path:
        return spec.run_dir / CONSOLE_LOG

    def qmp_socket(self, spec: VmSpec) -> Path:
        return spec.run_dir / QMP_SOCK

    def pid_file(self, spec: VmSpec) -> Path:
        return Path(_abs(spec.run_dir)) / PID_FILE

    def qemu_log(self, spec: VmSpec) -> Path:
        return spec.run_dir / QEMU_LOG

    def argv(self, spec: VmSpec, accel: str | None = None, incoming: bool = False) -> list[str]:
        return argv(spec, accel or self.accel, incoming, tsc_khz=host_tsc_khz(),
                    binary=self.binary, tb_size_mib=self.tb_size_mib)

    # -- queries ----------------------------------------------------------------------------

    def _pid(self, spec: VmSpec) -> int | None:
        """Our QEMU's pid: by its pid file, or — when the file is gone (the runtime dir was
        removed under it) — by the `-pidfile <path>` its command line still names."""
        pid_file = self.pid_file(spec)
        if pid_file.exists():
            return pids.owned_pid(pid_file)
        return pids.find_by_arg("-pidfile", str(pid_file))

    def kill(self, spec: VmSpec) -> None:
        self._kill(spec)

    def is_alive(self, spec: VmSpec) -> bool:
        return self._pid(spec) is not None

    def pid(self, spec: VmSpec) -> int | None:
        return self._pid(spec)

    def status(self, spec: VmSpec) -> VmStatus:
        if not self.is_alive(spec):
            return VmStatus.GONE
        deadline = base.CONTROL_DEADLINE
        ends = time.monotonic() + deadline
        try:
            with Qmp(self.qmp_socket(spec), connect_timeout=deadline) as q:
                state = q.execute("query-status", timeout=max(ends - time.monotonic(), 0.01))["status"]
        except RuntimeFailure:
            if not self.is_alive(spec):
                return VmStatus.GONE
            raise
        return STATUS.get(state, VmStatus.PAUSED)

    def _require_alive(self, spec: VmSpec) -> int:
        pid = self._pid(spec)
        if pid is None:
            raise RuntimeFailure(f"{spec.name} has no running hypervisor",
                                 "start or wake the instance first")
        return pid

    # -- lifecycle --------------------------------------------------------------------------

    def boot(self, spec: VmSpec, progress: Progress | None = None) -> None:
        with Steps("boot", progress) as s:
            s.run("check", lambda: self._check_inputs(spec))
            s.run("run-dir", lambda: self._prepare_run_dir(spec, s, fresh=True))
            s.run("spawn", lambda: self._start(spec, self.accel, False, s))
            s.run("running", lambda: self._expect_state(spec, "running"))

    def restore(self, spec: VmSpec, snap_dir: Path, progress: Progress | None = None) -> None:
        with Steps("restore", progress) as s:
            info = s.run("check", lambda: self._check_snapshot(spec, snap_dir))
            accel = info.extra.get("accel", self.accel)
            s.run("run-dir", lambda: self._prepare_run_dir(spec, s, fresh=False))
            s.run("spawn", lambda: self._start(spec, accel, True, s))
            with Qmp(self.qmp_socket(spec)) as q:
                # Loaded and left paused (-S): the guest runs only at resume().
                s.run("load", lambda: self._load(spec, q, snap_dir / info.memory_file, info))

    def agent(self, spec: VmSpec) -> AgentClient:
        return AgentClient(VirtioSerialChannel(
            self.agent_socket(spec), alive=lambda: self.is_alive(spec),
            last_words=lambda: self._last_words(spec), unanswered=lambda: self.unanswered(spec)))

    def _last_words(self, spec: VmSpec) -> str:
        """What QEMU and the guest said last: for the error when a hypervisor exits early."""
        parts = []
        if qlog := qemu_message(_tail(self.qemu_log(spec))):
            parts.append(f"QEMU: {qlog}")
        if tail := self._console_tail(spec):
            parts.append("console:\n" + tail)
        return "\n".join(parts)

    def _console_tail(self, spec: VmSpec, lines: int = 5) -> str:
        """The console's last lines, escaped (the guest wrote them). Once the hypervisor is gone,
        after its logger wrote the rest."""
        log = self.console_log(spec)
        if not self.is_alive(spec):
            console.settle(log)
        text = printable(console.tail(log)).strip()
        return "\n".join(text.splitlines()[-lines:])

    def pause(self, spec: VmSpec) -> None:
        self._require_alive(spec)
        qmp.call(self.qmp_socket(spec), "stop")

    def resume(self, spec: VmSpec) -> None:
        self._require_alive(spec)
        with Qmp(self.qmp_socket(spec)) as q:
            _run_vcpus(q)

    def snapshot(self, spec: VmSpec, snap_dir: Path,
                 progress: Progress | None = None) -> SnapshotInfo:
        pid = self._require_alive(spec)
        started = time.monotonic()
        tmp = snap_dir / (MEMORY_FILE + ".tmp")
        with Qmp(self.qmp_socket(spec)) as q:
            with Steps("snapshot", progress) as s:
                state = s.run("status", lambda: q.execute("query-status")["status"])
                if state == "running":
                    s.run("pause", lambda: q.execute("stop"))
                    s.on_undo("pause", lambda: _run_vcpus(q))
                elif state != "paused":
                    raise RuntimeFailure(f"cannot snapshot {spec.name} while QEMU is {state}")
                s.run("prepare", lambda: self._prepare_snap_dir(snap_dir, s))
                s.run("save", lambda: self._save(spec, q, tmp))
                accel = _running_accel(pid) or self.accel
                info = s.run("commit",
                             lambda: self._commit(spec, snap_dir, tmp, started, accel))
            # Committed: from here the VM must never run again (its disks now belong to the
            # snapshot), so failures below end in SIGKILL, not in a resume.
            s2 = Steps("snapshot", progress)
            s2.run("quit", lambda: self._end(spec, pid, q))
        return info

    def stop(self, spec: VmSpec, timeout: float) -> None:
        pid = self._pid(spec)
        if pid is not None:
            try:
                if timeout > 0:
                    with Qmp(self.qmp_socket(spec), connect_timeout=2.0) as q:
                        if q.execute("query-status")["status"] != "running":
                            _run_vcpus(q)  # a paused guest cannot see the power button
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

    # -- steps ------------------------------------------------------------------------------

    def _check_inputs(self, spec: VmSpec) -> None:
        rundir.check_inputs(spec)

    def _prepare_run_dir(self, spec: VmSpec, steps: Steps, fresh: bool) -> None:
        rundir.prepare(spec, steps, fresh, hypervisor="QEMU", pid=self._pid(spec), log=self.qemu_log(spec),
                       console_log=self.console_log(spec), cleanup=lambda: self._cleanup(spec))

    # -- the jail ---------------------------------------------------------------------------

    def jailing(self) -> jail.Jailing:
        """Whether the hypervisor starting now is jailed (setting `jail`, the host's recorded
        verdict, what this process can do now), or refuses: see `jail.decide`."""
        return jail.decide(self.jail_config, self.name)

    def jailed(self) -> bool:
        return self.jailing().jailed

    def jail_of(self, spec: VmSpec) -> str | None:
        return rundir.jail_note(spec) if self.is_alive(spec) else None

    def mem_overhead_mib(self, accel: str) -> int:
        """What the jail's memory limit allows beyond guest RAM: QEMU itself and, under TCG,
        its translation cache."""
        tb = (self.tb_size_mib or 1024) if accel == "tcg" else 0
        return jail.MEM_OVERHEAD_MIB + tb

    def mem_overhead(self) -> int:
        """The jail's memory limit beyond guest RAM, on this host's accelerator (admission)."""
        return self.mem_overhead_mib(self.accel)

    def _start(self, spec: VmSpec, accel: str, incoming: bool, steps: Steps) -> int:
        how = self.jailing()
        rundir.note_jail(spec, how.line())
        if how.cgroups is None:
            return self._spawn(spec, self.argv(spec, accel, incoming), steps)
        return self._spawn_jailed(spec, accel, incoming, steps, how.cgroups)

    def _spawn_jailed(self, spec: VmSpec, accel: str, incoming: bool, steps: Steps,
                      cgroups: jail.Cgroups) -> int:
        steps.on_undo("spawn", lambda: self._kill(spec))
        cfg = self.jail_config
        desc = jail.describe(spec, cfg.uid_base, self.mem_overhead_mib(accel))  # (shared with Firecracker's jailer)
        ids = desc.ids
        if ids.groups:
            for f in (spec.kernel, spec.initrd):
                if f is not None:
                    jail.share_with_group(f, ids.groups[0])
        procs = jail.create_cgroup(cgroups, desc.cgroup, desc.limits)
        binary = proc_which(self.binary) or self.binary
        # The console's descriptor is the write end of the FIFO the logger reads (runtime/console.py).
        reader = console.open_pipe(self.console_log(spec))
        try:
            fds = jail.open_fds(spec, self.agent_socket(spec), self.qmp_socket(spec),
                                console.pipe_path(self.console_log(spec)))
        except BaseException:
            os.close(reader)
            raise
        try:
            args = argv(spec, accel, incoming, tsc_khz=host_tsc_khz(), binary=binary,
                        tb_size_mib=self.tb_size_mib, fds=fds)
            plan = jail.plan(spec, args, ids, fds, cgroup_procs=procs, pid_file=self.pid_file(spec),
                             qmp_socket=self.qmp_socket(spec), log=self.qemu_log(spec),
                             kvm=accel == "kvm")
            try:
                jail.spawn(plan)
            except RuntimeFailure as e:
                os.close(reader)
                why = qemu_message(_tail(self.qemu_log(spec))) or e.message
                raise RuntimeFailure(f"QEMU could not start {spec.name} in its jail: {why}",
                                     f"full command: {shlex.join(args)}") from e
        finally:
            jail.close(fds.all())
        return self._started(spec, reader)

    def _spawn(self, spec: VmSpec, args: list[str], steps: Steps) -> int:
        # Registered first: if QEMU daemonized but we time out, the undo still finds it.
        steps.on_undo("spawn", lambda: self._kill(spec))
        # QEMU opens the console FIFO for writing: it finds this read end there, then the logger.
        reader = console.open_pipe(self.console_log(spec))
        try:
            run(args, timeout=SPAWN_TIMEOUT)
        except CommandFailed as e:
            os.close(reader)
            why = qemu_message(_tail(self.qemu_log(spec)) or e.stderr) or e.message
            raise RuntimeFailure(f"QEMU could not start {spec.name}: {why}",
                                 f"full command: {e.message.split(' failed (')[0]}") from e
        return self._started(spec, reader)

    def _started(self, spec: VmSpec, reader: int) -> int:
        """QEMU started: its console's logger takes the FIFO's read end (and closes it here);
        the pid of a QEMU still there, or its log's last words."""
        console.start_logger(reader, self.console_log(spec))
        pid = self._pid(spec)
        if pid is None:
            raise RuntimeFailure(f"QEMU for {spec.name} exited right after starting: "
                                 f"{qemu_message(_tail(self.qemu_log(spec)))}")
        return pid

    def _expect_state(self, spec: VmSpec, want: str) -> None:
        try:
            state = qmp.call(self.qmp_socket(spec), "query-status")["status"]
        except RuntimeFailure as e:
            raise self._with_logs(spec, e) from e
        if state != want:
            raise self._with_logs(spec, RuntimeFailure(
                f"{spec.name}: QEMU is {state}, expected {want}"))

    def _with_logs(self, spec: VmSpec, e: RuntimeFailure) -> RuntimeFailure:
        """Attach what QEMU and the guest said, before the undo removes the logs."""
        words = self._last_words(spec)
        return RuntimeFailure(e.message + (f"\n{words}" if words else ""), e.hint)

    def _check_snapshot(self, spec: VmSpec, snap_dir: Path) -> SnapshotInfo:
        info = SnapshotInfo.load(snap_dir)
        info.check_matches(spec, self.name)
        self._check_inputs(spec)
        mem = snap_dir / info.memory_file
        try:
            size = mem.stat().st_size
        except FileNotFoundError:
            raise RuntimeFailure(f"snapshot memory file {mem} is missing",
                                 "restart the instance cold instead of waking it") from None
        # QEMU accepts a truncated stream as a finished one on some paths; never feed it one.
        if size != info.size_bytes:
            raise RuntimeFailure(f"snapshot memory file {mem} has {size} bytes, the manifest "
                                 f"says {info.size_bytes}",
                                 "restart the instance cold instead of waking it")
        with open(mem, "rb") as f:
            if f.read(4) != QEVM_MAGIC:
                raise RuntimeFailure(f"snapshot memory file {mem} is not a QEMU snapshot",
                                     "restart the instance cold instead of waking it")
        info.verify(snap_dir, spec.name)  # (QEMU would load many a damaged stream)
        return info

    def _prepare_snap_dir(self, snap_dir: Path, steps: Steps) -> None:
        private.mkdirs(snap_dir)
        # Uncommit any older snapshot first: a manifest must never describe a half-written file.
        rundir.unlink(snap_dir / MANIFEST)
        # On failure no snapshot is left at all: the VM runs on, so its disks move on.
        steps.on_undo("prepare", lambda: rundir.unlink(snap_dir / (MEMORY_FILE + ".tmp"),
                                                       snap_dir / MEMORY_FILE, snap_dir / MANIFEST))

    def _save(self, spec: VmSpec, q: Qmp, tmp: Path) -> None:
        q.execute("migrate-set-parameters", {"max-bandwidth": SNAPSHOT_BANDWIDTH})
        # An fd we own rather than `exec:cat > FILE`: once QEMU reports `completed` every
        # byte is in the file, whereas a `cat` child may still be draining its pipe.
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)
        try:
            q.send_fd(fd, SNAPSHOT_FD)
        finally:
            os.close(fd)
        q.execute("migrate", {"uri": f"fd:{SNAPSHOT_FD}"})
        self._wait_migration(spec, q, "save", _transfer_timeout(spec.mem_mib))

    def _commit(self, spec: VmSpec, snap_dir: Path, tmp: Path, started: float,
                accel: str) -> SnapshotInfo:
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        final = snap_dir / MEMORY_FILE
        os.replace(tmp, final)
        info = SnapshotInfo(
            backend=self.name,
            memory_file=MEMORY_FILE,
            mem_mib=spec.mem_mib,
            vcpus=spec.vcpus,
            devices=spec.devices(),
            size_bytes=final.stat().st_size,
            created=time.time(),
            extra={"accel": accel, "machine": "microvm"},
            seconds=round(time.monotonic() - started, 4),
            checksums={MEMORY_FILE: checksum(final)},  # (just written: read from the page cache)
        )
        info.write(snap_dir)
        return info

    def _load(self, spec: VmSpec, q: Qmp, memory: Path, info: SnapshotInfo) -> None:
        fd = os.open(memory, os.O_RDONLY | os.O_CLOEXEC)
        try:
            q.send_fd(fd, SNAPSHOT_FD)
        finally:
            os.close(fd)
        try:
            q.execute("migrate-incoming", {"uri": f"fd:{SNAPSHOT_FD}"})
            self._wait_migration(spec, q, "load", _transfer_timeout(info.mem_mib))
            state = q.execute("query-status")["status"]
        except RuntimeFailure as e:
            # QEMU exits when an incoming migration fails; its reason is in qemu.log.
            raise self._with_logs(spec, RuntimeFailure(
                f"QEMU could not load the snapshot of {spec.name}: {e.message}",
                "restart the instance cold instead of waking it")) from e
        if state != "paused":
            raise self._with_logs(spec, RuntimeFailure(
                f"{spec.name}: QEMU is {state} after loading the snapshot, expected paused"))

    def _wait_migration(self, spec: VmSpec, q: Qmp, what: str, timeout: float) -> None:
        def done() -> dict[str, object] | None:
            info: dict[str, object] = q.execute("query-migrate")
            return info if info.get("status") in ("completed", "failed", "cancelled") else None

        try:
            result = until(done, timeout, interval=0.005, what=f"snapshot {what}")
        except TimeoutError:
            if what == "save":
                with contextlib.suppress(RuntimeFailure):
                    q.execute("migrate_cancel")
            raise RuntimeFailure(f"snapshot {what} of {spec.name} did not finish in "
                                 f"{timeout:g}s") from None
        if result["status"] != "completed":
            raise RuntimeFailure(f"snapshot {what} of {spec.name} {result['status']}: "
                                 f"{result.get('error-desc', 'no reason given')}")

    def _end(self, spec: VmSpec, pid: int, q: Qmp) -> None:
        with contextlib.suppress(RuntimeFailure):
            q.quit()
        if not pids.wait_gone(pid, QUIT_TIMEOUT):
            self._kill(spec)
        self._cleanup(spec)

    def _kill(self, spec: VmSpec) -> None:
        rundir.kill(spec, "QEMU", self._pid(spec), KILL_TIMEOUT, cleanup=lambda: self._cleanup(spec))

    def _cleanup(self, spec: VmSpec) -> None:
        """Remove the files and the jail's cgroup a dead hypervisor leaves; never while it lives."""
        if self._pid(spec) is None:
            rundir.unlink(self.qmp_socket(spec), self.agent_socket(spec), self.pid_file(spec),
                          rundir.jail_note_path(spec))
            console.settle(self.console_log(spec))  # its logger writes the last lines and ends
            console.remove_pipe(self.console_log(spec))
            with contextlib.suppress(OSError):
                jail.jail_root(spec).rmdir()
            # (whatever the setting says now: the VM may have been started jailed)
            with contextlib.suppress(RuntimeFailure):
                jail.remove_cgroup(jail.cgroups(self.jail_config.cgroup_root), jail.cgroup_name(spec))


#: Outgoing migration states in which QEMU still writes the stream (and stops the vCPUs
#: at its end). `query-migrate` without a status: no migration ever started.
_MIGRATING = ("setup", "active", "pre-switchover", "device", "wait-unplug", "cancelling",
              "postcopy-active", "postcopy-paused", "postcopy-recover")


def _run_vcpus(q: Qmp) -> None:
    """Let the vCPUs run, and stay running: a snapshot still being written (its command was
    killed after handing QEMU the file) is cancelled first, since when it ends QEMU stops
    the vCPUs again (`postmigrate`), leaving a guest the store says runs frozen."""
    status = q.execute("query-migrate").get("status")
    if status in _MIGRATING:
        with contextlib.suppress(RuntimeFailure):
            q.execute("migrate_cancel")  # (refused when it just ended: fine, see below)
        try:
            until(lambda: q.execute("query-migrate").get("status") not in _MIGRATING,
                  QUIT_TIMEOUT, interval=0.005, what="cancel the snapshot being written")
        except TimeoutError as e:
            raise RuntimeFailure(f"QEMU did not cancel a snapshot being written: {e}",
                                 "stop the instance and start it again") from None
    q.execute("cont")


def _check_accel(accel: str) -> str:
    if accel not in ("tcg", "kvm"):
        raise InvalidInput(f"unknown accelerator {accel!r}", "use tcg or kvm")
    return accel


def _running_accel(pid: int) -> str | None:
    """The accelerator a running QEMU was started with (it may predate a settings change)."""
    args = pids.cmdline(pid)
    for flag, value in itertools.pairwise(args):
        if flag == "-accel":
            return value.split(",")[0]
    return None


def _transfer_timeout(mem_mib: int) -> float:
    # Measured ~0.1 s per 256 MiB; allow a slow, busy host 100x that.
    return 30.0 + mem_mib / 16
