"""The ephemeral builder microVM: `mvm builder init|info`, and one `pool build` run in it.

The VM is booted through the runtime interface like an instance (nothing here is
QEMU-specific): block devices only, and it is destroyed — process, sockets, run directory,
TAP and its disks but the pool's store — whether the build succeeds, fails, times out or is
interrupted. It has no network, except when it must fetch (`on_host.needs_network`: a URL
ref, which only the builder fetches, or no offline package set): then an egress-only TAP on
its tenant's own network for the run (`netops.builder_up`).
Its console (the build job's step lines and Nix's log, bounded) streams as
step progress and is kept in the build log.
"""

from __future__ import annotations

import contextlib
import re
import shutil
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

from mvm.builder import on_host, vm_image
from mvm.context import Host
from mvm.errors import BuildFailed, InvalidInput
from mvm.image import archive
from mvm.lifecycle import netops
from mvm.model import Pool, Revision
from mvm.runtime.base import Disk, NetIf, VmSpec
from mvm.util.progress import Progress

#: `room(needed_bytes, record)`: raises QuotaExceeded when a revision of that size would not fit
#: the tenant's disk quota or the host's free space (`lifecycle.quota.check_build`).
Room = Callable[[int, bool], None]
POLL = 0.2
#: How often a running builder's disks are measured against the quota (seconds).
DISK_WATCH = 1.0
#: The console may exceed the job's own log limit by kernel messages and step lines only.
CONSOLE_LIMIT = 2 * on_host.LOG_LIMIT + 64 * 1024
MIN_MEM, MAX_MEM = 512, 16384
MAX_CPUS = 8
CMDLINE = "root=/dev/vda mvm.rootwait=30"
_KERNEL_LINE = re.compile(r"\[\s*\d+\.\d+\] ")


@dataclass(frozen=True)
class Options:
    cpus: int = 2
    mem_mib: int = 1024
    timeout: float = 1800.0

    def check(self) -> None:
        if not 1 <= self.cpus <= MAX_CPUS:
            raise InvalidInput(f"--builder-cpus must be between 1 and {MAX_CPUS} (got {self.cpus})")
        if not MIN_MEM <= self.mem_mib <= MAX_MEM:
            raise InvalidInput(f"--builder-mem must be between {MIN_MEM} and {MAX_MEM} MiB"
                               f" (got {self.mem_mib})")
        if self.timeout <= 0:
            raise InvalidInput(f"--timeout must be positive (got {self.timeout:g})")


def init(ctx: Host, progress: Progress, force: bool = False) -> tuple[vm_image.BuilderInfo, bool]:
    info, made = vm_image.install(ctx.layout.builder_dir(), progress, force)
    if ctx.settings.nixpkgs.startswith("path:"):
        progress("package-set", "…")
        export, paths = on_host.nixpkgs_export(ctx.layout, Path(ctx.settings.nixpkgs[5:]))
        progress("package-set", f"{len(paths)} store paths ({export.stat().st_size // 2**20} MiB)")
        _seed(ctx, info, ctx.layout.builder_dir() / "seed.log", progress, Options())
    return info, made


def info(ctx: Host) -> vm_image.BuilderInfo:
    return vm_image.load(ctx.layout.builder_dir())


