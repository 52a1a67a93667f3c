"""The builder microVM's image (`mvm builder init`, `mvm builder info`).

A Debian root file system made with `mmdebstrap` from the Debian mirrors apt is configured
with (nothing else is downloaded): Nix (`nix-bin`), e2fsprogs, a static BusyBox, Python and the
CA certificates (a builder that fetches a URL ref needs them),
plus mvm's builder init (`/mvm/init`) and a nix.conf. It boots with mvm's default guest
kernel, whose initrd mounts it read-only and runs `/mvm/init`. The build job itself (Python,
from this mvm) comes with each build on its input disk, so the image holds only Debian's
packages and the init, and its version names exactly those: the recipe below and every
installed package's version. Packed with the same pinned `mkfs.ext4 -d` as revisions.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from mvm.errors import CommandFailed, HostUnsupported, NotFound
from mvm.image import rootfs
from mvm.util import proc
from mvm.util.progress import Progress

#: Bump when what goes into the image changes in a way the hashed files below do not show.
RECIPE_VERSION = 1
SUITE = "bookworm"
PACKAGES = ("nix-bin", "e2fsprogs", "busybox-static", "python3", "tar", "ca-certificates")
BUILD_USERS = 4
IMAGE = "rootfs.ext4"
MANIFEST = "manifest.json"
DATA = Path(__file__).resolve().parent.parent / "data"
FIXED_MTIME = rootfs.FIXED_MTIME

# The builder's PID 1 (after the initrd). Disks, in device order: the image (read-only), the
# input (a tar the host made), the package set's store paths (`nix-store --export`), the
# pool's Nix store (ext4, read-write), the output (raw, the job writes its archive there).
# The job's module is named as it was before it moved to `mvm.builder.in_guest` (the input
# carries that entry point, `on_host.JOB_ENTRY`): this text is in the recipe's hash.
INIT = r"""#!/mvm/busybox sh
# mvm builder init: mounts the pool's store, unpacks the input and runs the build job.
B=/mvm/busybox
export PATH=/usr/sbin:/usr/bin:/sbin:/bin HOME=/tmp LANG=C.UTF-8
fail() { echo "@mvm error $*"; $B sync; $B poweroff -f; exit 1; }
$B mount -t tmpfs -o mode=1777,nosuid,nodev tmpfs /tmp || fail "cannot mount /tmp"
$B mount -t tmpfs -o mode=0755,nosuid,nodev tmpfs /run || fail "cannot mount /run"
$B mkdir -p /dev/pts && $B mount -t devpts -o gid=5,mode=620 devpts /dev/pts
$B mount -t ext4 -o rw,nosuid,nodev /dev/vdd /nix || fail "cannot mount the pool's Nix store disk"
$B mkdir /tmp/in && $B tar -x -f /dev/vdb -C /tmp/in || fail "cannot unpack the input disk"
echo "@mvm builder up"
cd /tmp/in && PYTHONPATH=/tmp/in/lib python3 -m mvm.build.vm_job /tmp/in
$B sync
$B umount /nix
$B poweroff -f
"""


class BuilderMissing(NotFound):
    """No builder image is installed."""


@dataclass(frozen=True)
class BuilderInfo:
    dir: Path
    version: str
    recipe: str
    packages: dict[str, str]
    size: int
    sha256: str
    created: float

    @property
    def image(self) -> Path:
        return self.dir / IMAGE

    def to_json(self) -> dict[str, Any]:
        return {"version": self.version, "recipe": self.recipe, "image": str(self.image),
                "size": self.size, "sha256": self.sha256, "created": self.created,
                "packages": self.packages}


def nix_conf() -> bytes:
    """mvm's nix.conf, with no substituters: the builder has no network."""
    return (DATA / "nix" / "nix.conf").read_bytes() + b"\nsubstituters =\n"


def recipe_hash(mirrors: list[str]) -> str:
    h = hashlib.sha256()
    for part in (str(RECIPE_VERSION), SUITE, " ".join(PACKAGES), str(BUILD_USERS),
                 " ".join(mirrors)):
        h.update(part.encode() + b"\0")
    h.update(INIT.encode() + b"\0" + nix_conf())
    return h.hexdigest()[:16]


def mirrors() -> list[str]:
    """`deb <uri> <suite> <components>` lines for the Debian archives apt is configured with."""
    try:
        out = proc.output(["apt-get", "indextargets", "--format",
                           "$(REPO_URI) $(RELEASE) $(COMPONENT) $(TARGET_OF)"], timeout=60)
    except CommandFailed as e:
        raise HostUnsupported(f"cannot read apt's sources: {e.message}",
                              "the builder image is made from the Debian mirror apt uses") from e
    lines = set()
    for ln in out.splitlines():
        parts = ln.split()
        if len(parts) == 4 and parts[3] == "deb" and parts[1].startswith(SUITE) \
                and "debian" in parts[0]:
            lines.add(f"deb {parts[0]} {parts[1]} {parts[2]}")
    if not lines:
        raise HostUnsupported(f"apt has no Debian {SUITE} sources",
                              "configure a Debian mirror for apt (the builder image needs one)")
    return sorted(lines)


