"""The host's side of a build in the builder microVM: the disks it is given, the cache hit
decided without it, and the revision made from the bytes it hands back.

The VM itself is booted by the layer above (through the runtime interface); this module
never evaluates the flake and never mounts or walks anything the builder wrote.

Disks, in device order (the builder's /mvm/init relies on it): the builder image
(read-only), the input (a tar made here: the flake's files, the offline package set, the
build job's code, the host's BusyBox and job.json), the package set's store paths (a
`nix-store --export` of the host files `mvm setup` imported, shared read-only: host data,
never a download), the pool's own Nix store (ext4, persistent, never shared between pools),
and the output (raw, read back with `archive.read_archive`).
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import re
import shutil
import stat
import tarfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from mvm.builder import vm_image
from mvm.config.paths import Layout
from mvm.errors import BuildFailed, HostUnsupported, InvalidInput
from mvm.guest.layout import static_busybox
from mvm.image import archive, revdir, revision, rootfs, source
from mvm.model import Pool, Revision
from mvm.util import private, proc
from mvm.util.hashing import file_sha256

SRC = Path(__file__).resolve().parent.parent  # the mvm package
#: The mvm modules the job runs with inside the builder (standard library besides these).
JOB_FILES = (
    "__init__.py", "errors.py", "util/__init__.py", "util/proc.py", "util/hashing.py",
    "image/__init__.py", "image/nix.py", "image/rootfs.py", "image/revision.py",
    "image/archive.py", "image/outputs.py", "builder/__init__.py", "builder/in_guest.py",
    "util/private.py", "guest/__init__.py", "guest/layout.py",
    "image/source.py", "config/__init__.py", "config/paths.py",
    # every guest file: the revision's hash covers them all (`revision.guest_files_hash`)
    *sorted(f"data/guest/{p.name}" for p in (SRC / "data" / "guest").iterdir() if p.is_file()),
)
#: The module the builder image's /mvm/init runs (`vm_image.INIT`), by the job's name before
#: it moved to `mvm.builder.in_guest`. Images keep that line: changing it would change every
#: image's recipe and version (a new `mvm builder init` on every host), so the input carries
#: this entry point under the old name instead (until a recipe change renames it).
JOB_ENTRY = {
    "build/__init__.py": b"",
    "build/vm_job.py": b"import runpy\n\n"
                       b"runpy.run_module('mvm.builder.in_guest', run_name='__main__', alter_sys=True)\n",
}
MAX_SOURCE = 256 * 2**20
STORE_DISK_GIB = 16
OUTPUT_DISK_MIB = 4096
LOG_LIMIT = 512 * 1024
_OUT_PATH = re.compile(r"/nix/store/[0-9a-z]{32}-[A-Za-z0-9+._?=-]{1,200}")
_REV = re.compile(r"[0-9a-f]{16}")


@dataclass(frozen=True)
class Prepared:
    """A build ready to run: its disks (in device order) and the key of its inputs."""

    key: str
    image: Path
    input: Path
    imports: Path
    store: Path
    output: Path
    workdir: Path
    source: Path | None = None  # mvm's checked copy of the flake (image.source.stage)
    fetched: bool = False  # a URL ref: only the builder fetches it (through its network)
    networked: bool = False  # the builder has its tenant's egress-only network

    def disks(self) -> list[tuple[str, Path, bool]]:
        """(id, path, read_only) in device order."""
        return [("root", self.image, True), ("input", self.input, True),
                ("pkgs", self.imports, True), ("store", self.store, False),
                ("output", self.output, False)]


def workdir(layout: Layout, pool: Pool) -> Path:
    return layout.pool_dir(pool.tenant, pool.id) / "builder"


def offline(nixpkgs: str) -> bool:
    """The `nixpkgs` setting names mvm's offline package set (`path:` to a set `mvm setup`
    made): the builder overrides the flake's nixpkgs with it and fetches nothing for it."""
    return _nixpkgs_dir(nixpkgs) is not None


