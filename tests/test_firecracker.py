"""The Firecracker backend: the lifecycle's start, warm, resume, sleep, wake, stop and the
builder VM, against the Firecracker API double (tests/doubles/firecracker_api.py) — and the
same against a real `firecracker` when it is on PATH (marker `firecracker`; skipped, with
the reason, when it is not). Error answers are injected into the double (FC_DOUBLE_REFUSE,
FC_DOUBLE_CRASH_ON): each surfaces as one line and leaves no process or file behind.
Also: the jailer's command line and chroot, and the pool's backend selection.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from mvm.config.paths import Layout
from mvm.config.settings import Settings
from mvm.context import Host
from mvm.context.compose import crash_after
from mvm.errors import HostUnsupported, MvmError, RuntimeFailure
from mvm.lifecycle import apply, create, observe, specs
from mvm.lifecycle.apply import pool_locked
from mvm.model import Action, InstanceRef, Pool, PoolRef, State
from mvm.runtime import base, firecracker, jail
from mvm.runtime.base import Disk, JailIds, NetIf, SnapshotInfo, VmSpec, VmStatus
from mvm.runtime.firecracker import FirecrackerRuntime
from mvm.services import builder, tenants
from mvm.store import FileLocks, SqliteFences, SqliteStore
from mvm.util import pids
from tests.conftest import REPO, Mvm

DOUBLE = [sys.executable, "-m", "tests.doubles.firecracker_api"]
REF = PoolRef("acme", "fc")
REV = "rev1"


def _runtime(kind: str) -> FirecrackerRuntime:
    if kind == "double":
        return FirecrackerRuntime(DOUBLE, jailer=None)
    if shutil.which("firecracker") is None:
        pytest.skip("firecracker is not on PATH: the real-binary run of this test needs it "
                    "(and a fast KVM); the double's run covers the sequence here")
    if not os.access("/dev/kvm", os.R_OK | os.W_OK):
        pytest.skip("firecracker is on PATH but /dev/kvm is not usable")
    if not os.environ.get("MVM_FC_REVISION"):
        pytest.skip("firecracker is on PATH: set MVM_FC_REVISION to a built revision directory "
                    "(rootfs.ext4, vmlinux, initrd from `mvm pool build`) to run this against it")
    return FirecrackerRuntime(jail_config=jail.Config(jail.Mode.AUTO))


BACKENDS = [pytest.param("double", id="double"),
            pytest.param("real", id="real-firecracker", marks=pytest.mark.firecracker)]


class World:
    def __init__(self, root: Path, rt: FirecrackerRuntime, run: Path) -> None:
        self.root = root
        self.rt = rt
        home = root / "home"
        self.ctx = Host(layout=Layout(home, run), settings=Settings(),
                        store=SqliteStore(home / "mvm.db"),
                        locks=FileLocks(home / "locks", SqliteFences(home / "mvm.db")),
                        runtime_factory=lambda: rt, store_factory=lambda: SqliteStore(home / "mvm.db"))

    def new(self) -> InstanceRef:
        return create(self.ctx, REF).ref

    def spec(self, ref: InstanceRef) -> VmSpec:
        i = self.ctx.store.instance(ref.tenant, ref.pool, ref.instance)
        return specs.control_spec(self.ctx.layout, i)

    def guest(self, ref: InstanceRef, *argv: str) -> str:
        from mvm.services import instances

        return instances.exec_(self.ctx, ref, list(argv)).stdout.decode()

    def remember(self, ref: InstanceRef, line: str) -> None:
        """A line in the guest's memory only (the double's `write`; a real guest's tmpfs)."""
        if self.rt.command == DOUBLE:
            self.guest(ref, "write", line)
        else:
            self.guest(ref, "sh", "-c", f"echo {line} >> /run/mvm-fc-test")

    def recall(self, ref: InstanceRef) -> str:
        if self.rt.command == DOUBLE:
            return self.guest(ref, "read")
        return self.guest(ref, "cat", "/run/mvm-fc-test")

    def state(self, ref: InstanceRef) -> State:
        return self.ctx.store.instance(ref.tenant, ref.pool, ref.instance).state

    def run_dir_files(self, ref: InstanceRef) -> set[str]:
        d = self.spec(ref).run_dir
        return {p.name for p in d.iterdir()} if d.is_dir() else set()


