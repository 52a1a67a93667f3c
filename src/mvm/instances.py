"""Instances: the state machine of DESIGN §2 driven through the runtime interface.

Every transition goes through `model.transition` (one table, one guard) and through
`_transition`, which holds the pool lock, re-reads the observed state, and writes the new
state only after the runtime and the guest did what was asked.
"""

from __future__ import annotations

import shutil
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import replace
from pathlib import Path

from mvm import disks, netops, paths, quota, secrets_disk
from mvm.errors import (
    Conflict,
    IllegalTransition,
    MvmError,
    NotFound,
    QuotaExceeded,
    RuntimeFailure,
)
from mvm.guest.agent_client import ExecResult
from mvm.model import (
    Action,
    Instance,
    InstanceRef,
    PoolRef,
    State,
    new_instance_id,
    transition,
)
from mvm.runtime.base import Disk, Runtime, Steps, VmSpec, VmStatus
from mvm.store import Store, pool_lock, tenant_lock

Progress = Callable[[str, str], None]
AGENT_READY_TIMEOUT = 120.0
STOP_TIMEOUT = 10.0


def _noop(step: str, message: str) -> None:
    pass


def runtime() -> Runtime:
    from mvm.runtime import select

    return select.runtime()


def agent(rt: Runtime, spec: VmSpec):  # type: ignore[no-untyped-def]
    from mvm.guest.agent_client import AgentClient

    return AgentClient(rt.agent_socket(spec))


# -- specs --------------------------------------------------------------------

def instance_dir(i: Instance) -> Path:
    return paths.instance_dir(i.tenant, i.pool, i.id)


def data_disk_path(i: Instance) -> Path:
    return instance_dir(i) / "data.ext4"


def run_dir(i: Instance) -> Path:
    """Sockets, pid file and console log. They live under a short runtime path (socket paths
    are limited to 108 bytes); `instances/<i>/run` links there."""
    real = paths.runtime_dir() / i.id
    link = instance_dir(i) / "run"
    if not link.is_symlink() and instance_dir(i).is_dir():
        real.mkdir(parents=True, exist_ok=True)
        if link.is_dir():  # a run dir of an older layout
            shutil.rmtree(link)
        link.symlink_to(real)
    return real


def snapshot_dir(i: Instance) -> Path:
    return instance_dir(i) / "snapshot"


def spec_for(store: Store, i: Instance, revision: str) -> VmSpec:
    """The VM for an instance at a revision. Device order is fixed: rootfs, data, secrets."""
    pool = store.pool(i.tenant, i.pool)
    rdir = paths.revision_dir(i.tenant, i.pool, revision)
    if not (rdir / "rootfs.ext4").is_file():
        raise NotFound(f"revision {revision} of {i.tenant}/{i.pool} has no artifacts",
                       f"build the pool: `mvm pool build {i.tenant}/{i.pool}`")
    devs = [Disk("rootfs", rdir / "rootfs.ext4", True)]
    if pool.data_disk:
        devs.append(Disk("data", data_disk_path(i), False))
    devs.append(Disk("secrets", secrets_disk.image_path(i.id), True))
    initrd = rdir / "initrd"
    return VmSpec(
        name=i.id, vcpus=pool.cpus, mem_mib=pool.mem, kernel=rdir / "vmlinux",
        initrd=initrd if initrd.is_file() else None,
        cmdline=" ".join(_cmdline(store, i)), disks=tuple(devs),
        net=netops.netif(store, i), run_dir=run_dir(i),
    )


def _cmdline(store: Store, i: Instance) -> list[str]:
    args = ["root=/dev/vda", "ro", f"mvm.hostname={i.id}"]
    ip = netops.kernel_ip_arg(store, i)
    if ip:
        args.append(ip)
    return args


# -- observed state --------------------------------------------------------------

