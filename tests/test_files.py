"""No other tenant and no unprivileged host user can read a tenant's files: directories 0700,
files 0600 from their first byte; the clear-text secrets directory in /dev/shm is ours alone or
refused. Checked as `nobody` would try (`su nobody`, `find -perm`)."""

from __future__ import annotations

import json
import os
import shutil
import stat
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from mvm.config.paths import Layout
from mvm.config.settings import Settings
from mvm.context import Host, compose
from mvm.errors import HostUnsupported
from mvm.lifecycle import apply, create, specs
from mvm.model import Action, Pool, PoolRef, State
from mvm.services import tenants
from mvm.store import FileLocks, SqliteFences, SqliteStore
from mvm.util import private
from tests.conftest import Mvm, instances_by_state, needs_assets
from tests.doubles.fake_runtime import _DETACHED, FakeRuntime
from tests.test_lifecycle_faults import REV

REF = PoolRef("acme", "w")
NOBODY = 65534
DOUBLE_FILES = ("fake-vm.json", "fake.pid", "memory.json")  # the fake hypervisor's, not mvm's


def as_nobody(cmd: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["su", "nobody", "-s", "/bin/sh", "-c", cmd], capture_output=True,
                          text=True, timeout=60)


def readable_by_others(*roots: Path) -> list[str]:
    """What others may read: `find ROOT -perm /o+r`, and group-readable files of a group other
    than root's (QEMU daemonizes with umask 027: its console log and sockets are 0640 root:root,
    in a 0700 directory). Symlinks are not followed."""
    out = []
    for root in roots:
        if root.exists():
            r = subprocess.run(["find", str(root), "(", "-perm", "/o+r", "-o", "(", "-perm", "/g+r",
                                "-not", "-group", "0", ")", ")", "-not", "-type", "l"],
                               capture_output=True, text=True, check=True)
            out += [ln for ln in r.stdout.splitlines() if not ln.endswith(DOUBLE_FILES)]
    return out


