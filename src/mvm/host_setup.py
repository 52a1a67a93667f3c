"""Host set-up (`mvm setup`) and checks (`mvm doctor`)."""

from __future__ import annotations

import os
import shutil
import socket
from collections.abc import Callable
from pathlib import Path
from typing import Any

from mvm import config, paths, proc
from mvm.errors import CommandFailed

DATA = Path(__file__).resolve().parent / "data"
Progress = Callable[[str, str], None]


def internet_reachable(host: str = "github.com", timeout: float = 3.0) -> bool:
    try:
        with socket.create_connection((host, 443), timeout=timeout):
            return True
    except OSError:
        return False


def install_builtin_flake() -> Path:
    dest = paths.builtin_flake_dir()
    dest.mkdir(parents=True, exist_ok=True)
    src = DATA / "builtin-flake" / "flake.nix"
    if not (dest / "flake.nix").is_file() or (dest / "flake.nix").read_bytes() != src.read_bytes():
        shutil.copyfile(src, dest / "flake.nix")
    return dest


def setup(offline: bool | None, progress: Progress) -> None:
    from mvm.build import kernel, offline_nixpkgs

    progress("kernel", "…")
    info = kernel.install_default_kernel(paths.kernel_dir())
    progress("kernel", f"{paths.kernel_dir()} ({getattr(info, 'version', '')})")
    progress("builtin-flake", "…")
    progress("builtin-flake", str(install_builtin_flake()))
    progress("nixpkgs", "…")
    d = offline_nixpkgs.install(paths.offline_nixpkgs_dir())
    if offline is None:
        offline = not internet_reachable()
    current = config.get("nixpkgs")
    if offline and not current:
        config.set_value("nixpkgs", offline_nixpkgs.ref(d))
    elif offline is False and current == offline_nixpkgs.ref(d):
        config.set_value("nixpkgs", "")
    progress("nixpkgs", f"flakes' nixpkgs input -> {config.get('nixpkgs') or 'their own (online)'}")
    from mvm.runtime import accel, select

    progress("accelerator", "…")
    probe = accel.probe_kvm(cache=select.kvm_probe_cache())
    progress("accelerator", f"{'kvm' if probe.fast else 'tcg'} ({probe.reason})")


def _check(name: str, ok: bool, detail: str, required: bool = True) -> dict[str, Any]:
    return {"check": name, "ok": ok, "detail": detail, "required": required}


def doctor() -> list[dict[str, Any]]:
    from mvm.runtime import accel, select

    checks = []
    qemu = shutil.which("qemu-system-x86_64")
    qv = ""
    if qemu:
        try:
            qv = proc.output([qemu, "--version"], timeout=10).splitlines()[0]
        except CommandFailed as e:
            qv = e.message
    checks.append(_check("qemu", bool(qemu), qv or "qemu-system-x86_64 not found: apt-get install qemu-system-x86"))
    probe = accel.probe_kvm(cache=select.kvm_probe_cache())
    checks.append(_check("kvm", True, f"{'usable and fast' if probe.fast else 'not used'}: {probe.reason}",
                         required=False))
    checks.append(_check("accelerator", True, accel.choose_accel(config.get("accel"),
                                                                 cache=select.kvm_probe_cache())))
    nix = shutil.which("nix")
    checks.append(_check("nix", bool(nix), proc.output(["nix", "--version"], timeout=10).strip()
                         if nix else "nix not found: apt-get install nix-bin"))
    checks.append(_check("nixpkgs", True, config.get("nixpkgs") or "flakes use their own nixpkgs input"))
    mkfs = shutil.which("mkfs.ext4")
    checks.append(_check("mkfs.ext4", bool(mkfs), mkfs or "apt-get install e2fsprogs"))
    tun = os.path.exists("/dev/net/tun")
    checks.append(_check("/dev/net/tun", tun, "present" if tun else "missing: modprobe tun"))
    bridge = os.path.isdir("/sys/class/net") and (os.path.exists("/sys/module/bridge")
                                                 or os.geteuid() == 0)
    checks.append(_check("bridge", bridge, "bridges can be created" if bridge else "no bridge support"))
    nft = shutil.which("nft")
    checks.append(_check("nftables", bool(nft), nft or "apt-get install nftables", required=False))
    kdir = paths.kernel_dir()
    have_kernel = (kdir / "vmlinux").is_file() and (kdir / "initrd").is_file()
    checks.append(_check("guest kernel", have_kernel,
                         str(kdir) if have_kernel else f"missing in {kdir}: run `mvm setup`"))
    fc = shutil.which("firecracker")
    checks.append(_check("firecracker", bool(fc), fc or "not installed (qemu backend is used)",
                         required=False))
    return checks
