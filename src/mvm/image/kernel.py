"""mvm's default guest kernel: Debian's cloud kernel as an ELF vmlinux plus a tiny initrd.

The kernel package ships a bzImage whose payload is LZ4 (legacy frame); QEMU's microvm
(PVH) and Firecracker both boot the uncompressed ELF faster, so we unpack it once. The
virtio drivers are modules in this kernel, so the initrd carries a static BusyBox, the
modules and an `/init` (mvm/data/kernel/initrd-init.in) that loads them, mounts the shared
root read-only and hands over to `/mvm/init` (DESIGN §5). Everything here is reproducible: same package + same
BusyBox (+ same compiler for the vsock relay) → same bytes.

For Firecracker the initrd also loads vsock and its virtio transport, and carries the
guest agent's vsock relay (a small static C program compiled here: BusyBox cannot open
AF_VSOCK), which /init leaves in /run/mvm for `/mvm/agent vsock`. Modules in
`OPTIONAL_MODULES` ride along and are loaded only when `mvm.modules=` names them.

Firecracker without ACPI (before 1.8) names its virtio-mmio devices only on the command line
(`virtio_mmio.device=`), which this kernel ignores (no CONFIG_VIRTIO_MMIO_CMDLINE_DEVICES).
So the initrd also carries `mvm_mmio_cmdline.ko`, a tiny module built here with gcc and make
against the `linux-headers` packages of the very kernel shipped, which registers those
devices; /init loads it only when the entries are there and no device came through ACPI.
"""

from __future__ import annotations

import gzip
import hashlib
import io
import json
import os
import re
import stat
import struct
import tempfile
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

from mvm.errors import BuildFailed, CommandFailed, HostUnsupported
from mvm.guest.layout import static_busybox
from mvm.util import proc
from mvm.util.hashing import file_sha256

METAPACKAGE = "linux-image-cloud-amd64"
# Bump when the initrd layout or /init changes, so installed kernels are rebuilt.
BUILDER_VERSION = 6
# Drivers the guest needs before its root can be mounted; dependencies are added from
# each module's own `depends=` (the package ships no modules.dep: depmod runs at install).
WANTED_MODULES = ("virtio_mmio", "virtio_blk", "virtio_net", "virtio_console",
                  # the ACPI power button, so a graceful stop reaches the guest's init
                  "button", "evdev",
                  # Firecracker's vsock device, where the guest agent listens
                  "vsock", "vmw_vsock_virtio_transport")
# In the initrd, loaded only when named on the command line: `mvm.modules=a,b`.
OPTIONAL_MODULES = ("vsock_loopback",)
#: In mvm/data/kernel, not data/guest: it goes into the initrd (whose bytes a revision's hash
#: covers), while data/guest is what every image carries (hashed as the guest files).
VSOCK_RELAY_SOURCE = "vsock-relay.c"
#: The module that registers the command line's virtio-mmio devices (also in mvm/data/kernel).
MMIO_CMDLINE_SOURCE = "mvm_mmio_cmdline.c"
MMIO_CMDLINE_MODULE = "mvm_mmio_cmdline"
FIXED_MTIME = 0

LZ4_LEGACY_MAGIC = b"\x02\x21\x4c\x18"
ELF_MAGIC = b"\x7fELF"


class KernelInstallFailed(BuildFailed):
    """The default guest kernel could not be fetched, unpacked or packed."""


@dataclass(frozen=True)
class KernelInfo:
    dir: Path
    kernel_version: str  # `uname -r` in the guest
    package: str
    package_version: str
    vmlinux_sha256: str
    initrd_sha256: str
    modules: tuple[str, ...]

    @property
    def version(self) -> str:
        return self.kernel_version

    @property
    def vmlinux(self) -> Path:
        return self.dir / "vmlinux"

    @property
    def initrd(self) -> Path:
        return self.dir / "initrd"

    @property
    def manifest(self) -> Path:
        return self.dir / "manifest.json"


# ---------------------------------------------------------------------------- public


