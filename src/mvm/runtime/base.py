"""The runtime interface: what the layers above may ask of a hypervisor, and nothing more.

Every operation is expressible in Firecracker's API terms, so a second backend is a new
class, not a rewrite: boot = /machine-config + /boot-source + /drives + /network-interfaces
+ /actions InstanceStart; pause/resume = PATCH /vm; snapshot = PATCH /vm Paused +
/snapshot/create + exit; restore = a new process + /snapshot/load + PATCH /vm Resumed.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
import zlib
from abc import ABC, abstractmethod
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from enum import StrEnum
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

from mvm.errors import RuntimeFailure
from mvm.util import private
from mvm.util.progress import StepTimes

if TYPE_CHECKING:
    from mvm.guest.agent_client import GuestAgentClient

T = TypeVar("T")

#: Removes what one step created. Must be safe to call when that thing is already gone.
Undo = Callable[[], None]

MANIFEST = "snapshot.json"
#: How each snapshot file is checksummed when the snapshot is committed, and checked before
#: a restore: integrity against corruption on the host's disk (as ZFS's fletcher4 and btrfs's
#: crc32c are), not against root — whoever can write a snapshot can write its manifest. CRC-32
#: (zlib): ~4 GB/s here, where SHA-256 does ~1.7 and blake2b ~0.7; a wake pays it on every
#: restore (see `make bench`). The manifest names the algorithm with each value.
CHECKSUM = "crc32"
_CHUNK = 1 << 20
#: Seconds a live hypervisor has to answer its control socket (QMP, Firecracker's API) when
#: asked how it is: one that does not is unresponsive (hung, stopped, or its socket removed).
CONTROL_DEADLINE = 5.0
#: What a hypervisor holds beyond guest RAM when its backend does not say (the jail's own
#: figure for QEMU's code, heap, device state and I/O buffers: runtime/jail.MEM_OVERHEAD_MIB).
DEFAULT_MEM_OVERHEAD_MIB = 128


@dataclass(frozen=True)
class Disk:
    id: str
    path: Path
    read_only: bool
    #: Its name must go as soon as the hypervisor holds the file open (the clear-text secrets
    #: disk): a runtime that names it elsewhere too (Firecracker's chroot) removes that name then.
    transient: bool = False


@dataclass(frozen=True)
class NetIf:
    tap: str
    mac: str


@dataclass(frozen=True)
class JailIds:
    """Who a jailed hypervisor runs as: a uid and gid of its own, and supplementary groups
    (its tenant's, through which it reads the tenant's kernel and initrd)."""

    uid: int
    gid: int
    groups: tuple[int, ...] = ()


@dataclass(frozen=True)
class VmSpec:
    """One microVM as the hypervisor sees it. Disk order is device order: keep it stable."""

    name: str
    vcpus: int
    mem_mib: int
    kernel: Path
    initrd: Path | None
    #: Guest-contract parameters only; the backend adds its own hypervisor-specific ones.
    cmdline: str
    disks: tuple[Disk, ...]
    net: NetIf | None
    #: Sockets, pid file and console log live here (DESIGN §8 `instances/<i>/run/`).
    run_dir: Path
    #: The jail's identity (see runtime/jail.py); None: one derived from run_dir.
    ids: JailIds | None = None

    def devices(self) -> tuple[str, ...]:
        """The device list a snapshot depends on, in device order (see SnapshotInfo)."""
        out = [f"blk:{d.id}:{'ro' if d.read_only else 'rw'}" for d in self.disks]
        out.append("agent")
        if self.net is not None:
            out.append(f"net:{self.net.mac}")
        return tuple(out)


class VmStatus(StrEnum):
    RUNNING = "running"
    PAUSED = "paused"
    #: The hypervisor stopped the guest because a disk write failed on the host (e.g. a full
    #: disk); it lives, but the guest cannot go on.
    IO_ERROR = "io-error"
    #: The hypervisor lives but the guest cannot run: it panicked, shut down, or hit an
    #: internal error of the hypervisor.
    BROKEN = "broken"
    #: No hypervisor process (never started, stopped, snapshotted, or crashed).
    GONE = "gone"

    def is_live(self) -> bool:
        return self is not VmStatus.GONE

    def is_error(self) -> bool:
        return self in (VmStatus.IO_ERROR, VmStatus.BROKEN)


@dataclass(frozen=True)
class SnapshotInfo:
    """The manifest written last into a snapshot directory; its presence commits the snapshot."""

    backend: str
    #: File names inside the snapshot directory.
    memory_file: str
    mem_mib: int
    vcpus: int
    devices: tuple[str, ...]
    size_bytes: int
    created: float
    #: Backend-specific facts restore needs (e.g. QEMU's accelerator and CPU model).
    extra: dict[str, str] = field(default_factory=dict)
    seconds: float = 0.0
    #: File name -> "crc32:<hex>" of every file of the snapshot, taken as it was committed
    #: (`checksum`); a manifest of an older mvm has none, and its files are not checked.
    checksums: dict[str, str] = field(default_factory=dict)

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=2, sort_keys=True) + "\n"

    @classmethod
    def from_json(cls, text: str) -> SnapshotInfo:
        raw: dict[str, Any] = json.loads(text)
        raw["devices"] = tuple(raw["devices"])
        return cls(**raw)

    def write(self, snap_dir: Path) -> None:
        """Atomically write the manifest (tmp + fsync + rename)."""
        tmp = snap_dir / (MANIFEST + ".tmp")
        with os.fdopen(private.create(tmp), "w") as f:  # 0600, as every file of a tenant
            f.write(self.to_json())
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, snap_dir / MANIFEST)
        _fsync_dir(snap_dir)

    @classmethod
    def committed(cls, snap_dir: Path) -> bool:
        """Whether snap_dir holds a whole snapshot: a readable manifest and a memory file of
        the size it records (the manifest is written last, after the memory file's fsync)."""
        try:
            info = cls.load(snap_dir)
            return (snap_dir / info.memory_file).stat().st_size == info.size_bytes
        except (RuntimeFailure, OSError):
            return False

    @classmethod
    def load(cls, snap_dir: Path) -> SnapshotInfo:
        path = snap_dir / MANIFEST
        try:
            info = cls.from_json(path.read_text())
        except FileNotFoundError:
            raise RuntimeFailure(f"no snapshot in {snap_dir}",
                                 "the instance was never put to sleep, or its snapshot was "
                                 "removed; start it instead") from None
        except (ValueError, TypeError, KeyError) as e:
            raise RuntimeFailure(f"unreadable snapshot manifest {path}: {e}",
                                 "remove the snapshot directory and start the instance "
                                 "afresh") from e
        return info

    def check_file(self, snap_dir: Path, name: str, vm: str) -> None:
        """Refuse a snapshot file that is not what was written."""
        want = self.checksums.get(name)
        if want is None:
            return
        got = checksum(snap_dir / name, algorithm_of(want))
        if got != want:
            raise RuntimeFailure(
                f"the snapshot of {vm} is damaged: {snap_dir / name} does not match the checksum "
                f"taken when it was written",
                "the instance stays sleeping and the snapshot is kept for inspection; `mvm "
                "instance stop` discards it, then `mvm instance start` boots afresh, with the "
                "same data disk")

    def verify(self, snap_dir: Path, vm: str) -> None:
        """Refuse a snapshot any file of which does not match its checksum: before a restore,
        so that no hypervisor ever loads it (one pass over the files; ~0.06-0.12 of a wake
        here, see `make bench`)."""
        for name in sorted(self.checksums):
            self.check_file(snap_dir, name, vm)

    def check_matches(self, spec: VmSpec, backend: str) -> None:
        """Refuse a restore that cannot work: the hypervisor would fail later, less clearly."""
        problems = []
        if self.backend != backend:
            problems.append(f"taken by {self.backend}, restoring with {backend}")
        if self.mem_mib != spec.mem_mib:
            problems.append(f"memory {self.mem_mib} MiB at snapshot, {spec.mem_mib} MiB now")
        if self.vcpus != spec.vcpus:
            problems.append(f"{self.vcpus} vCPUs at snapshot, {spec.vcpus} now")
        if self.devices != spec.devices():
            problems.append(f"devices {list(self.devices)} at snapshot, "
                            f"{list(spec.devices())} now")
        if problems:
            raise RuntimeFailure(f"snapshot of {spec.name} does not fit its VM: "
                                 + "; ".join(problems),
                                 "restart the instance cold instead of waking it")


def checksum(path: Path, algorithm: str = CHECKSUM) -> str:
    """A snapshot file's checksum as the manifest records it: `<algorithm>:<hex>`, with CRC-32
    or any of hashlib's algorithms."""
    buf = bytearray(_CHUNK)
    view = memoryview(buf)
    with open(path, "rb", buffering=0) as f:
        if algorithm == "crc32":
            crc = 0
            while n := f.readinto(buf):
                crc = zlib.crc32(view[:n], crc)
            return f"crc32:{crc:08x}"
        h = hashlib.new(algorithm)
        while n := f.readinto(buf):
            h.update(view[:n])
        return f"{algorithm}:{h.hexdigest()}"


def algorithm_of(value: str) -> str:
    """The algorithm a manifest's checksum value was taken with."""
    return value.split(":", 1)[0]


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class UndoSteps:
    """An ordered run of named steps; what they created is undone, once, in reverse, on failure.

    Use as a context manager. Each step returns its value; `on_undo` registers how to remove
    what a step created. Leaving the block normally commits (undos are dropped); leaving it by
    an exception runs the undos and lets the exception propagate. An undo that itself fails is
    recorded as a note on the original exception instead of hiding it.
    """

    def __init__(self, what: str, progress: StepTimes | None = None, *,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.what = what
        self.progress = progress
        self.timings: list[tuple[str, float]] = []
        self._undos: list[tuple[str, Undo]] = []
        self._clock = clock
        self._started = clock()

    def run(self, name: str, fn: Callable[[], T]) -> T:
        start = self._clock()
        result = fn()
        took = self._clock() - start
        self.timings.append((name, took))
        if self.progress is not None:
            self.progress(name, took)
        return result

    def on_undo(self, name: str, undo: Undo) -> None:
        self._undos.append((name, undo))

    def total(self) -> float:
        return self._clock() - self._started

    def rollback(self, error: BaseException | None = None) -> None:
        undos, self._undos = self._undos, []
        for name, undo in reversed(undos):
            try:
                undo()
            except Exception as e:
                if error is not None:
                    error.add_note(f"while undoing {self.what} step {name!r}: {e}")

    def __enter__(self) -> UndoSteps:
        return self

    def __exit__(self, exc_type: object, exc: BaseException | None, tb: object) -> None:
        if exc is not None:
            self.rollback(exc)
        else:
            self._undos.clear()


class Runtime(ABC):
    """One hypervisor backend. Callers never reach past this to the hypervisor itself."""

    #: Short backend name, recorded in snapshot manifests ("qemu", "firecracker").
    name: str
    #: Whether a restored VM keeps the snapshot's memory file mapped for its whole life (as
    #: Firecracker does): its files may then be deleted only once no hypervisor runs.
    maps_snapshot_while_running: bool = False

    @abstractmethod
    def boot(self, spec: VmSpec, progress: StepTimes | None = None) -> None:
        """Start a fresh VM. Returns once the hypervisor runs the guest; the caller then waits
        for the guest agent. On failure nothing is left behind (process, socket or file)."""

    @abstractmethod
    def pause(self, spec: VmSpec) -> None:
        """Stop the vCPUs; RAM stays resident. Idempotent."""

    @abstractmethod
    def resume(self, spec: VmSpec) -> None:
        """Run the vCPUs again. Idempotent."""

    @abstractmethod
    def snapshot(self, spec: VmSpec, snap_dir: Path,
                 progress: StepTimes | None = None) -> SnapshotInfo:
        """Pause if needed, save memory and device state into snap_dir with a manifest, then
        end the hypervisor process (freeing its RAM). The caller syncs the guest's disks first.
        On failure the VM is left as it was (running or paused) and no manifest is written."""

    @abstractmethod
    def restore(self, spec: VmSpec, snap_dir: Path, progress: StepTimes | None = None) -> None:
        """Start a new process with identical devices and load the snapshot, leaving the vCPUs
        paused: the guest runs only at `resume`, so the caller can first record that the
        snapshot is consumed. Disks must be exactly as at snapshot time. On failure nothing is
        left behind; the snapshot stays."""

    @abstractmethod
    def stop(self, spec: VmSpec, timeout: float) -> None:
        """Ask the guest to power off, wait up to `timeout`, then force. Always leaves no
        process, socket or pid file; the console log is kept. Safe when nothing runs."""

    def kill(self, spec: VmSpec) -> None:
        """End the hypervisor at once, asking it nothing (it may not answer), and clear what it
        left, as `stop` does. Safe when nothing runs."""
        self.stop(spec, 0)

    @abstractmethod
    def status(self, spec: VmSpec) -> VmStatus:
        """Running, paused, or gone — from the hypervisor, not from what we last asked. A live
        hypervisor that does not answer its control socket within `CONTROL_DEADLINE` seconds
        (read when called) raises RuntimeFailure saying so."""

    def unanswered(self, spec: VmSpec) -> str:
        """Why the VM's live hypervisor does not answer its control socket; '' when it answers
        (within `CONTROL_DEADLINE`) or is gone."""
        try:
            self.status(spec)
        except RuntimeFailure as e:
            return e.message
        return ""

    @abstractmethod
    def is_alive(self, spec: VmSpec) -> bool:
        """Whether this VM's own hypervisor process exists (pid file + /proc, never `ps`)."""

    @abstractmethod
    def agent_socket(self, spec: VmSpec) -> Path:
        """The host end of the guest agent channel (a Unix stream socket to connect to)."""

    @abstractmethod
    def agent(self, spec: VmSpec) -> GuestAgentClient:
        """A client of the VM's guest agent over this backend's channel (virtio-serial for
        QEMU, vsock for Firecracker), whose waits end early, with the console's last lines,
        when the hypervisor exits."""

    @abstractmethod
    def console_log(self, spec: VmSpec) -> Path:
        """Where the guest's serial console is written."""

    def pid(self, spec: VmSpec) -> int | None:
        """The host pid of this VM's hypervisor process, if it runs (for measuring its CPU
        time: the agent's idle policy); None when the backend cannot tell."""
        return None

    def jail_of(self, spec: VmSpec) -> str | None:
        """Whether this VM's running hypervisor is jailed, as decided at its start: "jailed" or
        "unjailed: <why>"; None when none runs, or the backend cannot tell."""
        return None

    def mem_overhead(self) -> int:
        """MiB a VM's hypervisor holds beyond guest RAM (admission counts it with the RAM).
        A backend that knows better (QEMU: its jail's figure, with the TCG cache) says so."""
        return DEFAULT_MEM_OVERHEAD_MIB
