"""QemuRuntime against real guests: mvm's default kernel + initrd, a BusyBox rootfs with
mvm's guest files, asserted through the guest agent the way the host sees it. What needs no
guest (refusals, the status mapping, stop's fallback to quit) is shown on the QMP double:
tests/test_qemu_qmp.py.

Run with `pytest -m guest tests/test_qemu_runtime.py -s` to see the measured timings.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import replace
from pathlib import Path

import pytest

from mvm.errors import GuestError, RuntimeFailure
from mvm.guest.agent_client import GuestAgentClient
from mvm.guest.layout import install_guest_files
from mvm.image.kernel import (
    KernelInfo,
    KernelInstallFailed,
    install_default_kernel,
    load_kernel,
)
from mvm.runtime.base import MANIFEST, Disk, NetIf, SnapshotInfo, VmSpec, VmStatus
from mvm.runtime.qemu import QemuRuntime
from mvm.runtime.qemu.qmp import Qmp
from mvm.util import pids
from mvm.util.retry import until

pytestmark = [
    pytest.mark.guest,
    pytest.mark.skipif(shutil.which("qemu-system-x86_64") is None, reason="needs QEMU"),
]

READY_TIMEOUT = 90.0
ASSETS_HOME = Path(os.environ.get("MVM_ASSETS_HOME", "/var/lib/mvm"))


def mkfs(image: Path, label: str, size: str, content: Path | None = None) -> Path:
    argv = ["mkfs.ext4", "-q", "-F", "-L", label, "-E", "root_owner=0:0"]
    if content is not None:
        argv += ["-d", str(content)]
    subprocess.run([*argv, str(image), size], check=True, capture_output=True)
    return image


@pytest.fixture(scope="session")
def kernel(tmp_path_factory: pytest.TempPathFactory) -> KernelInfo:
    try:
        return load_kernel(ASSETS_HOME / "kernel")  # installed by `mvm setup`
    except KernelInstallFailed:
        return install_default_kernel(tmp_path_factory.mktemp("kernel"))


@pytest.fixture(scope="session")
def rootfs(tmp_path_factory: pytest.TempPathFactory) -> Path:
    d = tmp_path_factory.mktemp("rootfs")
    staging = d / "staging"
    (staging / "bin").mkdir(parents=True)
    shutil.copy2("/bin/busybox", staging / "bin" / "busybox")
    (staging / "bin" / "sh").symlink_to("busybox")
    install_guest_files(staging)
    return mkfs(d / "rootfs.ext4", "mvm-root", "32M", staging)


class Vms:
    """Makes specs, and on teardown makes sure nothing it booted outlives the test."""

    def __init__(self, rt: QemuRuntime, kernel: KernelInfo, rootfs: Path, tmp: Path) -> None:
        self.rt, self.kernel, self.rootfs, self.tmp = rt, kernel, rootfs, tmp
        self.specs: list[VmSpec] = []

    def spec(self, name: str = "vm", data: Path | None = None, **changes: object) -> VmSpec:
        d = self.tmp / name
        d.mkdir(exist_ok=True)
        if data is None:
            data = mkfs(d / "data.ext4", "mvm-data", "16M")
        s = VmSpec(name=name, vcpus=1, mem_mib=256, kernel=self.kernel.vmlinux,
                   initrd=self.kernel.initrd, cmdline=f"root=/dev/vda ro mvm.hostname={name}",
                   disks=(Disk("rootfs", self.rootfs, True), Disk("data", data, False)),
                   net=None, run_dir=d / "run")
        s = replace(s, **changes)  # type: ignore[arg-type]
        self.specs.append(s)
        return s

    def agent(self, spec: VmSpec) -> GuestAgentClient:
        return GuestAgentClient(self.rt.agent_socket(spec))

    def sh(self, spec: VmSpec, script: str, timeout: float = 20) -> str:
        with self.agent(spec) as a:
            r = a.exec(["sh", "-c", script], timeout)
        assert r.exit_code == 0, (script, r)
        return r.stdout.decode()

    def cleanup(self) -> None:
        for s in self.specs:
            self.rt.stop(s, 0)


@pytest.fixture
def vms(kernel: KernelInfo, rootfs: Path, tmp_path: Path) -> Iterator[Vms]:
    v = Vms(QemuRuntime("tcg"), kernel, rootfs, tmp_path)
    yield v
    v.cleanup()


def boot_ready(vms: Vms, spec: VmSpec) -> float:
    start = time.monotonic()
    vms.rt.boot(spec)
    with vms.agent(spec) as a:
        a.wait_ready(READY_TIMEOUT)
    return time.monotonic() - start


def leftovers(vms: Vms, spec: VmSpec) -> list[str]:
    """What a gone VM must not leave: its process, sockets, pid file."""
    out = [p.name for p in (vms.rt.qmp_socket(spec), vms.rt.agent_socket(spec),
                            vms.rt.pid_file(spec)) if p.exists()]
    if vms.rt.is_alive(spec):
        out.append("process")
    return out


def timed(fn: Callable[[], object]) -> float:
    start = time.monotonic()
    fn()
    return time.monotonic() - start


# ------------------------------------------------------------------------------- tests


def test_boot_runs_the_guest_with_our_devices_and_command_line(vms: Vms) -> None:
    spec = vms.spec()
    took = boot_ready(vms, spec)
    print(f"\ncold boot to agent ready: {took:.2f}s")
    assert vms.rt.status(spec) is VmStatus.RUNNING and vms.rt.is_alive(spec)
    cmdline = vms.sh(spec, "cat /proc/cmdline").split()
    assert "console=ttyS0,115200" in cmdline and cmdline.count("console=ttyS0,115200") == 1
    assert any(a.startswith("tsc_early_khz=") for a in cmdline)
    assert cmdline[-3:] == ["root=/dev/vda", "ro", "mvm.hostname=vm"]
    assert vms.sh(spec, "cat /sys/block/vda/ro /sys/block/vdb/ro") == "1\n0\n"
    assert "mvm-init: ready" in vms.rt.console_log(spec).read_text(errors="replace")


def test_pause_resume(vms: Vms) -> None:
    spec = vms.spec()
    boot_ready(vms, spec)
    t_pause = timed(lambda: vms.rt.pause(spec))
    assert vms.rt.status(spec) is VmStatus.PAUSED
    with vms.agent(spec) as a, pytest.raises(GuestError, match="did not answer"):
        a.exec(["true"], timeout=0.5)  # a paused guest runs nothing
    vms.rt.pause(spec)  # idempotent
    t_resume = timed(lambda: vms.rt.resume(spec))
    assert vms.rt.status(spec) is VmStatus.RUNNING
    with vms.agent(spec) as a:
        start = time.monotonic()
        a.wait_ready(10)
        answered = time.monotonic() - start
    statuses: list[VmStatus] = []
    threads = [threading.Thread(target=lambda: statuses.append(vms.rt.status(spec)))
               for _ in range(8)]  # QEMU serves one QMP client at a time: they queue
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    assert statuses == [VmStatus.RUNNING] * 8
    print(f"\npause {t_pause * 1000:.1f} ms, resume {t_resume * 1000:.1f} ms, "
          f"agent answers {answered * 1000:.1f} ms after resume")


def test_snapshot_ends_the_process_and_restore_keeps_memory_and_disks(vms: Vms) -> None:
    spec = vms.spec()
    boot_ready(vms, spec)
    # State that only survives if guest RAM does: a tmpfs counter and a live process.
    bump = "n=$(cat /run/counter 2>/dev/null || echo 0); echo $((n+1)) | tee /run/counter"
    assert vms.sh(spec, bump) == "1\n"
    assert vms.sh(spec, bump) == "2\n"
    sleeper = vms.sh(spec, "sleep 10000 >/dev/null 2>&1 & echo $!").strip()
    vms.sh(spec, "echo on-disk > /data/file")
    with vms.agent(spec) as a:
        a.sleep_prep()

    snap = spec.run_dir.parent / "snapshot"
    steps: list[str] = []
    t_snap = timed(lambda: vms.rt.snapshot(spec, snap, lambda n, t: steps.append(n)))
    assert steps == ["status", "pause", "prepare", "save", "commit", "quit"]
    assert leftovers(vms, spec) == []
    assert vms.rt.status(spec) is VmStatus.GONE
    info = SnapshotInfo.load(snap)
    memory = snap / info.memory_file
    size = memory.stat().st_size
    assert info.size_bytes == size and memory.read_bytes()[:4] == b"QEVM"
    assert 4 << 20 < size < (spec.mem_mib + 16) << 20  # zero pages are not stored
    assert (info.backend, info.mem_mib, info.vcpus) == ("qemu", 256, 1)
    assert info.devices == ("blk:rootfs:ro", "blk:data:rw", "agent")
    assert json.loads((snap / MANIFEST).read_text())["extra"]["accel"] == "tcg"

    steps.clear()
    t_restore = timed(lambda: vms.rt.restore(spec, snap, lambda n, t: steps.append(n)))
    assert steps == ["check", "run-dir", "spawn", "load"]
    # loaded, but the guest does not run until told: the caller first consumes the snapshot
    assert vms.rt.status(spec) is VmStatus.PAUSED
    vms.rt.resume(spec)
    assert vms.rt.status(spec) is VmStatus.RUNNING
    with vms.agent(spec) as a:
        start = time.monotonic()
        a.wake()
        t_answer = time.monotonic() - start
    assert vms.sh(spec, bump) == "3\n"
    assert vms.sh(spec, f"kill -0 {sleeper} && echo alive") == "alive\n"
    assert vms.sh(spec, "cat /data/file") == "on-disk\n"
    assert abs(float(vms.sh(spec, "date +%s")) - time.time()) < 3  # wake set the clock
    print(f"\nsnapshot {t_snap:.3f}s ({size / 1e6:.1f} MB), restore {t_restore:.3f}s, "
          f"agent answered {t_answer * 1000:.0f} ms later")

    vms.rt.stop(spec, 0)
    assert leftovers(vms, spec) == []
    assert vms.rt.console_log(spec).exists()  # kept for `instance logs`


def test_snapshot_of_a_paused_vm_and_failed_snapshot_leaves_it_paused(vms: Vms) -> None:
    spec = vms.spec()
    boot_ready(vms, spec)
    vms.rt.pause(spec)
    snap = spec.run_dir.parent / "snapshot"
    blocker = snap / "memory.tmp"
    blocker.mkdir(parents=True)  # the memory file cannot be created: save fails
    with pytest.raises((RuntimeFailure, OSError)):
        vms.rt.snapshot(spec, snap)
    assert vms.rt.status(spec) is VmStatus.PAUSED  # as it was, not lost
    assert not (snap / MANIFEST).exists()
    blocker.rmdir()
    vms.rt.snapshot(spec, snap)
    vms.rt.restore(spec, snap)
    vms.rt.resume(spec)
    with vms.agent(spec) as a:
        a.wait_ready(10)


def test_failed_snapshot_of_a_running_vm_resumes_it(vms: Vms,
                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    spec = vms.spec()
    boot_ready(vms, spec)

    real_commit = vms.rt._commit

    def broken_commit(*args: object) -> None:
        real_commit(*args)  # type: ignore[arg-type]
        raise OSError(28, "No space left on device")  # ...even after the manifest was written

    monkeypatch.setattr(vms.rt, "_commit", broken_commit)
    snap = spec.run_dir.parent / "snapshot"
    with pytest.raises(OSError, match="No space"):
        vms.rt.snapshot(spec, snap)
    assert vms.rt.status(spec) is VmStatus.RUNNING
    # The VM runs on and its disks move on: no snapshot may survive to be restored later.
    assert sorted(p.name for p in snap.iterdir()) == []
    with vms.agent(spec) as a:
        a.wait_ready(10)


def test_resume_cancels_a_snapshot_left_being_written(vms: Vms) -> None:
    """A `sleep` killed after handing QEMU the memory file leaves QEMU writing it; the
    recovery resumes the VM. Were the snapshot left to finish, QEMU would stop the vCPUs
    at its end (`postmigrate`) and the guest the store says runs would freeze."""
    resume_after_a_killed_snapshot(vms)


def resume_after_a_killed_snapshot(vms: Vms) -> None:
    """The sleep's command killed while QEMU writes the memory file (the resume cancels it),
    then killed after QEMU finished it (`postmigrate`: the resume re-activates the disks).
    Both times the guest runs on. (Also run jailed, by tests/test_jail_guest.py.)"""
    spec = vms.spec()
    boot_ready(vms, spec)

    def killed_sleep(bandwidth: int) -> Qmp:
        vms.rt.pause(spec)
        fd = os.open(spec.run_dir.parent / "memory.tmp", os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        q = Qmp(vms.rt.qmp_socket(spec))
        q.__enter__()
        q.execute("migrate-set-parameters", {"max-bandwidth": bandwidth})
        q.send_fd(fd, "killed-sleep")
        os.close(fd)
        q.execute("migrate", {"uri": "fd:killed-sleep"})
        return q

    def ended(q: Qmp) -> str | None:
        status: str = q.execute("query-migrate")["status"]
        return status if status in ("completed", "cancelled", "failed") else None

    q = killed_sleep(8 * 1024**2)  # seconds long
    assert q.execute("query-migrate")["status"] in ("setup", "active")
    q.__exit__(None, None, None)
    vms.rt.resume(spec)
    with Qmp(vms.rt.qmp_socket(spec)) as q:
        assert until(lambda: ended(q), 60, what="the snapshot's end") == "cancelled"
    time.sleep(0.5)
    assert vms.rt.status(spec) is VmStatus.RUNNING
    assert vms.sh(spec, "echo hi") == "hi\n"

    q = killed_sleep(64 * 1024**3)
    assert until(lambda: ended(q), 60, what="the snapshot's end") == "completed"
    q.__exit__(None, None, None)
    vms.rt.resume(spec)
    time.sleep(0.5)
    assert vms.rt.status(spec) is VmStatus.RUNNING
    assert vms.sh(spec, "echo again > /data/x && sync && cat /data/x") == "again\n"


def test_failed_boots_leave_nothing_behind(vms: Vms, tmp_path: Path) -> None:
    no_kernel = vms.spec("nokernel", kernel=tmp_path / "missing-vmlinux")
    with pytest.raises(RuntimeFailure, match=r"kernel .* does not exist"):
        vms.rt.boot(no_kernel)
    assert not no_kernel.run_dir.exists()

    bad_disk = vms.spec("baddisk", disks=(Disk("rootfs", vms.rootfs, True),
                                          Disk("data", tmp_path / "nope.ext4", False)))
    with pytest.raises(RuntimeFailure, match="disk 'data'"):
        vms.rt.boot(bad_disk)
    assert not bad_disk.run_dir.exists()

    # A failure only QEMU can see: a read-write image already locked by another VM.
    first = vms.spec("first")
    vms.rt.boot(first)
    data = first.disks[1].path
    second = vms.spec("second", data=data)
    with pytest.raises(RuntimeFailure, match=r"QEMU could not start second: .*lock"):
        vms.rt.boot(second)
    assert not second.run_dir.exists()
    assert vms.rt.status(first) is VmStatus.RUNNING  # the other VM is untouched


def test_a_failed_restore_leaves_nothing_and_keeps_the_snapshot(vms: Vms) -> None:
    spec = vms.spec()
    boot_ready(vms, spec)
    snap = spec.run_dir.parent / "snapshot"
    vms.rt.snapshot(spec, snap)
    memory = snap / "memory"
    good = memory.read_bytes()
    # Same size and magic, garbage after: the checksum tells (QEMU exits on this garbage too,
    # but a damaged file is the cause to tell)
    memory.write_bytes(good[:4] + os.urandom(4096) + good[4100:])
    with pytest.raises(RuntimeFailure, match="the snapshot of vm is damaged"):
        vms.rt.restore(spec, snap)
    assert leftovers(vms, spec) == []
    assert (snap / MANIFEST).exists() and memory.exists()
    # A manifest without checksums (an older mvm's): only QEMU can tell, and it exits.
    info = SnapshotInfo.load(snap)
    replace(info, checksums={}).write(snap)
    with pytest.raises(RuntimeFailure, match="could not load the snapshot") as e:
        vms.rt.restore(spec, snap)
    assert "QEMU: " in e.value.message  # QEMU's own reason, from its log
    assert leftovers(vms, spec) == []
    info.write(snap)
    memory.write_bytes(good)
    vms.rt.restore(spec, snap)
    vms.rt.resume(spec)
    with vms.agent(spec) as a:
        a.wait_ready(10)


def test_a_panicking_guest_ends_its_process(vms: Vms) -> None:
    spec = vms.spec()
    boot_ready(vms, spec)
    pid = vms.rt._pid(spec)
    assert pid is not None
    with vms.agent(spec) as a, pytest.raises(GuestError):
        a.exec(["sh", "-c", "echo c > /proc/sysrq-trigger"], timeout=3)
    assert pids.wait_gone(pid, 20)  # panic=-1 + -no-reboot: the process exits
    assert vms.rt.status(spec) is VmStatus.GONE
    vms.rt.stop(spec, 0)
    assert leftovers(vms, spec) == []


@pytest.fixture
def tap() -> Iterator[str]:
    if os.geteuid() != 0 or shutil.which("ip") is None:
        pytest.skip("needs root and iproute2 to create a TAP device")
    name = f"mvmt{uuid.uuid4().hex[:8]}"
    p = subprocess.run(["ip", "tuntap", "add", "dev", name, "mode", "tap"], capture_output=True)
    if p.returncode != 0:
        pytest.skip(f"cannot create a TAP device: {p.stderr.decode().strip()}")
    subprocess.run(["ip", "link", "set", name, "up"], check=True)
    yield name
    subprocess.run(["ip", "link", "del", name], capture_output=True)


def test_network_device_survives_snapshot_and_restore(vms: Vms, tap: str) -> None:
    mac = "52:54:00:12:34:56"
    spec = vms.spec(net=NetIf(tap, mac))
    boot_ready(vms, spec)
    assert vms.sh(spec, "cat /sys/class/net/eth0/address") == f"{mac}\n"
    snap = spec.run_dir.parent / "snapshot"
    vms.rt.snapshot(spec, snap)
    assert SnapshotInfo.load(snap).devices[-1] == f"net:{mac}"
    vms.rt.restore(spec, snap)
    vms.rt.resume(spec)
    assert vms.sh(spec, "cat /sys/class/net/eth0/address") == f"{mac}\n"
