"""Files only root reads: tenant directories 0700 and files 0600 from their first byte.

Every file mvm makes for a tenant (disks, images, kernels of revisions, snapshots, logs,
manifests, secrets) is created with its mode — never made and then chmod-ed after content was
written, which leaves a window in which another user can open it. `PRIVATE_UMASK` is what the
CLI runs under (and passes to the programs it starts), so files that others create for mvm
(mkfs, QEMU's console log, SQLite's journal) are private too.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import stat
from collections.abc import Iterator
from pathlib import Path

from mvm.errors import HostUnsupported

PRIVATE_UMASK = 0o077
DIR_MODE = 0o700
FILE_MODE = 0o600


def mkdirs(path: Path, mode: int = DIR_MODE) -> Path:
    """`mkdir -p` whose every new component gets `mode` (pathlib's parents get the umask's)."""
    missing = []
    p = path
    while not p.exists():
        missing.append(p)
        p = p.parent
    for d in reversed(missing):
        with contextlib.suppress(FileExistsError):
            os.mkdir(d, mode)
            os.chmod(d, mode)  # (empty yet: the umask may have taken bits `mode` wants)
    return path


def create(path: Path, mode: int = FILE_MODE, *, exclusive: bool = False) -> int:
    """Open `path` for writing, truncated, created with `mode`; an existing file is made `mode`
    before anything is written to it. Returns the fd."""
    flags = os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC | os.O_NOFOLLOW
    fd = os.open(path, flags | (os.O_EXCL if exclusive else 0), mode)
    try:
        os.fchmod(fd, mode)  # an existing file kept its mode through O_CREAT; it is empty now
    except BaseException:
        os.close(fd)
        raise
    return fd


@contextlib.contextmanager
def open_new(path: Path, mode: int = FILE_MODE) -> Iterator[int]:
    fd = create(path, mode)
    try:
        yield fd
    finally:
        os.close(fd)


def write(path: Path, data: bytes, mode: int = FILE_MODE) -> None:
    """Write a whole file atomically (tmp, then rename), `mode` from its first byte."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        with open_new(tmp, mode) as fd:
            view = memoryview(data)
            while view:
                view = view[os.write(fd, view):]
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def copy(src: Path, dest: Path, mode: int = FILE_MODE) -> None:
    """Copy a file's bytes into a new file that is `mode` from its first byte."""
    with open(src, "rb") as s, os.fdopen(create(dest, mode), "wb") as d:
        shutil.copyfileobj(s, d, 1 << 20)


def exclusive_dir(path: Path) -> Path:
    """A directory that is ours alone, in a place others may write to (/dev/shm): made by us
    with 0700, or — already there — a real directory owned by us with mode 0700. Anything else
    (another user's, wider, a symlink) is refused: we would put clear text in it."""
    try:
        os.mkdir(path, DIR_MODE)
        os.chmod(path, DIR_MODE)
    except FileExistsError:
        pass
    st = os.lstat(path)
    problems = []
    if not stat.S_ISDIR(st.st_mode):
        problems.append("is not a directory")
    if st.st_uid != os.geteuid():
        problems.append(f"is owned by uid {st.st_uid}, not {os.geteuid()}")
    if stat.S_IMODE(st.st_mode) != DIR_MODE:
        problems.append(f"has mode {stat.S_IMODE(st.st_mode):04o}, not 0700")
    if problems:
        raise HostUnsupported(
            f"{path} {' and '.join(problems)}: mvm will not put clear-text secrets there",
            f"someone else may have made it; remove it (`rm -rf {path}`) and retry")
    return path


def tighten(root: Path, skip: tuple[Path, ...] = ()) -> int:
    """Make an existing tree private: no bit for group or others on anything in it (symlinks
    and `skip` left as they are). Returns how many modes changed."""
    changed = 0
    paths = [root]
    for dirpath, dirnames, filenames in os.walk(root):
        here = Path(dirpath)
        dirnames[:] = [d for d in dirnames if here / d not in skip]
        paths += [here / n for n in [*dirnames, *filenames] if here / n not in skip]
    for p in paths:
        st = os.lstat(p)
        if not stat.S_ISLNK(st.st_mode) and stat.S_IMODE(st.st_mode) & 0o077:
            os.chmod(p, stat.S_IMODE(st.st_mode) & ~0o077)
            changed += 1
    return changed
