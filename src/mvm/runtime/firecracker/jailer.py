"""Firecracker's jailer: its command line (docs/jailer.md) from the jail description shared
with QEMU's launcher (runtime/jail.py), and the chroot it runs in, where the VM's files are
hard-linked (or bound, across filesystems). Pure but for linking and unbinding."""

from __future__ import annotations

import contextlib
import errno
import hashlib
import os
import re
from pathlib import Path

from mvm.errors import RuntimeFailure
from mvm.runtime import console, jail
from mvm.runtime.base import VmSpec
from mvm.runtime.firecracker.api import MEMORY_FILE, STATE_FILE, VSOCK_SOCK, Paths
from mvm.util.proc import run

JAILER = "jailer"
#: The jailer's chroot base (`<base>/firecracker/<id>/root`), in spec.run_dir.
JAIL_DIR = "jail"
#: Firecracker's API socket inside its chroot, as the jailer starts it.
JAILED_API_SOCK = "/run/firecracker.socket"
_ID_OK = re.compile(r"[^A-Za-z0-9-]")


def vm_id(spec: VmSpec) -> str:
    """Firecracker's `--id` (and the jailer's): letters, digits and '-', at most 64; unique per
    run directory, which is how mvm tells its own process in /proc (`--id <id>`)."""
    digest = hashlib.sha256(os.path.abspath(spec.run_dir).encode()).hexdigest()[:12]
    return f"{_ID_OK.sub('-', spec.name)[:40]}-{digest}"


def chroot_dir(base: Path, exec_name: str, instance_id: str) -> Path:
    """`<chroot base>/<exec file name>/<id>/root`, as jailer.md lays it out."""
    return base / exec_name / instance_id / "root"


def chroot_paths(spec: VmSpec) -> Paths:
    """How Firecracker names the VM's files inside its chroot (see `chroot_links`)."""
    return Paths("vmlinux", "initrd" if spec.initrd is not None else None,
                 tuple(f"disk-{d.id}" for d in spec.disks), VSOCK_SOCK, console.PIPE)


def chroot_links(spec: VmSpec, snap_dir: Path | None = None) -> dict[str, Path]:
    """What is linked into the chroot: chroot name -> host file. Nothing else is there."""
    out = {"vmlinux": spec.kernel}
    if spec.initrd is not None:
        out["initrd"] = spec.initrd
    out.update({f"disk-{d.id}": d.path for d in spec.disks})
    if snap_dir is not None:
        out[STATE_FILE] = snap_dir / STATE_FILE
        out[MEMORY_FILE] = snap_dir / MEMORY_FILE
    return out


def jailer_argv(jailer_bin: str, exec_file: str, spec: VmSpec, desc: jail.Description,
                cgroup_version: int, chroot_base: Path, netns: str | None) -> list[str]:
    """The jailer's command line (docs/jailer.md), then Firecracker's own arguments after `--`."""
    args = [jailer_bin, "--id", vm_id(spec), "--exec-file", exec_file,
            "--uid", str(desc.ids.uid), "--gid", str(desc.ids.gid),
            "--cgroup-version", str(cgroup_version)]
    cg = jail.Cgroups(cgroup_version, {})
    for fname, value in jail.cgroup_files(cg, desc.limits).items():
        if fname not in jail.OPTIONAL_FILES:
            args += ["--cgroup", f"{fname}={value}"]
    args += ["--parent-cgroup", jail.CGROUP_PARENT, "--chroot-base-dir", os.path.abspath(chroot_base)]
    if netns is not None:
        args += ["--netns", netns]
    args += ["--new-pid-ns", "--daemonize", "--", "--api-sock", JAILED_API_SOCK]
    return args


def link_into_chroot(root: Path, links: dict[str, Path], uid: int, gid: int) -> None:
    """Hard-link each file into the chroot (bind-mount where it lives on another filesystem),
    owned so the jailed Firecracker can open it."""
    for name, src in links.items():
        dst = root / name
        try:
            os.link(src, dst)
        except OSError as e:
            if e.errno != errno.EXDEV:
                raise RuntimeFailure(f"cannot link {src} into the jail: {e.strerror}") from e
            dst.touch(0o600)
            run(["mount", "--bind", os.fspath(src), os.fspath(dst)])
        with contextlib.suppress(OSError):
            os.chown(dst, uid, gid)


def drop_transient(root: Path, spec: VmSpec) -> list[str]:
    """Remove the chroot's names of the disks that must not keep one (`Disk.transient`: the
    clear-text secrets image) once Firecracker holds them open; returns what was removed."""
    gone = []
    for d in spec.disks:
        dst = root / f"disk-{d.id}"
        if not d.transient or not (dst.exists() or dst.is_symlink()):
            continue
        if os.path.ismount(dst):
            run(["umount", "-l", os.fspath(dst)], check=False)
        dst.unlink(missing_ok=True)
        gone.append(dst.name)
    return gone


def unbind_chroot(root: Path) -> None:
    if not root.is_dir():
        return
    for f in root.iterdir():
        if os.path.ismount(f):
            run(["umount", "-l", os.fspath(f)], check=False)
