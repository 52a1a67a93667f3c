"""Which runtime this host uses: the `backend` and `accel` settings, made into an object."""

from __future__ import annotations

from pathlib import Path

from mvm import config
from mvm.config import paths
from mvm.errors import HostUnsupported, InvalidInput
from mvm.runtime.accel import choose_accel
from mvm.runtime.base import Runtime


def kvm_probe_cache() -> Path:
    """Where the KVM speed verdict is kept (re-probed after each host reboot)."""
    return paths.home() / "kvm-probe.json"


def runtime(backend: str | None = None, accel: str | None = None) -> Runtime:
    backend = backend or config.get("backend")
    if backend == "qemu":
        from mvm.runtime.qemu import QemuRuntime

        setting = accel or config.get("accel")
        return QemuRuntime(lambda: choose_accel(setting, cache=kvm_probe_cache()))
    if backend == "firecracker":
        raise HostUnsupported("the firecracker backend is not implemented yet",
                              "run `mvm config set backend qemu`")
    raise InvalidInput(f"unknown backend {backend!r}", "use qemu or firecracker")