def needs_network(flake: str, nixpkgs: str) -> bool:
    """The rule for the builder's egress-only network of its tenant's own: a URL ref
    (`github:`, `https://…tar.gz`, …) is fetched by the builder itself, and without the
    offline package set the builder fetches the flake's own nixpkgs (or the `nixpkgs`
    setting's ref) and may substitute from the binary cache. A local flake (a directory, a
    local git repository) built with the offline set is copied in by mvm: no network at all."""
    return source.is_url_ref(flake) or not offline(nixpkgs)


def prepare(layout: Layout, nixpkgs: str, pool: Pool, builder: vm_image.BuilderInfo,
            net: dict[str, Any] | None = None) -> Prepared:
    """Make the input disk and compute the input key; the store and output disks are made
    by `disks` only when the build is not a cache hit. `net` (address, gateway, DNS) is the
    builder's network, given exactly when `needs_network(pool.flake, nixpkgs)`."""
    pkgs = _nixpkgs_dir(nixpkgs)
    if pkgs is None and nixpkgs.startswith("path:"):
        raise HostUnsupported(f"the builder microVM cannot use the host path {nixpkgs} as "
                              "nixpkgs (only mvm's offline package set is copied in)",
                              "run `mvm setup` offline, set nixpkgs to a URL ref or to empty "
                              "(the flake's own), or use --builder host")
    kdir = layout.kernel_dir()
    if not (kdir / "vmlinux").is_file():
        raise HostUnsupported(f"the default guest kernel is missing ({kdir}/vmlinux)",
                              "run `mvm setup` (or `make demo`) to install it")
    networked = needs_network(pool.flake, nixpkgs)
    if networked != (net is not None):
        raise ValueError("a builder has a network exactly when needs_network says so")
    wdir = workdir(layout, pool)
    wdir.mkdir(parents=True, exist_ok=True)
    for stale in wdir.glob("run-*"):  # of a command that died (we hold the pool's lock)
        shutil.rmtree(stale, ignore_errors=True)
    run = wdir / f"run-{os.getpid()}"
    run.mkdir(mode=0o700)
    try:  # (a source or input refused: nothing of this run stays)
        fetched = source.is_url_ref(pool.flake)
        src = None if fetched else _flake_dir(pool.flake, run / "source", layout, nixpkgs,
                                              pool.flake_id)
        if pkgs is not None:
            export, paths = nixpkgs_export(layout, pkgs)
        else:  # no package set to import: an empty disk in its place
            export, paths = run / "no-imports", []
            export.write_bytes(bytes(512))
        kernel_sha = file_sha256(kdir / "vmlinux")
        initrd_sha = file_sha256(kdir / "initrd") if (kdir / "initrd").is_file() else ""
        key = hashlib.sha256()
        for part in (pool.profile, builder.version, kernel_sha, initrd_sha, rootfs.PACKER_VERSION):
            key.update(part.encode() + b"\0")
        tar_path = run / "input.tar"
        job = {"profile": pool.profile, "imports": paths, "imports_device": "/dev/vdc",
               "output_device": "/dev/vde", "kernel_sha256": kernel_sha,
               "initrd_sha256": initrd_sha, "log_limit": LOG_LIMIT,
               "flake": pool.flake if fetched else None, "net": net,
               "nixpkgs": "offline" if pkgs is not None else nixpkgs}
        if networked:  # what it fetches may change: never a cache hit decided on the host
            key.update(f"fetched {pool.flake} {nixpkgs} {time.time_ns()} {os.getpid()}\0".encode())
        _input_tar(tar_path, key, job, src, pkgs)
    except BaseException:
        shutil.rmtree(run, ignore_errors=True)
        raise
    return Prepared(key.hexdigest()[:32], builder.image, tar_path, export,
                    wdir / "store.ext4", run / "output.img", run, src, fetched, networked)