def install_default_kernel(dest: Path) -> KernelInfo:
    """Install vmlinux, initrd and manifest.json into dest; skip when already current."""
    package, version = resolve_package()
    busybox_sha = file_sha256(static_busybox())
    relay_source = vsock_relay_source()
    relay_sha = hashlib.sha256(relay_source).hexdigest()
    mmio_source = mmio_cmdline_source()
    mmio_sha = hashlib.sha256(mmio_source).hexdigest()
    current = _installed(dest, package, version, busybox_sha, relay_sha, mmio_sha)
    if current is not None:
        return current

    dest.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix=".kernel-", dir=dest) as tmp_s:
        tmp = Path(tmp_s)
        deb = _download(package, tmp)
        root = tmp / "pkg"
        proc.run(["dpkg-deb", "-x", deb, root], timeout=300)
        kver = _kernel_version(root)
        vmlinux = tmp / "vmlinux"
        extract_vmlinux(root / "boot" / f"vmlinuz-{kver}", vmlinux, tmp)
        _check_config(root / "boot" / f"config-{kver}")
        mod_root = root / "lib" / "modules" / kver
        modules = module_closure(mod_root, WANTED_MODULES)
        loaded = {name for name, _ in modules}
        optional = [(n, p) for n, p in module_closure(mod_root, OPTIONAL_MODULES)
                    if n not in loaded]
        relay = tmp / "vsock-relay"
        build_vsock_relay(relay_source, relay, tmp)
        mmio = tmp / f"{MMIO_CMDLINE_MODULE}.ko"
        build_mmio_cmdline_module(mmio_source, mmio, _fetch_headers(kver, version, tmp), tmp)
        initrd = tmp / "initrd"
        initrd.write_bytes(build_initrd(kver, modules, static_busybox(), optional=optional,
                                        vsock_relay=relay, mmio_cmdline=mmio))

        info = KernelInfo(
            dir=dest,
            kernel_version=kver,
            package=package,
            package_version=version,
            vmlinux_sha256=file_sha256(vmlinux),
            initrd_sha256=file_sha256(initrd),
            modules=tuple(m for m, _ in modules),
        )
        manifest = tmp / "manifest.json"
        manifest.write_text(json.dumps(_manifest_dict(info, busybox_sha, relay_sha, mmio_sha),
                                       indent=2) + "\n")
        for f in (vmlinux, initrd):
            f.chmod(0o644)
            os.replace(f, dest / f.name)
        os.replace(manifest, info.manifest)  # last: a manifest means both files are complete
    return info


def load_kernel(dest: Path) -> KernelInfo:
    """Read an installed kernel's manifest (no apt, no hashing)."""
    try:
        data = json.loads((dest / "manifest.json").read_text())
        return _info_from_manifest(dest, data)
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise KernelInstallFailed(
            f"no usable guest kernel in {dest}: {e}",
            "install it with install_default_kernel() (`mvm doctor` says how)",
        ) from e


def resolve_package() -> tuple[str, str]:
    """The versioned kernel package behind the metapackage, and the version apt would get."""
    try:
        out = proc.output(["apt-cache", "depends", METAPACKAGE], timeout=60)
    except CommandFailed as e:
        raise KernelInstallFailed(
            f"cannot resolve {METAPACKAGE}: {e.message}",
            "run `apt-get update` (the package lists must know the Debian cloud kernel)",
        ) from e
    pkgs = re.findall(r"^\s*Depends:\s*(linux-image-[^\s<>]+)", out, re.M)
    if not pkgs:
        raise KernelInstallFailed(
            f"{METAPACKAGE} depends on no linux-image package",
            f"check `apt-cache depends {METAPACKAGE}`",
        )
    package = pkgs[0]
    policy = proc.output(["apt-cache", "policy", package], timeout=60)
    m = re.search(r"^\s*Candidate:\s*(\S+)", policy, re.M)
    if not m or m.group(1) == "(none)":
        raise KernelInstallFailed(f"{package} has no installable version",
                                  "run `apt-get update`")
    return package, m.group(1)


# ---------------------------------------------------------------------------- vmlinux


def extract_vmlinux(bzimage: Path, out: Path, workdir: Path) -> None:
    """Decompress the LZ4 payload of a bzImage into an ELF vmlinux at `out`."""
    data = bzimage.read_bytes()
    payload = _lz4_payload(data)
    if payload is None:
        raise KernelInstallFailed(
            f"{bzimage.name}: no LZ4 payload found",
            "the kernel must be built with CONFIG_KERNEL_LZ4 (Debian's cloud kernel is)",
        )
    src = workdir / "payload.lz4"
    src.write_bytes(payload)
    try:
        proc.run(["lz4", "-d", "-f", "-q", src, out], timeout=120)
    except CommandFailed as e:
        if e.returncode == 127:
            raise HostUnsupported("lz4 is not installed", "apt-get install lz4") from e
        raise KernelInstallFailed(f"cannot decompress {bzimage.name}: {e.message}") from e
    finally:
        src.unlink(missing_ok=True)
    with out.open("rb") as f:
        head = f.read(5)
    if head[:4] != ELF_MAGIC or head[4] != 2:
        raise KernelInstallFailed(f"{bzimage.name}: decompressed payload is not an ELF64 vmlinux")


