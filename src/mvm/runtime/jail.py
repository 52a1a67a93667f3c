"""The hypervisor's jail (Firecracker's jailer model, applied to QEMU).

Each VM's hypervisor runs as a uid/gid of its own (`VmSpec.ids`, allocated by the caller),
with no capabilities, as pid 1 of its own PID namespace, in mount/IPC/UTS/network namespaces
of its own whose filesystem holds only read-only system files the hypervisor needs, its
kernel and initrd, and a private directory — under QEMU's seccomp sandbox, in a cgroup with
the VM's CPU, memory (plus the hypervisor's overhead) and pids limits. Everything else the
hypervisor uses is handed over as an open file descriptor by mvm: disks (`-add-fd`), the TAP,
the QMP and agent sockets (already listening), the console log. So it can write no host file
by path, needs no privilege, and an escape lands in an unprivileged, empty, limited place.

This module is the description (`plan`: pure, so it can be read and tested), the cgroups (v2
where the host has the controllers on its unified hierarchy, else v1; any root, so a fake tree
tests v2) and `spawn`, which runs `jail_exec.py` (the launcher; see its docstring for why one).
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import hashlib
import json
import os
import socket
import struct
import sys
import time
from dataclasses import dataclass, field
from enum import StrEnum
from pathlib import Path

from mvm.errors import CommandFailed, HostUnsupported, RuntimeFailure
from mvm.runtime.base import JailIds, VmSpec
from mvm.util.proc import run

LAUNCHER = Path(__file__).with_name("jail_exec.py")
CGROUP_ROOT = Path("/sys/fs/cgroup")
#: Every jail's cgroup lives under this one, at the root of each hierarchy.
CGROUP_PARENT = "mvm"
CONTROLLERS = ("cpu", "memory", "pids")
#: What QEMU holds besides guest RAM (its code, heap, device state, I/O buffers), measured
#: ~50-60 MiB under TCG, with room to spare: a guest must never be OOM-killed in normal use.
#: The TCG translation cache (`tb-size`) comes on top.
MEM_OVERHEAD_MIB = 128
#: Threads: main loop, RCU, vCPUs, and up to 64 block I/O workers; no process may fork.
PIDS_BASE = 96
CPU_PERIOD_US = 100_000
#: CPU beyond the vCPUs, for QEMU's main loop and I/O threads, in % of one core.
CPU_OVERHEAD_PCT = 50
#: The jail's ids: settings' base + a number kept by the store (1 ≤ n < IDS); specs without
#: ids (none come from mvm itself) get one derived from their run directory above that.
IDS = 1_000_000
#: System files QEMU needs, bound read-only: libraries and ld.so's cache, firmware and ROMs.
SYSTEM_PATHS = ("/usr/lib", "/usr/lib64", "/usr/share/qemu", "/usr/share/seabios",
                "/usr/share/ipxe", "/etc/ld.so.cache")
DEVICES = ("/dev/null", "/dev/zero", "/dev/urandom", "/dev/random")
SPAWN_TIMEOUT = 25.0

TUNSETIFF = 0x400454CA
IFF_TAP = 0x0002
IFF_NO_PI = 0x1000
IFF_VNET_HDR = 0x4000


class Mode(StrEnum):
    AUTO = "auto"  # jailed where the host allows it
    REQUIRED = "required"  # refuse to start a VM that cannot be jailed
    OFF = "off"


#: The first jail uid/gid is this plus 1 (setting `jail-uid-base`): far above users' and
#: systemd's dynamic ranges, below 2^31.
UID_BASE = 1_900_000_000


@dataclass(frozen=True)
class Config:
    mode: Mode = Mode.AUTO
    uid_base: int = UID_BASE
    #: None: /sys/fs/cgroup, or the host init's view of it when this process has none
    cgroup_root: Path | None = None


@dataclass(frozen=True)
class Limits:
    mem_bytes: int
    cpu_quota_us: int
    cpu_period_us: int
    cpu_weight: int  # cgroup v2 scale (1-10000, default 100); v1 shares are 1024/100 of it
    pids: int


def limits(spec: VmSpec, overhead_mib: int) -> Limits:
    return Limits(
        mem_bytes=(spec.mem_mib + overhead_mib) << 20,
        cpu_quota_us=CPU_PERIOD_US * (spec.vcpus * 100 + CPU_OVERHEAD_PCT) // 100,
        cpu_period_us=CPU_PERIOD_US,
        cpu_weight=min(10000, 100 * spec.vcpus),
        pids=PIDS_BASE + spec.vcpus,
    )


# -- cgroups ----------------------------------------------------------------------------------

@dataclass(frozen=True)
class Cgroups:
    """The host's cgroup hierarchy as the jail uses it: v2 (one tree) or v1 (one per controller)."""

    version: int
    #: controller -> the directory of its hierarchy (v2: the same root for all)
    roots: dict[str, Path]
    missing: tuple[str, ...] = ()

    def dirs(self, name: str) -> list[Path]:
        """The VM's cgroup directory in each hierarchy (one for v2)."""
        seen = dict.fromkeys(root / CGROUP_PARENT / name for root in self.roots.values())
        return list(seen)

    def describe(self) -> str:
        if self.missing:
            return f"cgroup v{self.version}: missing controllers {', '.join(self.missing)}"
        return f"cgroup v{self.version} ({', '.join(sorted(self.roots))})"


