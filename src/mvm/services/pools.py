"""Pools: a flake + profile, machine shape, and the revisions built from them."""

from __future__ import annotations

import contextlib
import dataclasses
import re
import shutil
import time
from collections.abc import Callable
from dataclasses import replace

from mvm.context import Host
from mvm.errors import Conflict, InvalidInput, NotFound, QuotaExceeded
from mvm.image import pipeline, source
from mvm.lifecycle import disks, quota
from mvm.model import (
    MAX_CPUS,
    MAX_MEM_MIB,
    MIN_MEM_MIB,
    Event,
    Pool,
    PoolRef,
    Reason,
    Revision,
    check_revision,
)
from mvm.services import builder
from mvm.store import Lease, Store, pool_lock_name, tenant_lock_name
from mvm.util import private

BUILTIN_PROFILES = ("minimal", "baseline", "python")
MIN_DATA_DISK_MIB = 8
NETWORK_MODES = ("tenant", "none")
#: Revisions a successful build keeps besides the current one and those instances use.
KEEP_REVISIONS = 3
PROFILE_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_'-]*")


def builtin_flake(ctx: Host) -> str:
    d = ctx.layout.builtin_flake_dir()
    if not (d / "flake.nix").is_file():
        raise NotFound("mvm's built-in flake is not installed",
                       "run `mvm setup` (or `make demo`), or pass --flake")
    return str(d.resolve())


def get(ctx: Host, ref: PoolRef) -> Pool:
    """The pool (`NotFound` when there is none)."""
    return ctx.store.pool(ref.tenant, ref.pool)


def create(ctx: Host, ref: PoolRef, flake: str | None, profile: str, cpus: int, mem: int,
           data_disk: int = 0, network: str = "tenant", *, idle_warm: float | None = None,
           idle_sleep: float | None = None, min_running: int = 0, pinned: bool = False,
           backend: str = "", unresponsive_grace: float | None = None) -> Pool:
    store = ctx.store
    _check_policy(idle_warm, idle_sleep, min_running)
    grace = Pool.unresponsive_grace if unresponsive_grace is None else _check_grace(unresponsive_grace)
    # The pool's backend (its own, else the host's setting): refused here, with one line, when
    # this host cannot run it.
    from mvm.runtime import select

    # Recorded as it is now: a later change of the host's setting must not move a pool's running
    # instances to a runtime that cannot see their hypervisors.
    backend = (select.parse_backend(backend) if backend else ctx.settings.backend).value
    select.check_backend(select.Backend(backend), ctx.layout)
    tenant = store.tenant(ref.tenant)
    if cpus < 1 or cpus > MAX_CPUS:
        raise InvalidInput(f"--cpus must be between 1 and {MAX_CPUS} (got {cpus})")
    if mem < MIN_MEM_MIB or mem > MAX_MEM_MIB:
        raise InvalidInput(f"--mem must be between {MIN_MEM_MIB} and {MAX_MEM_MIB} MiB (got {mem})")
    if data_disk < 0:
        raise InvalidInput(f"--data-disk must not be negative (got {data_disk})")
    if data_disk and data_disk < MIN_DATA_DISK_MIB:
        raise InvalidInput(f"--data-disk must be 0 (none) or at least {MIN_DATA_DISK_MIB} MiB"
                           f" (got {data_disk})")
    if network not in NETWORK_MODES:
        raise InvalidInput(f"--network must be one of {', '.join(NETWORK_MODES)} (got {network!r})")
    q = tenant.quotas
    if cpus > q.max_vcpus:
        raise QuotaExceeded(f"--cpus {cpus} exceeds tenant {tenant.id}'s vCPU quota ({q.max_vcpus})")
    if mem > q.max_mem:
        raise QuotaExceeded(f"--mem {mem} exceeds tenant {tenant.id}'s memory quota ({q.max_mem} MiB)")
    if data_disk > min(q.max_data_disk, q.max_disk):
        raise QuotaExceeded(f"--data-disk {data_disk} exceeds tenant {tenant.id}'s data disk quota"
                            f" ({min(q.max_data_disk, q.max_disk)} MiB per instance)",
                            "give a smaller --data-disk, or a tenant with a larger --max-data-disk")
    if data_disk:
        disks.check_room(ctx.layout.tenant_dir(tenant.id), data_disk)
    _check_new(store, ref, q.max_pools)  # at once; again under the tenant's lock below
    # The host never evaluates a tenant's flake: only the reference's form and the directory
    # are checked here; a profile the flake lacks is reported by the first build.
    if not PROFILE_NAME.fullmatch(profile):
        raise InvalidInput(f"profile {profile!r} is not a name",
                           "a profile is an attribute name under packages.<system>, e.g. baseline")
    flake_ref = source.check_ref(flake, ctx.layout) if flake else builtin_flake(ctx)
    if flake is None and profile not in BUILTIN_PROFILES:
        raise InvalidInput(f"no built-in profile {profile!r}",
                           f"built-in profiles: {', '.join(BUILTIN_PROFILES)}; or pass --flake")
    # The directory as it is now (resolved by check_ref, opened without following links):
    # every build opens the same path the same way and refuses another directory there.
    flake_id = source.identity(flake_ref)
    pool = Pool(ref.tenant, ref.pool, flake_ref, profile, cpus, mem, data_disk, network,
                created=time.time(), idle_warm=idle_warm, idle_sleep=idle_sleep,
                min_running=min_running, pinned=pinned, backend=backend, flake_id=flake_id,
                unresponsive_grace=grace)
    # Counted and added under the tenant's lock: concurrent creates cannot both pass the count.
    with ctx.locks.lock(tenant_lock_name(ref.tenant)) as lease:
        _check_new(store, ref, q.max_pools)
        store.add_pool(pool, Event("pool.create", f"pool {ref} from {flake_ref}#{profile}",
                                   tenant=ref.tenant, pool=ref.pool), fence=lease)
    private.mkdirs(ctx.layout.artifacts_dir(ref.tenant, ref.pool))
    return pool


