"""The kernel a Firecracker pool boots: Firecracker loads only an uncompressed ELF64 x86-64
vmlinux with an entry point or a PVH note (Xen ELFNOTE 18). The vmlinux mvm ships is one;
a bzImage, an ELF32, a non-ELF or a truncated file is refused with one line."""

from __future__ import annotations

import shutil
import struct
from pathlib import Path

import pytest

from mvm.errors import BuildFailed
from mvm.guest.layout import _has_interp
from mvm.image import kernel, outputs
from mvm.image.outputs import KernelNotForFirecracker, check_firecracker_kernel
from tests.conftest import ASSETS_HOME, needs_assets

SHIPPED = ASSETS_HOME / "kernel" / "vmlinux"


def elf64(*, machine: int = 62, entry: int = 0x1000000, pvh: bool = False,
          ei_class: int = 2) -> bytes:
    """A small ELF: header, one PT_LOAD and (with `pvh`) a PT_NOTE holding the Xen PVH note."""
    desc = struct.pack("<I", 0x1000000)
    note = struct.pack("<III", 4, len(desc), 18) + b"Xen\0" + desc
    phnum = 2 if pvh else 1
    phoff = 64
    data_off = phoff + 56 * phnum
    header = (b"\x7fELF" + bytes([ei_class, 1, 1]) + bytes(9)
              + struct.pack("<HHIQQQIHHHHHH", 2, machine, 1, entry, phoff, 0, 0, 64, 56, phnum,
                            64, 0, 0))
    phdrs = struct.pack("<IIQQQQQQ", 1, 5, data_off, 0x1000000, 0x1000000, 16, 16, 0x1000)
    if pvh:
        phdrs += struct.pack("<IIQQQQQQ", 4, 4, data_off + 16, 0, 0, len(note), len(note), 4)
    return header + phdrs + b"\x90" * 16 + note


def bzimage() -> bytes:
    data = bytearray(2048)
    data[:2] = b"MZ"
    data[0x1FE:0x200] = b"\x55\xaa"
    data[0x202:0x206] = b"HdrS"
    return bytes(data)


def refusal(path: Path) -> str:
    with pytest.raises(KernelNotForFirecracker) as e:
        check_firecracker_kernel(path)
    assert isinstance(e.value, BuildFailed)
    line = e.value.line()
    assert "\n" not in line and str(path) in line and "uncompressed x86-64 ELF vmlinux" in line
    return line


@needs_assets("kernel")
def test_the_vmlinux_mvm_ships_is_one_firecracker_boots() -> None:
    check_firecracker_kernel(SHIPPED)
    # ... with a PVH note (CONFIG_PVH), the entry Firecracker prefers
    with SHIPPED.open("rb") as f:
        head = f.read(64)
        phoff, = struct.unpack_from("<Q", head, 32)
        phentsize, phnum = struct.unpack_from("<HH", head, 54)
        f.seek(phoff)
        table = f.read(phentsize * phnum)
        notes = []
        for i in range(phnum):
            p_type, _, off, _, _, size = struct.unpack_from("<IIQQQQ", table, i * phentsize)
            if p_type == 4:
                f.seek(off)
                notes.append(f.read(size))
    assert any(outputs._has_pvh_note(n) for n in notes)


@needs_assets("kernel")
def test_a_truncated_vmlinux_is_refused(tmp_path: Path) -> None:
    cut = tmp_path / "vmlinux"
    with SHIPPED.open("rb") as f:
        cut.write_bytes(f.read(1 << 20))
    assert "is truncated" in refusal(cut)


def test_small_elfs(tmp_path: Path) -> None:
    k = tmp_path / "k"
    k.write_bytes(elf64())
    check_firecracker_kernel(k)  # an entry point
    k.write_bytes(elf64(entry=0, pvh=True))
    check_firecracker_kernel(k)  # a PVH note
    k.write_bytes(elf64(entry=0))
    assert "neither an entry point nor a PVH note" in refusal(k)
    k.write_bytes(elf64(machine=183))  # aarch64
    assert "machine 183, not x86-64 (62)" in refusal(k)
    k.write_bytes(elf64(ei_class=1))
    assert "32-bit ELF" in refusal(k) and "not ELF64" in refusal(k)
    k.write_bytes(elf64()[:40])
    assert "is truncated" in refusal(k)
    k.write_bytes(elf64()[:100])
    assert "is truncated" in refusal(k)


@pytest.mark.parametrize(("content", "expected"), [
    (bzimage(), "is a bzImage (a compressed kernel), not an ELF vmlinux"),
    (b"#!/bin/sh\necho not a kernel\n", "is not an ELF file"),
    (b"", "is not an ELF file"),
])
def test_what_is_not_an_elf_is_refused(tmp_path: Path, content: bytes, expected: str) -> None:
    k = tmp_path / "k"
    k.write_bytes(content)
    assert expected in refusal(k)


def test_a_missing_kernel_is_one_line(tmp_path: Path) -> None:
    assert "cannot read the kernel" in refusal(tmp_path / "nope")


def test_a_profile_that_ships_only_a_bzimage_is_refused_for_firecracker(tmp_path: Path) -> None:
    """What a Firecracker pool's build checks: the profile's kernel (QEMU boots a bzImage,
    so profile_kernel accepts it) must be a vmlinux Firecracker loads."""
    store = tmp_path / "nix/store"
    out = store / "aaaa-profile"
    (out / "boot").mkdir(parents=True)
    (out / "boot/vmlinux").write_bytes(bzimage())  # named vmlinux, but a bzImage
    found = outputs.profile_kernel(str(out), [str(out)], store)
    assert found is not None
    kernel, _ = found
    line = refusal(kernel)
    assert "is a bzImage" in line and "ship `vmlinux` in the profile" in line