def _lz4_payload(data: bytes) -> bytes | None:
    """The compressed stream without the 4-byte decompressed-size trailer the kernel appends.

    The setup header names the payload exactly (boot protocol ≥ 2.08); scanning for the
    magic is the fallback, leaving lz4 to stop at the end of the stream.
    """
    if data[0x202:0x206] == b"HdrS" and len(data) > 0x250:
        setup_sects = data[0x1F1] or 4
        offset, length = struct.unpack_from("<II", data, 0x248)
        start = (setup_sects + 1) * 512 + offset
        blob = data[start : start + length]
        if blob[:4] == LZ4_LEGACY_MAGIC and len(blob) == length:
            return blob[:-4]
    pos = data.find(LZ4_LEGACY_MAGIC)
    return data[pos:] if pos >= 0 else None


# ---------------------------------------------------------------------------- modules


def module_closure(mod_root: Path, wanted: Iterable[str]) -> list[tuple[str, Path]]:
    """The wanted modules plus their dependencies, in load order (dependencies first)."""
    index = {_norm(p.name.removesuffix(".ko")): p for p in (mod_root / "kernel").rglob("*.ko")}
    builtin = {
        _norm(Path(line.strip()).name.removesuffix(".ko"))
        for line in _read_lines(mod_root / "modules.builtin")
    }
    order: list[tuple[str, Path]] = []
    state: dict[str, str] = {}

    def visit(name: str, chain: tuple[str, ...]) -> None:
        if name in builtin or state.get(name) == "done":
            return
        if state.get(name) == "visiting":
            raise KernelInstallFailed(f"module dependency cycle: {' -> '.join((*chain, name))}")
        path = index.get(name)
        if path is None:
            raise KernelInstallFailed(
                f"kernel module {name} not found (needed by {' -> '.join(chain) or 'mvm'})",
                "the kernel package must ship the virtio drivers as modules or built in",
            )
        state[name] = "visiting"
        info = modinfo(path)
        for dep in info.get("depends", "").split(","):
            if dep:
                visit(_norm(dep), (*chain, name))
        for soft in info.get("softdep", "").split():
            if soft not in ("pre:", "post:") and _norm(soft) in index:
                visit(_norm(soft), (*chain, name))
        state[name] = "done"
        order.append((name, path))

    for name in wanted:
        visit(_norm(name), ())
    return order


def modinfo(ko: Path) -> dict[str, str]:
    """The `.modinfo` section of a kernel module (ELF64 little-endian), as a dict."""
    data = ko.read_bytes()
    if data[:4] != ELF_MAGIC or data[4] != 2 or data[5] != 1:
        raise KernelInstallFailed(f"{ko.name}: not an ELF64 little-endian module")
    (shoff,) = struct.unpack_from("<Q", data, 0x28)
    shentsize, shnum, shstrndx = struct.unpack_from("<HHH", data, 0x3A)

    def section(i: int) -> tuple[int, int, int]:
        base = shoff + i * shentsize
        name, _type, _flags, _addr, offset, size = struct.unpack_from("<IIQQQQ", data, base)
        return name, offset, size

    _, str_off, _ = section(shstrndx)
    for i in range(shnum):
        name_off, offset, size = section(i)
        end = data.index(b"\0", str_off + name_off)
        if data[str_off + name_off : end] == b".modinfo":
            info: dict[str, str] = {}
            for item in data[offset : offset + size].split(b"\0"):
                key, sep, value = item.decode(errors="replace").partition("=")
                if sep and key not in info:
                    info[key] = value
            return info
    return {}


def _norm(name: str) -> str:
    return name.replace("-", "_")


def _read_lines(path: Path) -> list[str]:
    try:
        return path.read_text().splitlines()
    except FileNotFoundError:
        return []


