"""Pack a Nix closure into a reproducible ext4 root filesystem (DESIGN §4 step 4)."""

from __future__ import annotations

import errno
import functools
import os
import shutil
import uuid
from collections.abc import Callable
from pathlib import Path

from mvm.util import private, proc

# Bump when the layout of the image changes, so revisions built by an older packer differ.
PACKER_VERSION = "1"
FIXED_MTIME = 1  # the Nix store's own mtime
MIN_SIZE_MIB = 16


def stage(out_path: str, closure: list[str], staging: Path,
          guest_files: Callable[[Path], None]) -> None:
    """Lay out the profile at /, its /nix/store closure, /usr/* links and mvm's guest files."""
    store = staging / "nix" / "store"
    for top in (staging, staging / "nix", store):
        _own_dir(top)
    for p in closure:
        _copy_tree(Path(p), store / Path(p).name)
    out = Path(out_path)
    if out.is_dir():
        for entry in sorted(out.iterdir()):
            dest = staging / entry.name
            if entry.name == "nix":
                continue
            _copy_tree(entry, dest, link=False)
    usr = staging / "usr"
    _own_dir(usr)
    for sub in ("bin", "sbin", "lib", "lib64"):
        target = staging / sub
        if (target.exists() or target.is_symlink()) and not (usr / sub).exists():
            (usr / sub).symlink_to(f"../{sub}")
    for d in ("bin", "etc", "proc", "sys", "dev", "run", "tmp", "data", "root", "var"):
        _own_dir(staging / d)
    (staging / "tmp").chmod(0o1777)
    guest_files(staging)
    _normalize(staging)


def _own_dir(path: Path) -> None:
    """A directory the image has whatever the profile holds: 0755 whatever the umask (mvm runs
    with 077, and the image's bytes must not depend on it)."""
    if not path.exists() and not path.is_symlink():
        path.mkdir()
        path.chmod(0o755)


def _copy_tree(src: Path, dest: Path, link: bool = True) -> None:
    """Copy preserving symlinks; hard-link files when on the same filesystem (fast, read-only)."""
    if src.is_symlink() or not src.is_dir():
        if src.is_symlink():
            dest.symlink_to(os.readlink(src))
            st = src.lstat()
            os.utime(dest, ns=(st.st_atime_ns, st.st_mtime_ns), follow_symlinks=False)
        else:
            _copy_file(src, dest, link)
        return
    if dest.is_symlink() or dest.exists():
        # a merged directory: profile content over directories we created
        pass
    else:
        dest.mkdir()
    for child in sorted(src.iterdir()):
        _copy_tree(child, dest / child.name, link)
    shutil.copystat(src, dest, follow_symlinks=False)  # after the children: they bump mtime


def _copy_file(src: Path, dest: Path, link: bool) -> None:
    if link:
        try:
            os.link(src, dest)
            return
        except OSError as e:
            if e.errno not in (errno.EXDEV, errno.EPERM):
                raise
    shutil.copy2(src, dest, follow_symlinks=False)


def _normalize(staging: Path) -> None:
    store = staging / "nix" / "store"
    for dirpath, dirnames, filenames in os.walk(staging, topdown=True):
        here = Path(dirpath)
        if here == store:
            dirnames[:] = []  # store contents are already normalized by Nix (and maybe hard links)
        for name in filenames + dirnames:
            os.utime(here / name, (FIXED_MTIME, FIXED_MTIME), follow_symlinks=False)
    for d in (store, store.parent, staging):
        os.utime(d, (FIXED_MTIME, FIXED_MTIME))


@functools.cache
def mkfs_version() -> str:
    """The packer's own version is part of what determines an image's bytes."""
    return proc.run(["mkfs.ext4", "-V"], timeout=10).stderr.decode().splitlines()[0].strip()


def tree_size(root: Path) -> tuple[int, int]:
    """Bytes and inode count of a tree, counting hard links once."""
    seen: set[tuple[int, int]] = set()
    total = 0
    inodes = 0
    for dirpath, dirnames, filenames in os.walk(root):
        for name in filenames + dirnames:
            st = os.lstat(os.path.join(dirpath, name))
            key = (st.st_dev, st.st_ino)
            if key in seen:
                continue
            seen.add(key)
            inodes += 1
            total += (st.st_size + 4095) // 4096 * 4096
    return total, inodes


def mkfs(staging: Path, image: Path, label: str, seed: str, size_mib: int | None = None) -> None:
    """mkfs.ext4 -d with every source of randomness pinned, so equal trees give equal bytes."""
    size, inodes = tree_size(staging)
    mib = size_mib or max(MIN_SIZE_MIB, int(size * 1.15 / 2**20) + 16)
    fs_uuid = str(uuid.uuid5(uuid.NAMESPACE_URL, f"mvm:{seed}"))
    if image.exists():
        image.unlink()
    with os.fdopen(private.create(image, exclusive=True), "wb") as f:  # 0600 from the start
        f.truncate(mib * 2**20)
    proc.run(
        ["mkfs.ext4", "-q", "-F", "-L", label, "-U", fs_uuid,
         "-E", f"hash_seed={fs_uuid},root_owner=0:0,lazy_itable_init=0",
         "-O", "^has_journal", "-b", "4096", "-N", str(inodes + 1024 + inodes // 4), "-m", "0",
         "-d", str(staging), str(image)],
        env={"E2FSPROGS_FAKE_TIME": str(FIXED_MTIME)}, timeout=1800,
    )
    _pin_inode_times(staging, image)


def _pin_inode_times(staging: Path, image: Path) -> None:
    """mkfs.ext4 -d copies each source's atime and ctime, which no one can pin on the source
    (ctime is the kernel's); set them in the image instead, in one debugfs session."""
    seen: set[tuple[int, int]] = set()
    cmds = []
    for dirpath, dirnames, filenames in os.walk(staging):
        for name in [*dirnames, *filenames]:
            full = os.path.join(dirpath, name)
            st = os.lstat(full)
            if (st.st_dev, st.st_ino) in seen:
                continue
            seen.add((st.st_dev, st.st_ino))
            rel = "/" + os.path.relpath(full, staging)
            if '"' in rel or "\n" in rel:
                continue  # debugfs cannot quote these; such names do not occur in practice
            # mtime is already pinned in the staging tree (and in the Nix store)
            cmds.append(f'sif "{rel}" atime {FIXED_MTIME}')
            cmds.append(f'sif "{rel}" ctime {FIXED_MTIME}')
    for field in ("atime", "ctime", "mtime"):
        cmds.append(f'sif / {field} {FIXED_MTIME}')
    proc.run(["debugfs", "-w", "-f", "-", str(image)], input="\n".join(cmds).encode() + b"\n",
             env={"E2FSPROGS_FAKE_TIME": str(FIXED_MTIME)}, timeout=1800)


def pack_closure(out_path: str, closure: list[str], image: Path, seed: str,
                 guest_files: Callable[[Path], None], workdir: Path) -> int:
    """Stage and pack; returns the closure size in bytes."""
    staging = workdir / "rootfs"
    if staging.exists():
        shutil.rmtree(staging)
    stage(out_path, closure, staging, guest_files)
    try:
        mkfs(staging, image, "mvm-root", seed)
        return tree_size(staging / "nix" / "store")[0]
    finally:
        shutil.rmtree(staging, ignore_errors=True)
