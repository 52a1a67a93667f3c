"""Pack a Nix closure into a reproducible ext4 root filesystem (DESIGN §4 step 4)."""

from __future__ import annotations

import errno
import functools
import os
import shutil
import stat
import uuid
from collections.abc import Callable
from pathlib import Path

from mvm.errors import CommandFailed
from mvm.image import outputs
from mvm.util import private, proc

# Bump when the layout of the image changes, so revisions built by an older packer differ.
PACKER_VERSION = "3"
FIXED_MTIME = 1  # the Nix store's own mtime
MIN_SIZE_MIB = 16


# mvm owns these top-level names of every image: init mounts over the mount points and runs
# from /mvm, so they are mvm's own fresh directories whatever the profile put there.
OWNED = ("mvm", "proc", "sys", "dev", "run", "tmp", "data")
# Made when the profile has nothing there (a profile's own link or directory is kept).
DEFAULT_DIRS = ("bin", "etc", "root", "var")


def stage(out_path: str, closure: list[str], staging: Path,
          guest_files: Callable[[Path], None], store: Path = outputs.STORE) -> None:
    """Lay out the profile at /, its /nix/store closure, /usr/* links and mvm's guest files.

    Nothing here follows a symlink the build made: the output is resolved inside its closure
    (`outputs.resolve`), links are copied as links, directories are made fresh, and every path
    mvm writes, chmods or creates in is checked to be a directory and not a link first.
    """
    root = outputs.resolve(out_path, closure, store)
    nix_store = staging / "nix" / "store"
    for top in (staging, staging / "nix", nix_store):
        _fresh_dir(top)
    for p in closure:
        _copy_tree(Path(p), nix_store / Path(p).name)
    if root is not None and stat.S_ISDIR(os.lstat(root).st_mode):
        for name in sorted(os.listdir(root)):
            if name != "nix":
                _copy_tree(root / name, staging / name, link=False)
    for name in OWNED:  # the profile's own /tmp, /mvm …: replaced, never written through
        _remove(staging / name)
        _fresh_dir(staging / name)
    for name in DEFAULT_DIRS:
        if not os.path.lexists(staging / name):
            _fresh_dir(staging / name)
    usr = staging / "usr"
    if not os.path.lexists(usr):
        _fresh_dir(usr)
    if _is_real_dir(usr):  # a profile's /usr that is a link is left as the profile made it
        for sub in ("bin", "sbin", "lib", "lib64"):
            if os.path.lexists(staging / sub) and not os.path.lexists(usr / sub):
                (usr / sub).symlink_to(f"../{sub}")
    (staging / "tmp").chmod(0o1777)
    guest_files(staging)
    _normalize(staging)


def _fresh_dir(path: Path) -> None:
    """A directory of mvm's own in the image: 0755 whatever the umask (mvm runs with 077, and
    the image's bytes must not depend on it)."""
    os.mkdir(path)
    os.chmod(path, 0o755)


def _is_real_dir(path: Path) -> bool:
    return stat.S_ISDIR(os.lstat(path).st_mode)


def _remove(path: Path) -> None:
    """Remove whatever is at `path` without following it (rmtree does not follow links)."""
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return
    if stat.S_ISDIR(st.st_mode):
        shutil.rmtree(path)
    else:
        os.unlink(path)


def _copy_tree(src: Path, dest: Path, link: bool = True) -> None:
    """Copy without following anything: links as links, directories made fresh (never merged
    into something that exists), regular files hard-linked when `link` and on the same
    filesystem (fast; the store is read-only), else copied."""
    st = os.lstat(src)
    if stat.S_ISLNK(st.st_mode):
        os.symlink(os.readlink(src), dest)
        os.utime(dest, ns=(st.st_atime_ns, st.st_mtime_ns), follow_symlinks=False)
    elif stat.S_ISDIR(st.st_mode):
        os.mkdir(dest)  # raises if anything is there: nothing is ever written through a link
        for child in sorted(os.listdir(src)):
            _copy_tree(src / child, dest / child, link)
        shutil.copystat(src, dest, follow_symlinks=False)  # after the children: they bump mtime
    elif stat.S_ISREG(st.st_mode):
        _copy_file(src, dest, link)
    else:
        raise outputs.OutsideClosure(f"the build output holds {src}, which is not a file,"
                                     " directory or symlink")


