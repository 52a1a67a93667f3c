"""What every backend does the same around a VM: before it boots or restores, check that the
files it is made of exist and make its run directory, registering the undo that leaves it as it
was; at the end, kill its hypervisor and clear what it left."""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from pathlib import Path

from mvm.errors import InvalidInput, RuntimeFailure
from mvm.runtime import console
from mvm.runtime.base import UndoSteps, VmSpec
from mvm.util import pids, private


def unlink(*paths: Path) -> None:
    for p in paths:
        with contextlib.suppress(FileNotFoundError):
            p.unlink()


#: What the runtime decided about the jail of the hypervisor it started last in a run
#: directory ("jailed", or "unjailed: why"): `Runtime.jail_of` reads it while that one lives.
JAIL_NOTE = "jail.state"


def jail_note_path(spec: VmSpec) -> Path:
    return spec.run_dir / JAIL_NOTE


def note_jail(spec: VmSpec, line: str) -> None:
    with open(private.create(jail_note_path(spec)), "w") as f:
        f.write(line + "\n")


def jail_note(spec: VmSpec) -> str | None:
    try:
        return jail_note_path(spec).read_text().strip() or None
    except OSError:
        return None


def check_inputs(spec: VmSpec) -> None:
    """The kernel, initrd and disks exist, and the VM has a vCPU and memory to run."""
    needed = [("kernel", spec.kernel)]
    if spec.initrd is not None:
        needed.append(("initrd", spec.initrd))
    needed += [(f"disk {d.id!r}", d.path) for d in spec.disks]
    for what, path in needed:
        if not path.is_file():
            raise RuntimeFailure(f"{spec.name}: {what} {path} does not exist",
                                 "rebuild the pool or restore the missing file")
    if spec.vcpus < 1 or spec.mem_mib < 16:
        raise InvalidInput(f"{spec.name}: {spec.vcpus} vCPUs / {spec.mem_mib} MiB is not a runnable VM")


def prepare(spec: VmSpec, steps: UndoSteps, fresh: bool, *, hypervisor: str, pid: int | None,
            log: Path, console_log: Path, cleanup: Callable[[], None]) -> None:
    """Refuse a VM whose hypervisor (`pid`) still runs; make its run directory and clear what
    a crashed hypervisor left (`cleanup`); `fresh`: a cold boot starts a new console log. The
    undo removes what this made: the hypervisor's `log`, a console log that was not there."""
    if pid is not None:
        raise RuntimeFailure(f"{spec.name} already runs ({hypervisor} pid {pid})", "stop the instance first")
    created = not spec.run_dir.exists()
    private.mkdirs(spec.run_dir)
    console_existed = console_log.exists() and not fresh

    def undo() -> None:
        cleanup()
        unlink(log)
        if not console_existed:
            console.remove(console_log)
        if created:
            with contextlib.suppress(OSError):
                spec.run_dir.rmdir()

    steps.on_undo("run-dir", undo)
    cleanup()  # leftovers of a crashed hypervisor
    if fresh:
        console.remove(console_log)
    console.mark(console_log)  # a failure's last words are this hypervisor's console only


def kill(spec: VmSpec, hypervisor: str, pid: int | None, timeout: float, *, cleanup: Callable[[], None]) -> None:
    """SIGKILL the VM's hypervisor (`pid`, if it runs), wait until it is gone, then `cleanup`."""
    if pid is not None:
        pids.kill(pid)
        if not pids.wait_gone(pid, timeout):
            raise RuntimeFailure(f"{hypervisor} pid {pid} of {spec.name} survived SIGKILL",
                                 "the host may be in trouble; check `dmesg`")
    cleanup()