def load(dest: Path) -> BuilderInfo:
    try:
        data = json.loads((dest / MANIFEST).read_text())
    except FileNotFoundError:
        raise BuilderMissing("the builder image is not installed",
                             "run `mvm builder init` (or `mvm setup`)") from None
    info = BuilderInfo(dest, data["version"], data["recipe"], data["packages"], data["size"],
                       data["sha256"], data["created"])
    if not info.image.is_file() or info.image.stat().st_size != info.size:
        raise BuilderMissing(f"the builder image {info.image} is missing or damaged",
                             "run `mvm builder init --force`")
    return info


def install(dest: Path, progress: Progress, force: bool = False) -> tuple[BuilderInfo, bool]:
    """Make the image unless one of the current recipe is installed. Returns (info, made)."""
    srcs = mirrors()
    recipe = recipe_hash(srcs)
    if not force:
        try:
            info = load(dest)
            if info.recipe == recipe:
                return info, False
        except BuilderMissing:
            pass
    for tool in ("mmdebstrap", "mkfs.ext4", "debugfs"):
        if not proc.which(tool):
            raise HostUnsupported(f"{tool} is not installed", "apt-get install mmdebstrap e2fsprogs")
    dest.mkdir(parents=True, exist_ok=True)
    work = dest / f".tmp-{os.getpid()}"
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir()
    try:
        root = work / "root"
        progress("debian", "…")
        _mmdebstrap(root, srcs)
        packages = _packages(root)
        progress("debian", f"{len(packages)} packages (nix-bin {packages.get('nix-bin', '?')})")
        progress("image", "…")
        _customize(root)
        version = _version(recipe, packages)
        rootfs.mkfs(root, work / IMAGE, "mvm-builder", version)
        shutil.rmtree(root)
        from mvm.util.hashing import file_sha256

        size = (work / IMAGE).stat().st_size
        info = BuilderInfo(dest, version, recipe, packages, size, file_sha256(work / IMAGE),
                           time.time())
        os.replace(work / IMAGE, dest / IMAGE)
        tmp = dest / (MANIFEST + ".tmp")
        tmp.write_text(json.dumps({**info.to_json(), "recipe_version": RECIPE_VERSION},
                                  indent=2, sort_keys=True) + "\n")
        os.replace(tmp, dest / MANIFEST)
        progress("image", f"{dest / IMAGE} ({size // 2**20} MiB, version {version})")
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return info, True


def _mmdebstrap(root: Path, srcs: list[str]) -> None:
    users = "; ".join(
        [f'echo "nixbld:x:30000:{",".join(f"nixbld{i}" for i in range(1, BUILD_USERS + 1))}"'
         ' >> "$1/etc/group"']
        + [f'echo "nixbld{i}:x:{30000 + i}:30000:Nix build user {i}:/var/empty:/usr/sbin/nologin"'
           ' >> "$1/etc/passwd"' for i in range(1, BUILD_USERS + 1)])
    argv = ["mmdebstrap", "--variant=minbase", "--mode=root", "--format=directory",
            "--include=" + ",".join(PACKAGES),
            "--dpkgopt=path-exclude=/usr/share/doc/*", "--dpkgopt=path-exclude=/usr/share/man/*",
            "--dpkgopt=path-exclude=/usr/share/locale/*",
            f"--customize-hook={users}", SUITE, str(root), *srcs]
    try:
        proc.run(argv, timeout=1800, env={"SOURCE_DATE_EPOCH": str(FIXED_MTIME)})
    except CommandFailed as e:
        tail = "\n".join(e.stderr.strip().splitlines()[-5:])
        raise HostUnsupported(f"mmdebstrap could not make the builder image:\n{tail}",
                              "check that apt's Debian mirror is reachable (`apt-get update`)") from e


def _packages(root: Path) -> dict[str, str]:
    out = proc.output(["dpkg-query", f"--admindir={root}/var/lib/dpkg", "-W",
                       "-f", "${Package} ${Version}\n"], timeout=60)
    return dict(sorted(ln.split(" ", 1) for ln in out.splitlines() if " " in ln))


def _version(recipe: str, packages: dict[str, str]) -> str:
    h = hashlib.sha256(recipe.encode() + b"\0")
    for name, ver in packages.items():
        h.update(f"{name}={ver}\n".encode())
    return h.hexdigest()[:16]


def _customize(root: Path) -> None:
    """mvm's files; machine-specific and time-stamped files out; every mtime pinned."""
    mvm = root / "mvm"
    mvm.mkdir()
    shutil.copyfile(root / "bin" / "busybox", mvm / "busybox")
    (mvm / "busybox").chmod(0o755)
    (mvm / "init").write_text(INIT)
    (mvm / "init").chmod(0o755)
    (root / "etc" / "nix").mkdir(exist_ok=True)
    (root / "etc" / "nix" / "nix.conf").write_bytes(nix_conf())
    for d in ("nix", "tmp", "run", "proc", "sys", "dev"):
        (root / d).mkdir(exist_ok=True)
    for junk in ("var/cache/ldconfig/aux-cache", "etc/machine-id", "var/lib/dbus/machine-id"):
        (root / junk).unlink(missing_ok=True)
    for d in ("var/log", "var/cache/apt", "var/lib/apt/lists"):
        shutil.rmtree(root / d, ignore_errors=True)
        (root / d).mkdir(parents=True, exist_ok=True)
    for dirpath, dirnames, filenames in os.walk(root):
        for name in dirnames + filenames:
            os.utime(os.path.join(dirpath, name), (FIXED_MTIME, FIXED_MTIME), follow_symlinks=False)
    os.utime(root, (FIXED_MTIME, FIXED_MTIME))
