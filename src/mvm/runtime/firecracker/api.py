"""Firecracker's REST API: what a VM is, declared as requests one resource per line
(`boot_requests`, `load_request`), and the client that sends them over the API's Unix socket
(httpx's UDS transport). An error answer is Firecracker's own `fault_message`, surfaced as
one line (RuntimeFailure)."""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx

from mvm.errors import RuntimeFailure
from mvm.runtime.base import VmSpec
from mvm.util.text import printable

# Files in spec.run_dir.
API_SOCK = "firecracker.sock"
VSOCK_SOCK = "vsock.sock"
PID_FILE = "firecracker.pid"
#: Firecracker's own messages (its stderr).
FC_LOG = "firecracker.log"

# Files in a snapshot directory.
MEMORY_FILE = "memory"
STATE_FILE = "vmstate"

#: The guest's vsock context id (any ≥ 3: each VM has its own device).
GUEST_CID = 3
IFACE = "eth0"

#: Hypervisor-specific guest parameters: Firecracker's serial console, `reboot=k` so that a
#: reboot or Ctrl-Alt-Del ends the process, `panic=1` (a panic reboots: the process ends);
#: the rest as QEMU's (fast i8042 probe, no PCI). Firecracker adds `virtio_mmio.device=` for
#: each device, and `root=/dev/vda` for the root drive.
BASE_PARAMS = (
    "console=ttyS0",
    "quiet",
    "reboot=k",
    "panic=1",
    "pci=off",
    "i8042.noaux",
    "i8042.nomux",
    "i8042.nopnp",
    "i8042.dumbkbd",
    "8250.nr_uarts=1",
    "random.trust_cpu=on",
)

API_TIMEOUT = 30.0
HINT = "see the instance's firecracker.log and console (`mvm instance logs`)"

#: A request: method, path, JSON body.
Request = tuple[str, str, dict[str, Any]]


def kernel_cmdline(cmdline: str) -> str:
    return " ".join([*BASE_PARAMS, cmdline]).strip()


@dataclass(frozen=True)
class Paths:
    """The VM's files as Firecracker names them: host paths, or names inside its chroot."""

    kernel: str
    initrd: str | None
    disks: tuple[str, ...]
    vsock: str
    serial: str | None = None


def host_paths(spec: VmSpec) -> Paths:
    return Paths(os.path.abspath(spec.kernel),
                 os.path.abspath(spec.initrd) if spec.initrd is not None else None,
                 tuple(os.path.abspath(d.path) for d in spec.disks),
                 os.path.abspath(spec.run_dir / VSOCK_SOCK))


def boot_requests(spec: VmSpec, p: Paths) -> list[Request]:
    """A fresh VM, one resource per line, in the order Firecracker takes them. A jailed
    Firecracker has no stdout (the jailer daemonizes it): its serial goes to the console FIFO
    linked into its chroot."""
    initrd = {"initrd_path": p.initrd} if p.initrd is not None else {}
    return [
        *[("PUT", "/serial", {"serial_out_path": p.serial}) for _ in [p.serial] if p.serial],
        ("PUT", "/machine-config", {"vcpu_count": spec.vcpus, "mem_size_mib": spec.mem_mib, "smt": False}),
        ("PUT", "/boot-source", {"kernel_image_path": p.kernel, **initrd,
                                 "boot_args": kernel_cmdline(spec.cmdline)}),
        *[("PUT", f"/drives/{d.id}", {"drive_id": d.id, "path_on_host": p.disks[n],
                                      "is_root_device": n == 0, "is_read_only": d.read_only})
          for n, d in enumerate(spec.disks)],
        *[("PUT", f"/network-interfaces/{IFACE}", {"iface_id": IFACE, "host_dev_name": net.tap,
                                                   "guest_mac": net.mac})
          for net in ([spec.net] if spec.net is not None else [])],
        ("PUT", "/vsock", {"guest_cid": GUEST_CID, "uds_path": p.vsock}),
        ("PUT", "/actions", {"action_type": "InstanceStart"}),
    ]


def load_request(spec: VmSpec, state: str, memory: str, vsock: str, tap_at_snapshot: str | None) -> Request:
    """The first and only call of a restoring process: the vCPUs stay paused."""
    body: dict[str, Any] = {"snapshot_path": state,
                            "mem_backend": {"backend_type": "File", "backend_path": memory},
                            "resume_vm": False,
                            "vsock_override": {"uds_path": vsock}}
    if spec.net is not None and spec.net.tap != tap_at_snapshot:
        body["network_overrides"] = [{"iface_id": IFACE, "host_dev_name": spec.net.tap}]
    return ("PUT", "/snapshot/load", body)


class Api:
    """Firecracker's REST API on its Unix socket; errors as one line with its fault_message."""

    def __init__(self, sock: Path, what: str, timeout: float = API_TIMEOUT,
                 died: Callable[[], str] | None = None) -> None:
        """`died`: what the process said last, if it is gone (else "")."""
        self.sock = sock
        self.what = what
        self.died = died
        self.client = httpx.Client(transport=httpx.HTTPTransport(uds=os.fspath(sock)),
                                   base_url="http://localhost", timeout=timeout)

    def __enter__(self) -> Api:
        return self

    def __exit__(self, *exc: object) -> None:
        self.client.close()

    def call(self, method: str, path: str, body: dict[str, Any] | None = None) -> Any:
        try:
            r = self.client.request(method, path, json=body)
        except httpx.HTTPError as e:
            said = self.died() if self.died is not None else ""
            raise RuntimeFailure(f"Firecracker of {self.what} did not answer {method} {path}: "
                                 + (f"it exited: {said}" if said else f"{e or type(e).__name__}"),
                                 HINT) from e
        if r.status_code >= 300:
            try:
                fault = str(r.json().get("fault_message", r.text))
            except ValueError:
                fault = r.text
            fault = " ".join(printable(fault).split()) or f"HTTP {r.status_code}"
            raise RuntimeFailure(f"Firecracker refused {method} {path} for {self.what}: {fault}", HINT)
        return r.json() if r.content else None

    def send(self, req: Request) -> Any:
        return self.call(*req)