def detect_cgroups(root: Path | None = None) -> Cgroups:
    """v2 when the unified hierarchy at `root` offers every controller, else v1 hierarchies
    mounted as `root/<controller>` (as this host and systemd's hybrid layout have them).
    Without a root: /sys/fs/cgroup — or, where this process has no cgroup mounts there (a
    command run by `ip netns exec`, as the tests and the benchmark run mvm, gets a /sys of its
    own), the tree as its nearest ancestor sees it (`/proc/<ppid>/root/sys/fs/cgroup`)."""
    if root is not None:
        return _detect(root)
    found = _detect(CGROUP_ROOT)
    pid = os.getppid()
    for _ in range(8):
        if not found.missing or pid <= 1:
            break
        with contextlib.suppress(OSError):
            seen = _detect(Path(f"/proc/{pid}/root") / CGROUP_ROOT.relative_to("/"))
            if not seen.missing:
                return seen
        pid = _ppid(pid)
    return found


def _ppid(pid: int) -> int:
    try:
        return int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[1])
    except (OSError, ValueError, IndexError):
        return 0


def _detect(root: Path) -> Cgroups:
    with contextlib.suppress(OSError):
        offered = (root / "cgroup.controllers").read_text().split()
        missing = tuple(c for c in CONTROLLERS if c not in offered)
        return Cgroups(2, {c: root for c in CONTROLLERS if c in offered}, missing)
    roots: dict[str, Path] = {}
    for c in CONTROLLERS:
        d = root / c
        if (d / "cgroup.procs").exists():
            roots[c] = d
    return Cgroups(1, roots, tuple(c for c in CONTROLLERS if c not in roots))


def _write(path: Path, value: str) -> None:
    with open(path, "w") as f:
        f.write(value)


def _enable_v2(d: Path) -> None:
    """Make the controllers available to d's children (v2 only delegates them downwards)."""
    have = (d / "cgroup.subtree_control").read_text().split()
    want = [f"+{c}" for c in CONTROLLERS if c not in have]
    if want:
        _write(d / "cgroup.subtree_control", " ".join(want))


#: Written only where the kernel offers them (v2's swap controller needs swap accounting).
OPTIONAL_FILES = ("memory.swap.max",)