# ---------------------------------------------------------------------------- the vsock relay
# (the guest agent's AF_VSOCK listener, compiled for the initrd; it runs in guests: tests of
# its behaviour are in test_guest_firecracker.py)


@pytest.mark.skipif(shutil.which("gcc") is None, reason="needs gcc (make deps installs it)")
def test_the_vsock_relay_is_a_static_x86_64_program(tmp_path: Path) -> None:
    out = tmp_path / "vsock-relay"
    kernel.build_vsock_relay(kernel.vsock_relay_source(), out, tmp_path)
    data = out.read_bytes()
    assert data[:5] == b"\x7fELF\x02" and struct.unpack_from("<H", data, 18)[0] == 62
    assert not _has_interp(data)  # static: it runs on any image
    again = tmp_path / "again"
    kernel.build_vsock_relay(kernel.vsock_relay_source(), again, tmp_path)
    assert again.read_bytes() == data  # reproducible


@pytest.mark.skipif(shutil.which("gcc") is None, reason="needs gcc (make deps installs it)")
def test_a_relay_that_does_not_compile_is_one_line(tmp_path: Path) -> None:
    with pytest.raises(kernel.KernelInstallFailed) as e:
        kernel.build_vsock_relay(b"int main(void) { return x; }\n", tmp_path / "r", tmp_path)
    assert e.value.line().startswith("cannot compile the vsock relay: ")
    assert "\n" not in e.value.line()


# ---------------------------------------------------------------------------- mvm_mmio_cmdline
# (the module that registers the command line's virtio-mmio devices; it is built against the
# shipped kernel's headers when the kernel is installed, and its behaviour is shown in guests
# by test_guest_firecracker.py)


@pytest.mark.skipif(shutil.which("apt-cache") is None, reason="needs apt-cache")
def test_the_module_is_built_from_the_shipped_kernels_own_headers_packages() -> None:
    package, _ = kernel.resolve_package()
    kver = package.removeprefix("linux-image-")
    pkgs = kernel.headers_packages(kver)
    assert pkgs[0] == f"linux-headers-{kver}"
    assert any(p.startswith("linux-headers-") and p.endswith("-common") for p in pkgs), pkgs
    assert any(p.startswith("linux-kbuild-") for p in pkgs), pkgs
    assert not [p for p in pkgs if p.startswith("linux-compiler-")]  # gcc comes from deps


@pytest.mark.skipif(shutil.which("make") is None, reason="needs make (make deps installs it)")
def test_a_module_that_does_not_build_is_one_line(tmp_path: Path) -> None:
    with pytest.raises(kernel.KernelInstallFailed) as e:
        kernel.build_mmio_cmdline_module(kernel.mmio_cmdline_source(), tmp_path / "m.ko",
                                          tmp_path / "no-headers", tmp_path)
    assert e.value.line().startswith("cannot build the mvm_mmio_cmdline kernel module: ")
    assert "\n" not in e.value.line()


def _newc(raw: bytes) -> dict[str, bytes]:
    """The files of a "newc" cpio archive, by path."""
    entries, off = {}, 0
    while True:
        fields = [int(raw[off + 6 + 8 * i:off + 14 + 8 * i], 16) for i in range(13)]
        namesize, filesize = fields[11], fields[6]
        name = raw[off + 110:off + 110 + namesize - 1].decode()
        off += 110 + namesize + (-(110 + namesize) % 4)
        if name == "TRAILER!!!":
            return entries
        entries[name] = raw[off:off + filesize]
        off += filesize + (-filesize % 4)


@needs_assets("kernel")
def test_the_installed_initrd_is_what_mvm_builds_from_its_parts(tmp_path: Path) -> None:
    """The initrd's /init is a data file (mvm/data/kernel) filled in by `render_init`: from the
    installed initrd's own modules, BusyBox, relay and module, mvm builds now the very bytes
    installed (whose hash every revision with the default kernel covers)."""
    import gzip
    import json

    installed = ASSETS_HOME / "kernel" / "initrd"
    manifest = json.loads((ASSETS_HOME / "kernel" / "manifest.json").read_text())
    if manifest["builder"] != kernel.BUILDER_VERSION:
        pytest.skip("the installed kernel was made by another version of mvm's kernel builder")
    files = _newc(gzip.decompress(installed.read_bytes()))
    kver = manifest["kernel_version"]

    def part(name: str) -> Path:
        p = tmp_path / name.replace("/", "_")
        p.write_bytes(files[name])
        return p

    init = files["init"].decode()
    loads = [ln.split()[1] for ln in init.splitlines() if ln.startswith("load ")]
    optional = [ln.split()[1] for ln in init.splitlines() if ln.startswith("asked ") and " load " in ln]
    modules = [(n, part(f"lib/modules/{kver}/{n}.ko")) for n in loads]
    assert [n for n, _ in modules] == manifest["modules"] and modules
    rebuilt = kernel.build_initrd(
        kver, modules, part("bin/busybox"),
        optional=[(n, part(f"lib/modules/{kver}/{n}.ko")) for n in optional],
        vsock_relay=part("bin/vsock-relay"),
        mmio_cmdline=part(f"lib/modules/{kver}/{kernel.MMIO_CMDLINE_MODULE}.ko"))
    assert rebuilt == installed.read_bytes()
