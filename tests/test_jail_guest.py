"""Jailed QEMU on real guests: what the host sees of the hypervisor process (its ids,
capabilities, seccomp, cgroup, the filesystem it sees), and that boot, pause, snapshot,
restore, a crash and stop work jailed and leave nothing behind. The cgroups are v1 here."""

from __future__ import annotations

import json
import os
import shutil
import signal
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from mvm.errors import RuntimeFailure
from mvm.image.kernel import KernelInfo
from mvm.runtime import jail
from mvm.runtime.base import JailIds, VmSpec, VmStatus
from mvm.runtime.qemu import QemuRuntime
from mvm.util import pids
from tests.conftest import Mvm, instances_by_state, needs_assets, sh
from tests.test_agent import _events, _pool
from tests.test_qemu_runtime import (  # noqa: F401
    Vms,
    boot_ready,
    kernel,
    leftovers,
    resume_after_a_killed_snapshot,
    rootfs,
)

pytestmark = [
    pytest.mark.guest,
    pytest.mark.skipif(shutil.which("qemu-system-x86_64") is None, reason="needs QEMU"),
    pytest.mark.skipif(not jail.support().ok, reason=f"no jail here: {jail.support().reason}"),
]

BASE = jail.UID_BASE
TENANT_GID = BASE + 10


def status(pid: int) -> dict[str, str]:
    lines = Path(f"/proc/{pid}/status").read_text().splitlines()
    return {k: v.strip() for k, _, v in (ln.partition(":") for ln in lines)}


def cgroup_dirs(pid: int) -> dict[str, Path]:
    """The v1 cgroup directories of a process, by controller."""
    out = {}
    for line in Path(f"/proc/{pid}/cgroup").read_text().splitlines():
        _, ctrls, path = line.split(":", 2)
        for c in ctrls.split(","):
            if c in jail.CONTROLLERS:
                out[c] = Path("/sys/fs/cgroup", c) / path.lstrip("/")
    return out


def processes_of(uid: int, home: Path | None = None) -> list[int]:
    """Live processes running as `uid` (of `home` only, when given: jail ids are numbered per
    state home, so another test's home may use the same uid at the same time)."""
    out = []
    for p in os.listdir("/proc"):
        if p.isdigit():
            try:
                if status(int(p))["Uid"].split()[0] == str(uid) and pids.is_running(int(p)) and (
                        home is None or str(home).encode() in Path(f"/proc/{p}/cmdline").read_bytes()):
                    out.append(int(p))
            except (OSError, KeyError):
                continue
    return out


@pytest.fixture
def jvms(kernel: KernelInfo, rootfs: Path, tmp_path: Path) -> Iterator[Vms]:  # noqa: F811
    rt = QemuRuntime("tcg", jail_config=jail.Config(jail.Mode.REQUIRED))
    v = Vms(rt, kernel, rootfs, tmp_path)
    yield v
    v.cleanup()


def test_a_jailed_qemu_resumes_after_a_killed_snapshot(jvms: Vms) -> None:
    """The snapshot cancelled (or finished) under a jailed QEMU, whose disks are descriptor
    sets: resuming re-activates them (QEMU's own image locks would refuse it)."""
    resume_after_a_killed_snapshot(jvms)


def tenant_kernel(k: KernelInfo, tmp: Path) -> tuple[Path, Path]:
    """The kernel as a tenant's revision holds it: root's, 0600, in a 0700 directory."""
    d = tmp / "tenants" / "acme"
    d.mkdir(parents=True, mode=0o700)
    out = []
    for src in (k.vmlinux, k.initrd):
        assert src is not None
        dst = d / src.name
        shutil.copyfile(src, dst)
        dst.chmod(0o600)
        out.append(dst)
    return out[0], out[1]