def _check_config(config: Path) -> None:
    """Fail early if the kernel lacks what the guest relies on being built in."""
    text = config.read_text() if config.exists() else ""
    needed = ("CONFIG_EXT4_FS=y", "CONFIG_DEVTMPFS=y", "CONFIG_BLK_DEV_INITRD=y",
              "CONFIG_RD_GZIP=y", "CONFIG_TMPFS=y", "CONFIG_PVH=y")
    missing = [opt for opt in needed if opt not in text.splitlines()]
    if missing:
        raise KernelInstallFailed(f"{config.name} lacks {', '.join(missing)}",
                                  "mvm's initrd needs these built in")


# ---------------------------------------------------------------------------- vsock relay


def vsock_relay_source() -> bytes:
    return resources.files("mvm").joinpath("data", "kernel", VSOCK_RELAY_SOURCE).read_bytes()


def build_vsock_relay(source: bytes, out: Path, workdir: Path) -> None:
    """Compile the guest agent's vsock relay, static (it runs on any image)."""
    src = workdir / VSOCK_RELAY_SOURCE
    src.write_bytes(source)
    try:
        proc.run(["gcc", "-static", "-Os", "-s", "-Wall", "-Werror", "-o", out, src],
                 timeout=300)
    except CommandFailed as e:
        if e.returncode == 127:
            raise HostUnsupported("gcc is not installed (mvm compiles the guest's vsock relay)",
                                  "apt-get install gcc libc6-dev") from e
        raise KernelInstallFailed(f"cannot compile the vsock relay: {e.message}",
                                  "apt-get install gcc libc6-dev") from e


# ---------------------------------------------------------------------------- mmio module


def mmio_cmdline_source() -> bytes:
    return resources.files("mvm").joinpath("data", "kernel", MMIO_CMDLINE_SOURCE).read_bytes()


def headers_packages(kver: str) -> list[str]:
    """The packages `make -C <headers> M=...` needs for kernel `kver`: its flavour's headers
    and what those depend on among Debian's kernel packages (the common headers, kbuild)."""
    package = f"linux-headers-{kver}"
    try:
        out = proc.output(["apt-cache", "depends", package], timeout=60)
    except CommandFailed as e:
        raise KernelInstallFailed(f"cannot resolve {package}: {e.message}",
                                  "run `apt-get update`") from e
    deps = re.findall(r"^\s*Depends:\s*(linux-(?:headers|kbuild)-[^\s<>]+)", out, re.M)
    return [package, *dict.fromkeys(deps)]


def _fetch_headers(kver: str, version: str, workdir: Path) -> Path:
    """Download and unpack the headers of kernel `kver` (package version `version`, the
    kernel's own); the flavour's build directory, made usable where it was unpacked."""
    root = workdir / "headers"
    for deb in _download_all([f"{p}={version}" for p in headers_packages(kver)], workdir):
        proc.run(["dpkg-deb", "-x", deb, root], timeout=300)
    build = root / "usr" / "src" / f"linux-headers-{kver}"
    makefile = build / "Makefile"
    if not makefile.is_file():
        raise KernelInstallFailed(f"linux-headers-{kver} has no usr/src/linux-headers-{kver}"
                                  "/Makefile", "check the package with `dpkg -c`")
    # Its Makefile includes the common headers' by absolute path (/usr/src/...)
    text = makefile.read_text()
    makefile.write_text(text.replace(" /usr/src/", f" {root}/usr/src/"))
    return build


def build_mmio_cmdline_module(source: bytes, out: Path, headers: Path, workdir: Path) -> None:
    """Compile mvm_mmio_cmdline.ko against a kernel's headers build directory; reproducible
    (no debug info, no build id: both carry the build's temporary paths)."""
    src = workdir / "mmio-module"
    src.mkdir()
    (src / MMIO_CMDLINE_SOURCE).write_bytes(source)
    (src / "Kbuild").write_text(f"obj-m := {MMIO_CMDLINE_MODULE}.o\n")
    hint = "apt-get install gcc make libc6-dev"
    try:
        proc.run(["make", "-s", "-C", headers, f"M={src}", "modules"], timeout=600)
        proc.run(["strip", "--strip-debug", "--remove-section=.note.gnu.build-id", "-o", out,
                  src / f"{MMIO_CMDLINE_MODULE}.ko"], timeout=60)
    except CommandFailed as e:
        if e.returncode == 127:
            raise HostUnsupported("make, gcc or strip is not installed (mvm builds a kernel "
                                  "module for the guest's initrd)", hint) from e
        raise KernelInstallFailed(f"cannot build the {MMIO_CMDLINE_MODULE} kernel module: "
                                  f"{e.message}", hint) from e


