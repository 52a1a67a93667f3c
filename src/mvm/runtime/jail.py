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
tests v2; mounted by mvm where its own view has none: `cgroups`), `spawn`, which runs
`jail_exec.py` (the launcher; see its docstring for why one), and the decision both backends
take at each start (`decide`), held to the host's verdict recorded once (`Verdict`).
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
from mvm.util import private
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
    #: None: /sys/fs/cgroup, or the hierarchies mvm mounts where this process sees none there
    cgroup_root: Path | None = None
    #: Where the host's verdict (can it jail?) is recorded; None: decided anew, not recorded
    record: Path | None = None


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


def detect_cgroups(root: Path = CGROUP_ROOT) -> Cgroups:
    """The hierarchies as found at `root`, mounting nothing: v2 when the unified hierarchy
    there offers every controller, else v1 hierarchies mounted as `root/<controller>` (as this
    host and systemd's hybrid layout have them)."""
    return _detect(root)


def cgroups(root: Path | None = None) -> Cgroups:
    """The hierarchies the jail uses. Given a root: as found there (a fake tree, in tests).
    Else /sys/fs/cgroup — or, where this process's view has no cgroup mounts there, the
    kernel's hierarchies mounted by mvm itself at PRIVATE_ROOT: `ip netns exec` (how a service
    manager or a test runs mvm inside a network namespace) mounts a /sys of its own without
    them, in a mount namespace of its own, where mvm's mounts stay. What any other process
    sees (its parent, PID 1) is never consulted: it proves nothing about this one."""
    if root is not None:
        return _detect(root)
    found = _detect(CGROUP_ROOT)
    if not found.missing:
        return found
    mounted = mount_private()
    return mounted if mounted is not None else found


#: Where mvm mounts the hierarchies it needs when its view of /sys/fs/cgroup has none.
PRIVATE_ROOT = Path("/run/mvm/cgroup")


def mount_private(base: Path = PRIVATE_ROOT) -> Cgroups | None:
    """Mount the hierarchies holding the jail's controllers under `base` (each once: a mount
    already there is reused) and describe them; None if the kernel lacks one of them or a
    mount fails (then the caller's own view says what is missing). v1 where the kernel has
    the controllers bound to v1 hierarchies (/proc/cgroups names a hierarchy; controllers
    bound together are mounted together), else v2."""
    hierarchies = kernel_hierarchies()
    if hierarchies is None or any(c not in hierarchies for c in CONTROLLERS):
        return None
    try:
        if all(hierarchies[c] == 0 for c in CONTROLLERS):  # on the unified hierarchy
            _mount(base / "unified", "cgroup2", None)
            cg = _detect(base / "unified")
            return cg if not cg.missing else None
        if any(hierarchies[c] == 0 for c in CONTROLLERS):
            return None  # split between v1 and v2: the jail uses one version
        roots = {}
        for c in CONTROLLERS:
            together = sorted(k for k, h in hierarchies.items() if h == hierarchies[c])
            d = base / ",".join(together)
            _mount(d, "cgroup", ",".join(together))
            roots[c] = d
    except (OSError, CommandFailed):
        return None
    return Cgroups(1, roots)


def kernel_hierarchies() -> dict[str, int] | None:
    """Enabled controller -> its v1 hierarchy's number (0: the unified hierarchy), from
    /proc/cgroups; None without it."""
    try:
        lines = Path("/proc/cgroups").read_text().splitlines()
    except OSError:
        return None
    out = {}
    for line in lines:
        f = line.split()
        if len(f) == 4 and not line.startswith("#") and f[3] == "1":
            out[f[0]] = int(f[1])
    return out


def _mount(d: Path, fstype: str, options: str | None) -> None:
    if _mounted_here(d, fstype):
        return
    private.mkdirs(d.parent.parent, 0o711)  # /run/mvm, as the runtime root is made
    private.mkdirs(d)
    run(["mount", "-t", fstype, *(["-o", options] if options else []), fstype, str(d)], timeout=10)