def _check_new(store: Store, ref: PoolRef, max_pools: int) -> None:
    existing = store.pools(ref.tenant)
    if any(p.id == ref.pool for p in existing):
        raise Conflict(f"pool {ref} already exists", "choose another name or `mvm pool destroy` it first")
    if len(existing) >= max_pools:
        raise QuotaExceeded(f"tenant {ref.tenant} already has {len(existing)} pools (quota {max_pools})")


def build(ctx: Host, ref: PoolRef, force: bool = False,
          progress: Callable[[str, str], None] = lambda s, m: None,
          builder_kind: str | None = None,
          options: builder.Options | None = None) -> tuple[Revision, bool]:
    """Build in the builder microVM (`vm`) or with the host's Nix (`host`: trusted hosts
    only); by default as the `builder` setting says."""
    store = ctx.store
    pool = store.pool(ref.tenant, ref.pool)
    kind = builder_kind or ctx.settings.builder.value
    if kind not in ("vm", "host"):
        raise InvalidInput(f"--builder must be vm or host (got {kind!r})")
    opts = options or builder.Options()
    opts.check()
    with ctx.locks.lock(pool_lock_name(ref.tenant, ref.pool)) as lease:
        bdir = ctx.layout.builds_dir(ref.tenant, ref.pool)
        private.mkdirs(bdir)
        log = bdir / f"{time.strftime('%Y%m%dT%H%M%S')}-{time.time_ns() % 10**9:09d}.log"
        with private.open_new(log):  # 0600 before Nix writes a line to it
            pass
        interrupted = sum(b["status"] == "interrupted" and not b["finished"]
                          for b in store.builds(ref.tenant, ref.pool))  # (not yet recorded)
        if interrupted:
            store.interrupt_builds(ref.tenant, ref.pool, Event(
                "pool.build-interrupted", f"{interrupted} earlier build(s) recorded as interrupted",
                Reason.CRASH, ref.tenant, ref.pool, cause="the command running it died"),
                fence=lease)
        build_id = store.start_build(ref.tenant, ref.pool, str(log), builder=kind, event=Event(
            "pool.build-start", f"building {pool.flake}#{pool.profile} with the {kind} builder"
            f"{' (forced)' if force else ''}", Reason.BUILD, ref.tenant, ref.pool), fence=lease)
        started = ctx.clock()

        def room(needed: int, record: bool = True) -> None:  # the new revision's bytes fit
            quota.check_build(store, ctx.layout, ref, needed, record)

        try:
            pool = _flake_recorded(ctx, pool)
            if kind == "vm":
                rev, cached = builder.build(ctx, pool, force, log, progress, opts, room)
            else:
                rev, cached = pipeline.run_build(ctx.layout, ctx.settings.nixpkgs, pool, force,
                                                 log, progress, room)
            check_backend_kernel(ctx, pool, rev.hash)
            store.add_revision(rev, fence=lease)
            pipeline.switch_current(ctx.layout, ref.tenant, ref.pool, rev.hash)
            store.set_pool_current(ref.tenant, ref.pool, rev.hash, fence=lease)
        except BaseException as e:
            with contextlib.suppress(Exception):  # what the builder's store grew by counts
                quota.measure_builds(store, ctx.layout, ref.tenant)
            cause = (str(e).splitlines() or [type(e).__name__])[-1]
            store.finish_build(build_id, "failed", error=str(e).splitlines()[-1] if str(e) else "",
                               event=Event("pool.build-failed", f"build failed: {e}", Reason.BUILD,
                                           ref.tenant, ref.pool, cause=cause,
                                           duration=max(0.0, ctx.clock() - started)),
                               fence=lease)
            raise
        removed = _gc(ctx, ref, KEEP_REVISIONS, lease)
        if removed:
            progress("gc", f"removed {len(removed)} old revision(s), kept the newest {KEEP_REVISIONS}"
                     " and those in use")
        quota.measure_builds(store, ctx.layout, ref.tenant)
        store.finish_build(build_id, "ok", rev.hash, cached, event=Event(
            "pool.build", f"revision {rev.hash}{' (cached)' if cached else ''}", Reason.BUILD,
            ref.tenant, ref.pool, duration=max(0.0, ctx.clock() - started)), fence=lease)
        progress("current", rev.hash)
        return rev, cached