# ---------------------------------------------------------------------------- initrd

#: The initrd's /init, in mvm/data/kernel: `@KVER@` and `@LOADS@` are filled in by `render_init`.
#: Its bytes are the initrd's (whose hash a revision's covers): change it with BUILDER_VERSION.
#: (Its second line still names this module as it was called when the script was written.)
INIT_TEMPLATE_FILE = "initrd-init.in"


def init_template() -> str:
    return resources.files("mvm").joinpath("data", "kernel", INIT_TEMPLATE_FILE).read_bytes().decode()


def render_init(kver: str, modules: list[tuple[str, Path]],
                optional: Sequence[tuple[str, Path]] = ()) -> str:
    loads = "\n".join(f"load {name} /lib/modules/{kver}/{name}.ko" for name, _ in modules)
    loads += "".join(f"\nasked {name} && load {name} /lib/modules/{kver}/{name}.ko"
                     for name, _ in optional)
    return init_template().replace("@KVER@", kver).replace("@LOADS@", loads)


def build_initrd(kver: str, modules: list[tuple[str, Path]], busybox: Path, *,
                 optional: Sequence[tuple[str, Path]] = (),
                 vsock_relay: Path | None = None, mmio_cmdline: Path | None = None) -> bytes:
    """A gzip'd newc cpio: /init, static BusyBox, the modules (and the optional ones), the
    vsock relay, mvm_mmio_cmdline.ko. Byte-for-byte reproducible."""
    cpio = CpioWriter()
    for d in ("bin", "dev", "lib", "lib/modules", f"lib/modules/{kver}", "newroot", "proc",
              "sys"):
        cpio.add_dir(d)
    cpio.add_file("bin/busybox", busybox.read_bytes(), 0o755)
    if vsock_relay is not None:
        cpio.add_file("bin/vsock-relay", vsock_relay.read_bytes(), 0o755)
    cpio.add_symlink("bin/sh", "busybox")
    # The kernel opens /dev/console for init before anything is mounted.
    cpio.add_device("dev/console", stat.S_IFCHR, 5, 1, 0o600)
    cpio.add_file("init", render_init(kver, modules, optional).encode(), 0o755)
    for name, path in [*modules, *optional]:
        cpio.add_file(f"lib/modules/{kver}/{name}.ko", path.read_bytes(), 0o644)
    if mmio_cmdline is not None:
        cpio.add_file(f"lib/modules/{kver}/{MMIO_CMDLINE_MODULE}.ko", mmio_cmdline.read_bytes(),
                      0o644)
    raw = cpio.finish()
    buf = io.BytesIO()
    with gzip.GzipFile(fileobj=buf, mode="wb", compresslevel=9, mtime=FIXED_MTIME) as gz:
        gz.write(raw)
    return buf.getvalue()


class CpioWriter:
    """SVR4 "newc" cpio archive, entries sorted by path, fixed owner/mtime/inode numbers."""

    def __init__(self) -> None:
        self._entries: dict[str, tuple[int, bytes, int, int]] = {}  # path → mode, data, rdev

    def add_dir(self, path: str, perm: int = 0o755) -> None:
        self._entries[path] = (stat.S_IFDIR | perm, b"", 0, 0)

    def add_file(self, path: str, data: bytes, perm: int) -> None:
        self._entries[path] = (stat.S_IFREG | perm, data, 0, 0)

    def add_symlink(self, path: str, target: str) -> None:
        self._entries[path] = (stat.S_IFLNK | 0o777, target.encode(), 0, 0)

    def add_device(self, path: str, kind: int, major: int, minor: int, perm: int) -> None:
        self._entries[path] = (kind | perm, b"", major, minor)

    def finish(self) -> bytes:
        out = bytearray()
        for ino, path in enumerate(sorted(self._entries), start=1):
            mode, data, rmajor, rminor = self._entries[path]
            nlink = 2 if stat.S_ISDIR(mode) else 1
            self._entry(out, path, ino, mode, nlink, data, rmajor, rminor)
        self._entry(out, "TRAILER!!!", 0, 0, 1, b"", 0, 0)
        out += b"\0" * (-len(out) % 512)
        return bytes(out)

    @staticmethod
    def _entry(out: bytearray, name: str, ino: int, mode: int, nlink: int, data: bytes,
               rmajor: int, rminor: int) -> None:
        name_b = name.encode() + b"\0"
        fields = (ino, mode, 0, 0, nlink, FIXED_MTIME, len(data), 0, 0, rmajor, rminor,
                  len(name_b), 0)
        out += b"070701" + b"".join(b"%08X" % v for v in fields)
        out += name_b + b"\0" * (-(110 + len(name_b)) % 4)
        out += data + b"\0" * (-len(data) % 4)


