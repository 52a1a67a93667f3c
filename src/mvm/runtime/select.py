"""Which runtime this host uses: the `backend` and `accel` settings, made into an object; and
the runtime of a pool that asks for a backend of its own (`pool create --backend`)."""

from __future__ import annotations

from dataclasses import replace

from mvm.config.paths import Layout
from mvm.config.settings import Backend, Settings
from mvm.errors import HostUnsupported, InvalidInput
from mvm.runtime.accel import choose_accel, probe_kvm
from mvm.runtime.base import Runtime


def runtime(settings: Settings, layout: Layout) -> Runtime:
    from mvm.runtime import jail

    jail_config = jail.Config(jail.Mode(settings.jail.value), settings.jail_uid_base,
                              record=layout.jail_verdict())
    if settings.backend is Backend.QEMU:
        from mvm.runtime.qemu import QemuRuntime

        return QemuRuntime(lambda: choose_accel(settings.accel.value, cache=layout.kvm_probe_cache()),
                           jail_config=jail_config)
    from mvm.runtime.firecracker import FirecrackerRuntime

    return FirecrackerRuntime(jail_config=jail_config)


def runtime_for_backend(backend: str, settings: Settings, layout: Layout) -> Runtime:
    """The runtime of a pool whose backend is not the host's."""
    return runtime(replace(settings, backend=parse_backend(backend)), layout)


def parse_backend(text: str) -> Backend:
    try:
        return Backend(text)
    except ValueError:
        raise InvalidInput(f"unknown backend {text!r}",
                           f"use one of {', '.join(b.value for b in Backend)}") from None


def check_backend(backend: Backend, layout: Layout, *, binary: str | None = None) -> None:
    """Refuse, with one line, a backend this host cannot run: Firecracker needs its binary on
    PATH and a KVM that runs guests fast (it has no emulation)."""
    if backend is not Backend.FIRECRACKER:
        return
    from mvm.runtime import firecracker

    if (why := firecracker.available(binary or firecracker.BINARY)) is not None:
        raise HostUnsupported(f"this host cannot run Firecracker VMs: {why}",
                              "install Firecracker on this host, or create the pool with --backend qemu")
    kvm = probe_kvm(cache=layout.kvm_probe_cache())
    if not kvm.fast:
        raise HostUnsupported(f"this host cannot run Firecracker VMs: no fast KVM ({kvm.reason})",
                              "Firecracker needs KVM; create the pool with --backend qemu")
