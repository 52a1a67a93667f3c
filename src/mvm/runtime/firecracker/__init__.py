"""The Firecracker backend (see runtime.py)."""

from mvm.runtime.firecracker.runtime import (
    API_SOCK,
    BINARY,
    JAILED_API_SOCK,
    JAILER,
    PID_FILE,
    VSOCK_SOCK,
    FirecrackerRuntime,
    available,
    boot_requests,
    chroot_dir,
    chroot_links,
    chroot_paths,
    jailer_argv,
    link_into_chroot,
    load_request,
    version,
    vm_id,
)

__all__ = ["API_SOCK", "BINARY", "JAILED_API_SOCK", "JAILER", "PID_FILE", "VSOCK_SOCK", "FirecrackerRuntime",
           "available", "boot_requests", "chroot_dir", "chroot_links", "chroot_paths", "jailer_argv",
           "link_into_chroot", "load_request", "version", "vm_id"]
