"""`pool build`: a flat recipe of named, timed steps (DESIGN §4).

The builder step (host Nix today, the builder microVM later) is one entry of the
recipe, so it can be swapped without touching the rest.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from mvm.config.paths import Layout
from mvm.errors import BuildFailed, HostUnsupported, MvmError
from mvm.guest.layout import static_busybox
from mvm.image import nix, offline_nixpkgs, outputs, revdir, revision, rootfs, source
from mvm.model import Pool, Revision
from mvm.util import private
from mvm.util.hashing import file_sha256
from mvm.util.progress import Progress

#: `room(needed_bytes)`: raises when a new revision of that size would not fit the tenant's
#: disk quota or the host's free space (lifecycle.quota.check_build, given by the caller).
Room = Callable[[int], None]
DATA = Path(__file__).resolve().parent.parent / "data"


@dataclass
class BuildContext:
    layout: Layout
    nixpkgs: str  # the `nixpkgs` setting: where flakes' nixpkgs input points
    pool: Pool
    force: bool
    log: Path
    progress: Progress
    workdir: Path | None = None  # the build's scratch directory (removed when it ends)
    result: nix.BuildResult | None = None
    source_dir: Path | None = None  # the staged copy of the flake's directory
    closure: list[str] = field(default_factory=list)
    kernel: Path | None = None
    initrd: Path | None = None
    kernel_source: str = ""
    revision: str = ""
    cache_hit: bool = False
    closure_size: int = 0
    timings: dict[str, float] = field(default_factory=dict)
    room: Room = lambda needed: None


def guest_files_hash() -> str:
    return revision.guest_files_hash(DATA / "guest")


# -- steps -------------------------------------------------------------------

def mvm_flakes(layout: Layout, nixpkgs: str) -> list[str]:
    """mvm's own local flakes a tenant's inputs may name: the offline nixpkgs set."""
    own = [nixpkgs, str(layout.offline_nixpkgs_dir())]
    return [*own, *(str(Path(p.removeprefix("path:").split("?")[0]).resolve())
                    for p in own if p.startswith(("path:", "/")))]


def step_source(ctx: BuildContext) -> None:
    """Copy the flake's source into a directory of mvm's own and refuse inputs that name host
    paths, all before Nix reads or fetches anything (image.source)."""
    assert ctx.workdir
    ctx.source_dir = source.stage(ctx.pool.flake, ctx.workdir / "source", ctx.layout,
                                  fetch=nix.prefetch, expect=ctx.pool.flake_id)
    source.check_inputs(ctx.source_dir, mvm_flakes(ctx.layout, ctx.nixpkgs))
    ctx.progress("source", f"{ctx.pool.flake} checked and copied")


def step_nix_build(ctx: BuildContext) -> None:
    assert ctx.source_dir
    if ctx.nixpkgs:  # the offline package set's host files, back in the store if they left it
        offline_nixpkgs.ensure_imported(ctx.nixpkgs)
    ctx.result = nix.build(f"path:{ctx.source_dir}", ctx.pool.profile, ctx.log, ctx.nixpkgs,
                           cwd=ctx.source_dir)
    ctx.progress("nix-build", ctx.result.out_path)


def step_closure(ctx: BuildContext) -> None:
    assert ctx.result
    ctx.closure = nix.closure(ctx.result.out_path)
    outputs.resolve(ctx.result.out_path, ctx.closure)  # an output that is a link out: refused
    ctx.progress("closure", f"{len(ctx.closure)} store paths")


def step_kernel(ctx: BuildContext) -> None:
    """The profile's own kernel when it ships one, else mvm's default guest kernel.

    A profile's kernel and initrd must be regular files inside the build's closure: a link
    out of it (to another tenant's secrets, to /etc) is refused, never copied.
    """
    assert ctx.result
    out = ctx.result.out_path
    shipped = outputs.profile_kernel(out, ctx.closure)
    if shipped is not None:
        ctx.kernel, ctx.initrd = shipped
        ctx.kernel_source = "profile"
    else:
        kdir = ctx.layout.kernel_dir()
        if not (kdir / "vmlinux").is_file():
            raise HostUnsupported(f"the default guest kernel is missing ({kdir}/vmlinux)",
                                  "run `mvm setup` (or `make demo`) to install it")
        ctx.kernel, ctx.initrd = kdir / "vmlinux", kdir / "initrd"
        ctx.kernel_source = "default"
    ctx.progress("kernel", f"{ctx.kernel_source}: {ctx.kernel}")


def step_revision(ctx: BuildContext) -> None:
    """The revision hash covers everything that determines the image bytes."""
    assert ctx.result and ctx.kernel
    ctx.revision = revision.revision_hash(
        ctx.result.out_path,
        file_sha256(ctx.kernel),
        file_sha256(ctx.initrd) if ctx.initrd else "",
        guest_files_hash(),
        file_sha256(static_busybox()),  # copied into every image as /mvm/busybox
        rootfs.mkfs_version(),
        rootfs.PACKER_VERSION,
    )
    rdir = ctx.layout.revision_dir(ctx.pool.tenant, ctx.pool.id, ctx.revision)
    ctx.cache_hit = (rdir / "manifest.json").is_file() and not ctx.force
    ctx.progress("revision", ctx.revision + (" (cached, nothing to build)" if ctx.cache_hit else ""))


def step_pack(ctx: BuildContext) -> None:
    if ctx.cache_hit:
        return
    assert ctx.result and ctx.kernel
    from mvm.guest.layout import install_guest_files

    # The image, kernel and initrd the revision will hold must fit before any is written.
    ctx.room(rootfs.estimate_bytes(ctx.closure) + ctx.kernel.stat().st_size
             + (ctx.initrd.stat().st_size if ctx.initrd else 0))
    revs = ctx.layout.revisions_dir(ctx.pool.tenant, ctx.pool.id)
    with revdir.staging(revs, ctx.revision) as tmp:
        started = time.monotonic()
        ctx.closure_size = rootfs.pack_closure(
            ctx.result.out_path, ctx.closure, tmp / "rootfs.ext4", ctx.revision,
            install_guest_files, tmp)
        ctx.timings["pack"] = time.monotonic() - started
        private.copy(ctx.kernel, tmp / "vmlinux")  # 0600 from the first byte, like the rootfs
        if ctx.initrd:
            private.copy(ctx.initrd, tmp / "initrd")
        manifest: dict[str, Any] = {
            "revision": ctx.revision,
            "tenant": ctx.pool.tenant,
            "pool": ctx.pool.id,
            "flake": ctx.pool.flake,
            "profile": ctx.pool.profile,
            "out_path": ctx.result.out_path,
            "lock_hash": hashlib.sha256(
                json.dumps(ctx.result.locked, sort_keys=True).encode()).hexdigest(),
            "locked_inputs": {
                k: v.get("locked", {}) for k, v in ctx.result.locked.get("nodes", {}).items()
                if k != "root"},
            "closure_paths": len(ctx.closure),
            "closure_size": ctx.closure_size,
            "rootfs_size": (tmp / "rootfs.ext4").stat().st_size,
            "rootfs_sha256": file_sha256(tmp / "rootfs.ext4"),
            "kernel": {"source": ctx.kernel_source, "sha256": file_sha256(tmp / "vmlinux")},
            "initrd": bool(ctx.initrd),
            "built": time.time(),
            "build_seconds": None,
        }
        revdir.install(tmp, ctx.layout.revision_dir(ctx.pool.tenant, ctx.pool.id, ctx.revision), manifest)
    ctx.progress("pack", f"rootfs.ext4 {manifest['rootfs_size'] // 2**20} MiB"
                 f" from {ctx.closure_size // 2**20} MiB closure")


RECIPE: list[tuple[str, Callable[[BuildContext], None]]] = [
    ("source", step_source),
    ("nix-build", step_nix_build),
    ("closure", step_closure),
    ("kernel", step_kernel),
    ("revision", step_revision),
    ("pack", step_pack),
]


def switch_current(layout: Layout, tenant: str, pool: str, rev: str) -> None:
    """Point artifacts/current at a revision atomically (symlink + rename)."""
    link = layout.current_link(tenant, pool)
    tmp = link.with_name(f".current-{os.getpid()}")
    if tmp.is_symlink() or tmp.exists():
        tmp.unlink()
    tmp.symlink_to(Path("revisions") / rev)
    os.replace(tmp, link)


def read_manifest(layout: Layout, tenant: str, pool: str, rev: str) -> dict[str, Any]:
    data: dict[str, Any] = json.loads(
        (layout.revision_dir(tenant, pool, rev) / "manifest.json").read_text())
    return data


def run_build(layout: Layout, nixpkgs: str, pool: Pool, force: bool, log: Path,
              progress: Progress, room: Room = lambda needed: None) -> tuple[Revision, bool]:
    """Run the recipe. `current` is not touched here: the caller switches it on success."""
    ctx = BuildContext(layout, nixpkgs, pool, force, log, progress, room=room)
    started = time.monotonic()
    # We hold the pool's lock: scratch directories of a build that crashed are garbage.
    for stale in log.parent.glob(".work-*"):
        shutil.rmtree(stale, ignore_errors=True)
    ctx.workdir = log.parent / f".work-{os.getpid()}"
    os.mkdir(ctx.workdir, 0o700)
    try:
        for name, step in RECIPE:
            t0 = time.monotonic()
            progress(name, "…")
            try:
                step(ctx)
            except MvmError:
                raise
            except Exception as e:  # a bug or an OS error: still one clear line, log kept
                raise BuildFailed(f"build step {name} failed: {e}", f"full log: {log}") from e
            ctx.timings[name] = time.monotonic() - t0
    finally:
        shutil.rmtree(ctx.workdir, ignore_errors=True)
    manifest = read_manifest(layout, pool.tenant, pool.id, ctx.revision)
    if not ctx.cache_hit:
        manifest["build_seconds"] = round(time.monotonic() - started, 3)
        mpath = layout.revision_dir(pool.tenant, pool.id, ctx.revision) / "manifest.json"
        private.write(mpath, json.dumps(manifest, indent=2, sort_keys=True).encode() + b"\n")
    assert ctx.result
    rev = Revision(pool.tenant, pool.id, ctx.revision, ctx.result.out_path, manifest,
                   float(manifest.get("built", time.time())))
    return rev, ctx.cache_hit
