"""What a build produced is a tenant's bytes: the host follows nothing out of its closure.

A profile's output, its kernel and its initrd are made by a tenant's derivation, and a
derivation may make any of them a symlink to anything (`ln -s /etc $out`). mvm packs images
as root, so every path it reads from an output is resolved here first: symlinks are followed
only while they stay inside the build's closure (store paths under /nix/store that the output
references), and anything that leaves it is refused with one line. The builder microVM's
host side uses the same checks on the files it receives (`check_kernel`, `check_initrd`).
"""

from __future__ import annotations

import os
import stat
import struct
from collections.abc import Iterable
from pathlib import Path

from mvm.errors import BuildFailed
from mvm.image import archive

STORE = Path("/nix/store")
MAX_LINKS = 40  # as the kernel's own limit on symlinks in one lookup


class OutsideClosure(BuildFailed):
    """A build output names something outside its closure (or is not what it must be)."""


def resolve(path: Path | str, closure: Iterable[str], store: Path = STORE) -> Path | None:
    """`path` (under one of `closure`'s store paths) with its symlinks followed only inside
    the closure: the real path, whose components are no symlinks, or None when it does not
    exist. A symlink leading anywhere else (another store path, /etc, a tenant's directory,
    `..` above the store) raises OutsideClosure naming where it leads."""
    allowed = {Path(p).name for p in closure}
    path = Path(path)
    if not _under(path, store):
        raise OutsideClosure(f"{path} is not in the Nix store")
    todo = list(path.parts[len(store.parts):])  # ".." kept: resolved below, link by link
    cur = store
    links = 0
    origin = path
    while todo:
        name = todo.pop(0)
        if name in ("", "."):
            continue
        if name == "..":
            if cur == store:
                raise _outside(origin, "..")
            cur = cur.parent
            continue
        if cur == store and name not in allowed:
            raise _outside(origin, str(store / name))
        nxt = cur / name
        try:
            st = os.lstat(nxt)
        except (FileNotFoundError, NotADirectoryError):
            return None
        if stat.S_ISLNK(st.st_mode):
            links += 1
            if links > MAX_LINKS:
                raise OutsideClosure(f"{origin}: too many levels of symbolic links")
            target = os.readlink(nxt)
            if os.path.isabs(target):
                if not _under(Path(target), store):
                    raise _outside(origin, target)
                cur = store
                todo = list(Path(target).parts[len(store.parts):]) + todo
            else:
                todo = list(Path(target).parts) + todo
            continue
        if todo and not stat.S_ISDIR(st.st_mode):
            return None
        cur = nxt
    if cur == store:
        raise _outside(origin, str(store))
    return cur


def _under(path: Path, store: Path) -> bool:
    return path.is_absolute() and path.parts[:len(store.parts)] == store.parts \
        and len(path.parts) > len(store.parts)


def _outside(origin: Path, where: str) -> OutsideClosure:
    return OutsideClosure(f"the build output {origin} leads to {where}, outside the build's closure",
                          "a profile's files must be in its own closure; mvm follows no link out of it")


def regular_file(path: Path | str, closure: Iterable[str], what: str,
                 store: Path = STORE) -> Path | None:
    """A file of a build output that must be a regular file inside the closure (resolved),
    or None when nothing is there (a dangling link inside the closure counts as nothing)."""
    real = resolve(path, closure, store)
    if real is None:
        return None
    if not stat.S_ISREG(os.lstat(real).st_mode):
        raise OutsideClosure(f"the profile's {what} {path} is not a regular file",
                             f"ship the {what} as a file in the profile's output")
    return real


def profile_kernel(out_path: str, closure: Iterable[str],
                   store: Path = STORE) -> tuple[Path, Path | None] | None:
    """The kernel and initrd a profile ships (`vmlinux` and `initrd`, or `boot/vmlinux` and
    `boot/initrd`, each a regular file inside the closure, the kernel bootable, the initrd not
    empty), or None for mvm's default kernel. Both builders choose with this, so the same
    flake gives the same kernel files and revision whichever builder ran."""
    closure = list(closure)
    for name in ("vmlinux", "boot/vmlinux"):
        kernel = regular_file(f"{out_path}/{name}", closure, "kernel", store)
        if kernel is not None:
            check_kernel(kernel)
            initrd = regular_file(f"{out_path}/{name.replace('vmlinux', 'initrd')}", closure,
                                  "initrd", store)
            if initrd is not None:
                check_initrd(initrd)
            return kernel, initrd
    return None


