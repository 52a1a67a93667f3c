"""The hypervisor jail as data: QEMU's jailed command line, the jail's description, cgroups v2
on a fake tree (this host has v1, exercised for real in test_jail_guest.py), ids, file sharing,
and a required jail refused on a host that cannot set it up."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

from mvm.errors import HostUnsupported
from mvm.runtime import jail
from mvm.runtime.base import Disk, JailIds, NetIf, VmSpec
from mvm.runtime.qemu import SANDBOX, QemuRuntime, argv
from mvm.store import SqliteStore

FDS = jail.Fds(disks=((10,), (11, 12)), agent=13, qmp=14, console=15, tap=16)


def spec(tmp: Path, name: str = "i-00000001", **kw: object) -> VmSpec:
    base = dict(name=name, vcpus=2, mem_mib=256, kernel=tmp / "k" / "vmlinux", initrd=tmp / "k" / "initrd",
                cmdline="root=/dev/vda ro",
                disks=(Disk("rootfs", tmp / "rev" / "rootfs.ext4", True),
                       Disk("data", tmp / name / "data.ext4", False)),
                net=NetIf("mvt1", "02:6d:76:00:00:03"), run_dir=tmp / "run" / name)
    base.update(kw)
    return VmSpec(**base)  # type: ignore[arg-type]


def devices(args: list[str]) -> list[str]:
    return [args[k + 1].split(",")[0] for k, a in enumerate(args) if a == "-device"]


def test_jailed_argv_opens_nothing_of_the_vm_by_path_but_kernel_and_initrd(tmp_path: Path) -> None:
    s = spec(tmp_path)
    plain = argv(s, "tcg", tsc_khz=None)
    jailed = argv(s, "tcg", tsc_khz=None, fds=FDS)
    text = " ".join(jailed)
    assert jailed[jailed.index("-sandbox") + 1] == SANDBOX == (
        "on,obsolete=deny,elevateprivileges=deny,spawn=deny,resourcecontrol=deny")
    assert "-daemonize" not in jailed and "-D" not in jailed  # foreground, messages on stderr
    for d in s.disks:
        assert str(d.path) not in text
    assert str(s.run_dir / "qmp.sock") not in text and "console.log" not in text
    assert "ifname=" not in text and "tap,id=net0,fd=16" in jailed
    # read-only disk: one O_RDONLY fd; read-write disk: O_RDWR and O_RDONLY, same fdset
    pairs = [jailed[k + 1] for k, a in enumerate(jailed) if a == "-add-fd"]
    assert pairs == ["fd=10,set=1", "fd=11,set=2", "fd=12,set=2", "fd=15,set=3"]
    drives = [jailed[k + 1] for k, a in enumerate(jailed) if a == "-drive"]
    assert [d.split(",")[0] for d in drives] == ["file=/dev/fdset/1", "file=/dev/fdset/2"]
    assert "socket,id=agent,fd=13,server=on,wait=off" in jailed
    assert "socket,id=qmp,fd=14,server=on,wait=off" in jailed
    assert "file,id=console,path=/dev/fdset/3,append=on" in jailed
    # what a snapshot depends on is unchanged: the same devices in the same order
    assert devices(jailed) == devices(plain)
    # the kernel by path (QEMU 7.2 cannot load it from an fd); the pid file path names the VM
    assert jailed[jailed.index("-kernel") + 1] == str(s.kernel)
    assert jailed[jailed.index("-pidfile") + 1] == str(s.run_dir / "qemu.pid")
    assert argv(s, "tcg", True, tsc_khz=None, fds=FDS)[-3:] == ["-incoming", "defer", "-S"]


def test_the_jail_sees_system_files_read_only_its_kernel_and_nothing_of_other_vms(tmp_path: Path) -> None:
    s = spec(tmp_path)
    other = spec(tmp_path, "i-00000002")
    ids = JailIds(1900000005, 1900000005, (1900000001,))
    p = jail.plan(s, ["/usr/bin/qemu-system-x86_64", "-name", "x"], ids, FDS,
                  cgroup_procs=[Path("/sys/fs/cgroup/memory/mvm/x/cgroup.procs")],
                  pid_file=s.run_dir / "qemu.pid", qmp_socket=s.run_dir / "qmp.sock",
                  log=s.run_dir / "qemu.log")
    assert (p.uid, p.gid, p.groups) == (1900000005, 1900000005, [1900000001])
    by_dst = {b.dst: b for b in p.binds}
    assert by_dst[str(s.kernel)] == jail.Bind(str(s.kernel), str(s.kernel))  # read-only
    assert by_dst[str(s.initrd)].rw is False
    assert by_dst["/usr/bin/qemu-system-x86_64"].rw is False
    assert by_dst["/usr/lib"].rw is False and by_dst["/usr/share/qemu"].rw is False
    writable = {b.dst for b in p.binds if b.rw}
    assert writable == {d for d in jail.DEVICES if os.path.exists(d)}  # device nodes only
    assert all(b.device for b in p.binds if b.rw)
    assert "/dev/kvm" not in by_dst
    seen = " ".join([*by_dst, *p.private_dirs])
    for d in (*s.disks, *other.disks):
        assert str(d.path) not in seen
    assert str(other.run_dir) not in seen and str(tmp_path / "rev") not in seen
    assert p.private_dirs == [str(s.run_dir)]  # QEMU's own pid file, invisible to the host
    assert p.root == str(s.run_dir / "jail") and p.netns
    assert p.fds == FDS.all() and p.pid_file == str(s.run_dir / "qemu.pid")
    kvm = jail.plan(s, ["/usr/bin/qemu-system-x86_64"], ids, FDS, cgroup_procs=[], kvm=True,
                    pid_file=s.run_dir / "p", qmp_socket=s.run_dir / "q", log=s.run_dir / "l")
    assert "/dev/kvm" in {b.dst for b in kvm.binds} or not os.path.exists("/dev/kvm")


def fake_v2(root: Path, controllers: str = "cpuset cpu io memory hugetlb pids rdma misc") -> Path:
    root.mkdir()
    (root / "cgroup.controllers").write_text(controllers + "\n")
    (root / "cgroup.subtree_control").write_text("")
    (root / "cgroup.procs").write_text("")
    return root


def test_cgroup_v2_on_a_fake_tree(tmp_path: Path) -> None:
    root = fake_v2(tmp_path / "cg")
    cg = jail.detect_cgroups(root)
    assert (cg.version, cg.missing) == (2, ())
    s = spec(tmp_path)
    lim = jail.limits(s, overhead_mib=192)
    # the parent's subtree_control must exist before its children do (cgroupfs makes it)
    (root / "mvm").mkdir()
    (root / "mvm" / "cgroup.subtree_control").write_text("")
    procs = jail.create_cgroup(cg, "i-00000001-abc", lim)
    d = root / "mvm" / "i-00000001-abc"
    assert procs == [d / "cgroup.procs"]
    assert (root / "cgroup.subtree_control").read_text().split() == ["+cpu", "+memory", "+pids"]
    assert (root / "mvm" / "cgroup.subtree_control").read_text().split() == ["+cpu", "+memory", "+pids"]
    assert (d / "memory.max").read_text() == str((256 + 192) << 20)
    assert (d / "cpu.max").read_text() == "250000 100000"  # 2 vCPUs + half a core for QEMU
    assert (d / "cpu.weight").read_text() == "200"
    assert (d / "pids.max").read_text() == str(jail.PIDS_BASE + 2)
    assert (root / "mvm" / "cpu.weight").read_text() == str(100 * (os.cpu_count() or 1))
    assert not (d / "memory.swap.max").exists()  # only where the kernel offers it


def test_cgroup_detection_v1_and_missing_controllers(tmp_path: Path) -> None:
    v1 = tmp_path / "v1"
    for c in ("cpu", "memory", "pids"):
        (v1 / c).mkdir(parents=True)
        (v1 / c / "cgroup.procs").write_text("")
    cg = jail.detect_cgroups(v1)
    assert cg.version == 1 and cg.roots == {c: v1 / c for c in ("cpu", "memory", "pids")}
    assert cg.dirs("x") == [v1 / c / "mvm" / "x" for c in ("cpu", "memory", "pids")]
    files = jail.cgroup_files(cg, jail.limits(spec(tmp_path, vcpus=1), 128))
    assert files["memory.limit_in_bytes"] == str(384 << 20) and files["cpu.shares"] == "1024"
    hybrid = fake_v2(tmp_path / "unified", "hugetlb")  # this host's unified tree: no controllers
    assert jail.detect_cgroups(hybrid).missing == ("cpu", "memory", "pids")
    with pytest.raises(HostUnsupported, match="missing controllers cpu, memory, pids"):
        jail.create_cgroup(jail.detect_cgroups(hybrid), "x", jail.limits(spec(tmp_path), 128))


def test_a_required_jail_that_cannot_be_set_up_refuses_the_boot(tmp_path: Path) -> None:
    s = spec(tmp_path, net=None)
    for f in (s.kernel, s.initrd, *(d.path for d in s.disks)):
        assert f is not None
        f.parent.mkdir(parents=True, exist_ok=True)
        f.write_bytes(b"x")
    empty = fake_v2(tmp_path / "cg", "hugetlb")
    rt = QemuRuntime("tcg", jail_config=jail.Config(jail.Mode.REQUIRED, cgroup_root=empty))
    with pytest.raises(HostUnsupported) as e:
        rt.boot(s)
    assert e.value.line().splitlines() == [
        "the hypervisor jail is required (setting jail=required) but cannot be set up here: "
        "cgroup v2: missing controllers cpu, memory, pids (see `mvm doctor`; or `mvm config set "
        "jail auto` to run unjailed where the jail is unavailable)"]
    assert not s.run_dir.exists() and not rt.is_alive(s)
    # auto: the same host runs it unjailed (not booted here: that is QEMU's own test)
    assert QemuRuntime("tcg", jail_config=jail.Config(jail.Mode.AUTO, cgroup_root=empty)).jailed() is False


def test_jail_numbers_are_kept_per_owner_and_reused_once_freed(tmp_path: Path) -> None:
    store = SqliteStore(tmp_path / "mvm.db")
    a, b, c = (store.jail_number(f"instance:i-0000000{k}") for k in (1, 2, 3))
    assert (a, b, c) == (1, 2, 3)
    assert store.jail_number("instance:i-00000002") == 2  # stable
    store.remove_instance("i-00000002")
    assert store.jail_number("tenant:acme") == 2  # the smallest free one
    assert store.jail_number("instance:i-00000004") == 4


def test_share_with_group_makes_a_private_file_readable_by_the_tenant_group_only(tmp_path: Path) -> None:
    private = tmp_path / "vmlinux"
    private.write_bytes(b"k")
    private.chmod(0o600)
    jail.share_with_group(private, 1900000001)
    st = private.stat()
    assert (st.st_uid, st.st_gid, st.st_mode & 0o7777) == (os.getuid(), 1900000001, 0o640)
    jail.share_with_group(private, 1900000001)  # idempotent
    assert private.stat().st_mode & 0o7777 == 0o640
    public = tmp_path / "default-vmlinux"
    public.write_bytes(b"k")
    public.chmod(0o644)
    gid = public.stat().st_gid
    jail.share_with_group(public, 1900000001)  # shared public files stay as they are
    assert (public.stat().st_gid, public.stat().st_mode & 0o7777) == (gid, 0o644)


def test_jail_settings_and_doctor(mvm) -> None:  # type: ignore[no-untyped-def]
    r = mvm("config", "set", "jail", "maybe")
    assert r.rc == 2 and r.lines[0].startswith("error: setting jail: 'maybe' is not one of auto, required, off")
    assert mvm("config", "set", "jail-uid-base", "12").rc == 2
    assert mvm.ok("config", "get", "jail").out.strip() == "auto"
    mvm.ok("config", "set", "jail", "required")
    assert mvm.ok("config", "get", "jail").out.strip() == "required"
    row = doctor_row(mvm)
    assert row["mode"] == "required" and row["required"] is True and row["host_can_jail"] is None
    assert row["detail"].startswith("not decided yet (`mvm setup` decides it; else the first start): ")
    if jail.support().ok:
        assert row["ok"] and row["now_ok"] and row["controllers"] == ["cpu", "memory", "pids"]
        assert row["cgroup_version"] == jail.cgroups().version


def doctor_row(mvm, *, rc: int = 0) -> dict:  # type: ignore[no-untyped-def,type-arg]
    r = mvm("doctor", "--json")
    assert r.rc == rc, r.err
    return {c["check"]: c for c in json.loads(r.out)}["jail"]  # type: ignore[no-any-return]


CAN = jail.Verdict(True, "", "cgroup v1 (cpu, memory, pids)", {"qemu": None, "firecracker": None}, 1.0)
CANNOT = jail.Verdict(False, "mvm does not run as root", "cgroup v1 (cpu, memory, pids)", {}, 1.0)


def test_setup_records_whether_the_host_can_jail_and_doctor_shows_it(mvm, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    from mvm.config.paths import Layout
    from mvm.services import host_setup

    layout = Layout(mvm.home)
    v = host_setup.record_jail(layout)  # (what `mvm setup` runs)
    assert jail.Verdict.load(layout.jail_verdict()) == v
    if not shutil.which("qemu-system-x86_64") or not jail.support().ok:
        pytest.skip(f"this host cannot jail: {v.line()}")
    assert v.ok and v.backends["qemu"] is None, v
    assert v.backends["firecracker"] == (None if shutil.which("jailer") else "jailer is not on PATH")
    row = doctor_row(mvm)
    assert row["ok"] and row["required"] and row["host_can_jail"] is True and row["decided"] == v.decided
    assert row["detail"].startswith("on: this host can jail")

    # recorded as able, but this process cannot now: doctor fails the check and says starts are refused
    (mvm.home / "config.json").write_text(json.dumps({**json.loads((mvm.home / "config.json").read_text()),
                                                      "jail": "auto"}))
    CANNOT.save(layout.jail_verdict())
    row = doctor_row(mvm)  # a host that cannot jail: a warning under auto, hypervisors run unjailed
    assert (row["ok"], row["required"], row["host_can_jail"]) == (False, False, False)
    assert row["detail"].startswith("UNAVAILABLE: this host cannot jail: mvm does not run as root; "
                                    "hypervisors run unjailed (setting jail=auto); uids/gids ")
    mvm.ok("config", "set", "jail", "required")
    row = doctor_row(mvm, rc=1)  # ... and a failure when the jail is required
    assert row["detail"].startswith("UNAVAILABLE: this host cannot jail: mvm does not run as root; "
                                    "starts are refused (setting jail=required)")


def test_a_host_recorded_as_able_to_jail_refuses_a_hypervisor_it_cannot_jail_now(tmp_path: Path) -> None:
    """The jail never goes away without a word: under `auto` too, a start that cannot be jailed
    on a host that can jail is refused with one line naming what is missing, leaving nothing."""
    s = spec(tmp_path, net=None)
    for f in (s.kernel, s.initrd, *(d.path for d in s.disks)):
        assert f is not None
        f.parent.mkdir(parents=True, exist_ok=True)
        f.write_bytes(b"x")
    record = tmp_path / "jail.json"
    CAN.save(record)
    empty = fake_v2(tmp_path / "cg", "hugetlb")  # this process sees no cpu, memory, pids now
    for mode in (jail.Mode.AUTO, jail.Mode.REQUIRED):
        rt = QemuRuntime("tcg", jail_config=jail.Config(mode, cgroup_root=empty, record=record))
        with pytest.raises(HostUnsupported) as e:
            rt.boot(s)
        assert e.value.line().splitlines() == [
            "cannot jail the hypervisor: cgroup v2: missing controllers cpu, memory, pids (this host "
            "was found able to jail (see `mvm doctor`): restore what is missing, or run `mvm setup` "
            "to decide again; `mvm config set jail off` runs hypervisors unjailed)"]
        assert not s.run_dir.exists() and not rt.is_alive(s)
    # recorded as unable: auto runs it unjailed, and says why; required refuses; off is off
    CANNOT.save(record)
    how = jail.decide(jail.Config(jail.Mode.AUTO, cgroup_root=empty, record=record), "qemu")
    assert how.line() == "unjailed: this host cannot jail QEMU: mvm does not run as root"
    with pytest.raises(HostUnsupported, match=r"required .* cannot be set up here: mvm does not run as root"):
        jail.decide(jail.Config(jail.Mode.REQUIRED, record=record), "qemu")
    assert jail.decide(jail.Config(jail.Mode.OFF, record=record), "qemu").line() == "unjailed: setting jail=off"
    # no record (a home where setup has not run): decided at the first start, and recorded
    fresh = tmp_path / "fresh.json"
    assert not jail.decide(jail.Config(jail.Mode.AUTO, cgroup_root=empty, record=fresh), "qemu").jailed
    assert jail.Verdict.load(fresh) is not None and not jail.Verdict.load(fresh).ok  # type: ignore[union-attr]


def start_as_a_service(argv: list[str], out: Path, env: dict[str, str]) -> int:
    """Start a command as a service manager leaves it: its launching shell exits at once (its
    parent is then PID 1), stdin from /dev/null, stdout and stderr to a file. Its pid."""
    r = subprocess.run(["sh", "-c", 'exec "$@" </dev/null >"$OUT" 2>&1 & echo $!', "sh", *argv],
                       env={**env, "OUT": str(out)}, check=True, timeout=30, capture_output=True, text=True)
    return int(r.stdout)


SEES = """
import json, os, sys, time
from mvm.runtime import jail
deadline = time.monotonic() + 10
while os.getppid() != 1 and time.monotonic() < deadline:
    time.sleep(0.01)
