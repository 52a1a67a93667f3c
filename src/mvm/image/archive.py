"""A build's outputs as untrusted bytes: the builder microVM's output archive, and the checks
any builder's kernel must pass (standard library only: also copied into the builder).

The builder writes one archive onto a raw disk; the host reads that disk as a byte stream,
never mounting it or walking a file system. The format is deliberately tiny:

    MVMOUT1\\n
    <name> <size> <sha256>\\n  <size bytes>      (repeated; known names only, each at most once)
    END\\n

The reader accepts only the names in LIMITS, each within its size limit, writes each to a new
regular file in a directory of its own (never following or replacing anything), and checks
every hash; anything else ends the read with one clear error.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from collections.abc import Iterable
from pathlib import Path
from typing import IO, Any

from mvm.errors import BuildFailed

MAGIC = b"MVMOUT1\n"
END = b"END\n"
RESULT = "result.json"
MiB = 2**20
#: Every name the archive may hold, and its size limit in bytes.
LIMITS: dict[str, int] = {
    RESULT: 4 * MiB,
    "rootfs.ext4": 16 * 1024 * MiB,
    "vmlinux": 512 * MiB,
    "initrd": 512 * MiB,
}
_HEADER = re.compile(rb"([a-z0-9.]{1,32}) ([0-9]{1,12}) ([0-9a-f]{64})\n")
_CHUNK = MiB
_ZEROS = bytes(_CHUNK)

ELF_MAGIC = b"\x7fELF"
EXT4_MAGIC_OFFSET = 1080  # the superblock (at 1024) + s_magic (at 56)
EXT4_MAGIC = b"\x53\xef"


class BadOutput(BuildFailed):
    """The builder's outputs are not what a build produces (a broken or hostile builder)."""


def kernel_format(head: bytes) -> str | None:
    """"elf" for an ELF vmlinux, "bzimage" for an x86 boot image, None for anything else.
    `head` is the file's first 1 KiB (or more)."""
    if head[:4] == ELF_MAGIC and head[4:5] == b"\x02":  # 64-bit
        return "elf"
    if len(head) >= 0x206 and head[0x1FE:0x200] == b"\x55\xaa" and head[0x202:0x206] == b"HdrS":
        return "bzimage"
    return None


def check_kernel(path: Path) -> str:
    """The kernel's format, or BadOutput: a kernel must be an ELF vmlinux or a bzImage."""
    with open(path, "rb") as f:
        kind = kernel_format(f.read(1024))
    if kind is None:
        raise BadOutput(f"the build's kernel {path.name} is neither an ELF vmlinux nor a bzImage",
                        "a profile's vmlinux must be a Linux kernel image")
    return kind


def is_ext4(path: Path) -> bool:
    with open(path, "rb") as f:
        f.seek(EXT4_MAGIC_OFFSET)
        return f.read(2) == EXT4_MAGIC


# -- writing (inside the builder) ---------------------------------------------------------

def write_archive(dev: IO[bytes], result: dict[str, Any], files: Iterable[tuple[str, Path]]) -> None:
    """result.json first, then each (name, path); the caller syncs the device."""
    dev.write(MAGIC)
    body = (json.dumps(result, sort_keys=True) + "\n").encode()
    dev.write(f"{RESULT} {len(body)} {hashlib.sha256(body).hexdigest()}\n".encode())
    dev.write(body)
    for name, path in files:
        if name not in LIMITS or name == RESULT:
            raise ValueError(f"not an output name: {name}")
        size = path.stat().st_size
        h = hashlib.sha256()
        with open(path, "rb") as f:
            while chunk := f.read(_CHUNK):
                h.update(chunk)
        dev.write(f"{name} {size} {h.hexdigest()}\n".encode())
        with open(path, "rb") as f:
            while chunk := f.read(_CHUNK):
                dev.write(chunk)
    dev.write(END)
    dev.flush()


# -- reading (on the host) -----------------------------------------------------------------

def read_archive(src: Path, dest: Path) -> tuple[dict[str, Any], dict[str, str]]:
    """Unpack the archive on the raw disk `src` into the empty directory `dest`.

    Returns result.json's content and {name: sha256} of the files written. Raises BadOutput
    (after removing what it wrote) for anything that is not a well-formed archive.
    """
    written: dict[str, str] = {}
    try:
        with open(src, "rb") as f:
            total = os.fstat(f.fileno()).st_size
            if f.read(len(MAGIC)) != MAGIC:
                raise BadOutput("the builder wrote no result (it ended before its last step)",
                                "see the build log for the builder's console")
            while True:
                line = f.readline(128)
                if line == END:
                    break
                m = _HEADER.fullmatch(line)
                if not m:
                    raise BadOutput(f"malformed entry in the builder's output: {line[:60]!r}")
                name, size, digest = m.group(1).decode(), int(m.group(2)), m.group(3).decode()
                if name not in LIMITS:
                    raise BadOutput(f"the builder's output holds an unknown file {name!r}")
                if name in written:
                    raise BadOutput(f"the builder's output holds {name!r} twice")
                if size > LIMITS[name] or f.tell() + size > total:
                    raise BadOutput(f"{name} in the builder's output is too large ({size} bytes)")
                written[name] = _copy_exact(f, dest / name, size)
                if written[name] != digest:
                    raise BadOutput(f"{name} in the builder's output does not match its hash")
        if RESULT not in written:
            raise BadOutput("the builder's output has no result.json")
        try:
            result = json.loads((dest / RESULT).read_bytes())
        except ValueError as e:
            raise BadOutput(f"the builder's result.json is not JSON: {e}") from e
        if not isinstance(result, dict) or not isinstance(result.get("ok"), bool):
            raise BadOutput("the builder's result.json is not a result")
    except BaseException:
        for name in written:
            (dest / name).unlink(missing_ok=True)
        raise
    (dest / RESULT).unlink()
    del written[RESULT]
    return result, written


def sizes(src: Path) -> dict[str, int]:
    """{name: size} of the archive's entries, read from their headers only (skipping their
    bytes): what collecting it will write. Stops quietly at anything malformed, which
    `read_archive` then refuses."""
    out: dict[str, int] = {}
    with open(src, "rb") as f:
        total = os.fstat(f.fileno()).st_size
        if f.read(len(MAGIC)) != MAGIC:
            return out
        while len(out) <= len(LIMITS):
            m = _HEADER.fullmatch(f.readline(128))
            if not m or m.group(1).decode() not in LIMITS:
                break
            size = int(m.group(2))
            if f.tell() + size > total:
                break
            out[m.group(1).decode()] = size
            f.seek(size, os.SEEK_CUR)
    return out


def _copy_exact(f: IO[bytes], target: Path, size: int) -> str:
    """Copy `size` bytes into a new file, sparse: a chunk of zeros is skipped, not written (a
    rootfs image is mostly free space, which would otherwise take host disk)."""
    h = hashlib.sha256()
    fd = os.open(target, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600)
    with os.fdopen(fd, "wb") as out:
        left = size
        while left:
            chunk = f.read(min(left, _CHUNK))
            if not chunk:
                raise BadOutput(f"{target.name} in the builder's output is cut short")
            h.update(chunk)
            if chunk == _ZEROS:
                out.seek(len(chunk), os.SEEK_CUR)
            else:
                out.write(chunk)
            left -= len(chunk)
        out.truncate(size)
    return h.hexdigest()