def _flake_recorded(ctx: Host, pool: Pool) -> Pool:
    """The pool with its flake directory's identity recorded. A pool made before mvm recorded
    it gets it now, from its path (resolved at its create) opened without following any link:
    a link put in that path since is refused all the same."""
    if pool.flake_id or source.local_dir(pool.flake) is None:
        return pool
    try:
        flake_id = source.identity(pool.flake)
    except source.SourceRefused:
        return pool  # (not recorded: the build refuses it, with the same line)
    ctx.store.set_pool_flake_id(pool.tenant, pool.id, flake_id)
    return dataclasses.replace(pool, flake_id=flake_id)


def check_backend_kernel(ctx: Host, pool: Pool, rev: str) -> None:
    """A revision for a Firecracker pool must carry a kernel Firecracker boots (an uncompressed
    ELF64 vmlinux): a profile that ships only a bzImage is refused with one line, and the
    pool's current revision stays."""
    if (pool.backend or ctx.settings.backend.value) != "firecracker":
        return
    from mvm.image import outputs

    outputs.check_firecracker_kernel(ctx.layout.revision_dir(pool.tenant, pool.id, rev) / "vmlinux")


def revisions(ctx: Host, ref: PoolRef) -> list[Revision]:
    store = ctx.store
    store.pool(ref.tenant, ref.pool)
    return store.revisions(ref.tenant, ref.pool)


def rollback(ctx: Host, ref: PoolRef, revision: str | None = None) -> str:
    store = ctx.store
    pool = store.pool(ref.tenant, ref.pool)
    with ctx.locks.lock(pool_lock_name(ref.tenant, ref.pool)) as lease:
        revs = store.revisions(ref.tenant, ref.pool)
        hashes = [r.hash for r in revs]
        if revision is None:
            if pool.current not in hashes or hashes.index(pool.current) == 0:
                raise NotFound(f"pool {ref} has no revision before the current one",
                               "see `mvm pool revisions`, or pass --revision")
            target = hashes[hashes.index(pool.current) - 1]
        else:
            check_revision(revision)
            matches = [h for h in hashes if h.startswith(revision)]
            if not matches:
                raise NotFound(f"pool {ref} has no revision {revision}", "see `mvm pool revisions " f"{ref}`")
            if len(matches) > 1:
                raise InvalidInput(f"revision prefix {revision} is ambiguous", "give more characters")
            target = matches[0]
        if not (ctx.layout.revision_dir(ref.tenant, ref.pool, target) / "manifest.json").is_file():
            raise NotFound(f"revision {target} of {ref} has no artifacts on disk",
                           "rebuild it with `mvm pool build --force`")
        pipeline.switch_current(ctx.layout, ref.tenant, ref.pool, target)
        store.set_pool_current(ref.tenant, ref.pool, target,
                               Event("pool.rollback", f"current {pool.current or '-'} -> {target}",
                                     tenant=ref.tenant, pool=ref.pool), fence=lease)
        return target