def _mounted_here(d: Path, fstype: str) -> bool:
    """Whether this process sees a mount of `fstype` at d (/proc/self/mountinfo)."""
    with contextlib.suppress(OSError):
        for line in Path("/proc/self/mountinfo").read_text().splitlines():
            fields = line.split(" - ", 1)
            if len(fields) == 2 and fields[0].split()[4] == str(d) and fields[1].split()[0] == fstype:
                return True
    return False


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
    """Whether this process can jail hypervisors now (root, the cgroup controllers — mounted
    by mvm where its view has none —, PID namespaces), and the cgroups it has for it."""

    ok: bool
    reason: str
    cgroups: Cgroups


def support(cgroup_root: Path | None = None) -> Support:
    cg = cgroups(cgroup_root) if os.geteuid() == 0 else detect_cgroups(cgroup_root or CGROUP_ROOT)
    if os.geteuid() != 0:
        return Support(False, "mvm does not run as root", cg)
    if cg.missing:
        return Support(False, cg.describe(), cg)
    if not Path("/proc/self/ns/pid").exists():
        return Support(False, "the kernel has no PID namespaces", cg)
    return Support(True, "", cg)


# -- once per host: can it jail? --------------------------------------------------------------

#: What each backend's jail needs beyond the host's support, in the verdict's words.
BACKENDS = {"qemu": "QEMU", "firecracker": "Firecracker"}