def test_a_jailed_qemu_is_unprivileged_limited_sees_only_its_own_files_and_works(
        jvms: Vms, kernel: KernelInfo, tmp_path: Path) -> None:  # noqa: F811
    vmlinux, initrd = tenant_kernel(kernel, tmp_path)
    ids = JailIds(BASE + 11, BASE + 11, (TENANT_GID,))
    spec = jvms.spec("vm", kernel=vmlinux, initrd=initrd, ids=ids)
    other: VmSpec = jvms.spec("other")  # another instance's files, on the host
    other.run_dir.mkdir()
    (other.run_dir / "console.log").write_text("other's console")
    boot_ready(jvms, spec)

    pid = pids.read_pid(jvms.rt.pid_file(spec))
    assert pid is not None and jvms.rt.is_alive(spec)
    st = status(pid)
    assert st["Uid"].split() == [str(BASE + 11)] * 4 and st["Gid"].split() == [str(BASE + 11)] * 4
    assert st["Groups"].split() == [str(TENANT_GID)]
    assert (st["CapEff"], st["CapPrm"], st["CapBnd"]) == ("0000000000000000",) * 3
    assert (st["Seccomp"], st["NoNewPrivs"]) == ("2", "1")
    assert st["NSpid"].split() == [str(pid), "1"]  # pid 1 of its own PID namespace
    # the tenant's kernel: readable by the tenant's group only
    assert (vmlinux.stat().st_gid, vmlinux.stat().st_mode & 0o777) == (TENANT_GID, 0o640)

    cg = cgroup_dirs(pid)
    assert set(cg) == {"cpu", "memory", "pids"} and all(d.parent.name == "mvm" for d in cg.values())
    limit = int((cg["memory"] / "memory.limit_in_bytes").read_text())
    assert limit == (256 + jvms.rt.mem_overhead_mib("tcg")) << 20 == (256 + 128 + 64) << 20
    assert int((cg["pids"] / "pids.max").read_text()) == jail.PIDS_BASE + 1
    assert int((cg["cpu"] / "cpu.cfs_quota_us").read_text()) == 150_000

    root = Path(f"/proc/{pid}/root")
    assert (root / str(vmlinux).lstrip("/")).is_file()  # its kernel, by path
    for gone in (*(d.path for d in spec.disks), other.run_dir / "console.log",
                 *(d.path for d in other.disks), Path("/etc/passwd"), Path("/var/lib/mvm"),
                 jvms.rt.qmp_socket(spec), jvms.rt.console_log(spec)):
        assert not (root / str(gone).lstrip("/")).exists(), gone
    assert (root / str(spec.run_dir).lstrip("/") / "qemu.pid").read_text().strip() == "1"
    with pytest.raises(OSError):
        (root / "usr" / "jail-probe").write_text("x")  # read-only, even for root

    # pause, snapshot and restore, jailed; the guest's memory survives
    jvms.rt.pause(spec)
    assert jvms.rt.status(spec) is VmStatus.PAUSED
    jvms.rt.resume(spec)
    assert jvms.sh(spec, "echo 41 > /run/n; cat /run/n") == "41\n"
    with jvms.agent(spec) as a:
        a.sleep_prep()
    jvms.rt.snapshot(spec, spec.run_dir.parent / "snap")
    assert leftovers(jvms, spec) == [] and processes_of(BASE + 11) == []
    assert all(not d.exists() for d in cg.values())
    jvms.rt.restore(spec, spec.run_dir.parent / "snap")
    jvms.rt.resume(spec)
    with jvms.agent(spec) as a:
        a.wake()
    assert jvms.sh(spec, "cat /run/n") == "41\n"
    woken = pids.read_pid(jvms.rt.pid_file(spec))
    assert woken is not None and woken != pid and status(woken)["Seccomp"] == "2"
    assert status(woken)["Uid"].split()[0] == str(BASE + 11)

    # found by its command line when its pid file is gone (the run dir removed under it)
    jvms.rt.pid_file(spec).unlink()
    assert jvms.rt.is_alive(spec) and jvms.rt.status(spec) is VmStatus.RUNNING

    # a crash: what the dead hypervisor leaves is cleaned up by the next stop
    os.kill(woken, signal.SIGKILL)
    assert pids.wait_gone(woken, 30)
    assert jvms.rt.status(spec) is VmStatus.GONE
    jvms.rt.stop(spec, 0)
    assert leftovers(jvms, spec) == [] and processes_of(BASE + 11) == []
    assert all(not d.exists() for d in cgroup_dirs_named(jail.cgroup_name(spec)))
    assert not jail.jail_root(spec).exists()


def test_a_jailed_qemu_that_cannot_start_says_why_in_one_line_and_leaves_nothing(
        jvms: Vms, tmp_path: Path) -> None:
    bad = tmp_path / "private-vmlinux"  # root's own, 0600, and no group given to share it
    bad.write_bytes(b"\0" * 4096)
    bad.chmod(0o600)
    spec = jvms.spec("vm", kernel=bad, initrd=None)
    with pytest.raises(RuntimeFailure) as e:
        jvms.rt.boot(spec)
    first = e.value.message.splitlines()[0]
    # (QEMU may serve QMP before it fails to load the kernel: then it "exited right after starting")
    assert first.startswith(("QEMU could not start vm in its jail: ", "QEMU for vm exited right after"))
    assert "could not open kernel file" in first and "Permission denied" in first, first
    assert len(first) < 300
    assert leftovers(jvms, spec) == [] and not spec.run_dir.exists()
    assert all(not d.exists() for d in cgroup_dirs_named(jail.cgroup_name(spec)))


def cgroup_dirs_named(name: str) -> list[Path]:
    return jail.detect_cgroups().dirs(name)