def build(ctx: Host, pool: Pool, force: bool, log: Path, progress: Progress,
          opts: Options, room: Room | None = None) -> tuple[Revision, bool]:
    """Build pool in a builder microVM (or find the revision its unchanged inputs made).
    With `room`, the builder's disks are measured while it runs (its store and its output
    count in the tenant's disk quota: it is stopped when they cross it) and its output is
    checked to fit before it is collected."""
    opts.check()
    started = time.monotonic()
    image = info(ctx)
    progress("inputs", "…")
    tenant = ctx.store.tenant(pool.tenant)
    networked = on_host.needs_network(pool.flake, ctx.settings.nixpkgs)
    net = netops.builder_net(tenant) if networked else None
    netcfg = None if net is None else {
        "address": f"{net.ip}/{net.subnet.prefixlen}", "gateway": str(net.gateway),
        "dns": netops.builder_dns()}
    prep = on_host.prepare(ctx.layout, ctx.settings.nixpkgs, pool, image, netcfg)
    try:
        rev = None if force or prep.networked else on_host.cached(ctx.layout, pool, prep.key)
        progress("inputs", f"key {prep.key[:16]}" + (f" -> revision {rev} (cached, nothing to build)"
                                                     if rev else ""))
        if rev is not None:
            from mvm.image import pipeline

            manifest = pipeline.read_manifest(ctx.layout, pool.tenant, pool.id, rev)
            return Revision(pool.tenant, pool.id, rev, manifest["out_path"], manifest,
                            float(manifest.get("built", time.time()))), True
        end_stale(ctx, pool)  # before its store disk is touched
        seed = None if prep.store.is_file() or not on_host.offline(ctx.settings.nixpkgs) \
            else _seed(ctx, image, log, progress, opts)
        on_host.disks(prep, seed)
        watch = None if room is None else _DiskWatch(prep, room)
        with _network(ctx, pool, opts, prep.networked) as netif:
            _run(ctx, spec(ctx, pool, prep, opts, netif), log, progress, opts, pool.backend, watch)
        progress("collect", "…")
        if room is not None:
            room(on_host.output_bytes(ctx.layout, prep), True)
        try:
            revision = on_host.collect(ctx.layout, pool, prep, image, log, started)
        except archive.BadOutput as e:
            tail = _tail(log)
            raise archive.BadOutput(e.message + (f"\nthe builder's last lines:\n{tail}" if tail else ""),
                                    e.hint) from e
        progress("collect", f"revision {revision.hash}")
        return revision, False
    finally:
        shutil.rmtree(prep.workdir, ignore_errors=True)


def end_stale(ctx: Host, pool: Pool) -> None:
    """End a builder left by a command that was killed (the caller holds the pool's lock),
    and its tenant's builder TAP when no builder uses it."""
    vm = spec(ctx, pool, None, Options())
    ctx.runtime_for(pool.backend).stop(vm, 0)
    shutil.rmtree(vm.run_dir, ignore_errors=True)
    from mvm.network import host

    t = ctx.store.tenant(pool.tenant)
    tap = netops.builder_net(t).tap
    if tap in host.links() and tap not in host.live_taps():
        with contextlib.suppress(Exception), ctx.locks.lock(netops.builder_lock(t.id), timeout=0):
            netops.builder_down(ctx, t)  # (a networked build at work holds the lock: its own)


@contextlib.contextmanager
def _network(ctx: Host, pool: Pool, opts: Options, networked: bool) -> Iterator[NetIf | None]:
    """The builder's TAP on its tenant's network while it runs, when it fetches
    (`on_host.needs_network`; one such builder per tenant at a time: it has the tenant's
    builder address)."""
    if not networked:
        yield None
        return
    t = ctx.store.tenant(pool.tenant)
    with ctx.locks.lock(netops.builder_lock(t.id), timeout=opts.timeout):
        netops.builder_down(ctx, t)  # a TAP a killed command left
        try:
            net = netops.builder_up(ctx, t)
            yield NetIf(net.tap, net.mac)
        finally:
            netops.builder_down(ctx, t)


def spec(ctx: Host, pool: Pool, prep: on_host.Prepared | None, opts: Options,
         net: NetIf | None = None) -> VmSpec:
    """The builder's VM (without disks when only its process and files are looked for)."""
    return VmSpec(
        name=f"builder-{pool.tenant}-{pool.id}", vcpus=opts.cpus, mem_mib=opts.mem_mib,
        kernel=ctx.layout.kernel_dir() / "vmlinux", initrd=_initrd(ctx), cmdline=CMDLINE,
        disks=tuple(Disk(i, p, ro) for i, p, ro in prep.disks()) if prep else (), net=net,
        run_dir=ctx.layout.runtime_dir() / f"builder.{pool.tenant}.{pool.id}")


