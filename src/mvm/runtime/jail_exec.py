"""The jail's launcher: run a hypervisor as pid 1 of its own namespaces, unprivileged.

Started by `mvm.runtime.jail.spawn` as `python -I -S jail_exec.py '<plan JSON>'`, as root,
with the hypervisor's file descriptors (disks, TAP, listening sockets, console) inherited.
It imports nothing from mvm, so it starts in ~20 ms and its root-privileged part is all here.

Why a launcher of our own rather than `unshare … sh -c 'mount …; exec setpriv … qemu'`: the
mounts, `pivot_root`, the drop of every capability and the uid change must happen in one
process between the namespaces' creation and the exec (a chain of util-linux tools makes
that ~15 processes and a shell script built from paths), and the parent must learn the
hypervisor's *host* pid (inside the PID namespace it is 1) and wait until it serves QMP —
which `unshare --fork` cannot tell, and would stay alive as the hypervisor's parent for its
whole life. Python 3.11 has no `os.unshare`/`mount`, so the few syscalls go through ctypes.

The parent (host namespaces): `setsid`, joins the VM's cgroups (the child inherits them),
`unshare(CLONE_NEWPID)`, forks; waits for QMP's greeting on the VM's socket, writes the host
pid into the VM's pid file, and exits 0 — as `qemu -daemonize` would — or non-zero when the
hypervisor exited first. The child (pid 1 of the new PID namespace): new mount, IPC, UTS and
network namespaces; a tmpfs root holding only the plan's read-only binds (system files the
hypervisor needs, its kernel/initrd), a few device nodes, its own /proc and one private
directory it may write (its pid file goes there); `pivot_root`; no core dumps; no new
privileges; every capability dropped from the bounding set; groups, gid and uid set (which
clears the rest); then exec.
"""

from __future__ import annotations

import ctypes
import json
import os
import resource
import socket
import sys
import time
from typing import Any

CLONE_NEWNS = 0x00020000
CLONE_NEWUTS = 0x04000000
CLONE_NEWIPC = 0x08000000
CLONE_NEWNET = 0x40000000
CLONE_NEWPID = 0x20000000
MS_RDONLY = 1
MS_NOSUID = 2
MS_NODEV = 4
MS_NOEXEC = 8
MS_REMOUNT = 32
MS_BIND = 4096
MS_REC = 16384
MS_PRIVATE = 1 << 18
MNT_DETACH = 2
PR_CAPBSET_DROP = 24
PR_SET_NO_NEW_PRIVS = 38
SYS_PIVOT_ROOT = 155  # x86_64

_libc = ctypes.CDLL(None, use_errno=True)


def _check(ret: int, what: str) -> None:
    if ret != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"{what}: {os.strerror(err)}")


def _mount(src: str | None, dst: str, fstype: str | None, flags: int, data: str | None = None) -> None:
    _check(_libc.mount(src and src.encode(), dst.encode(), fstype and fstype.encode(),
                       ctypes.c_ulong(flags), data and data.encode()), f"mount {src} on {dst}")


def _bind(src: str, dst: str, writable: bool, device: bool) -> None:
    if os.path.isdir(src):
        os.makedirs(dst, exist_ok=True)
    else:
        os.makedirs(os.path.dirname(dst), exist_ok=True)
        with open(dst, "a"):
            pass
    _mount(src, dst, None, MS_BIND | MS_REC)
    flags = MS_BIND | MS_REMOUNT | MS_NOSUID | (0 if device else MS_NODEV) | (0 if writable else MS_RDONLY)
    _mount(None, dst, None, flags)


def _inside(root: str, path: str) -> str:
    return os.path.join(root, path.lstrip("/"))


