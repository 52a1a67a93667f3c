"""Where an instance's files live, and the VM a revision of it is."""

from __future__ import annotations

import shutil
from pathlib import Path

from mvm.config.paths import RUNTIME_MODE, Layout
from mvm.context import Host
from mvm.errors import NotFound
from mvm.lifecycle import netops, secrets_disk
from mvm.model import Instance
from mvm.runtime.base import Disk, JailIds, Runtime, VmSpec
from mvm.store import Store
from mvm.util import private


def instance_dir(layout: Layout, i: Instance) -> Path:
    return layout.instance_dir(i.tenant, i.pool, i.id)


def data_disk_path(layout: Layout, i: Instance) -> Path:
    return instance_dir(layout, i) / "data.ext4"


def kept_data(pool: str, instance: str) -> str:
    """Where `destroy --keep-data` moves an instance's data disk, under its tenant's directory
    (outside the pool: a later `pool destroy` must not take what the user kept)."""
    return f"kept-data/{pool}-{instance}.ext4"


def run_dir(layout: Layout, i: Instance) -> Path:
    """Sockets, pid file and console log. They live under a short runtime path (socket paths
    are limited to 108 bytes); `instances/<i>/run` links there."""
    real = layout.runtime_dir() / i.id
    link = instance_dir(layout, i) / "run"
    if not link.is_symlink() and instance_dir(layout, i).is_dir():
        private.mkdirs(real.parent, RUNTIME_MODE)
        private.mkdirs(real)
        if link.is_dir():  # a run dir of an older layout
            shutil.rmtree(link)
        link.symlink_to(real)
    return real


def snapshots_dir(layout: Layout, i: Instance) -> Path:
    """Every snapshot of an instance has a name of its own under here; the store names the one
    committed (`Instance.snapshot`), which a wake may restore exactly once."""
    return instance_dir(layout, i) / "snapshot"


def snapshot_dir(layout: Layout, i: Instance, name: str) -> Path:
    return snapshots_dir(layout, i) / name


def spec_for(ctx: Host, i: Instance, revision: str) -> VmSpec:
    """The VM for an instance at a revision. Device order is fixed: rootfs, data, secrets."""
    store, layout = ctx.store, ctx.layout
    pool = store.pool(i.tenant, i.pool)
    rdir = layout.revision_dir(i.tenant, i.pool, revision)
    if not (rdir / "rootfs.ext4").is_file():
        raise NotFound(f"revision {revision} of {i.tenant}/{i.pool} has no artifacts",
                       f"build the pool: `mvm pool build {i.tenant}/{i.pool}`")
    devs = [Disk("rootfs", rdir / "rootfs.ext4", True)]
    if pool.data_disk:
        devs.append(Disk("data", data_disk_path(layout, i), False))
    devs.append(Disk("secrets", secrets_disk.image_path(layout, i.id), True, transient=True))
    initrd = rdir / "initrd"
    return VmSpec(
        name=i.id, vcpus=pool.cpus, mem_mib=pool.mem, kernel=rdir / "vmlinux",
        initrd=initrd if initrd.is_file() else None,
        cmdline=" ".join(_cmdline(store, i)), disks=tuple(devs),
        net=netops.netif(store, i), run_dir=run_dir(layout, i), ids=jail_ids(ctx, i),
    )


def jail_ids(ctx: Host, i: Instance) -> JailIds:
    """Who the instance's jailed hypervisor runs as: a uid and gid of its own, and its tenant's
    group (which may read the tenant's kernel and initrd). Numbers kept by the store."""
    base = ctx.settings.jail_uid_base
    own = base + ctx.store.jail_number(f"instance:{i.id}")
    return JailIds(own, own, (base + ctx.store.jail_number(f"tenant:{i.tenant}"),))


def runtime(ctx: Host, i: Instance) -> Runtime:
    """The runtime of the instance's pool (its `backend`, else the host's)."""
    try:
        backend = ctx.store.pool(i.tenant, i.pool).backend
    except NotFound:  # (a pool destroyed under it: its instances ran on the host's)
        backend = ""
    return ctx.runtime_for(backend)


def control_spec(layout: Layout, i: Instance) -> VmSpec:
    """Enough of a VM to find, ask and end its hypervisor — even when its revision's files are
    gone: sockets, pid file and console live in the run dir."""
    return VmSpec(name=i.id, vcpus=1, mem_mib=0, kernel=Path("/nonexistent"), initrd=None,
                  cmdline="", disks=(), net=None, run_dir=layout.runtime_dir() / i.id)


def _cmdline(store: Store, i: Instance) -> list[str]:
    args = ["root=/dev/vda", "ro", f"mvm.hostname={i.id}"]
    ip = netops.kernel_ip_arg(store, i)
    if ip:
        args.append(ip)
    return args
