"""The read-only secrets disk: built from the tenant's secrets at every start and wake.

The clear-text image lives only in memory-backed storage (/dev/shm) and is unlinked as soon
as the hypervisor holds it open, so it is never left anywhere in clear.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

from mvm.build import rootfs
from mvm.config.paths import Layout
from mvm.errors import InvalidInput

# Fixed, so a snapshot's device geometry matches the image re-delivered at wake.
SIZE_MIB = 4
LABEL = "mvm-secrets"


def image_path(layout: Layout, instance_id: str) -> Path:
    return layout.secrets_runtime_dir() / f"{instance_id}.img"


def build(layout: Layout, tenant: str, instance_id: str) -> Path:
    src = layout.secrets_file(tenant)
    data = src.read_bytes() if src.exists() else b"{}\n"
    if len(data) > (SIZE_MIB - 1) * 2**20:
        raise InvalidInput(f"tenant {tenant}'s secrets are {len(data)} bytes; at most "
                           f"{SIZE_MIB - 1} MiB fit the secrets disk")
    rt = layout.secrets_runtime_dir()
    rt.mkdir(mode=0o700, parents=True, exist_ok=True)
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
        rootfs.mkfs(staging, image, LABEL, f"secrets:{tenant}", size_mib=SIZE_MIB)
        image.chmod(0o600)
    except BaseException:
        remove(layout, instance_id)
        raise
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return image


def remove(layout: Layout, instance_id: str) -> None:
    image_path(layout, instance_id).unlink(missing_ok=True)