@needs_assets("kernel", "nixpkgs-offline")
@pytest.mark.nix
def test_pool_scale_runs_jailed_instances(gmvm: Mvm, app_pool: None) -> None:
    gmvm.ok("pool", "scale", "acme/workers", "--running", "1")
    inst = instances_by_state(gmvm, "acme/workers")["running"][0]
    iid = inst.split("/")[-1]
    idir = gmvm.home / "tenants/acme/pools/workers/instances" / iid
    pid = pids.read_pid(idir / "run" / "qemu.pid")
    assert pid is not None
    st = status(pid)
    uid = int(st["Uid"].split()[0])
    assert uid > BASE and st["Gid"].split()[0] == str(uid) and st["Seccomp"] == "2"
    assert st["CapEff"] == "0000000000000000" and len(st["Groups"].split()) == 1
    mem = cgroup_dirs(pid)["memory"]
    assert int((mem / "memory.limit_in_bytes").read_text()) == (256 + 128 + 64) << 20
    root = Path(f"/proc/{pid}/root")
    assert not (root / str(idir / "data.ext4").lstrip("/")).exists()
    assert not (root / str(gmvm.home / "mvm.db").lstrip("/")).exists()
    assert sh(gmvm, inst, "cat /run/secrets/secrets.json").rc == 0
    gmvm.ok("instance", "sleep", inst)
    assert not mem.exists()
    gmvm.ok("instance", "wake", inst)
    assert sh(gmvm, inst, "echo ok").out == "ok\n"
    woken = pids.read_pid(idir / "run" / "qemu.pid")
    assert woken is not None and status(woken)["Uid"].split()[0] == str(uid)  # the same ids
    assert any(iid in p.name for p in Path("/sys/fs/cgroup/memory/mvm").iterdir())
    os.kill(woken, signal.SIGKILL)  # a hypervisor that dies: observing cleans up its jail
    assert pids.wait_gone(woken, 30)
    assert "hypervisor process exited unexpectedly" in gmvm.ok("instance", "observe", "acme/workers").out
    assert not any(iid in p.name for p in Path("/sys/fs/cgroup/memory/mvm").iterdir())
    gmvm.ok("pool", "scale", "acme/workers", "--running", "1")
    gmvm.ok("pool", "scale", "acme/workers", "--running", "0")
    assert processes_of(uid, gmvm.home) == []
    assert not any(iid in p.name for p in Path("/sys/fs/cgroup/memory/mvm").iterdir())


@needs_assets("kernel", "builtin-flake", "nixpkgs-offline")
@pytest.mark.nix
@pytest.mark.net
def test_an_agent_started_as_a_service_jails_its_hypervisors(gmvm: Mvm, tmp_path: Path) -> None:
    """`ip netns exec NS mvm agent serve` as a service manager starts it (its parent PID 1, a /sys
    without cgroup mounts): the QEMUs it starts and wakes are jailed, and their events and
    `instance info` (directly and through the agent) say so."""
    from tests.test_jail import start_as_a_service

    _pool(gmvm, "acme/w")
    assert gmvm.ns
    argv = ["ip", "netns", "exec", gmvm.ns, sys.executable, "-m", "mvm.cli.main", "agent", "serve",
            "--interval", "1"]
    log = tmp_path / "agent.log"
    agent = start_as_a_service(argv, log, gmvm.env)
    try:
        sock = gmvm.home / "agent" / "api.sock"
        deadline = time.monotonic() + 60
        while not sock.exists():
            assert pids.is_running(agent) and time.monotonic() < deadline, log.read_text()
            time.sleep(0.1)
        assert status(agent)["PPid"] == "1"
        through = Mvm(gmvm.home, ns=gmvm.ns)
        through.env["MVM_AGENT"] = str(sock)
        through.ok("pool", "scale", "acme/w", "--running", "1")
        inst = instances_by_state(gmvm, "acme/w")["running"][0]
        idir = gmvm.home / "tenants/acme/pools/w/instances" / inst.split("/")[-1]
        for woken in (False, True):
            pid = pids.read_pid(idir / "run" / "qemu.pid")
            assert pid is not None
            st = status(pid)
            assert int(st["Uid"].split()[0]) > BASE and st["CapEff"] == "0000000000000000", st
            assert st["Seccomp"] == "2" and len(st["NSpid"].split()) == 2, st  # pid 1 of its own
            cg = cgroup_dirs(pid)
            assert set(cg) == {"cpu", "memory", "pids"} and all(d.parent.name == "mvm" for d in cg.values())
            assert int((cg["memory"] / "memory.limit_in_bytes").read_text()) == (256 + 128 + 64) << 20
            for m in (gmvm, through):  # the CLI's view and the API's
                assert json.loads(m.ok("instance", "info", inst, "--json").out)["jail"] == "jailed"
            kind = "instance.wake" if woken else "instance.start"
            assert [msg.endswith("; jailed") for _, msg, _ in _events(gmvm, kind)] == [True], _events(gmvm, kind)
            if not woken:  # (the agent holds the pool at its counts: scaled, not slept by hand)
                through.ok("pool", "scale", "acme/w", "--running", "0", "--sleeping", "1")
                through.ok("pool", "scale", "acme/w", "--running", "1")
                assert instances_by_state(gmvm, "acme/w") == {"running": [inst]}
        assert sh(gmvm, inst, "echo ok").out == "ok\n"
    finally:
        os.kill(agent, signal.SIGTERM)
        assert pids.wait_gone(agent, 60)