def refresh(store: Store, i: Instance, rt: Runtime | None = None) -> Instance:
    """Reconcile a live instance with its hypervisor: a dead process is failed, never running."""
    if not i.state.is_live() or i.revision is None:
        return i
    rt = rt or runtime()
    try:
        spec = spec_for(store, i, i.revision)
    except MvmError:
        return i
    try:
        status = rt.status(spec)
    except RuntimeFailure:
        return i  # alive but not answering: its state is unknown, keep what we know
    if status is VmStatus.GONE:
        rt.stop(spec, 0)  # removes stale sockets and pid file
        netops.instance_down(store, i)
        secrets_disk.remove(i.id)
        store.update_instance(i.id, state=State.FAILED, pid=None,
                              error="hypervisor process exited unexpectedly")
        store.event("instance.failed", "hypervisor process gone", i.tenant, i.pool, i.id)
    elif status is VmStatus.PAUSED and i.state is State.RUNNING:
        store.update_instance(i.id, state=State.WARM)
    elif status is VmStatus.RUNNING and i.state is State.WARM:
        store.update_instance(i.id, state=State.RUNNING)
    else:
        return i
    return store.instance(i.tenant, i.pool, i.id)


def list_instances(store: Store, tenant: str | None = None, pool: str | None = None,
                   locked: bool = False) -> list[Instance]:
    """Instances with their observed state. `locked`: the caller holds the pool's lock."""
    rt = None
    out = []
    for i in store.instances(tenant, pool):
        if i.state.is_live():
            rt = rt or runtime()
            if locked:
                i = refresh(store, i, rt)
            else:
                try:  # a command at work on the pool owns its states: don't correct under it
                    with pool_lock(i.tenant, i.pool, timeout=0):
                        i = refresh(store, i, rt)
                except Conflict:
                    pass
        out.append(i)
    return out


def get(store: Store, ref: InstanceRef, locked: bool = False) -> Instance:
    """One instance with its observed state. `locked`: the caller holds the pool's lock."""
    i = store.instance(ref.tenant, ref.pool, ref.instance)
    if locked:
        return refresh(store, i)
    try:
        with pool_lock(ref.tenant, ref.pool, timeout=0):
            return refresh(store, i)
    except Conflict:
        return i


# -- transitions --------------------------------------------------------------------

@contextmanager
def _locked(ref: PoolRef, locked: bool) -> Iterator[None]:
    """`locked`: the caller (pool scale, secrets rotation) holds the tenant's and the pool's
    locks and has checked quotas for the end state. Otherwise take both here: the tenant's
    for quotas and addresses, the pool's for its instances."""
    if locked:
        yield
    else:
        with tenant_lock(ref.tenant), pool_lock(ref.tenant, ref.pool):
            yield


def _check_quota(store: Store, i: Instance, target: State, locked: bool) -> None:
    if not locked:  # (pool scale checked its end state; its steps may pass through more)
        quota.check_transition(store, i, target)


def create(store: Store, ref: PoolRef, locked: bool = False) -> Instance:
    """A new instance in state `created`: an ID, an address, and its data disk."""
    pool = store.pool(ref.tenant, ref.pool)
    tenant = store.tenant(ref.tenant)
    with _locked(ref, locked):  # the tenant's lock: its addresses are allocated here
        if len(store.instances(ref.tenant, ref.pool)) >= tenant.quotas.max_instances:
            raise QuotaExceeded(f"pool {ref} already has {tenant.quotas.max_instances} instances"
                                " (tenant quota max-instances)")
        iid = new_instance_id()
        host_index, ip, mac = netops.allocate(store, tenant, pool, iid)
        i = Instance(iid, ref.tenant, ref.pool, State.CREATED, pool.current, host_index, ip, mac)
        d = paths.instance_dir(ref.tenant, ref.pool, iid)
        try:
            d.mkdir(parents=True)
            if pool.data_disk:
                disks.create_data_disk(d / "data.ext4", pool.data_disk)
            store.add_instance(i)
        except BaseException:
            shutil.rmtree(d, ignore_errors=True)
            raise
        store.event("instance.create", f"created {iid}", ref.tenant, ref.pool, iid)
        return i