def _input_tar(path: Path, key: Any, job: dict[str, Any], src: Path | None,
               pkgs: Path | None) -> None:
    with tarfile.open(path, "w", format=tarfile.PAX_FORMAT) as tar:
        adder = _Adder(tar, key)
        if src is not None:
            adder.tree(src, "src", limit=MAX_SOURCE, skip={".git"})
        if pkgs is not None:
            adder.tree(pkgs, "nixpkgs", limit=MAX_SOURCE, skip=set())
        for rel in JOB_FILES:
            adder.file(SRC / rel, f"lib/mvm/{rel}")
        for rel, code in JOB_ENTRY.items():
            adder.data(f"lib/mvm/{rel}", code)
        adder.file(static_busybox(), "busybox")
        adder.data("job.json", json.dumps(job, sort_keys=True).encode(), hashed=False)
    _pad(path)


# -- the seed store: the package set imported once, copied into each new pool's store ---------

def seed_path(layout: Layout, nixpkgs: str, builder: vm_image.BuilderInfo) -> Path:
    export, _ = nixpkgs_export(layout, _offline_dir(nixpkgs))
    tag = hashlib.sha256(f"{builder.version}\0{export.name}".encode()).hexdigest()[:16]
    return layout.builder_dir() / f"store-seed-{tag}.ext4"


def prepare_seed(layout: Layout, nixpkgs: str, builder: vm_image.BuilderInfo) -> Prepared:
    """A job with no flake: the builder imports the package set into an empty store disk,
    which then seeds every new pool's store (host data only: no tenant's input is in it)."""
    pkgs = _offline_dir(nixpkgs)
    export, paths = nixpkgs_export(layout, pkgs)
    run = layout.builder_dir() / f"seed-run-{os.getpid()}"
    shutil.rmtree(run, ignore_errors=True)
    run.mkdir()
    job = {"profile": None, "imports": paths, "imports_device": "/dev/vdc",
           "output_device": "/dev/vde", "kernel_sha256": "", "initrd_sha256": "",
           "log_limit": LOG_LIMIT, "flake": None, "net": None, "nixpkgs": "offline"}
    _input_tar(run / "input.tar", hashlib.sha256(), job, None, pkgs)
    prep = Prepared("", builder.image, run / "input.tar", export, run / "store.ext4",
                    run / "output.img", run)
    _empty_store(prep.store)
    with prep.output.open("wb") as f:
        f.truncate(64 * 2**20)
    return prep


def finish_seed(prep: Prepared, seed: Path) -> None:
    out = prep.workdir / "out"
    out.mkdir()
    result, _ = archive.read_archive(prep.output, out)
    if not result["ok"] or result.get("seed") is not True:
        raise BuildFailed(f"the builder could not seed a store: {result.get('error', '?')}")
    os.replace(prep.store, seed)
    for old in seed.parent.glob("store-seed-*.ext4"):
        if old != seed:
            old.unlink(missing_ok=True)


def _empty_store(path: Path) -> None:
    tmp = path.with_suffix(".tmp")
    with tmp.open("wb") as f:
        f.truncate(STORE_DISK_GIB * 2**30)
    proc.run(["mkfs.ext4", "-q", "-F", "-L", "mvm-nix-store", "-m", "0",
              "-E", "root_owner=0:0", str(tmp)], timeout=300)
    os.replace(tmp, path)


def disks(prep: Prepared, seed: Path | None) -> None:
    """The pool's store disk (made once: a sparse copy of the seed, else empty) and a fresh
    output disk."""
    if not prep.store.is_file():
        if seed is not None and seed.is_file():
            tmp = prep.store.with_suffix(".tmp")
            proc.run(["cp", "--sparse=always", str(seed), str(tmp)], timeout=600)
            os.replace(tmp, prep.store)
        else:
            _empty_store(prep.store)
    with prep.output.open("wb") as f:
        f.truncate(OUTPUT_DISK_MIB * 2**20)