def revisions_in_use(ctx: Host, ref: PoolRef) -> set[str]:
    store = ctx.store
    return {i.revision for i in store.instances(ref.tenant, ref.pool) if i.revision}


def gc(ctx: Host, ref: PoolRef, keep: int = KEEP_REVISIONS) -> list[str]:
    """Delete old revisions; never `current`, never one an instance uses. Returns what went.
    (Every successful build does the same with KEEP_REVISIONS.)"""
    store = ctx.store
    if keep < 0:
        raise InvalidInput(f"--keep must not be negative (got {keep})")
    store.pool(ref.tenant, ref.pool)
    with ctx.locks.lock(pool_lock_name(ref.tenant, ref.pool)) as lease:
        removed = _gc(ctx, ref, keep, lease)
        quota.measure_builds(store, ctx.layout, ref.tenant)
        return removed


def _gc(ctx: Host, ref: PoolRef, keep: int, lease: Lease) -> list[str]:
    """(The caller holds the pool's lock.) All but the newest `keep` revisions, the current
    one and those instances use."""
    store = ctx.store
    pool = store.pool(ref.tenant, ref.pool)
    revs = store.revisions(ref.tenant, ref.pool)
    protected = revisions_in_use(ctx, ref) | {pool.current}
    newest = {r.hash for r in revs[-keep:]} if keep else set()
    removed = []
    for r in revs:
        if r.hash in protected or r.hash in newest:
            continue
        shutil.rmtree(ctx.layout.revision_dir(ref.tenant, ref.pool, r.hash), ignore_errors=True)
        removed.append(r.hash)
    if removed:
        store.remove_revisions(ref.tenant, ref.pool, removed,
                               Event("pool.gc", f"removed {', '.join(removed)}",
                                     tenant=ref.tenant, pool=ref.pool), fence=lease)
    return removed


def destroy(ctx: Host, ref: PoolRef, force: bool = False) -> None:
    store = ctx.store
    store.pool(ref.tenant, ref.pool)
    with ctx.locks.lock(pool_lock_name(ref.tenant, ref.pool)) as lease:
        live = store.instances(ref.tenant, ref.pool)
        if live and not force:
            raise Conflict(f"pool {ref} still has {len(live)} instance(s)",
                           "scale it to zero first, or pass --force to destroy them too")
        if live:
            from mvm.lifecycle import apply
            from mvm.model import Action

            for i in live:
                apply(ctx, i.ref, Action.DESTROY, lease=lease)
        builder.end_stale(ctx, store.pool(ref.tenant, ref.pool))
        store.remove_pool(ref.tenant, ref.pool, Event("pool.destroy", f"pool {ref} destroyed",
                                                      tenant=ref.tenant, pool=ref.pool), fence=lease)
        shutil.rmtree(ctx.layout.pool_dir(ref.tenant, ref.pool), ignore_errors=True)
        ctx.locks.remove(pool_lock_name(ref.tenant, ref.pool))  # (we hold it)


# -- idle policy (run by the agent, `services/agent.py`) -------------------------------------

_DURATION = re.compile(r"(\d+(?:\.\d+)?)([smh]?)")
_UNITS = {"": 1.0, "s": 1.0, "m": 60.0, "h": 3600.0}
MAX_DURATION = 30 * 86400.0