def check_kernel(path: Path) -> None:
    """A kernel mvm can boot: an ELF vmlinux or a bzImage (the builder microVM's output is
    checked by the same `archive.kernel_format`)."""
    with open(path, "rb") as f:
        if archive.kernel_format(f.read(1024)) is not None:
            return
    raise OutsideClosure(f"the profile's kernel {path} is neither an ELF vmlinux nor a bzImage",
                         "ship an uncompressed vmlinux (or a bzImage for QEMU pools)")


def check_initrd(path: Path) -> None:
    """An initrd is any non-empty file (a cpio archive, compressed or not)."""
    if os.stat(path).st_size == 0:
        raise OutsideClosure(f"the profile's initrd {path} is empty")


# ---------------------------------------------------------------------------- Firecracker

EM_X86_64 = 62
PT_LOAD, PT_NOTE = 1, 4
XEN_ELFNOTE_PHYS32_ENTRY = 18  # the PVH entry point, in a note named "Xen"


class KernelNotForFirecracker(BuildFailed):
    """A kernel Firecracker cannot boot: it loads only an uncompressed ELF64 x86-64 vmlinux."""


_FC_HINT = ("Firecracker boots only an uncompressed x86-64 ELF vmlinux: ship `vmlinux` in the "
            "profile (not a bzImage), or use a QEMU pool")


def check_firecracker_kernel(path: Path) -> None:
    """Refuse, with one line, a kernel Firecracker would not load: not an ELF, not ELF64
    little-endian, not x86-64 (e_machine 62), without an entry point or a PVH note (Xen
    ELFNOTE 18), or with program headers or loadable segments past the end of the file."""
    def bad(what: str) -> KernelNotForFirecracker:
        return KernelNotForFirecracker(f"the kernel {path} {what}", _FC_HINT)

    try:
        with open(path, "rb") as f:
            size = os.fstat(f.fileno()).st_size
            head = f.read(1024)
            if archive.kernel_format(head) == "bzimage":
                raise bad("is a bzImage (a compressed kernel), not an ELF vmlinux")
            if head[:4] != b"\x7fELF":
                raise bad("is not an ELF file")
            if len(head) < 64:
                raise bad(f"is truncated ({size} bytes: shorter than an ELF64 header)")
            if head[4] != 2:
                raise bad(f"is a {'32-bit ' if head[4] == 1 else ''}ELF of class {head[4]}, "
                          "not ELF64")
            if head[5] != 1:
                raise bad("is a big-endian ELF, not little-endian")
            machine = struct.unpack_from("<H", head, 18)[0]
            if machine != EM_X86_64:
                raise bad(f"is an ELF for machine {machine}, not x86-64 ({EM_X86_64})")
            entry, phoff = struct.unpack_from("<QQ", head, 24)
            phentsize, phnum = struct.unpack_from("<HH", head, 54)
            if phnum == 0 or phentsize < 56 or phoff + phnum * phentsize > size:
                raise bad(f"is truncated or damaged ({size} bytes; its {phnum} program "
                          f"headers at {phoff} do not fit)")
            f.seek(phoff)
            table = f.read(phnum * phentsize)
            pvh = False
            loads = 0
            for i in range(phnum):
                p_type, _, offset, _, _, filesz = struct.unpack_from("<IIQQQQ", table,
                                                                     i * phentsize)
                if offset + filesz > size:
                    raise bad(f"is truncated ({size} bytes; a segment ends at "
                              f"{offset + filesz})")
                if p_type == PT_LOAD:
                    loads += 1
                elif p_type == PT_NOTE and filesz <= 1 << 20:
                    f.seek(offset)
                    pvh = pvh or _has_pvh_note(f.read(filesz))
            if loads == 0:
                raise bad("has no loadable segment")
            if entry == 0 and not pvh:
                raise bad("has neither an entry point nor a PVH note")
    except OSError as e:
        raise KernelNotForFirecracker(f"cannot read the kernel {path}: {e.strerror or e}",
                                      _FC_HINT) from e
    except struct.error:
        raise KernelNotForFirecracker(f"the kernel {path} is truncated or damaged",
                                      _FC_HINT) from None


def _has_pvh_note(notes: bytes) -> bool:
    pos = 0
    while pos + 12 <= len(notes):
        namesz, descsz, n_type = struct.unpack_from("<III", notes, pos)
        name = notes[pos + 12:pos + 12 + namesz].rstrip(b"\0")
        if name == b"Xen" and n_type == XEN_ELFNOTE_PHYS32_ENTRY:
            return True
        pos += 12 + (namesz + 3) // 4 * 4 + (descsz + 3) // 4 * 4
    return False