def cached(layout: Layout, pool: Pool, key: str) -> str | None:
    """The revision an earlier build made from exactly these inputs, if it is still on disk."""
    revs = layout.revisions_dir(pool.tenant, pool.id)
    for manifest in sorted(revs.glob("*/manifest.json")) if revs.is_dir() else []:
        try:
            data = json.loads(manifest.read_text())
        except (OSError, ValueError):
            continue
        if data.get("input_key") == key and _REV.fullmatch(manifest.parent.name):
            return manifest.parent.name
    return None


def collect(layout: Layout, pool: Pool, prep: Prepared, builder: vm_image.BuilderInfo,
            log: Path, started: float) -> Revision:
    """Read the output disk into a new revision directory, checking every byte of it."""
    with revdir.staging(layout.revisions_dir(pool.tenant, pool.id), "vm") as tmp:
        result, files = archive.read_archive(prep.output, tmp)
        if not result["ok"]:
            raise BuildFailed(str(result.get("error") or "the build failed"), f"full log: {log}")
        manifest = _check(result, files, tmp, layout)
        if prep.source is not None:
            manifest.update(_locks(prep.source))
        if prep.fetched and isinstance(result.get("fetched"), dict):
            manifest["fetched"] = {k: str(v)[:300] for k, v in result["fetched"].items()
                                   if k in ("ref", "store_path", "nar_hash")}
        rev = manifest["revision"]
        if manifest["kernel"]["source"] == "default":
            private.copy(layout.kernel_dir() / "vmlinux", tmp / "vmlinux")  # 0600, like the rest
            if (layout.kernel_dir() / "initrd").is_file():
                private.copy(layout.kernel_dir() / "initrd", tmp / "initrd")
        manifest.update({
            "tenant": pool.tenant, "pool": pool.id, "flake": pool.flake, "profile": pool.profile,
            "builder": {"kind": "vm", "version": builder.version}, "input_key": prep.key,
            "built": time.time(), "build_seconds": round(time.monotonic() - started, 3),
        })
        revdir.install(tmp, layout.revision_dir(pool.tenant, pool.id, rev), manifest)
    return Revision(pool.tenant, pool.id, rev, manifest["out_path"], manifest, manifest["built"])


def _check(result: dict[str, Any], files: dict[str, str], tmp: Path,
           layout: Layout) -> dict[str, Any]:
    """The builder's claims, checked against what the host knows; the manifest they make."""
    def bad(what: str) -> archive.BadOutput:
        return archive.BadOutput(f"the builder's result is not acceptable: {what}")

    parts = result.get("parts")
    if not isinstance(parts, dict) or set(parts) != {
            "out_path", "kernel_sha256", "initrd_sha256", "guest_hash", "busybox_sha256",
            "mkfs_version", "packer_version"} or not all(isinstance(v, str) for v in parts.values()):
        raise bad("no revision parts")
    if not _OUT_PATH.fullmatch(parts["out_path"]):
        raise bad(f"out path {parts['out_path'][:80]!r}")
    if parts["guest_hash"] != revision.guest_files_hash() \
            or parts["busybox_sha256"] != file_sha256(static_busybox()) \
            or parts["packer_version"] != rootfs.PACKER_VERSION:
        raise bad("packed with other guest files, BusyBox or packer than this host's")
    if "rootfs.ext4" not in files or not archive.is_ext4(tmp / "rootfs.ext4"):
        raise bad("no ext4 rootfs")
    source = result.get("kernel_source")
    kdir = layout.kernel_dir()
    if source == "default":
        if set(files) != {"rootfs.ext4"} or parts["kernel_sha256"] != file_sha256(kdir / "vmlinux"):
            raise bad("a default-kernel build with other kernel files")
    elif source == "profile":
        if "vmlinux" not in files or files["vmlinux"] != parts["kernel_sha256"] \
                or files.get("initrd", "") != parts["initrd_sha256"]:
            raise bad("kernel files that do not match their hashes")
        archive.check_kernel(tmp / "vmlinux")
    else:
        raise bad(f"kernel source {source!r}")
    rev = revision.revision_hash(**parts)
    if result.get("revision") != rev:
        raise bad("a revision hash that does not match its parts")
    closure_size, closure_paths = result.get("closure_size"), result.get("closure_paths")
    if not isinstance(closure_size, int) or not isinstance(closure_paths, int):
        raise bad("no closure size")
    return {
        "revision": rev,
        "out_path": parts["out_path"],
        "mkfs_version": parts["mkfs_version"],
        "closure_paths": closure_paths,
        "closure_size": closure_size,
        "rootfs_size": (tmp / "rootfs.ext4").stat().st_size,
        "rootfs_sha256": files["rootfs.ext4"],
        "kernel": {"source": source, "sha256": parts["kernel_sha256"]},
        "initrd": bool(parts["initrd_sha256"]),
    }