def _seed(ctx: Host, image: vm_image.BuilderInfo, log: Path, progress: Progress,
          opts: Options) -> Path:
    """The seed of new pools' stores (the package set imported once), made on first need."""
    seed = on_host.seed_path(ctx.layout, ctx.settings.nixpkgs, image)
    if seed.is_file():
        return seed
    with ctx.locks.lock("builder-seed"):
        if seed.is_file():
            return seed
        progress("seed", "…")
        prep = on_host.prepare_seed(ctx.layout, ctx.settings.nixpkgs, image)
        try:
            vm = VmSpec(name="builder-seed", vcpus=opts.cpus, mem_mib=opts.mem_mib,
                        kernel=ctx.layout.kernel_dir() / "vmlinux",
                        initrd=_initrd(ctx), cmdline=CMDLINE,
                        disks=tuple(Disk(i, p, ro) for i, p, ro in prep.disks()), net=None,
                        run_dir=ctx.layout.runtime_dir() / "builder.seed")
            ctx.runtime().stop(vm, 0)
            _run(ctx, vm, log, lambda s, m: None, opts)
            on_host.finish_seed(prep, seed)
        finally:
            shutil.rmtree(prep.workdir, ignore_errors=True)
        progress("seed", f"the package set, imported once for new pools' stores: {seed.name}")
    return seed


def _initrd(ctx: Host) -> Path | None:
    initrd = ctx.layout.kernel_dir() / "initrd"
    return initrd if initrd.is_file() else None


class _DiskWatch:
    """Measures a running builder's store disk (through `room`, with the pool's other build
    storage) and its output so far (the revision to be) against the quota and the host's free
    space, at most every DISK_WATCH seconds: a builder that would cross either is stopped,
    so its store's growth is bounded by the quota, not by its 16 GiB disk."""

    def __init__(self, prep: on_host.Prepared, room: Room) -> None:
        self.prep = prep
        self.room = room
        self.next = 0.0

    def __call__(self) -> None:
        now = time.monotonic()
        if now < self.next:
            return
        self.next = now + DISK_WATCH
        from mvm.lifecycle import quota

        self.room(quota.allocated(self.prep.output), False)


def _run(ctx: Host, vm: VmSpec, log: Path, progress: Progress, opts: Options,
         backend: str = "", watch: Callable[[], None] | None = None) -> None:
    runtime = ctx.runtime_for(backend)  # the pool's backend (the seed's: the host's)
    progress("builder", "…")  # ended by the builder's own "@mvm builder up"
    console = _Console(runtime.console_log(vm), log, progress)
    try:
        runtime.boot(vm)
        deadline = time.monotonic() + opts.timeout
        while runtime.is_alive(vm):
            if watch is not None:
                watch()
            console.pump()
            if console.size > CONSOLE_LIMIT:
                raise BuildFailed("the builder wrote more log than allowed; it was stopped",
                                  f"full log (cut): {log}")
            if time.monotonic() > deadline:
                raise BuildFailed(f"the build did not finish within {opts.timeout:g}s (--timeout);"
                                  " the builder was stopped", f"log: {log}")
            time.sleep(POLL)
        console.pump()
    finally:
        with contextlib.suppress(Exception):
            runtime.stop(vm, 0)
        console.pump()
        console.close()
        shutil.rmtree(vm.run_dir, ignore_errors=True)


def _tail(log: Path, lines: int = 6) -> str:
    try:
        with log.open("rb") as f:
            f.seek(max(0, f.seek(0, 2) - 4096))
            text = f.read().decode("utf-8", "replace")
    except OSError:
        return ""
    return "\n".join(ln for ln in text.splitlines()[-lines:] if ln.strip())


class _Console:
    """Follows the builder's console: step lines become progress, the rest goes to the log."""

    def __init__(self, path: Path, log: Path, progress: Progress) -> None:
        self.path = path
        self.log = log.open("ab")
        self.progress = progress
        self.size = 0
        self.partial = b""

    def pump(self) -> None:
        try:
            with self.path.open("rb") as f:
                f.seek(self.size)
                data = f.read(CONSOLE_LIMIT + 1 - min(self.size, CONSOLE_LIMIT))
        except FileNotFoundError:
            return
        if not data:
            return
        self.size += len(data)
        self.log.write(data)
        self.log.flush()
        lines = (self.partial + data).split(b"\n")
        self.partial = lines.pop()[-4096:]
        for raw in lines:
            line = raw.decode("utf-8", "replace").rstrip("\r")
            if line.startswith("@mvm "):
                step, _, message = line[5:].partition(" ")
                self.progress(step, message)
            elif line.strip() and not _KERNEL_LINE.match(line):
                self.progress("log", line[:300])

    def close(self) -> None:
        self.log.close()