def parse_duration(text: str, option: str) -> float | None:
    """Seconds from `30s`, `5m`, `1h` or a plain number of seconds; `0` or `off`: None (never)."""
    value = text.strip().lower()
    if value in ("off", "none", "never"):
        return None
    m = _DURATION.fullmatch(value)
    if m is None:
        raise InvalidInput(f"{option} {text!r} is not a duration",
                           "give seconds, or a number with s, m or h (e.g. 30s, 5m, 1h); 0 or off: never")
    seconds = float(m.group(1)) * _UNITS[m.group(2)]
    if seconds > MAX_DURATION:
        raise InvalidInput(f"{option} {text!r} is longer than 30 days", "give a shorter duration, or off")
    return seconds or None


def _check_policy(idle_warm: float | None, idle_sleep: float | None, min_running: int) -> None:
    if min_running < 0:
        raise InvalidInput(f"--min-running must not be negative (got {min_running})")
    for name, v in (("--idle-warm", idle_warm), ("--idle-sleep", idle_sleep)):
        if v is not None and not 0 < v <= MAX_DURATION:
            raise InvalidInput(f"{name} must be a positive duration of at most 30 days (got {v})")


def parse_grace(text: str, option: str = "--unresponsive-grace") -> float:
    """`--unresponsive-grace`: a duration, which may not be off."""
    seconds = parse_duration(text, option)
    if seconds is None:
        raise InvalidInput(f"{option} {text!r} is not a positive duration",
                           "give how long a hypervisor may not answer before it is ended, e.g. 30s")
    return _check_grace(seconds)


def _check_grace(seconds: float) -> float:
    if not 0 < seconds <= MAX_DURATION:
        raise InvalidInput(f"--unresponsive-grace must be a positive duration of at most 30 days"
                           f" (got {seconds:g})")
    return seconds


_UNSET = object()


def update_policy(ctx: Host, ref: PoolRef, idle_warm: object = _UNSET,
                  idle_sleep: object = _UNSET, min_running: int | None = None,
                  pinned: bool | None = None, unresponsive_grace: float | None = None) -> Pool:
    """Change a pool's idle policy; what is not given stays (`idle_warm`, `idle_sleep`:
    seconds, or None for never). The agent applies it at its next pass. `unresponsive_grace`:
    seconds a hypervisor that does not answer is given before it is ended (observe.py)."""
    store = ctx.store
    with ctx.locks.lock(pool_lock_name(ref.tenant, ref.pool)) as lease:
        p = store.pool(ref.tenant, ref.pool)
        warm = p.idle_warm if idle_warm is _UNSET else idle_warm
        sleep = p.idle_sleep if idle_sleep is _UNSET else idle_sleep
        assert warm is None or isinstance(warm, (int, float))
        assert sleep is None or isinstance(sleep, (int, float))
        keep = p.min_running if min_running is None else min_running
        pin = p.pinned if pinned is None else pinned
        _check_policy(warm, sleep, keep)
        if unresponsive_grace is not None:
            _check_grace(unresponsive_grace)
        grace = p.unresponsive_grace if unresponsive_grace is None else unresponsive_grace
        out = replace(p, idle_warm=warm, idle_sleep=sleep, min_running=keep, pinned=pin,
                      unresponsive_grace=grace)
        store.set_pool_policy(ref.tenant, ref.pool, warm, sleep, keep, pin, Event(
            "pool.policy", f"idle policy of {ref}: {describe_policy(out)}; unresponsive-grace "
            f"{_fmt(grace)}", tenant=ref.tenant, pool=ref.pool), fence=lease, unresponsive_grace=grace)
        return store.pool(ref.tenant, ref.pool)


def _fmt(seconds: float | None) -> str:
    if seconds is None:
        return "off"
    for unit, n in (("h", 3600.0), ("m", 60.0)):
        if seconds >= n and seconds % n == 0:
            return f"{seconds / n:g}{unit}"
    return f"{seconds:g}s"


def describe_grace(p: Pool) -> str:
    return f"unresponsive-grace {_fmt(p.unresponsive_grace)}"


def describe_policy(p: Pool) -> str:
    return (f"idle-warm {_fmt(p.idle_warm)}, idle-sleep {_fmt(p.idle_sleep)}, "
            f"min-running {p.min_running}{', pinned' if p.pinned else ''}")