@pytest.fixture
def world(request: pytest.FixtureRequest, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[World]:
    monkeypatch.delenv("MVM_HOME", raising=False)
    monkeypatch.setenv("MVM_RUNTIME_DIR", "/nonexistent-mvm-runtime-dir")
    monkeypatch.chdir(REPO)  # (the double runs as `python -m tests.doubles.firecracker_api`)
    kind = getattr(request, "param", "double")
    run = Path(tempfile.mkdtemp(prefix="fc-", dir="/tmp"))  # (sockets: a short path)
    request.addfinalizer(lambda: shutil.rmtree(run, ignore_errors=True))
    w = World(tmp_path, _runtime(kind), run)
    tenants.create(w.ctx, "acme")
    w.ctx.store.add_pool(Pool("acme", "fc", "path:/nonexistent", "p", 1, 64, data_disk=8, network="none",
                              backend="firecracker"))
    w.ctx.store.set_pool_current("acme", "fc", REV)
    rdir = w.ctx.layout.revision_dir("acme", "fc", REV)
    if kind == "real":
        shutil.copytree(os.environ["MVM_FC_REVISION"], rdir)
    else:
        rdir.mkdir(parents=True)
        shutil.copy("/bin/true", rdir / "vmlinux")  # an ELF64 x86-64 (the double boots nothing)
        (rdir / "rootfs.ext4").write_bytes(b"\0" * 65536)
    yield w
    for i in w.ctx.store.instances():
        w.rt.stop(specs.control_spec(w.ctx.layout, i), 0)


def _no_firecracker_of(w: World, ref: InstanceRef) -> None:
    spec = w.spec(ref)
    assert not w.rt.is_alive(spec)
    assert pids.find_by_arg("--id", firecracker.vm_id(spec)) is None
    left = w.run_dir_files(ref) & {firecracker.API_SOCK, firecracker.VSOCK_SOCK, firecracker.PID_FILE, "console.pipe"}
    assert not left, f"left behind: {left}"


@pytest.mark.parametrize("world", BACKENDS, indirect=True)
def test_start_warm_resume_sleep_wake_stop(world: World) -> None:
    w = world
    ref = w.new()
    apply(w.ctx, ref, Action.START)
    spec = w.spec(ref)
    assert w.rt.status(spec) is VmStatus.RUNNING
    w.remember(ref, "in-memory")
    apply(w.ctx, ref, Action.WARM)
    assert w.rt.status(spec) is VmStatus.PAUSED
    apply(w.ctx, ref, Action.RESUME)
    assert w.rt.status(spec) is VmStatus.RUNNING
    apply(w.ctx, ref, Action.SLEEP)
    i = w.ctx.store.instance(ref.tenant, ref.pool, ref.instance)
    assert i.state is State.SLEEPING and i.snapshot
    snap = specs.snapshot_dir(w.ctx.layout, i, i.snapshot)
    assert SnapshotInfo.load(snap).backend == "firecracker"
    assert sorted(p.name for p in snap.iterdir()) == ["memory", "snapshot.json", "vmstate"]
    _no_firecracker_of(w, ref)
    memory = (snap / "memory").read_bytes()

    apply(w.ctx, ref, Action.WAKE)
    assert w.state(ref) is State.RUNNING
    assert w.recall(ref) == "in-memory\n"  # the guest's memory came back
    # Firecracker maps the memory file for the VM's life: it is still there, unchanged.
    assert (snap / "memory").read_bytes() == memory
    assert w.rt.is_alive(w.spec(ref))

    apply(w.ctx, ref, Action.STOP)
    assert w.state(ref) is State.STOPPED
    _no_firecracker_of(w, ref)
    assert not snap.exists()  # the consumed snapshot went once no hypervisor mapped it
    console = (w.spec(ref).run_dir / "console.log").read_text()
    assert "reboot: Restarting system" in console, console  # the guest heard Ctrl-Alt-Del


def test_the_runtimes_stop_of_a_paused_vm_powers_the_guest_off(world: World) -> None:
    """Runtime.stop itself (the lifecycle syncs first anyway): a paused guest is resumed so
    that it hears Ctrl-Alt-Del, syncs and powers off, rather than being killed."""
    w = world
    ref = w.new()
    apply(w.ctx, ref, Action.START)
    w.guest(ref, "write", "unsynced")
    apply(w.ctx, ref, Action.WARM)
    i = w.ctx.store.instance(ref.tenant, ref.pool, ref.instance)
    spec = specs.spec_for(w.ctx, i, REV)
    w.rt.stop(spec, 10)
    _no_firecracker_of(w, ref)
    assert "reboot: Restarting system" in (spec.run_dir / "console.log").read_text()
    data = next(d.path for d in spec.disks if d.id == "data")
    assert Path(f"{data}.fake-content").read_text() == "unsynced\n"  # the double's guest synced


# (action to run, the request refused, where the instance was, where it must stay)
REFUSED = [
    (Action.START, "PUT /machine-config", State.CREATED),
    (Action.START, "PUT /boot-source", State.CREATED),
    (Action.START, "PUT /drives/rootfs", State.CREATED),
    (Action.START, "PUT /vsock", State.CREATED),
    (Action.START, "PUT /actions", State.CREATED),
    (Action.WARM, "PATCH /vm", State.RUNNING),
    (Action.SLEEP, "PUT /snapshot/create", State.RUNNING),
    (Action.WAKE, "PUT /snapshot/load", State.SLEEPING),
]


def _bring(w: World, ref: InstanceRef, state: State) -> None:
    for action in {State.CREATED: (), State.RUNNING: (Action.START,),
                   State.SLEEPING: (Action.START, Action.SLEEP)}[state]:
        apply(w.ctx, ref, action)


@pytest.mark.parametrize(("action", "request_", "state"),
                         [pytest.param(a, r, s, id=f"{a.value}-{r.replace(' ', '-')}") for a, r, s in REFUSED])
@pytest.mark.parametrize("how", ["refuse", "crash"])
def test_an_error_answer_is_one_line_and_leaves_nothing_behind(
        world: World, monkeypatch: pytest.MonkeyPatch, action: Action, request_: str, state: State, how: str) -> None:
    w = world
    ref = w.new()
    _bring(w, ref, state)
    snap_before = w.ctx.store.instance(ref.tenant, ref.pool, ref.instance).snapshot
    monkeypatch.setenv("FC_DOUBLE_REFUSE" if how == "refuse" else "FC_DOUBLE_CRASH_ON", request_)
    if state is State.RUNNING:  # the running double read its environment at start: restart it
        apply(w.ctx, ref, Action.STOP)
        apply(w.ctx, ref, Action.START)
    with pytest.raises(MvmError) as e:
        apply(w.ctx, ref, action)
    message = e.value.message
    assert len(message.splitlines()) == 1, message
    method, path = request_.split(" ")
    if how == "refuse":
        assert f"Firecracker refused {method} {path}" in message, message
        assert f"injected refusal of {request_}" in message, message
    else:
        assert "Firecracker" in message and f"injected crash on {request_}" in message, message
    i = w.ctx.store.instance(ref.tenant, ref.pool, ref.instance)
    assert i.op is None
    if how == "crash" and state is State.RUNNING:  # the hypervisor died: the VM is gone
        assert i.state in (State.FAILED, state), i.state
    else:
        assert i.state is state, i.state
    assert i.snapshot == snap_before
    if state is State.RUNNING and how == "refuse":
        assert w.rt.status(w.spec(ref)) is VmStatus.RUNNING  # the VM goes on as it was
        root = specs.snapshots_dir(w.ctx.layout, i)
        assert not root.is_dir() or not any(root.iterdir()), "a partial snapshot was left"
    else:
        _no_firecracker_of(w, ref)
    if state is State.SLEEPING:
        assert i.snapshot and SnapshotInfo.committed(specs.snapshot_dir(w.ctx.layout, i, i.snapshot))


def test_a_non_elf_kernel_fails_the_start_in_one_line(world: World) -> None:
    w = world
    (w.ctx.layout.revision_dir("acme", "fc", REV) / "vmlinux").write_bytes(b"MZ" + b"\0" * 1024)
    ref = w.new()
    with pytest.raises(MvmError) as e:
        apply(w.ctx, ref, Action.START)
    assert len(e.value.message.splitlines()) == 1
    assert "Firecracker refused PUT /actions" in e.value.message and "invalid kernel image" in e.value.message
    assert w.state(ref) is State.CREATED
    _no_firecracker_of(w, ref)


def test_the_builder_vm_runs_on_the_pools_backend(world: World, tmp_path: Path) -> None:
    """builder._run drives the VM through the runtime interface only: the pool's backend's."""
    w = world
    w.ctx.backend_factory = lambda backend: {"firecracker": w.rt}[backend]
    w.ctx.runtime_factory = lambda: pytest.fail("the builder asked for the host's runtime")
    disks = []
    for name in ("root", "input", "pkgs", "store", "output"):
        (tmp_path / name).write_bytes(b"\0" * 4096)
        disks.append(Disk(name, tmp_path / name, name not in ("store", "output")))
    vm = VmSpec("builder-acme-fc", 1, 64, w.ctx.layout.revision_dir("acme", "fc", REV) / "vmlinux", None,
                builder.CMDLINE, tuple(disks), None, w.ctx.layout.runtime_dir() / "builder.acme.fc")
    steps: list[tuple[str, str]] = []
    builder._run(w.ctx, vm, tmp_path / "build.log", lambda s, m: steps.append((s, m)),
                 builder.Options(cpus=1, mem_mib=64, timeout=120), "firecracker")
    assert (tmp_path / "output").read_bytes().startswith(b"FAKE-BUILD-OUTPUT")
    assert ("builder", "up (fake builder of the Firecracker API double)") in steps, steps
    assert not vm.run_dir.exists() and not w.rt.is_alive(vm)


# -- the jailer ------------------------------------------------------------------------------------

def _jail_spec(tmp_path: Path) -> VmSpec:
    for f in ("vmlinux", "initrd", "rootfs", "data"):
        (tmp_path / f).write_bytes(b"x")
    return VmSpec("i-1", 2, 256, tmp_path / "vmlinux", tmp_path / "initrd", "root=/dev/vda",
                  (Disk("rootfs", tmp_path / "rootfs", True), Disk("data", tmp_path / "data", False)),
                  NetIf("tap-i1", "02:00:00:00:00:09"), tmp_path / "run",
                  JailIds(1900000005, 1900000005, (1900000001,)))


@pytest.mark.parametrize("version", [1, 2])
def test_jailer_argv_has_jailer_md_flags_and_the_shared_jail_description(tmp_path: Path, version: int) -> None:
    spec = _jail_spec(tmp_path)
    desc = jail.describe(spec, jail.UID_BASE, jail.MEM_OVERHEAD_MIB)
    args = firecracker.jailer_argv("/usr/bin/jailer", "/usr/bin/firecracker", spec, desc, version,
                                   tmp_path / "run" / "jail", "/var/run/netns/x")
    sep = args.index("--")
    jailer, fc_args = args[:sep], args[sep + 1:]
    flags = dict(zip(jailer[1::2], jailer[2::2], strict=False))
    assert jailer[0] == "/usr/bin/jailer"
    assert flags["--id"] == firecracker.vm_id(spec) and len(flags["--id"]) <= 64
    assert flags["--exec-file"] == "/usr/bin/firecracker"
    assert (flags["--uid"], flags["--gid"]) == ("1900000005", "1900000005")  # the spec's own ids
    assert flags["--cgroup-version"] == str(version)
    assert flags["--chroot-base-dir"] == str(tmp_path / "run" / "jail")
    assert flags["--netns"] == "/var/run/netns/x"
    assert flags["--parent-cgroup"] == jail.CGROUP_PARENT
    cgroups = [jailer[k + 1] for k, a in enumerate(jailer) if a == "--cgroup"]
    lim = jail.limits(spec, jail.MEM_OVERHEAD_MIB)  # the same limits QEMU's jail writes
    if version == 2:
        assert f"memory.max={lim.mem_bytes}" in cgroups and f"pids.max={lim.pids}" in cgroups
        assert f"cpu.max={lim.cpu_quota_us} {lim.cpu_period_us}" in cgroups
    else:
        assert f"memory.limit_in_bytes={lim.mem_bytes}" in cgroups and f"cpu.cfs_quota_us={lim.cpu_quota_us}" in cgroups
    assert "--new-pid-ns" in jailer and "--daemonize" in jailer
    assert fc_args == ["--api-sock", firecracker.JAILED_API_SOCK]


def test_the_chroot_holds_exactly_the_linked_files(tmp_path: Path) -> None:
    spec = _jail_spec(tmp_path)
    root = firecracker.chroot_dir(tmp_path / "run" / "jail", "firecracker", firecracker.vm_id(spec))
    assert root == tmp_path / "run/jail/firecracker" / firecracker.vm_id(spec) / "root"  # jailer.md's layout
    root.mkdir(parents=True)
    snap = tmp_path / "snap"
    snap.mkdir()
    for f in ("vmstate", "memory"):
        (snap / f).write_bytes(b"s")
    links = firecracker.chroot_links(spec, snap)
    firecracker.link_into_chroot(root, links, os.getuid(), os.getgid())
    assert sorted(p.name for p in root.iterdir()) == ["disk-data", "disk-rootfs", "initrd", "memory", "vmlinux",
                                                      "vmstate"]
    for name, src in links.items():
        assert (root / name).stat().st_ino == src.stat().st_ino  # hard links, not copies
    # the VM's requests name the files as the chroot has them
    reqs = firecracker.boot_requests(spec, firecracker.chroot_paths(spec))
    named = {v for _, _, body in reqs for v in body.values() if isinstance(v, str)}
    assert {"vmlinux", "initrd", "disk-rootfs", "disk-data", firecracker.VSOCK_SOCK, "console.pipe"} <= named


def test_boot_requests_are_valid_for_the_double_schemas(tmp_path: Path) -> None:
    from tests.doubles import firecracker_api as double

    spec = _jail_spec(tmp_path)
    schema = {"/machine-config": "MachineConfiguration", "/boot-source": "BootSource", "/vsock": "Vsock",
              "/actions": "InstanceActionInfo", "/serial": "SerialDevice"}
    for method, path, body in firecracker.boot_requests(spec, firecracker.chroot_paths(spec)):
        name = schema.get(path) or ("Drive" if path.startswith("/drives/") else "NetworkInterface")
        assert method == "PUT"
        double.validate(name, body)
    _, _, load = firecracker.load_request(spec, "vmstate", "memory", "v.sock", tap_at_snapshot="old-tap")
    double.validate("SnapshotLoadParams", load)
    assert load["network_overrides"] == [{"iface_id": "eth0", "host_dev_name": "tap-i1"}]
    assert "network_overrides" not in firecracker.load_request(spec, "s", "m", "v", "tap-i1")[2]


# -- selection ---------------------------------------------------------------------------------------

def test_a_pool_runs_on_its_own_backend(world: World) -> None:
    w = world
    made: list[str] = []

    def factory(backend: str) -> FirecrackerRuntime:
        made.append(backend)
        return w.rt

    w.ctx.runtime_factory = lambda: pytest.fail("the host's runtime was asked for")
    w.ctx.backend_factory = factory
    ref = w.new()
    apply(w.ctx, ref, Action.START)
    assert w.guest(ref, "read") == ""
    apply(w.ctx, ref, Action.STOP)
    assert made == ["firecracker"]  # made once, for the pool's backend


def test_pool_create_backend_firecracker_is_refused_here_in_one_line(mvm: Mvm) -> None:
    if shutil.which("firecracker"):
        pytest.skip("firecracker is on PATH: this host may run Firecracker pools")
    mvm.ok("tenant", "create", "acme")
    r = mvm("pool", "create", "acme/w", "--backend", "firecracker")
    assert r.rc != 0
    assert r.errors == ["error: this host cannot run Firecracker VMs: firecracker is not on PATH "
                        "(install Firecracker on this host, or create the pool with --backend qemu)"], r.err
    assert "acme/w" not in mvm.ok("pool", "list").out  # nothing was created
    r = mvm("pool", "create", "acme/w", "--backend", "xen")
    assert r.rc != 0 and r.errors == ["error: unknown backend 'xen' (use one of qemu, firecracker)"], r.err
    # the host's setting is the pool's backend when it names none: checked the same way
    mvm.ok("config", "set", "backend", "firecracker")
    r = mvm("pool", "create", "acme/w")
    assert r.rc != 0 and r.errors[0].startswith("error: this host cannot run Firecracker VMs"), r.err
    assert "acme/w" not in mvm.ok("pool", "list").out
    assert mvm.ok("pool", "create", "acme/w", "--backend", "qemu").rc == 0
    # a pool made without --backend records the host's backend of the time: a later change of
    # the setting leaves its instances on the runtime that sees their hypervisors
    mvm.ok("config", "set", "backend", "qemu")
    mvm.ok("pool", "create", "acme/v")
    mvm.ok("config", "set", "backend", "firecracker")
    assert json.loads(mvm.ok("pool", "info", "acme/v", "--json").out)["backend"] == "qemu"


def test_select_makes_the_firecracker_runtime_and_refuses_it_without_the_binary(tmp_path: Path) -> None:
    from mvm.config.settings import Backend
    from mvm.runtime import select

    layout = Layout(tmp_path / "home", tmp_path / "run")
    rt = select.runtime_for_backend("firecracker", Settings(), layout)
    assert isinstance(rt, FirecrackerRuntime) and rt.maps_snapshot_while_running
    with pytest.raises(HostUnsupported) as e:
        select.check_backend(Backend.FIRECRACKER, layout, binary="no-such-firecracker-binary")
    assert e.value.message == "this host cannot run Firecracker VMs: no-such-firecracker-binary is not on PATH"
    select.check_backend(Backend.QEMU, layout)  # (nothing to check)


@pytest.mark.parametrize("request_", ["PUT /boot-source", "PUT /drives/data", "PUT /actions"])
def test_a_failed_boot_leaves_no_process_or_file_by_itself(world: World, monkeypatch: pytest.MonkeyPatch,
                                                           tmp_path: Path, request_: str) -> None:
    """The runtime's own contract (the lifecycle's recovery aside): boot undoes its steps."""
    monkeypatch.setenv("FC_DOUBLE_REFUSE", request_)
    spec = _jail_spec(tmp_path)
    spec = VmSpec(spec.name, 1, 64, world.ctx.layout.revision_dir("acme", "fc", REV) / "vmlinux", None,
                  "", spec.disks, None, world.ctx.layout.runtime_dir() / "solo")
    with pytest.raises(MvmError) as e:
        world.rt.boot(spec)
    assert f"Firecracker refused {request_}" in e.value.message and len(e.value.message.splitlines()) == 1
    assert not world.rt.is_alive(spec) and pids.find_by_arg("--id", firecracker.vm_id(spec)) is None
    assert not spec.run_dir.exists()


def test_doctor_shows_firecracker_and_jailer_or_their_absence(mvm: Mvm) -> None:
    import json

    checks = {c["check"]: c for c in json.loads(mvm.ok("doctor", "--json").out)}
    for name in ("firecracker", "jailer"):
        if shutil.which(name):
            assert checks[name]["ok"] and checks[name]["detail"], checks[name]
        else:
            assert checks[name]["detail"] == f"absent ({name} is not on PATH)"
            assert not checks[name]["ok"] and not checks[name]["required"]


@pytest.mark.parametrize("backend", ["firecracker", "qemu"])
def test_a_bzimage_only_revision_is_refused_for_a_firecracker_pool(world: World, backend: str) -> None:
    from mvm.image.outputs import KernelNotForFirecracker
    from mvm.services import pools

    w = world
    pool = w.ctx.store.pool("acme", "fc")
    pool = Pool(pool.tenant, pool.id, pool.flake, pool.profile, pool.cpus, pool.mem, backend=backend)
    kernel = w.ctx.layout.revision_dir("acme", "fc", REV) / "vmlinux"
    kernel.write_bytes(b"\0" * 0x1FE + b"\x55\xaaXXHdrS" + b"\0" * 4096)  # a bzImage's boot sector and header
    if backend == "qemu":
        pools.check_backend_kernel(w.ctx, pool, REV)  # QEMU boots a bzImage
        return
    with pytest.raises(KernelNotForFirecracker) as e:
        pools.check_backend_kernel(w.ctx, pool, REV)
    assert e.value.message == f"the kernel {kernel} is a bzImage (a compressed kernel), not an ELF vmlinux"
    shutil.copy("/bin/true", kernel)  # an ELF64 x86-64 with an entry point
    pools.check_backend_kernel(w.ctx, pool, REV)


@pytest.mark.parametrize("world", BACKENDS, indirect=True)
@pytest.mark.parametrize(("step", "after"), [("restore", State.SLEEPING), ("consume", State.RUNNING)])
def test_a_wake_killed_after_a_step_is_finished_by_the_next_command(world: World, step: str, after: State) -> None:
    """As tests/test_lifecycle_faults.py does with its fake runtime, on Firecracker's double:
    before `consume` the restored (paused) Firecracker is ended and the snapshot kept; after it,
    the guest runs on, and the memory file it maps stays until it is gone."""
    import dataclasses
    import signal

    from mvm.lifecycle import observe
    from mvm.lifecycle.apply import pool_locked

    w = world
    ref = w.new()
    apply(w.ctx, ref, Action.START)
    w.remember(ref, "in-memory")
    apply(w.ctx, ref, Action.SLEEP)
    snap = w.ctx.store.instance(ref.tenant, ref.pool, ref.instance).snapshot
    pid = os.fork()
    if pid == 0:
        try:
            home = w.ctx.layout.home
            apply(dataclasses.replace(w.ctx, crash_point=crash_after(f"wake:{step}"),
                                      store=SqliteStore(home / "mvm.db"), _runtime=None), ref, Action.WAKE)
        finally:
            os._exit(1)
    _, status = os.waitpid(pid, 0)
    assert os.WIFSIGNALED(status) and os.WTERMSIG(status) == signal.SIGKILL
    with pool_locked(w.ctx, ref.pool_ref, None) as lease:
        i = observe.instance(w.ctx, ref, lease)
    assert i is not None and i.state is after and i.op is None
    if after is State.SLEEPING:
        _no_firecracker_of(w, ref)
        assert i.snapshot == snap
        apply(w.ctx, ref, Action.WAKE)
    assert w.recall(ref) == "in-memory\n"


def _start_events(w: World, kind: str) -> list[str]:
    return [str(e["message"]) for e in reversed(w.ctx.store.events("acme")) if e["kind"] == kind]


def test_every_start_and_wake_says_whether_it_is_jailed_and_a_jail_lost_is_refused(
        world: World, tmp_path: Path) -> None:
    """Firecracker's jailer path holds to the host's verdict as QEMU's jail does: on a host that
    cannot jail, `auto` runs it unjailed and the start's and wake's events and `instance info`
    say so and why; on a host recorded as able to jail, a start whose jailer or cgroups are
    missing is refused with one line naming what, and nothing runs."""
    from mvm.services import views

    w = world
    record = tmp_path / "jail.json"
    jail.Verdict(False, "mvm does not run as root", "cgroup v1 (cpu, memory, pids)", {}, 1.0).save(record)
    w.rt.jailer = "jailer"
    w.rt.jail_config = jail.Config(jail.Mode.AUTO, record=record)
    ref = w.new()
    apply(w.ctx, ref, Action.START)
    line = "unjailed: this host cannot jail Firecracker: mvm does not run as root"
    assert _start_events(w, "instance.start") == [f"running revision {REV}; {line}"]
    assert views.instance_info(w.ctx, ref)["jail"] == line
    apply(w.ctx, ref, Action.SLEEP)
    assert views.instance_info(w.ctx, ref)["jail"] is None  # no hypervisor, no jail to speak of
    apply(w.ctx, ref, Action.WAKE)
    assert _start_events(w, "instance.wake") == [f"restored from snapshot; {line}"]
    assert views.instance_info(w.ctx, ref)["jail"] == line
    apply(w.ctx, ref, Action.STOP)

    able = jail.Verdict(True, "", "cgroup v1 (cpu, memory, pids)", {"qemu": None, "firecracker": None}, 1.0)
    able.save(record)
    hint = ("(this host was found able to jail (see `mvm doctor`): restore what is missing, or run "
            "`mvm setup` to decide again; `mvm config set jail off` runs hypervisors unjailed)")
    w.rt.jailer = "no-such-jailer"
    with pytest.raises(HostUnsupported) as e:
        apply(w.ctx, ref, Action.START)
    assert e.value.line() == f"cannot jail the hypervisor: no-such-jailer is not on PATH {hint}"
    w.rt.jailer = "true"  # (on PATH) but this process sees no cgroup controllers now
    empty = tmp_path / "cg"
    empty.mkdir()
    (empty / "cgroup.controllers").write_text("hugetlb\n")
    w.rt.jail_config = jail.Config(jail.Mode.AUTO, cgroup_root=empty, record=record)
    with pytest.raises(HostUnsupported) as e:
        apply(w.ctx, ref, Action.START)
    assert e.value.line() == f"cannot jail the hypervisor: cgroup v2: missing controllers cpu, memory, pids {hint}"
    assert w.state(ref) is State.STOPPED and len(_start_events(w, "instance.start")) == 1
    _no_firecracker_of(w, ref)


def test_a_damaged_snapshot_is_refused_and_kept_and_the_instance_stays_sleeping(world: World) -> None:
    from mvm.errors import RuntimeFailure
    from mvm.runtime.base import checksum
    from mvm.services import instances
    from tests.conftest import corrupt

    w = world
    ref = w.new()
    apply(w.ctx, ref, Action.START)
    w.remember(ref, "in-memory")
    apply(w.ctx, ref, Action.SLEEP)
    name = w.ctx.store.instance(ref.tenant, ref.pool, ref.instance).snapshot
    assert name
    snap = specs.snapshot_dir(w.ctx.layout, w.ctx.store.instance(ref.tenant, ref.pool, ref.instance), name)
    info = SnapshotInfo.load(snap)  # every file's checksum, taken as it was committed
    assert info.checksums == {n: checksum(snap / n) for n in ("memory", "vmstate")}
    corrupt(snap / "memory")  # 10 x 512 bytes inside it (the double's guest would not notice)
    kept = {p.name: p.read_bytes() for p in snap.iterdir()}
    with pytest.raises(RuntimeFailure) as err:
        apply(w.ctx, ref, Action.WAKE)
    assert err.value.message == (f"the snapshot of {w.spec(ref).name} is damaged: {snap / 'memory'} "
                                 "does not match the checksum taken when it was written")
    assert "\n" not in err.value.line()
    i = w.ctx.store.instance(ref.tenant, ref.pool, ref.instance)
    assert (i.state, i.snapshot, i.op) == (State.SLEEPING, name, None)
    assert {p.name: p.read_bytes() for p in snap.iterdir()} == kept  # kept for inspection
    _no_firecracker_of(w, ref)
    event = w.ctx.store.events("acme")[0]
    assert event["kind"] == "instance.wake-failed" and "is damaged" in str(event["cause"])
    view = instances.view(w.ctx, ref)  # what `instance info` shows
    assert view.observed == "" and "is damaged" in (view.instance.error or "")


def test_a_stopped_firecracker_is_unresponsive_refused_in_one_line_and_stopped(
        world: World, monkeypatch: pytest.MonkeyPatch) -> None:
    """Firecracker (its API double) stopped with SIGSTOP: observed unresponsive, a warm refused
    in one line, a stop ends it."""
    monkeypatch.setattr(base, "CONTROL_DEADLINE", 0.3)
    ref = world.new()
    apply(world.ctx, ref, Action.START)
    pid = world.rt.pid(world.spec(ref))
    assert pid is not None
    os.kill(pid, signal.SIGSTOP)
    try:
        with pool_locked(world.ctx, ref.pool_ref, False):
            lines = observe.pool(world.ctx, ref.pool_ref)
        assert any("unresponsive: Firecracker of" in ln for ln in lines), lines
        with pytest.raises(RuntimeFailure, match="its hypervisor does not answer"):
            apply(world.ctx, ref, Action.WARM)
        apply(world.ctx, ref, Action.STOP)
        assert world.state(ref) is State.STOPPED and not pids.is_running(pid)
    finally:
        if pids.is_running(pid):
            os.kill(pid, signal.SIGCONT)


@pytest.mark.skipif(os.geteuid() != 0, reason="bind mounts need root")
def test_a_jailed_firecracker_keeps_no_name_of_the_clear_text_secrets(tmp_path: Path) -> None:
    """The jailer's chroot names every disk: once Firecracker holds them open, the transient
    ones (the secrets image, in /dev/shm: another filesystem, so bind-mounted) lose that name;
    the others keep theirs, and the secrets file itself is the lifecycle's to unlink."""
    from mvm.runtime.firecracker import jailer

    shm = Path(tempfile.mkdtemp(dir="/dev/shm"))
    try:
        secrets, rootfs = shm / "i-1.img", tmp_path / "rootfs.ext4"
        secrets.write_bytes(b"API_KEY=hunter2")
        rootfs.write_bytes(b"rootfs")
        spec = VmSpec("i-1", 1, 128, tmp_path / "vmlinux", None, "",
                      (Disk("rootfs", rootfs, True), Disk("secrets", secrets, True, transient=True)),
                      None, tmp_path / "run")
        root = tmp_path / "chroot"
        root.mkdir()
        jailer.link_into_chroot(root, {f"disk-{d.id}": d.path for d in spec.disks}, 0, 0)
        assert os.path.ismount(root / "disk-secrets")  # (another filesystem: bind-mounted)
        assert (root / "disk-secrets").read_bytes() == b"API_KEY=hunter2"
        assert jailer.drop_transient(root, spec) == ["disk-secrets"]
        assert sorted(p.name for p in root.iterdir()) == ["disk-rootfs"]
        assert not any(str(root) in line for line in Path("/proc/self/mounts").read_text().splitlines())
        assert secrets.read_bytes() == b"API_KEY=hunter2"  # (unlinking it is the lifecycle's)
        assert jailer.drop_transient(root, spec) == []  # (again: nothing left to drop)
    finally:
        jailer.unbind_chroot(tmp_path / "chroot")
        shutil.rmtree(shm)
