"""The read-only secrets disk: built from the tenant's secrets at every start and wake.

Clear text never has a name on the host until the image is whole: the secrets are in a memfd
and the image is built as an unnamed file (O_TMPFILE) in memory-backed storage (/dev/shm),
so a command killed while it builds (SIGKILL: no `finally` runs) leaves nothing behind. The
whole image is then linked as `<instance>.img` for the hypervisor to open, and unlinked as
soon as the hypervisor holds it open (`remove`, right after boot and restore); a command
killed in between leaves its transition recorded, and the next command on the pool removes
the image when it finishes that transition. `sweep` removes whatever else is there (images of
instances that no longer exist; staging directories an older mvm made).
"""

from __future__ import annotations

import errno
import os
import shutil
import stat
from collections.abc import Callable, Iterable
from pathlib import Path

from mvm.config.paths import Layout
from mvm.errors import InvalidInput
from mvm.image import rootfs
from mvm.util import private

# Fixed, so a snapshot's device geometry matches the image re-delivered at wake.
SIZE_MIB = 4
LABEL = "mvm-secrets"
FILE = "secrets.json"
SUFFIX = ".img"
#: The most secrets.json may hold: what fits the image (`secrets set` refuses more, so a set
#: that is accepted never makes every start fail).
MAX_BYTES = (SIZE_MIB - 1) * 2**20


def check_size(tenant: str, size: int) -> None:
    if size > MAX_BYTES:
        raise InvalidInput(f"tenant {tenant}'s secrets are {size} bytes; at most {MAX_BYTES}"
                           f" ({SIZE_MIB - 1} MiB) fit the secrets disk",
                           "store large files on the data disk and keep only keys in secrets")


def image_path(layout: Layout, instance_id: str) -> Path:
    return layout.secrets_runtime_dir() / f"{instance_id}{SUFFIX}"


def build(layout: Layout, tenant: str, instance_id: str) -> Path:
    """The instance's secrets image at `image_path`, for the hypervisor to open."""
    image = image_path(layout, instance_id)
    fd = _make(layout, tenant)
    try:
        image.unlink(missing_ok=True)
        # Named only now that it is whole: linkat(AT_SYMLINK_FOLLOW) of /proc/self/fd/N, as
        # open(2) says for O_TMPFILE (os.link uses linkat only when given a directory fd).
        where = os.open(image.parent, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        try:
            os.link(f"/proc/self/fd/{fd}", image.name, dst_dir_fd=where, follow_symlinks=True)
        finally:
            os.close(where)
    finally:
        os.close(fd)
    return image


def check(layout: Layout, tenant: str) -> None:
    """Build the tenant's secrets image and throw it away: whether a start could build it now."""
    os.close(_make(layout, tenant))


def _make(layout: Layout, tenant: str) -> int:
    """An open, unnamed file holding the tenant's secrets image."""
    src = layout.secrets_file(tenant)
    data = src.read_bytes() if src.exists() else b"{}\n"
    check_size(tenant, len(data))
    rt = layout.secrets_runtime_dir()
    private.mkdirs(rt.parent, 0o755)  # (/dev/shm is there; a test's runtime root may not be)
    private.exclusive_dir(rt)  # ours alone, or refused: never a directory someone else made
    secrets = os.memfd_create("mvm-secrets", os.MFD_CLOEXEC)
    try:
        view = memoryview(data)
        while view:
            view = view[os.write(secrets, view):]
        image = os.open(rt, os.O_TMPFILE | os.O_RDWR | os.O_CLOEXEC, 0o600)
        try:
            # Equal secrets give an equal image, byte for byte: a woken guest keeps its mount
            # unless the secrets changed while it slept.
            rootfs.mkfs_one_file(image, FILE, secrets, LABEL, f"secrets:{tenant}", SIZE_MIB)
        except BaseException:
            os.close(image)
            raise
        return image
    finally:
        os.close(secrets)


def remove(layout: Layout, instance_id: str) -> None:
    image_path(layout, instance_id).unlink(missing_ok=True)


def sweep(layout: Layout, known: Callable[[], Iterable[str]]) -> list[str]:
    """Remove what killed commands left in the secrets directory that no command will finish:
    images of instances the store does not know (`known()`: the ids it knows, asked only when
    there are images), and the `stage-*` directories an older mvm staged clear-text secrets in
    (mvm makes none now). An image of a known instance is its transition's, finished (and
    removed) by the next command on its pool. Returns what was removed."""
    rt = layout.secrets_runtime_dir()
    if not _ours(rt):
        return []  # (absent; or someone else's, which a build refuses: never touched)
    removed: list[str] = []
    images: dict[str, Path] = {}
    for entry in os.scandir(rt):
        path = Path(entry.path)
        if entry.name.startswith("stage-"):
            if entry.is_dir(follow_symlinks=False):
                shutil.rmtree(path, ignore_errors=True)
            else:
                path.unlink(missing_ok=True)
            removed.append(entry.name)
        elif entry.name.endswith(SUFFIX):
            images[entry.name.removesuffix(SUFFIX)] = path
    if images:
        ids = set(known())
        for iid, path in images.items():
            if iid not in ids:
                path.unlink(missing_ok=True)
                removed.append(path.name)
    return removed


def _ours(rt: Path) -> bool:
    try:
        st = os.lstat(rt)
    except OSError as e:
        if e.errno in (errno.ENOENT, errno.ENOTDIR):
            return False
        raise
    return (stat.S_ISDIR(st.st_mode) and st.st_uid == os.geteuid()
            and stat.S_IMODE(st.st_mode) == private.DIR_MODE)