def _copy_file(src: Path, dest: Path, link: bool) -> None:
    if link:
        try:
            os.link(src, dest, follow_symlinks=False)
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


def image_mib(tree_bytes: int) -> int:
    """The size of the image `mkfs` makes for a tree of `tree_bytes` (`tree_size`)."""
    return max(MIN_SIZE_MIB, int(tree_bytes * 1.15 / 2**20) + 16)


def estimate_bytes(closure: list[str]) -> int:
    """At most the bytes `pack_closure` will write for this closure (before it stages it):
    the image's size, with room for mvm's guest files."""
    size = 16 * 2**20
    for p in closure:
        st = os.lstat(p)
        size += tree_size(Path(p))[0] + (st.st_size + 4095) // 4096 * 4096
    return image_mib(size) * 2**20


def mkfs(staging: Path, image: Path, label: str, seed: str, size_mib: int | None = None) -> None:
    """mkfs.ext4 -d with every source of randomness pinned, so equal trees give equal bytes."""
    size, inodes = tree_size(staging)
    mib = size_mib or image_mib(size)
    if image.exists():
        image.unlink()
    with os.fdopen(private.create(image, exclusive=True), "wb") as f:  # 0600 from the start
        f.truncate(mib * 2**20)
    proc.run(_mkfs_argv(label, seed, inodes, str(image), ["-d", str(staging)]),
             env={"E2FSPROGS_FAKE_TIME": str(FIXED_MTIME)}, timeout=1800)
    _pin_inode_times(staging, image)


def _mkfs_argv(label: str, seed: str, inodes: int, target: str, source: list[str]) -> list[str]:
    fs_uuid = str(uuid.uuid5(uuid.NAMESPACE_URL, f"mvm:{seed}"))
    return ["mkfs.ext4", "-q", "-F", "-L", label, "-U", fs_uuid,
            "-E", f"hash_seed={fs_uuid},root_owner=0:0,lazy_itable_init=0",
            "-O", "^has_journal", "-b", "4096", "-N", str(inodes + 1024 + inodes // 4), "-m", "0",
            *source, target]


def mkfs_one_file(image_fd: int, name: str, data_fd: int, label: str, seed: str,
                  size_mib: int) -> None:
    """An image holding one read-only file (mode 0400, root's), made without any named file
    on the host: the image is the open file `image_fd`, the content the open file `data_fd`
    (both reached as /proc/self/fd/N by mkfs and debugfs). Byte for byte what `mkfs` makes of
    a staging directory (0755) holding that one file: `mkfs -d` writes files the same way."""
    if not name or "/" in name or '"' in name or any(c.isspace() for c in name):
        raise ValueError(f"unsupported file name {name!r}")
    os.ftruncate(image_fd, 0)
    os.ftruncate(image_fd, size_mib * 2**20)
    image = f"/proc/self/fd/{image_fd}"
    env = {"E2FSPROGS_FAKE_TIME": str(FIXED_MTIME)}
    proc.run(_mkfs_argv(label, seed, 1, image, []), env=env, timeout=60, pass_fds=(image_fd,))
    cmds = [f"write /proc/self/fd/{data_fd} {name}", f"sif {name} mode 0100400",
            *(f"sif {where} {field} {FIXED_MTIME}" for where in (name, "/")
              for field in ("atime", "ctime", "mtime")),
            "ssv kbytes_written 0"]
    out = proc.run(["debugfs", "-w", "-f", "-", image], input="\n".join(cmds).encode() + b"\n",
                   env=env, timeout=60, pass_fds=(image_fd, data_fd))
    # (debugfs reports a failed command on stderr and still exits 0)
    err = [ln for ln in out.stderr.decode(errors="replace").splitlines()
           if ln.strip() and not ln.startswith("debugfs ")]
    if err:
        raise CommandFailed(f"debugfs could not write {name} into the image: {err[0]}")


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
    # The superblock's lifetime-writes counter counts the bytes mkfs wrote, which differ
    # between machines for the same tree (the builder microVM's and the host's did), not the
    # image's content: zeroed, so either builder packs the same bytes.
    cmds.append("ssv kbytes_written 0")
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