def start(store: Store, ref: InstanceRef, progress: Progress = _noop, locked: bool = False,
          revision: str | None = None) -> Instance:
    """Cold boot. A (re)start boots the pool's current revision unless told which."""
    with _locked(ref.pool_ref, locked):
        i = get(store, ref, locked=True)
        target = transition(i.state, Action.START)
        _check_quota(store, i, target, locked)
        pool = store.pool(ref.tenant, ref.pool)
        revision = revision or pool.current
        if not revision:
            raise NotFound(f"pool {ref.pool_ref} has no built revision",
                           f"run `mvm pool build {ref.pool_ref}` first")
        rt = runtime()
        tenant = store.tenant(ref.tenant)
        i = replace(i, revision=revision)
        spec = spec_for(store, i, revision)
        if rt.is_alive(spec):
            # The store says nothing runs, yet a hypervisor does: a command that crashed
            # between boot and recording it. It is no one's; end it before booting afresh.
            rt.stop(spec, 0)
            store.event("instance.orphan", "ended a hypervisor the store did not know of",
                        i.tenant, i.pool, i.id)
        with Steps(f"start {i.id}", _timed(progress)) as steps:
            steps.run("network", lambda: netops.instance_up(store, i))
            steps.on_undo("network", lambda: netops.instance_down(store, i))
            steps.run("secrets", lambda: secrets_disk.build(ref.tenant, i.id))
            steps.on_undo("secrets", lambda: secrets_disk.remove(i.id))
            steps.run("boot", lambda: rt.boot(spec))
            steps.on_undo("boot", lambda: rt.stop(spec, 0))
            steps.run("agent", lambda: agent(rt, spec).wait_ready(AGENT_READY_TIMEOUT))
        secrets_disk.remove(i.id)  # the hypervisor holds it open; nothing stays in clear
        _discard_snapshot(i)
        store.update_instance(i.id, state=target, revision=revision,
                              secrets_version=tenant.secrets_version, error=None)
        store.event("instance.start", f"running revision {revision}", i.tenant, i.pool, i.id)
        return store.instance(ref.tenant, ref.pool, ref.instance)


def warm(store: Store, ref: InstanceRef, progress: Progress = _noop, locked: bool = False) -> Instance:
    return _set_vcpus(store, ref, Action.WARM, locked)


def resume(store: Store, ref: InstanceRef, progress: Progress = _noop, locked: bool = False) -> Instance:
    return _set_vcpus(store, ref, Action.RESUME, locked)


def _set_vcpus(store: Store, ref: InstanceRef, action: Action, locked: bool) -> Instance:
    """warm (pause the vCPUs, RAM stays) and resume: one QMP/API call, no guest involvement."""
    with _locked(ref.pool_ref, locked):
        i = get(store, ref, locked=True)
        target = transition(i.state, action)
        _check_quota(store, i, target, locked)
        assert i.revision
        spec = spec_for(store, i, i.revision)
        rt = runtime()
        if action is Action.WARM:
            rt.pause(spec)
        else:
            rt.resume(spec)
        store.update_instance(i.id, state=target)
        store.event(f"instance.{action.value}", f"vCPUs {'paused' if action is Action.WARM else 'running'}",
                    i.tenant, i.pool, i.id)
        return store.instance(ref.tenant, ref.pool, ref.instance)