class Home:
    """A state home on the fake runtime whose clear-text secrets go to the real /dev/shm."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.ledger = root / "restores.txt"
        self.layout = Layout(root / "home")  # /run/mvm/<tag> and /dev/shm/mvm-<tag>
        self.ctx = Host(layout=self.layout, settings=Settings(),
                        store=SqliteStore(self.layout.db_path()),
                        locks=FileLocks(self.layout.locks_dir(), SqliteFences(self.layout.db_path())),
                        runtime_factory=lambda: FakeRuntime(self.ledger))

    def pool(self, data_disk: int = 8) -> None:
        tenants.create(self.ctx, "acme")
        self.ctx.store.add_pool(Pool("acme", "w", "path:/nonexistent", "p", 1, 128,
                                     data_disk=data_disk, network="none"))
        self.ctx.store.set_pool_current("acme", "w", REV)
        rdir = private.mkdirs(self.layout.revision_dir("acme", "w", REV))
        for f in ("rootfs.ext4", "vmlinux"):
            private.write(rdir / f, b"fake")


@pytest.fixture
def home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Home]:
    monkeypatch.delenv("MVM_HOME", raising=False)
    h = Home(tmp_path)
    yield h
    for i in h.ctx.store.instances():
        FakeRuntime(h.ledger).stop(specs.control_spec(h.layout, i), 0)
    for proc in _DETACHED:
        if proc.poll() is None:
            proc.kill()
    for d in (h.layout.runtime_dir(), h.layout.secrets_runtime_dir()):
        if d.is_symlink():
            d.unlink()
        shutil.rmtree(d, ignore_errors=True)


def _nobodys(d: Path) -> None:
    d.mkdir()
    os.chown(d, NOBODY, NOBODY)
    d.chmod(0o777)


def _roots(d: Path) -> None:
    d.mkdir(mode=0o755)
    d.chmod(0o755)


def _link(d: Path) -> None:
    target = d.with_name(d.name + "-target")
    _nobodys(target)
    d.symlink_to(target)


@pytest.mark.parametrize(("make", "why"), [
    (_nobodys, "is owned by uid 65534, not 0 and has mode 0777, not 0700"),
    (_roots, "has mode 0755, not 0700"),
    (_link, "is not a directory and has mode 0777, not 0700"),
], ids=["nobody-0777", "root-0755", "symlink"])
def test_a_secrets_directory_someone_else_made_is_refused(home: Home, make, why: str) -> None:  # type: ignore[no-untyped-def]
    home.pool()
    (home.layout.tenant_dir("acme") / "secrets.json").write_text('{"API_KEY": "hunter2"}')
    ref = create(home.ctx, REF).ref
    shm = home.layout.secrets_runtime_dir()
    assert shm.parent == Path("/dev/shm")
    make(shm)
    try:
        with pytest.raises(HostUnsupported) as err:
            apply(home.ctx, ref, Action.START)
        assert err.value.line() == (
            f"{shm} {why}: mvm will not put clear-text secrets there (someone else may have made"
            f" it; remove it (`rm -rf {shm}`) and retry)")
        assert os.listdir(shm) == []  # nothing was written in it
        i = home.ctx.store.instance("acme", "w", ref.instance)
        assert (i.state, i.op) == (State.CREATED, None)
        assert not FakeRuntime(home.ledger).is_alive(specs.control_spec(home.layout, i))
    finally:
        target = shm.with_name(shm.name + "-target")
        for d in (shm, target):
            if d.is_symlink():
                d.unlink()
            shutil.rmtree(d, ignore_errors=True)
    apply(home.ctx, ref, Action.START)  # made by mvm, it serves
    assert stat.S_IMODE(os.lstat(shm).st_mode) == 0o700 and os.lstat(shm).st_uid == 0


def test_what_mvm_makes_for_a_tenant_nobody_else_reads(home: Home, tmp_path: Path) -> None:
    home.pool()
    secrets = tmp_path / "s.json"
    secrets.write_text('{"API_KEY": "hunter2"}')
    tenants.set_secrets(home.ctx, "acme", secrets)
    a, b = create(home.ctx, REF).ref, create(home.ctx, REF).ref
    for ref in (a, b):
        apply(home.ctx, ref, Action.START)
    apply(home.ctx, a, Action.SLEEP)  # a snapshot and its manifest
    apply(home.ctx, b, Action.DESTROY, keep_data=True)  # a kept data disk
    assert readable_by_others(home.layout.home, home.layout.runtime_dir()) == []
    assert stat.S_IMODE(home.layout.home.stat().st_mode) == 0o711  # passed through, not listed
    assert stat.S_IMODE((home.layout.home / "tenants").stat().st_mode) == 0o711
    disk = specs.data_disk_path(home.layout, home.ctx.store.instance("acme", "w", a.instance))
    kept = home.layout.tenant_dir("acme") / "kept-data" / f"w-{b.instance}.ext4"
    for f in (disk, kept, home.layout.secrets_file("acme"), home.layout.db_path()):
        assert stat.S_IMODE(f.stat().st_mode) == 0o600, f
        r = as_nobody(f"cat {f}")
        assert r.returncode != 0 and "Permission denied" in r.stderr, (f, r)
    assert as_nobody(f"ls {home.layout.home / 'tenants'}").returncode != 0


def test_an_existing_home_is_made_private_once(tmp_path: Path) -> None:
    """Homes an older mvm made: 0644 disks under 0755 directories."""
    layout = Layout(tmp_path / "home", tmp_path / "run")
    disk = layout.instance_dir("acme", "w", "i-00000001") / "data.ext4"
    disk.parent.mkdir(parents=True, mode=0o755)
    for d in [disk.parent, *disk.parent.parents]:
        if d == tmp_path:
            break
        d.chmod(0o755)
    disk.write_bytes(b"tenant data")
    disk.chmod(0o644)
    (layout.home / "mvm.db").write_bytes(b"")
    (layout.home / "mvm.db").chmod(0o644)
    (layout.home / "config.json").write_text("{}")  # host settings: no tenant's
    (layout.home / "config.json").chmod(0o644)
    compose.make_private(layout)
    assert stat.S_IMODE(disk.stat().st_mode) == 0o600
    assert stat.S_IMODE(disk.parent.stat().st_mode) == 0o700
    assert stat.S_IMODE((layout.home / "tenants").stat().st_mode) == 0o711
    assert stat.S_IMODE((layout.home / "mvm.db").stat().st_mode) == 0o600
    assert stat.S_IMODE(layout.home.stat().st_mode) == 0o711
    assert stat.S_IMODE((layout.home / "config.json").stat().st_mode) == 0o644
    assert (layout.home / compose.PRIVATE_MARK).exists()


@pytest.mark.guest
@pytest.mark.nix
@needs_assets("kernel", "nixpkgs-offline")
def test_a_built_scaled_and_slept_pool_is_private(gmvm: Mvm, app_pool: None) -> None:
    gmvm.ok("pool", "scale", "acme/workers", "--running", "1", "--sleeping", "1")
    running = instances_by_state(gmvm, "acme/workers")["running"][0]
    layout = Layout(gmvm.home)
    own = [p for p in readable_by_others(gmvm.home, layout.runtime_dir(), layout.secrets_runtime_dir())
           if Path(p).name not in ("config.json",)]  # (the test's copy of the host settings)
    t, p, i = running.split("/")
    # The kernel and initrd a jailed QEMU opens by path are readable by its tenant's jail group,
    # which is one of the running QEMU's groups and not root's; nothing else is readable.
    qemu_pid = int((layout.runtime_dir() / i / "qemu.pid").read_text())
    status = Path(f"/proc/{qemu_pid}/status").read_text()
    groups = {int(g) for g in status.split("Groups:")[1].split("\n")[0].split()}
    boot_files = [f for f in own if Path(f).name in ("vmlinux", "initrd")]
    for f in boot_files:
        st = os.stat(f)
        assert stat.S_IMODE(st.st_mode) == 0o640 and st.st_gid in groups and st.st_gid != 0, f
    assert [f for f in own if f not in boot_files] == []
    idir = layout.instance_dir(t, p, i)
    rev = json.loads(gmvm.ok("instance", "info", running, "--json").out)["revision"]
    for f in (idir / "data.ext4", layout.revision_dir(t, p, rev) / "rootfs.ext4",
              layout.revision_dir(t, p, rev) / "initrd", layout.runtime_dir() / i / "console.log"):
        r = as_nobody(f"cat {f} > /dev/null")
        assert r.returncode != 0 and "Permission denied" in r.stderr, (f, r)
    # the image's own modes do not follow mvm's umask: the guest sees a usual tree
    rootfs = layout.revision_dir(t, p, rev) / "rootfs.ext4"
    for d, mode in (("/", "0755"), ("/nix/store", "0755"), ("/proc", "0755"), ("/data", "0755"),
                    ("/tmp", "01777")):
        out = subprocess.run(["debugfs", "-R", f"stat {d}", str(rootfs)], capture_output=True,
                             text=True, check=True).stdout
        assert f"Mode:  {mode}" in out, (d, out[:200])
