"""The read-only secrets disk: built from the tenant's secrets at every start and wake.

The clear-text image lives only in memory-backed storage (/dev/shm) and is unlinked as soon
as the hypervisor holds it open, so it is never left anywhere in clear.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

from mvm.config.paths import Layout
from mvm.errors import InvalidInput
from mvm.image import rootfs
from mvm.util import private

# Fixed, so a snapshot's device geometry matches the image re-delivered at wake.
SIZE_MIB = 4
LABEL = "mvm-secrets"
#: The most secrets.json may hold: what fits the image (`secrets set` refuses more, so a set
#: that is accepted never makes every start fail).
MAX_BYTES = (SIZE_MIB - 1) * 2**20


def check_size(tenant: str, size: int) -> None:
    if size > MAX_BYTES:
        raise InvalidInput(f"tenant {tenant}'s secrets are {size} bytes; at most {MAX_BYTES}"
                           f" ({SIZE_MIB - 1} MiB) fit the secrets disk",
                           "store large files on the data disk and keep only keys in secrets")


def image_path(layout: Layout, instance_id: str) -> Path:
    return layout.secrets_runtime_dir() / f"{instance_id}.img"


def build(layout: Layout, tenant: str, instance_id: str) -> Path:
    src = layout.secrets_file(tenant)
    data = src.read_bytes() if src.exists() else b"{}\n"
    check_size(tenant, len(data))
    rt = layout.secrets_runtime_dir()
    private.mkdirs(rt.parent, 0o755)  # (/dev/shm is there; a test's runtime root may not be)
    private.exclusive_dir(rt)  # ours alone, or refused: never a directory someone else made
    image = image_path(layout, instance_id)
    staging = Path(tempfile.mkdtemp(prefix="stage-", dir=rt))
    try:
        staging.chmod(0o755)
        f = staging / "secrets.json"
        fd = os.open(f, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o400)
        try:
            os.write(fd, data)
        finally:
            os.close(fd)
        os.utime(f, (1, 1))
        os.utime(staging, (1, 1))
        # Equal secrets give an equal image, byte for byte: a woken guest keeps its mount
        # unless the secrets changed while it slept.
        rootfs.mkfs(staging, image, LABEL, f"secrets:{tenant}", size_mib=SIZE_MIB)  # 0600
    except BaseException:
        remove(layout, instance_id)
        raise
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return image


def remove(layout: Layout, instance_id: str) -> None:
    image_path(layout, instance_id).unlink(missing_ok=True)
