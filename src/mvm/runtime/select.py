"""Which runtime this host uses: the `backend` and `accel` settings, made into an object."""

from __future__ import annotations

from mvm.config.paths import Layout
from mvm.config.settings import Backend, Settings
from mvm.errors import HostUnsupported
from mvm.runtime.accel import choose_accel
from mvm.runtime.base import Runtime


def runtime(settings: Settings, layout: Layout) -> Runtime:
    if settings.backend is Backend.QEMU:
        from mvm.runtime import jail
        from mvm.runtime.qemu import QemuRuntime

        return QemuRuntime(lambda: choose_accel(settings.accel.value, cache=layout.kvm_probe_cache()),
                           jail_config=jail.Config(jail.Mode(settings.jail.value), settings.jail_uid_base))
    raise HostUnsupported("the firecracker backend is not implemented yet",
                          "run `mvm config set backend qemu`")
