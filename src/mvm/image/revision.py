"""What a revision hash covers, computed the same way by the host builder and inside the
builder microVM (this module is copied into the builder with the job: standard library only).

The hash covers everything that determines an image's bytes: the profile's store path (the
same with either builder, since both evaluate the same flake against the same package set),
the kernel and initrd, mvm's guest files, the BusyBox copied into every image, and the packer
(mkfs's version and mvm's packing rules). Which builder ran is not part of it.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

DATA = Path(__file__).resolve().parent.parent / "data"


def guest_files_hash(guest: Path | None = None) -> str:
    h = hashlib.sha256()
    guest = guest or DATA / "guest"
    for p in sorted(guest.rglob("*")) if guest.exists() else []:
        if p.is_file():
            h.update(p.relative_to(guest).as_posix().encode() + b"\0" + p.read_bytes())
    return h.hexdigest()


def revision_hash(out_path: str, kernel_sha256: str, initrd_sha256: str, guest_hash: str,
                  busybox_sha256: str, mkfs_version: str, packer_version: str) -> str:
    h = hashlib.sha256()
    for part in (out_path, kernel_sha256, initrd_sha256, guest_hash, busybox_sha256,
                 mkfs_version, packer_version):
        h.update(part.encode() + b"\0")
    return h.hexdigest()[:16]
