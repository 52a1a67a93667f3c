"""The Firecracker backend: its API (api.py), its jailer (jailer.py) and the runtime (runtime.py)."""

from mvm.runtime.firecracker.api import API_SOCK, PID_FILE, VSOCK_SOCK, boot_requests, load_request
from mvm.runtime.firecracker.jailer import (
    JAILED_API_SOCK,
    JAILER,
    chroot_dir,
    chroot_links,
    chroot_paths,
    jailer_argv,
    link_into_chroot,
    vm_id,
)
from mvm.runtime.firecracker.runtime import BINARY, FirecrackerRuntime, available, version

__all__ = ["API_SOCK", "BINARY", "JAILED_API_SOCK", "JAILER", "PID_FILE", "VSOCK_SOCK", "FirecrackerRuntime",
           "available", "boot_requests", "chroot_dir", "chroot_links", "chroot_paths", "jailer_argv",
           "link_into_chroot", "load_request", "version", "vm_id"]
