"""One hypervisor process per VM: what the QEMU and Firecracker backends do the same way.

Its process is found by its pid file, and when that is gone or lies, by the arguments that name
it on its command line (`/proc`, never `ps`). It is started under the jail when `jailing` says
so, with the console FIFO's read end handed to mvm's console logger once it runs; before it
starts the VM's files are checked and its run directory made (`rundir.prepare`), and at the end
it is killed and what it left cleared. Its log's last lines and the console's make the error
when it exits early. A snapshot is uncommitted first (the manifest removed), written into
temporary names, fsync'ed and renamed, checksummed, and committed by its manifest, written
last; before a restore the manifest is checked against the VM and every file against its
checksum, before any hypervisor loads it.
"""

from __future__ import annotations

import contextlib
import os
import time
from abc import abstractmethod
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TypeVar

from mvm.errors import RuntimeFailure
from mvm.guest.agent_client import GuestAgentClient
from mvm.guest.channels import VirtioSerialChannel, VsockChannel
from mvm.runtime import base, console, jail, rundir
from mvm.runtime.base import MANIFEST, Runtime, SnapshotInfo, UndoSteps, VmSpec, VmStatus, checksum
from mvm.util import pids, private
from mvm.util.text import printable

T = TypeVar("T")

CONSOLE_LOG = "console.log"
#: The memory file of a snapshot (every backend's first snapshot file).
MEMORY_FILE = "memory"
KILL_TIMEOUT = 10.0
_WAKE_HINT = "restart the instance cold instead of waking it"


def log_tail(path: Path, lines: int, max_bytes: int = 4096) -> list[str]:
    """The last `lines` lines of a hypervisor's log (its last `max_bytes`); none when unreadable."""
    try:
        with open(path, "rb") as f:
            f.seek(0, os.SEEK_END)
            f.seek(max(0, f.tell() - max_bytes))
            text = f.read().decode(errors="replace")
    except OSError:
        return []
    return text.strip().splitlines()[-lines:]