def sleep(store: Store, ref: InstanceRef, progress: Progress = _noop, locked: bool = False) -> Instance:
    """Sync the guest, snapshot memory + devices to disk, end the hypervisor (RAM freed)."""
    with _locked(ref.pool_ref, locked):
        i = get(store, ref, locked=True)
        target = transition(i.state, Action.SLEEP)
        rt = runtime()
        assert i.revision
        spec = spec_for(store, i, i.revision)
        was_warm = i.state is State.WARM
        if was_warm:
            rt.resume(spec)  # the guest must run to sync its disks
        ag = agent(rt, spec)
        try:
            ag.sleep_prep()
            t0 = time.monotonic()
            rt.snapshot(spec, snapshot_dir(i))
            progress("snapshot", f"{time.monotonic() - t0:.2f}s")
        except BaseException:
            # A failed sleep leaves the instance as it was: running (or warm), never lost.
            if rt.is_alive(spec):
                try:
                    ag.wake()
                finally:
                    if was_warm:
                        rt.pause(spec)
            raise
        # The TAP stays (it holds no RAM): a wake then plugs straight back in.
        store.update_instance(i.id, state=target, pid=None)
        store.event("instance.sleep", "snapshotted to disk", i.tenant, i.pool, i.id)
        return store.instance(ref.tenant, ref.pool, ref.instance)


def wake(store: Store, ref: InstanceRef, progress: Progress = _noop, locked: bool = False) -> Instance:
    """Restore the snapshot in a new hypervisor; re-sync the clock and re-deliver secrets."""
    with _locked(ref.pool_ref, locked):
        i = get(store, ref, locked=True)
        target = transition(i.state, Action.WAKE)
        _check_quota(store, i, target, locked)
        rt = runtime()
        assert i.revision  # a snapshot is tied to the revision it was taken on
        spec = spec_for(store, i, i.revision)
        tenant = store.tenant(ref.tenant)
        restored = False

        def restore() -> None:
            nonlocal restored
            rt.restore(spec, snapshot_dir(i))
            restored = True

        try:
            _wake_steps(store, i, spec, rt, restore, tenant.secrets_version, progress)
        except BaseException as e:
            if restored:
                # The guest ran after the restore and may have written to its disks: the
                # snapshot no longer matches them and must never be restored again.
                _discard_snapshot(i)
                store.update_instance(i.id, state=State.FAILED, error=f"wake failed: {e}")
            raise
        secrets_disk.remove(i.id)
        _discard_snapshot(i)  # the disks moved on; the snapshot must never be restored again
        store.update_instance(i.id, state=target, secrets_version=tenant.secrets_version, error=None)
        store.event("instance.wake", "restored from snapshot", i.tenant, i.pool, i.id)
        return store.instance(ref.tenant, ref.pool, ref.instance)


def _wake_steps(store: Store, i: Instance, spec: VmSpec, rt: Runtime, restore: Callable[[], None],
                secrets_version: int, progress: Progress) -> None:
    with Steps(f"wake {i.id}", _timed(progress)) as steps:
        steps.run("network", lambda: netops.instance_up(store, i))  # the TAP kept at sleep
        steps.run("secrets", lambda: secrets_disk.build(i.tenant, i.id))
        steps.on_undo("secrets", lambda: secrets_disk.remove(i.id))
        steps.run("restore", restore)
        steps.on_undo("restore", lambda: rt.stop(spec, 0))
        fresh = i.secrets_version != secrets_version
        steps.run("agent", lambda: agent(rt, spec).wake(fresh_secrets=fresh))


def stop(store: Store, ref: InstanceRef, progress: Progress = _noop, locked: bool = False) -> Instance:
    with _locked(ref.pool_ref, locked):
        i = get(store, ref, locked=True)
        target = transition(i.state, Action.STOP)
        _halt(store, i)
        store.update_instance(i.id, state=target, pid=None)
        store.event("instance.stop", "stopped", i.tenant, i.pool, i.id)
        return store.instance(ref.tenant, ref.pool, ref.instance)