# ---------------------------------------------------------------------------- helpers


def _download_all(packages: Sequence[str], workdir: Path) -> list[Path]:
    dl = workdir / "deb-headers"
    dl.mkdir()
    try:
        proc.run(["apt-get", "download", "-q", *packages], cwd=dl, timeout=600)
    except CommandFailed as e:
        raise KernelInstallFailed(
            f"cannot download {' '.join(packages)}: {e.message}",
            "the host needs a reachable Debian mirror for apt-get",
        ) from e
    debs = sorted(dl.glob("*.deb"))
    if len(debs) != len(packages):
        raise KernelInstallFailed(f"apt-get download {' '.join(packages)} produced "
                                  f"{len(debs)} .deb files")
    return debs


def _download(package: str, workdir: Path) -> Path:
    dl = workdir / "deb"
    dl.mkdir()
    try:
        proc.run(["apt-get", "download", "-q", package], cwd=dl, timeout=600)
    except CommandFailed as e:
        raise KernelInstallFailed(
            f"cannot download {package}: {e.message}",
            "the host needs a reachable Debian mirror for apt-get, or a kernel dir to copy",
        ) from e
    debs = sorted(dl.glob("*.deb"))
    if len(debs) != 1:
        raise KernelInstallFailed(f"apt-get download {package} produced {len(debs)} .deb files")
    return debs[0]


def _kernel_version(root: Path) -> str:
    versions = sorted(p.name for p in (root / "lib" / "modules").iterdir() if p.is_dir())
    for kver in versions:
        if (root / "boot" / f"vmlinuz-{kver}").exists():
            return kver
    raise KernelInstallFailed("the kernel package has no boot/vmlinuz-* with matching modules")


def _manifest_dict(info: KernelInfo, busybox_sha: str, relay_sha: str,
                   mmio_sha: str) -> dict[str, object]:
    return {
        "builder": BUILDER_VERSION,
        "kernel_version": info.kernel_version,
        "package": info.package,
        "package_version": info.package_version,
        "busybox_sha256": busybox_sha,
        "vsock_relay_source_sha256": relay_sha,
        "mmio_cmdline_source_sha256": mmio_sha,
        "modules": list(info.modules),
        "vmlinux": {"file": "vmlinux", "sha256": info.vmlinux_sha256},
        "initrd": {"file": "initrd", "sha256": info.initrd_sha256},
    }


def _info_from_manifest(dest: Path, data: dict[str, object]) -> KernelInfo:
    vml = data["vmlinux"]
    ird = data["initrd"]
    assert isinstance(vml, dict) and isinstance(ird, dict)
    mods = data.get("modules", [])
    assert isinstance(mods, list)
    return KernelInfo(
        dir=dest,
        kernel_version=str(data["kernel_version"]),
        package=str(data["package"]),
        package_version=str(data["package_version"]),
        vmlinux_sha256=str(vml["sha256"]),
        initrd_sha256=str(ird["sha256"]),
        modules=tuple(str(m) for m in mods),
    )


def _installed(dest: Path, package: str, version: str, busybox_sha: str,
               relay_sha: str, mmio_sha: str) -> KernelInfo | None:
    """The installed kernel if it is exactly what we would build now, else None."""
    try:
        data = json.loads((dest / "manifest.json").read_text())
        info = _info_from_manifest(dest, data)
    except (OSError, ValueError, KeyError, TypeError, AssertionError):
        return None
    if (data.get("builder") != BUILDER_VERSION or info.package != package
            or info.package_version != version or data.get("busybox_sha256") != busybox_sha
            or data.get("vsock_relay_source_sha256") != relay_sha
            or data.get("mmio_cmdline_source_sha256") != mmio_sha):
        return None
    try:
        if (file_sha256(info.vmlinux) != info.vmlinux_sha256
                or file_sha256(info.initrd) != info.initrd_sha256):
            return None
    except OSError:
        return None
    return info