class HypervisorRuntime(Runtime):
    """A backend whose VM is one hypervisor process, driven over its control socket."""

    #: The hypervisor as messages name it ("QEMU", "Firecracker").
    hypervisor: str
    #: The files of a snapshot, the memory file first.
    snapshot_files: tuple[str, ...] = (MEMORY_FILE,)
    jail_config: jail.Config

    # -- what each backend says ---------------------------------------------------------------

    @abstractmethod
    def pid_file(self, spec: VmSpec) -> Path:
        """Where mvm (or the hypervisor) records the hypervisor's host pid."""

    @abstractmethod
    def hypervisor_log(self, spec: VmSpec) -> Path:
        """The hypervisor's own messages."""

    @abstractmethod
    def _identity(self, spec: VmSpec) -> tuple[str, str]:
        """The argument and value on the hypervisor's command line that name this VM's run."""

    @abstractmethod
    def _sockets(self, spec: VmSpec) -> tuple[Path, ...]:
        """The sockets a hypervisor leaves behind when it dies."""

    @abstractmethod
    def _said(self, spec: VmSpec) -> str:
        """What the hypervisor's log says went wrong last; '' when nothing."""

    @abstractmethod
    def _state(self, spec: VmSpec, deadline: float) -> VmStatus:
        """The VM's state as its live hypervisor answers it on its control socket."""

    @abstractmethod
    def _channel(self, spec: VmSpec, *, alive: Callable[[], bool], last_words: Callable[[], str],
                 unanswered: Callable[[], str]) -> VirtioSerialChannel | VsockChannel:
        """The guest agent's channel on this backend."""

    @abstractmethod
    def jailing(self) -> jail.Jailing:
        """Whether the hypervisor starting now is jailed, or refuses: see `jail.decide`."""

    def _remove_jail(self, spec: VmSpec) -> bool:
        """Remove what the jail of a dead hypervisor left in its run directory; whether it may
        have had a cgroup (then removed too)."""
        return True

    def _check_memory(self, memory: Path) -> None:
        """Refuse a snapshot's memory file that the hypervisor would misread (before checksums)."""

    # -- files and queries --------------------------------------------------------------------

    def console_log(self, spec: VmSpec) -> Path:
        return spec.run_dir / CONSOLE_LOG

    def _pid(self, spec: VmSpec) -> int | None:
        """Our hypervisor's pid: the one in its pid file when that process has our arguments;
        else (the file removed under it, or a stale one) by its command line in /proc."""
        flag, value = self._identity(spec)
        pid = pids.read_pid(self.pid_file(spec))
        if pid is not None and pids.is_running(pid) and pids.has_arg(pid, flag, value):
            return pid
        return pids.find_by_arg(flag, value)

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

    def status(self, spec: VmSpec) -> VmStatus:
        if not self.is_alive(spec):
            return VmStatus.GONE
        try:
            return self._state(spec, base.CONTROL_DEADLINE)
        except RuntimeFailure:
            if not self.is_alive(spec):  # it ended while asked
                return VmStatus.GONE
            raise

    def agent(self, spec: VmSpec) -> GuestAgentClient:
        return GuestAgentClient(self._channel(
            spec, alive=lambda: self.is_alive(spec), last_words=lambda: self._last_words(spec),
            unanswered=lambda: self.unanswered(spec)))

    def _last_words(self, spec: VmSpec) -> str:
        """What the hypervisor and the guest said last: for the error when it exits early."""
        parts = []
        if said := self._said(spec):
            parts.append(f"{self.hypervisor}: {said}")
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

    # -- the jail -----------------------------------------------------------------------------

    def jailed(self) -> bool:
        return self.jailing().jailed

    def jail_of(self, spec: VmSpec) -> str | None:
        return rundir.jail_note(spec) if self.is_alive(spec) else None

    def _describe_jail(self, spec: VmSpec, overhead_mib: int) -> jail.Description:
        """The VM's jail (shared by QEMU's launcher and Firecracker's jailer), its tenant's
        kernel and initrd made readable through the tenant's group."""
        desc = jail.describe(spec, self.jail_config.uid_base, overhead_mib)
        if desc.ids.groups:
            for f in (spec.kernel, spec.initrd):
                if f is not None:
                    jail.share_with_group(f, desc.ids.groups[0])
        return desc

    # -- start and end ------------------------------------------------------------------------

    def _check_inputs(self, spec: VmSpec) -> None:
        rundir.check_inputs(spec)

    def _prepare_run_dir(self, spec: VmSpec, steps: UndoSteps, fresh: bool) -> None:
        rundir.prepare(spec, steps, fresh, hypervisor=self.hypervisor, pid=self._pid(spec),
                       log=self.hypervisor_log(spec), console_log=self.console_log(spec),
                       cleanup=lambda: self._cleanup(spec))

    def _start(self, spec: VmSpec, steps: UndoSteps, plain: Callable[[], T],
               jailed: Callable[[jail.Cgroups], T]) -> T:
        """Start the hypervisor, under the jail when `jailing` says so (and note which, for
        `jail_of`). Its undo is registered first: a hypervisor that started but whose start
        timed out or failed later is still found and killed."""
        steps.on_undo("spawn", lambda: self._kill(spec))
        how = self.jailing()
        rundir.note_jail(spec, how.line())
        return plain() if how.cgroups is None else jailed(how.cgroups)

    @contextlib.contextmanager
    def _console_reader(self, spec: VmSpec, owner: tuple[int, int] | None = None) -> Iterator[int]:
        """The console FIFO's read end for the hypervisor started inside the block: closed if
        that fails, else handed to the console logger (which keeps the log within its cap)."""
        log = self.console_log(spec)
        reader = console.open_pipe(log, owner=owner)
        try:
            yield reader
        except BaseException:
            os.close(reader)
            raise
        console.start_logger(reader, log)  # (and closes the reader here)

    def kill(self, spec: VmSpec) -> None:
        self._kill(spec)

    def _kill(self, spec: VmSpec) -> None:
        rundir.kill(spec, self.hypervisor, self._pid(spec), KILL_TIMEOUT, cleanup=lambda: self._cleanup(spec))

    def _cleanup(self, spec: VmSpec) -> None:
        """Remove the files, jail and cgroup a dead hypervisor leaves; never while it lives."""
        if self._pid(spec) is not None:
            return
        rundir.unlink(*self._sockets(spec), self.pid_file(spec), rundir.jail_note_path(spec))
        console.settle(self.console_log(spec))  # its logger writes the last lines and ends
        console.remove_pipe(self.console_log(spec))
        if self._remove_jail(spec):
            # (whatever the setting says now: the VM may have been started jailed)
            with contextlib.suppress(RuntimeFailure):
                jail.remove_cgroup(jail.cgroups(self.jail_config.cgroup_root), jail.cgroup_name(spec))

    # -- the snapshot's skeleton ----------------------------------------------------------------

    def _prepare_snap_dir(self, snap_dir: Path, steps: UndoSteps) -> None:
        private.mkdirs(snap_dir)
        # Uncommit any older snapshot first: a manifest must never describe a half-written file.
        rundir.unlink(snap_dir / MANIFEST)
        # On failure no snapshot is left at all: the VM runs on, so its disks move on.
        steps.on_undo("prepare", lambda: rundir.unlink(
            *(snap_dir / f"{n}{t}" for n in self.snapshot_files for t in (".tmp", "")), snap_dir / MANIFEST))

    def _commit(self, spec: VmSpec, snap_dir: Path, started: float, extra: dict[str, str]) -> SnapshotInfo:
        """Make the written `<file>.tmp`s the snapshot (fsync, rename), then commit it: its
        manifest, with every file's checksum (just written: read from the page cache)."""
        for name in self.snapshot_files:
            tmp = snap_dir / f"{name}.tmp"
            with open(tmp, "rb") as f:
                os.fsync(f.fileno())
            os.chmod(tmp, 0o600)
            os.replace(tmp, snap_dir / name)
        memory = snap_dir / self.snapshot_files[0]
        info = SnapshotInfo(backend=self.name, memory_file=memory.name, mem_mib=spec.mem_mib,
                            vcpus=spec.vcpus, devices=spec.devices(), size_bytes=memory.stat().st_size,
                            created=time.time(), extra=extra, seconds=round(time.monotonic() - started, 4),
                            checksums={n: checksum(snap_dir / n) for n in self.snapshot_files})
        info.write(snap_dir)
        return info

    def _snapshot_names(self, info: SnapshotInfo) -> tuple[str, ...]:
        """The files a committed snapshot is made of, the memory file first."""
        return (info.memory_file,)

    def _check_snapshot(self, spec: VmSpec, snap_dir: Path) -> SnapshotInfo:
        """The committed snapshot in snap_dir, refused unless it fits the VM and its files are
        whole: there, the memory file of the size its manifest says, every checksum right."""
        info = SnapshotInfo.load(snap_dir)
        info.check_matches(spec, self.name)
        self._check_inputs(spec)
        for name in self._snapshot_names(info):
            if not (snap_dir / name).is_file():
                raise RuntimeFailure(f"snapshot file {snap_dir / name} is missing", _WAKE_HINT)
        memory = snap_dir / info.memory_file
        size = memory.stat().st_size
        if size != info.size_bytes:
            raise RuntimeFailure(f"snapshot memory file {memory} has {size} bytes, the manifest "
                                 f"says {info.size_bytes}", _WAKE_HINT)
        self._check_memory(memory)
        # Before any hypervisor loads it (or maps it: Firecracker reads the memory file lazily).
        info.verify(snap_dir, spec.name)
        return info