def _locks(src: Path) -> dict[str, Any]:
    """What the flake's own lock file says (read, never evaluated; nixpkgs is overridden by
    the offline package set in the builder)."""
    try:
        raw = (src / "flake.lock").read_bytes()[:1 << 20]
        locks = json.loads(raw)
    except (OSError, ValueError):
        raw, locks = b"", {}
    nodes = locks.get("nodes") if isinstance(locks, dict) else None
    return {
        "lock_hash": hashlib.sha256(raw).hexdigest(),
        "locked_inputs": {k: v.get("locked", {}) for k, v in (nodes or {}).items()
                          if k != "root" and isinstance(v, dict)},
    }


def nixpkgs_export(layout: Layout, pkgs: Path) -> tuple[Path, list[str]]:
    """The offline set's imported host files as one `nix-store --export` stream (made once
    per package set; the builder imports it into a pool's store when paths are missing)."""
    from mvm.image import nix

    data = json.loads((pkgs / "versions.json").read_text())
    paths = sorted(e["files"]["path"] for e in data["packages"].values())
    tag = hashlib.sha256("\n".join(paths).encode()).hexdigest()[:16]
    bdir = layout.builder_dir()
    bdir.mkdir(parents=True, exist_ok=True)
    export = bdir / f"nixpkgs-{tag}.export"
    if export.is_file():
        return export, paths
    from mvm.image import offline_nixpkgs

    offline_nixpkgs.ensure_imported(f"path:{pkgs}")
    tmp = export.with_suffix(f".tmp-{os.getpid()}")
    try:
        with tmp.open("wb") as f:
            proc.run(["nix-store", "--export", *paths], env=nix.env(), timeout=600, stdout=f.fileno())
        _pad(tmp)
        os.replace(tmp, export)
    finally:
        tmp.unlink(missing_ok=True)
    for old in bdir.glob("nixpkgs-*.export"):
        if old != export:
            old.unlink(missing_ok=True)
    return export, paths


def _flake_dir(flake: str, dest: Path, layout: Layout, nixpkgs: str, expect: str = "") -> Path:
    """mvm's own copy of the flake's source, made by the same rules as for the host builder
    (`source.stage`: the directory recorded at pool create, its own tree without secrets.json,
    links leaving it refused; a git repository's committed tree), its inputs checked on the
    host as for the host builder (`source.check_inputs`) before the builder sees them.
    Nothing fetches here: URL refs are fetched by the builder itself (`needs_network`), which
    checks their inputs the same way."""
    src = source.stage(flake, dest, layout, expect=expect)
    if not (src / "flake.nix").is_file():
        raise InvalidInput(f"no flake at {flake}: flake.nix does not exist",
                           "point the pool at a directory holding flake.nix")
    from mvm.image import pipeline

    source.check_inputs(src, pipeline.mvm_flakes(layout, nixpkgs))
    return src