def child(plan: dict[str, Any], log_fd: int) -> None:
    """pid 1 of the new PID namespace: build the jail, drop everything, exec."""
    # The jail's own directories (mount points for the binds) must be traversable by the jail's
    # uid whatever umask mvm runs with (077); QEMU itself then gets 077 back.
    os.umask(0o022)
    _check(_libc.unshare(CLONE_NEWNS | CLONE_NEWIPC | CLONE_NEWUTS
                         | (CLONE_NEWNET if plan["netns"] else 0)), "unshare")
    _mount(None, "/", None, MS_REC | MS_PRIVATE)
    root = plan["root"]
    _mount("tmpfs", root, "tmpfs", MS_NOSUID | MS_NODEV, "mode=0755,size=256k")
    for b in plan["binds"]:
        _bind(b["src"], _inside(root, b["dst"]), b.get("rw", False), b.get("device", False))
    for target, link in plan["symlinks"]:
        os.symlink(target, _inside(root, link))
    for d in plan["private_dirs"]:  # each a tmpfs of its own: the root is made read-only
        path = _inside(root, d)
        os.makedirs(path, mode=0o700, exist_ok=True)
        _mount("tmpfs", path, "tmpfs", MS_NOSUID | MS_NODEV | MS_NOEXEC,
               f"mode=0700,size=64k,uid={plan['uid']},gid={plan['gid']}")
    proc = _inside(root, "/proc")
    os.makedirs(proc, exist_ok=True)
    _mount("proc", proc, "proc", MS_NOSUID | MS_NODEV | MS_NOEXEC)
    old = _inside(root, "/.old")
    os.mkdir(old)
    _check(_libc.syscall(SYS_PIVOT_ROOT, root.encode(), old.encode()), "pivot_root")
    os.chdir("/")
    _check(_libc.umount2(b"/.old", MNT_DETACH), "umount old root")
    os.rmdir("/.old")
    _mount(None, "/", None, MS_REMOUNT | MS_RDONLY | MS_NOSUID | MS_NODEV)

    devnull = os.open("/dev/null", os.O_RDONLY)
    os.dup2(devnull, 0)
    os.dup2(log_fd, 1)
    os.dup2(log_fd, 2)
    os.close(devnull)
    os.close(log_fd)
    resource.setrlimit(resource.RLIMIT_CORE, (0, 0))  # a core would hold guest memory
    _check(_libc.prctl(PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0), "no_new_privs")
    cap = 0
    while _libc.prctl(PR_CAPBSET_DROP, cap, 0, 0, 0) == 0:
        cap += 1
    os.setgroups(plan["groups"])
    os.setresgid(plan["gid"], plan["gid"], plan["gid"])
    os.setresuid(plan["uid"], plan["uid"], plan["uid"])  # clears permitted and effective caps
    os.umask(0o077)
    os.execv(plan["argv"][0], plan["argv"])


def _greeted(sock_path: str, deadline: float) -> bool:
    """Whether QEMU greeted on its QMP socket (it does once its main loop runs)."""
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
            s.settimeout(max(0.05, min(0.5, deadline - time.monotonic())))
            s.connect(sock_path)
            data = b""
            while b"\n" not in data:
                chunk = s.recv(4096)
                if not chunk:
                    return False
                data += chunk
            return b'"QMP"' in data
    except OSError:
        return False


def main() -> int:
    plan = json.loads(sys.argv[1])
    os.setsid()
    for procs in plan["cgroup_procs"]:
        with open(procs, "w") as f:
            f.write(str(os.getpid()))
    log_fd = os.open(plan["log"], os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_APPEND | os.O_CLOEXEC, 0o600)
    os.set_inheritable(log_fd, True)
    _check(_libc.unshare(CLONE_NEWPID), "unshare pid")
    pid = os.fork()
    if pid == 0:
        try:
            child(plan, log_fd)
        except BaseException as e:
            os.write(2, f"jail: {e}\n".encode())
        os._exit(126)
    os.close(log_fd)
    deadline = time.monotonic() + plan["timeout"]
    while time.monotonic() < deadline:
        done, status = os.waitpid(pid, os.WNOHANG)
        if done:
            code = os.waitstatus_to_exitcode(status)
            print(f"the hypervisor exited at start ({'exit' if code >= 0 else 'signal'} "
                  f"{abs(code)})", file=sys.stderr)
            return 3
        if _greeted(plan["ready_socket"], deadline):
            tmp = plan["pid_file"] + ".tmp"
            with open(tmp, "w") as f:
                f.write(f"{pid}\n")
            os.replace(tmp, plan["pid_file"])
            return 0
        time.sleep(0.005)
    os.kill(pid, 9)
    print(f"the hypervisor did not serve QMP within {plan['timeout']}s", file=sys.stderr)
    return 4


if __name__ == "__main__":
    sys.exit(main())