def destroy(store: Store, ref: InstanceRef, keep_data: bool = False, locked: bool = False) -> Path | None:
    """Stop, then remove runtime files, snapshot and (unless kept) the data disk."""
    with _locked(ref.pool_ref, locked):
        i = store.instance(ref.tenant, ref.pool, ref.instance)
        transition(i.state, Action.DESTROY)
        _halt(store, i)
        netops.release(store, i)
        kept = None
        if keep_data and data_disk_path(i).exists():
            # outside the pool: a later `pool destroy` must not take what the user kept
            kept = paths.tenant_dir(i.tenant) / "kept-data" / f"{i.pool}-{i.id}.ext4"
            kept.parent.mkdir(parents=True, exist_ok=True)
            data_disk_path(i).rename(kept)
        shutil.rmtree(instance_dir(i), ignore_errors=True)
        shutil.rmtree(paths.runtime_dir() / i.id, ignore_errors=True)
        store.remove_instance(i.id)
        store.event("instance.destroy", f"destroyed{' (data kept)' if kept else ''}",
                    i.tenant, i.pool, i.id)
        return kept


def _halt(store: Store, i: Instance) -> None:
    """Whatever the state: no hypervisor, no TAP, no secrets image, no snapshot."""
    if i.revision:
        try:
            spec = spec_for(store, i, i.revision)
        except MvmError:
            spec = None
        if spec is not None:
            rt = runtime()
            graceful = i.state in (State.RUNNING, State.WARM) and rt.is_alive(spec)
            if graceful:
                # Flush the guest's page cache to the data disk before power-off, so a stop
                # (or a destroy --keep-data) never loses what the guest wrote.
                try:
                    if i.state is State.WARM:
                        rt.resume(spec)
                    agent(rt, spec).sleep_prep()
                except MvmError:
                    graceful = False
            rt.stop(spec, STOP_TIMEOUT if graceful else 0)
    netops.instance_down(store, i)
    secrets_disk.remove(i.id)
    _discard_snapshot(i)


def _discard_snapshot(i: Instance) -> None:
    shutil.rmtree(snapshot_dir(i), ignore_errors=True)


def exec_(store: Store, ref: InstanceRef, argv: list[str], timeout: float = 60.0) -> ExecResult:

    i = get(store, ref)
    if i.state is not State.RUNNING:
        hint = {State.WARM: f"resume it first: `mvm instance resume {ref}`",
                State.SLEEPING: f"wake it first: `mvm instance wake {ref}`"}.get(
                    i.state, f"start it first: `mvm instance start {ref}`")
        raise IllegalTransition(f"cannot exec in {ref}: it is {i.state.value}", hint)
    assert i.revision
    rt = runtime()
    result: ExecResult = agent(rt, spec_for(store, i, i.revision)).exec(argv, timeout)
    return result


def console(store: Store, ref: InstanceRef) -> bytes:
    i = store.instance(ref.tenant, ref.pool, ref.instance)
    log = runtime().console_log(spec_for(store, i, i.revision)) if i.revision else Path("/nonexistent")
    try:
        return log.read_bytes()
    except FileNotFoundError:
        return b""


def redeliver_secrets(store: Store, tenant: str, progress: Progress = _noop) -> list[str]:
    """Restart running/warm instances holding old secrets, each on the revision it runs;
    sleeping ones get the new secrets at wake. Returns what was restarted; a failure of one
    is reported and the others still go."""
    t = store.tenant(tenant)
    done, failed = [], []
    for i in store.instances(tenant):
        if i.state in (State.RUNNING, State.WARM) and i.secrets_version < t.secrets_version:
            try:
                with tenant_lock(i.tenant), pool_lock(i.tenant, i.pool):
                    was_warm = i.state is State.WARM
                    stop(store, i.ref, progress, locked=True)
                    start(store, i.ref, progress, locked=True, revision=i.revision)
                    if was_warm:
                        warm(store, i.ref, progress, locked=True)
                done.append(str(i.ref))
            except MvmError as e:
                progress(str(i.ref), f"failed: {e.line()}")
                failed.append(e)
    if failed:
        raise failed[0]
    return done


def _timed(progress: Progress) -> Callable[[str, float], None]:
    return lambda step, took: progress(step, f"{took:.2f}s")

