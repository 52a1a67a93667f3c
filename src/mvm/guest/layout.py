"""mvm's files inside every root filesystem (DESIGN §5).

`/mvm` holds a static BusyBox, the init (PID 1) and the guest agent, both BusyBox shell
scripts, and `/mvm/bin/<applet>` symlinks: the guest side needs nothing of the image, so
it runs on any image. The root is mounted read-only and shared, so the mount points
init needs must exist in the image already.
"""

from __future__ import annotations

import os
import shutil
import struct
from importlib import resources
from pathlib import Path

from mvm.errors import HostUnsupported
from mvm.util import proc

BUSYBOX = Path("/bin/busybox")  # Debian's busybox-static
GUEST_DIR = "mvm"
# Mount points (mode) that init mounts over; /run/secrets lives on the /run tmpfs.
MOUNT_POINTS = {"proc": 0o555, "sys": 0o555, "dev": 0o755, "run": 0o755, "tmp": 0o1777,
                "data": 0o755}
RESOLV_CONF_TARGET = "/run/mvm/resolv.conf"  # written by init from ip=…:<dns0>:<dns1>


def install_guest_files(root: Path) -> None:
    """Put /mvm/{busybox,init,agent,bin/*} and the mount points into a rootfs staging tree.

    Idempotent; modes are explicit (not the umask's) and mtimes fixed (SOURCE_DATE_EPOCH
    or 0), so the packed image is reproducible.
    """
    busybox = static_busybox()
    mvm_dir = root / GUEST_DIR
    if mvm_dir.is_symlink() or (mvm_dir.exists() and not mvm_dir.is_dir()):
        mvm_dir.unlink()
    if (mvm_dir / "bin").exists():
        shutil.rmtree(mvm_dir / "bin")
    (mvm_dir / "bin").mkdir(parents=True, exist_ok=True)

    _write(mvm_dir / "busybox", busybox.read_bytes(), 0o755)
    _write(mvm_dir / "init", guest_script("init"), 0o755)
    _write(mvm_dir / "agent", guest_script("agent"), 0o755)
    for applet in busybox_applets(busybox):
        (mvm_dir / "bin" / applet).symlink_to("../busybox")

    for name, mode in MOUNT_POINTS.items():
        path = root / name
        if not path.exists() and not path.is_symlink():
            path.mkdir()
            _fix(path, mode)

    # Give DNS settings from the kernel command line a place on the read-only root.
    etc = root / "etc"
    resolv = etc / "resolv.conf"
    if etc.is_dir() and not etc.is_symlink() and not resolv.exists() and not resolv.is_symlink():
        resolv.symlink_to(RESOLV_CONF_TARGET)
        _fix(resolv, None)

    for path in sorted((mvm_dir / "bin").iterdir()):
        _fix(path, None)
    _fix(mvm_dir / "bin", 0o755)
    _fix(mvm_dir, 0o755)


def guest_script(name: str) -> bytes:
    """The text of a guest script shipped in mvm's package data (`init` or `agent`)."""
    return resources.files("mvm").joinpath("data", "guest", name).read_bytes()


def busybox_applets(busybox: Path) -> list[str]:
    out = proc.output([busybox, "--list"], timeout=30)
    return sorted({a for a in out.split() if a and "/" not in a and a != "busybox"})


def static_busybox() -> Path:
    """The host's static BusyBox, which runs in any guest."""
    try:
        data = BUSYBOX.read_bytes()
    except FileNotFoundError:
        data = b""
    if data[:4] != b"\x7fELF" or _has_interp(data):
        raise HostUnsupported(f"{BUSYBOX} is missing or not statically linked",
                              "apt-get install busybox-static")
    return BUSYBOX


def _has_interp(elf: bytes) -> bool:
    """True if the ELF64 has a PT_INTERP program header (is dynamically linked)."""
    (phoff,) = struct.unpack_from("<Q", elf, 0x20)
    phentsize, phnum = struct.unpack_from("<HH", elf, 0x36)
    return any(struct.unpack_from("<I", elf, phoff + i * phentsize)[0] == 3
               for i in range(phnum))


def _write(path: Path, data: bytes, mode: int) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_bytes(data)
    os.replace(tmp, path)
    _fix(path, mode)


def _fix(path: Path, mode: int | None) -> None:
    if mode is not None:
        path.chmod(mode)
    epoch = int(os.environ.get("SOURCE_DATE_EPOCH", "0"))
    os.utime(path, (epoch, epoch), follow_symlinks=False)