before = [l.split()[1] for l in open("/proc/self/mounts") if l.split()[2] in ("cgroup", "cgroup2")]
sup = jail.support()
mounts = {o for l in open("/proc/self/mounts") if l.split()[2] == "cgroup" for o in l.split()[3].split(",")}
print(json.dumps({"ppid": os.getppid(), "before": before, "ok": sup.ok, "reason": sup.reason,
                  "roots": {c: str(d) for c, d in sup.cgroups.roots.items()}, "mounts": sorted(mounts)}))
"""


@pytest.mark.net
@pytest.mark.skipif(os.geteuid() != 0 or not jail.detect_cgroups().roots, reason="needs root and cgroups")
def test_under_ip_netns_exec_with_pid_1_as_parent_mvm_mounts_the_cgroups_it_needs(netns: str, tmp_path: Path) -> None:
    """`ip netns exec` mounts a /sys without cgroups; a service's parent is PID 1 (whose view
    proves nothing about this process's): mvm mounts the hierarchies itself, in the namespace
    `ip netns exec` made, where the jail (and Firecracker's jailer, which reads /proc/mounts)
    finds them. The host's view is untouched."""
    out = tmp_path / "out.json"
    start_as_a_service(["ip", "netns", "exec", netns, sys.executable, "-c", SEES], out, dict(os.environ))
    deadline = time.monotonic() + 30
    while not out.read_text().strip().endswith("}"):
        assert time.monotonic() < deadline, out.read_text()
        time.sleep(0.05)
    seen = json.loads(out.read_text())
    assert seen["ppid"] == 1 and seen["before"] == []  # a service's view: no cgroup mounts at all
    assert (seen["ok"], seen["reason"]) == (True, ""), seen
    assert all(Path(d).parent == jail.PRIVATE_ROOT for d in seen["roots"].values()), seen
    assert {"cpu", "memory", "pids"} <= set(seen["mounts"])
    host_mounts = Path("/proc/self/mounts").read_text()
    assert str(jail.PRIVATE_ROOT) not in host_mounts  # mounted in that namespace only