@dataclass(frozen=True)
class Verdict:
    """Whether this host can jail hypervisors, decided once — at `mvm setup` (or the first
    start of a state home where it has not run) — and recorded. On a host that can, a
    hypervisor that cannot be jailed at its start is refused: the jail never goes away
    without a word. On one that cannot, `jail auto` runs hypervisors unjailed and says so."""

    ok: bool
    reason: str  # why not, when not ok
    cgroups: str  # Cgroups.describe() when decided
    #: per backend: None when its own part of the jail works (QEMU's seccomp sandbox starts,
    #: Firecracker's jailer is on PATH), else why not
    backends: dict[str, str | None] = field(default_factory=dict)
    decided: float = 0.0

    def why_not(self, backend: str) -> str | None:
        """Why this host cannot jail `backend`'s hypervisors; None if it can."""
        if not self.ok:
            return self.reason
        return self.backends.get(backend)

    def line(self) -> str:
        if not self.ok:
            return f"this host cannot jail: {self.reason}"
        cannot = [f"{BACKENDS.get(b, b)}: {why}" for b, why in self.backends.items() if why]
        return "this host can jail" + (f" (but not {'; '.join(cannot)})" if cannot else "")

    def to_json(self) -> str:
        return json.dumps(self.__dict__, indent=2, sort_keys=True) + "\n"

    @classmethod
    def load(cls, path: Path) -> Verdict | None:
        """The recorded verdict; None if there is none (or it cannot be read)."""
        try:
            raw = json.loads(path.read_text())
            return cls(bool(raw["ok"]), str(raw["reason"]), str(raw["cgroups"]),
                       {str(k): (None if v is None else str(v)) for k, v in raw["backends"].items()},
                       float(raw["decided"]))
        except (OSError, ValueError, KeyError, TypeError, AttributeError):
            return None

    def save(self, path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(path.name + ".tmp")
        with os.fdopen(private.create(tmp), "w") as f:
            f.write(self.to_json())
        os.replace(tmp, path)


def decide_host(cgroup_root: Path | None = None, *, qemu: str = "qemu-system-x86_64",
                jailer: str = "jailer") -> Verdict:
    """Find out whether this host can jail (costs a QEMU start: its seccomp sandbox)."""
    from mvm.util.proc import which

    sup = support(cgroup_root)
    backends: dict[str, str | None] = {}
    if sup.ok:
        binary = which(qemu)
        why = seccomp_works(binary) if binary else f"{qemu} is not on PATH"
        backends["qemu"] = None if why is None else f"QEMU's seccomp sandbox does not work: {why}"
        backends["firecracker"] = None if which(jailer) else f"{jailer} is not on PATH"
    return Verdict(sup.ok, sup.reason, sup.cgroups.describe(), backends, time.time())


def host_verdict(cfg: Config) -> Verdict:
    """The recorded verdict (`cfg.record`), else one decided now — and recorded there (without
    a record: once per process)."""
    if cfg.record is None:
        if cfg.cgroup_root not in _DECIDED:
            _DECIDED[cfg.cgroup_root] = decide_host(cfg.cgroup_root)
        return _DECIDED[cfg.cgroup_root]
    if (v := Verdict.load(cfg.record)) is not None:
        return v
    v = decide_host(cfg.cgroup_root)
    v.save(cfg.record)
    return v


_DECIDED: dict[Path | None, Verdict] = {}


@dataclass(frozen=True)
class Jailing:
    """What a runtime does about the jail of a hypervisor it starts now."""

    jailed: bool
    why: str = ""  # why unjailed
    cgroups: Cgroups | None = None

    def line(self) -> str:
        return "jailed" if self.jailed else f"unjailed: {self.why}"


def decide(cfg: Config, backend: str, needs: str | None = None) -> Jailing:
    """Jailed, or unjailed and why, for a hypervisor of `backend` starting now; `needs`: what
    the backend itself misses now (Firecracker's jailer). Refuses (HostUnsupported, one line)
    when the jail is required and the host cannot jail, and whenever the host can jail — as
    recorded — but this start cannot be jailed: what is missing is named, nothing runs."""
    if cfg.mode is Mode.OFF:
        return Jailing(False, "setting jail=off")
    verdict = host_verdict(cfg)
    if (why := verdict.why_not(backend)) is not None:
        if cfg.mode is Mode.REQUIRED:
            raise HostUnsupported(f"the hypervisor jail is required (setting jail=required) but "
                                  f"cannot be set up here: {why}",
                                  "see `mvm doctor`; or `mvm config set jail auto` to run unjailed "
                                  "where the jail is unavailable")
        return Jailing(False, f"this host cannot jail {BACKENDS.get(backend, backend)}: {why}")
    now = support(cfg.cgroup_root)
    missing = needs if now.ok else now.reason
    if missing:
        raise HostUnsupported(f"cannot jail the hypervisor: {missing}",
                              "this host was found able to jail (see `mvm doctor`): restore what is "
                              "missing, or run `mvm setup` to decide again; `mvm config set jail off` "
                              "runs hypervisors unjailed")
    return Jailing(True, cgroups=now.cgroups)


def describe_host(mode: Mode, uid_base: int, verdict: Verdict | None, now: Support) -> str:
    """The jail as `doctor` shows it: the setting, the host's recorded verdict, what it sees now."""
    kvm = ""
    with contextlib.suppress(OSError):
        if os.stat("/dev/kvm").st_mode & 0o060 != 0o060:
            kvm = "; /dev/kvm is root's only, so jailed QEMUs cannot use KVM (make it 0660 root:kvm)"
    if mode is Mode.OFF:
        state = "off (setting jail=off): hypervisors run unjailed"
    elif verdict is None:
        state = (f"not decided yet (`mvm setup` decides it; else the first start): "
                 f"{'this host can jail now' if now.ok else f'now UNAVAILABLE: {now.reason}'}")
    elif not verdict.ok:
        state = (f"UNAVAILABLE: {verdict.line()}; " + ("starts are refused (setting jail=required)"
                 if mode is Mode.REQUIRED else "hypervisors run unjailed (setting jail=auto)"))
    else:
        state = f"on: {verdict.line()}"
        if not now.ok:
            state += f"; but NOT NOW: {now.reason}: starts are refused"
    return (f"{state}; uids/gids {uid_base + 1}-{uid_base + 2 * IDS - 1}; "
            f"{now.cgroups.describe()}; pid/mount/net namespaces; QEMU's seccomp sandbox{kvm}")


def seccomp_works(binary: str) -> str | None:
    """None if QEMU starts with the jail's seccomp sandbox, else why not (for `doctor`)."""
    try:
        run([binary, "-sandbox", "on,obsolete=deny,elevateprivileges=deny,spawn=deny,resourcecontrol=deny",
             "-M", "none", "-nodefaults", "-display", "none", "-S", "-qmp", "stdio"],
            input=b'{"execute":"qmp_capabilities"}{"execute":"quit"}', timeout=30)
    except CommandFailed as e:
        return e.message
    return None