def cgroup_files(cg: Cgroups, lim: Limits) -> dict[str, str]:
    """The limit files of a VM's cgroup and their values; each named after its controller."""
    if cg.version == 2:
        return {"memory.max": str(lim.mem_bytes), "memory.swap.max": "0",
                "cpu.max": f"{lim.cpu_quota_us} {lim.cpu_period_us}",
                "cpu.weight": str(lim.cpu_weight), "pids.max": str(lim.pids)}
    return {"memory.limit_in_bytes": str(lim.mem_bytes),
            "cpu.cfs_period_us": str(lim.cpu_period_us),
            "cpu.cfs_quota_us": str(lim.cpu_quota_us),
            "cpu.shares": str(lim.cpu_weight * 1024 // 100), "pids.max": str(lim.pids)}


def create_cgroup(cg: Cgroups, name: str, lim: Limits) -> list[Path]:
    """The VM's cgroup(s), limits written; returns the `cgroup.procs` files to join."""
    if cg.missing:
        raise HostUnsupported(f"cannot jail: {cg.describe()}",
                              "mount the cgroup controllers, or `mvm config set jail off`")
    if cg.version == 2:
        root = next(iter(cg.roots.values()))
        _enable_v2(root)
        (root / CGROUP_PARENT).mkdir(exist_ok=True)
        _enable_v2(root / CGROUP_PARENT)
    for d in cg.dirs(name):
        d.mkdir(parents=True, exist_ok=True)
    # All jails together weigh as much as one busy task per host core: under contention an
    # unjailed QEMU's threads each weighed one task, and one group of 1024 shares competing
    # with every task of the root made a jailed boot 1.4x slower here for nothing but that.
    cores = os.cpu_count() or 1
    parent = cg.roots["cpu"] / CGROUP_PARENT
    if cg.version == 2:
        _write(parent / "cpu.weight", str(min(10000, 100 * cores)))
    else:
        _write(parent / "cpu.shares", str(1024 * cores))
    for fname, value in cgroup_files(cg, lim).items():
        d = cg.roots[fname.split(".")[0]] / CGROUP_PARENT / name
        if fname not in OPTIONAL_FILES or (d / fname).exists():
            _write(d / fname, value)
    return [d / "cgroup.procs" for d in cg.dirs(name)]


def remove_cgroup(cg: Cgroups, name: str, timeout: float = 5.0) -> None:
    """Remove the VM's cgroup(s) once empty (an exiting process leaves them shortly after)."""
    for d in cg.dirs(name):
        deadline = time.monotonic() + timeout
        while True:
            try:
                d.rmdir()
                break
            except FileNotFoundError:
                break
            except OSError as e:
                if e.errno != errno.EBUSY or time.monotonic() >= deadline:
                    raise RuntimeFailure(f"cannot remove cgroup {d}: {e.strerror}",
                                         "a process of the hypervisor may still run") from e
                time.sleep(0.01)


def cgroup_name(spec: VmSpec) -> str:
    """Unique per VM and per state home: the run directory names both."""
    return f"{spec.name}-{hashlib.sha256(os.path.abspath(spec.run_dir).encode()).hexdigest()[:8]}"


# -- the description ---------------------------------------------------------------------------

@dataclass(frozen=True)
class Fds:
    """Descriptors mvm opened for the hypervisor, by what they are."""

    #: per disk, in device order: the descriptors of its fdset (read-write disks have an
    #: O_RDWR and an O_RDONLY one, so that QEMU can reopen the image either way)
    disks: tuple[tuple[int, ...], ...]
    agent: int
    qmp: int
    console: int
    tap: int | None = None

    def all(self) -> list[int]:
        out = [fd for d in self.disks for fd in d] + [self.agent, self.qmp, self.console]
        return out + ([self.tap] if self.tap is not None else [])


@dataclass(frozen=True)
class Bind:
    src: str
    dst: str
    rw: bool = False
    device: bool = False


@dataclass(frozen=True)
class Plan:
    """Everything the launcher does, as data."""

    argv: list[str]
    uid: int
    gid: int
    groups: list[int]
    root: str
    binds: list[Bind]
    symlinks: list[tuple[str, str]]
    private_dirs: list[str]
    cgroup_procs: list[str]
    pid_file: str
    ready_socket: str
    log: str
    netns: bool = True
    timeout: float = SPAWN_TIMEOUT
    fds: list[int] = field(default_factory=list)

    def to_json(self) -> str:
        d = {k: v for k, v in self.__dict__.items() if k != "fds"}
        d["binds"] = [b.__dict__ for b in self.binds]
        return json.dumps(d)


def system_binds(binary: str, kvm: bool) -> tuple[list[Bind], list[tuple[str, str]]]:
    """Read-only system files and devices, and the merged-/usr symlinks, as the host has them."""
    present = os.path.exists
    binds = [Bind(p, p) for p in (binary, *SYSTEM_PATHS) if present(p)]
    links = []
    for top in ("/lib", "/lib64"):
        if os.path.islink(top):
            links.append((os.readlink(top), top))
        elif present(top):
            binds.append(Bind(top, top))
    devices = [*DEVICES, "/dev/kvm"] if kvm else list(DEVICES)
    binds += [Bind(d, d, rw=True, device=True) for d in devices if present(d)]
    return binds, links


def plan(spec: VmSpec, argv: list[str], ids: JailIds, fds: Fds, *, cgroup_procs: list[Path],
         pid_file: Path, qmp_socket: Path, log: Path, kvm: bool = False) -> Plan:
    """The jail of one VM. Pure but for looking at which system paths exist."""
    binds, links = system_binds(argv[0], kvm)
    for f in (spec.kernel, spec.initrd):
        if f is not None:
            binds.append(Bind(os.path.abspath(f), os.path.abspath(f)))
    groups = list(ids.groups)
    if kvm:  # /dev/kvm is usually root:kvm 0660: the jail opens it through that group
        with contextlib.suppress(OSError):
            st = os.stat("/dev/kvm")
            if st.st_mode & 0o060 == 0o060 and st.st_gid not in groups:
                groups.append(st.st_gid)
    return Plan(
        argv=argv, uid=ids.uid, gid=ids.gid, groups=groups,
        root=str(jail_root(spec)), binds=binds, symlinks=links,
        # QEMU writes its own pid file (pid 1, useless to the host) into its private copy
        # of the run directory; the launcher writes the host pid into the real one.
        private_dirs=[os.path.abspath(spec.run_dir)],
        cgroup_procs=[str(p) for p in cgroup_procs], pid_file=str(pid_file),
        ready_socket=str(qmp_socket), log=str(log), fds=fds.all(),
    )


def jail_root(spec: VmSpec) -> Path:
    """An empty directory the jail's tmpfs root is mounted on (inside its own namespace only)."""
    return Path(os.path.abspath(spec.run_dir)) / "jail"


@dataclass(frozen=True)
class Description:
    """One VM's jail, whichever launcher applies it (jail_exec.py for QEMU, Firecracker's
    jailer): who it runs as, its limits, its cgroup's name under CGROUP_PARENT."""

    ids: JailIds
    limits: Limits
    cgroup: str


def describe(spec: VmSpec, uid_base: int, overhead_mib: int) -> Description:
    return Description(spec.ids or fallback_ids(spec, uid_base), limits(spec, overhead_mib),
                       cgroup_name(spec))


def fallback_ids(spec: VmSpec, base: int) -> JailIds:
    """Ids for a VM whose caller gave none: derived from its run directory, above the range
    the store allocates from."""
    n = IDS + int(hashlib.sha256(os.path.abspath(spec.run_dir).encode()).hexdigest()[:8], 16) % IDS
    return JailIds(base + n, base + n)


# -- host side: files, descriptors, spawn ------------------------------------------------------

def share_with_group(path: Path, gid: int) -> None:
    """Let the jail read a file of its tenant (kernel, initrd) through the tenant's group: chgrp
    and g+r, nothing for others. Files readable by everyone (mvm's default kernel) stay as they
    are. Idempotent."""
    st = path.stat()
    if st.st_mode & 0o004:
        return
    if st.st_gid != gid:
        os.chown(path, -1, gid)
    mode = (st.st_mode & 0o7700) | 0o040
    if st.st_mode & 0o7777 != mode:
        os.chmod(path, mode)


def listening_socket(path: Path) -> int:
    """A Unix socket bound and listening at path, owned by root (mvm connects as root)."""
    with contextlib.suppress(FileNotFoundError):
        path.unlink()
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        s.bind(str(path))
        os.chmod(path, 0o600)
        s.listen(1)
    except BaseException:
        s.close()
        raise
    return s.detach()


def open_tap(name: str) -> int:
    """The TAP as QEMU would open it by name (with virtio-net headers), handed over instead."""
    fd = os.open("/dev/net/tun", os.O_RDWR)
    try:
        fcntl.ioctl(fd, TUNSETIFF, struct.pack("16sH22x", name.encode(), IFF_TAP | IFF_NO_PI | IFF_VNET_HDR))
    except OSError as e:
        os.close(fd)
        raise RuntimeFailure(f"cannot open TAP {name}: {e.strerror}",
                             "run `mvm net verify --repair`") from e
    return fd


def open_fds(spec: VmSpec, agent_socket: Path, qmp_socket: Path, console_log: Path) -> Fds:
    """Open everything the jailed hypervisor gets as a descriptor; the caller closes them."""
    opened: list[int] = []

    def keep(fd: int) -> int:
        opened.append(fd)
        return fd

    try:
        disks: list[tuple[int, ...]] = []
        for d in spec.disks:
            if d.read_only:
                disks.append((keep(os.open(d.path, os.O_RDONLY)),))
            else:
                disks.append((keep(os.open(d.path, os.O_RDWR)), keep(os.open(d.path, os.O_RDONLY))))
        console = keep(os.open(console_log, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600))
        agent = keep(listening_socket(agent_socket))
        qmp = keep(listening_socket(qmp_socket))
        tap = keep(open_tap(spec.net.tap)) if spec.net is not None else None
    except BaseException:
        close(opened)
        raise
    return Fds(tuple(disks), agent, qmp, console, tap)


def close(fds: list[int]) -> None:
    for fd in fds:
        with contextlib.suppress(OSError):
            os.close(fd)


def spawn(p: Plan) -> None:
    """Run the launcher; returns once the jailed hypervisor serves QMP (its host pid is then in
    the pid file). On failure the launcher's own line is in the error, QEMU's in its log."""
    jail_root_dir = Path(p.root)
    jail_root_dir.mkdir(mode=0o700, exist_ok=True)
    try:
        run([sys.executable, "-I", "-S", str(LAUNCHER), p.to_json()], timeout=p.timeout + 5,
            pass_fds=p.fds)
    except CommandFailed as e:
        said = e.stderr.strip().splitlines()
        why = said[-1] if said else ("the jail's launcher timed out" if e.returncode == 124
                                     else f"the jail's launcher failed (exit {e.returncode})")
        raise RuntimeFailure(why) from e


@dataclass(frozen=True)
class Support:
    """Whether this host can jail hypervisors, and what it has for it (for `doctor`)."""

    ok: bool
    reason: str
    cgroups: Cgroups

    def line(self, mode: Mode, uid_base: int) -> str:
        state = ("off (setting jail=off)" if mode is Mode.OFF
                 else "on" if self.ok else f"UNAVAILABLE: {self.reason}")
        kvm = ""
        with contextlib.suppress(OSError):
            if os.stat("/dev/kvm").st_mode & 0o060 != 0o060:
                kvm = "; /dev/kvm is root's only, so jailed QEMUs cannot use KVM (make it 0660 root:kvm)"
        return (f"{state}; uids/gids {uid_base + 1}-{uid_base + 2 * IDS - 1}; "
                f"{self.cgroups.describe()}; pid/mount/net namespaces; QEMU's seccomp sandbox{kvm}")


def support(cgroup_root: Path | None = None) -> Support:
    cg = detect_cgroups(cgroup_root)
    if os.geteuid() != 0:
        return Support(False, "mvm does not run as root", cg)
    if cg.missing:
        return Support(False, cg.describe(), cg)
    if not Path("/proc/self/ns/pid").exists():
        return Support(False, "the kernel has no PID namespaces", cg)
    return Support(True, "", cg)


def seccomp_works(binary: str) -> str | None:
    """None if QEMU starts with the jail's seccomp sandbox, else why not (for `doctor`)."""
    try:
        run([binary, "-sandbox", "on,obsolete=deny,elevateprivileges=deny,spawn=deny,resourcecontrol=deny",
             "-M", "none", "-nodefaults", "-display", "none", "-S", "-qmp", "stdio"],
            input=b'{"execute":"qmp_capabilities"}{"execute":"quit"}', timeout=30)
    except CommandFailed as e:
        return e.message
    return None