def output_bytes(layout: Layout, prep: Prepared) -> int:
    """At most the bytes `collect` will write for the builder's output: its files (as their
    archive headers say) and, when it holds no kernel, the default kernel and initrd."""
    sizes = archive.sizes(prep.output)
    total = sum(v for k, v in sizes.items() if k != archive.RESULT)
    if "vmlinux" not in sizes:
        kdir = layout.kernel_dir()
        total += sum((kdir / n).stat().st_size for n in ("vmlinux", "initrd") if (kdir / n).is_file())
    return total


def _nixpkgs_dir(nixpkgs: str) -> Path | None:
    """mvm's offline package set the setting names, or None."""
    p = Path(nixpkgs.removeprefix("path:")) if nixpkgs.startswith("path:") else None
    return p if p is not None and (p / "versions.json").is_file() else None


def _offline_dir(nixpkgs: str) -> Path:
    p = _nixpkgs_dir(nixpkgs)
    if p is None:
        raise HostUnsupported("seeding builders' stores needs mvm's offline package set, "
                              "which is not configured", "run `mvm setup` offline")
    return p


def _pad(path: Path) -> None:
    """Disks are read in 512-byte sectors: round the file up."""
    size = path.stat().st_size
    if size % 512:
        with path.open("ab") as f:
            f.truncate(size + 512 - size % 512)


class _Adder:
    """Adds entries with fixed owners and times, hashing what it adds (the input key)."""

    def __init__(self, tar: tarfile.TarFile, key: Any) -> None:
        self.tar = tar
        self.key = key

    def data(self, name: str, data: bytes, mode: int = 0o644, hashed: bool = True) -> None:
        info = self._info(name, tarfile.REGTYPE, mode)
        info.size = len(data)
        self.tar.addfile(info, io.BytesIO(data))
        if hashed:
            self.key.update(f"f {name} {mode:o} {len(data)}\0".encode() + data)

    def file(self, path: Path, name: str) -> None:
        mode = 0o755 if os.access(path, os.X_OK) else 0o644
        self.data(name, path.read_bytes(), mode)

    def tree(self, root: Path, prefix: str, limit: int, skip: set[str]) -> None:
        total = 0
        self._dir(prefix)
        for dirpath, dirnames, filenames in os.walk(root):
            dirnames[:] = sorted(d for d in dirnames if d not in skip or dirpath != str(root))
            here = Path(dirpath)
            for name in sorted(dirnames + filenames):
                p = here / name
                rel = f"{prefix}/{p.relative_to(root).as_posix()}"
                st = os.lstat(p)
                if stat.S_ISLNK(st.st_mode):
                    target = os.readlink(p)
                    info = self._info(rel, tarfile.SYMTYPE, 0o777)
                    info.linkname = target
                    self.tar.addfile(info)
                    self.key.update(f"l {rel} {target}\0".encode())
                elif stat.S_ISDIR(st.st_mode):
                    self._dir(rel)
                elif stat.S_ISREG(st.st_mode):
                    total += st.st_size
                    if total > limit:
                        raise InvalidInput(f"the flake directory {root} holds more than "
                                           f"{limit // 2**20} MiB", "keep build inputs small")
                    with open(p, "rb") as f:
                        data = f.read()
                    self.data(rel, data, 0o755 if st.st_mode & 0o111 else 0o644)
                # sockets, fifos and devices are not flake sources: left out

    def _dir(self, name: str) -> None:
        self.tar.addfile(self._info(name, tarfile.DIRTYPE, 0o755))
        self.key.update(f"d {name}\0".encode())

    @staticmethod
    def _info(name: str, kind: bytes, mode: int) -> tarfile.TarInfo:
        info = tarfile.TarInfo(name)
        info.type = kind
        info.mode = mode
        info.mtime = 0
        info.uid = info.gid = 0
        info.uname = info.gname = "root"
        return info
