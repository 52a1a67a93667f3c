"""The QEMU backend: its command line (cmdline.py), QMP (qmp.py), snapshots (snapshot.py) and
the runtime (runtime.py)."""

from mvm.runtime.qemu.cmdline import (
    BINARY,
    SANDBOX,
    argv,
    host_tsc_khz,
    kernel_cmdline,
    qemu_message,
)
from mvm.runtime.qemu.runtime import QemuRuntime

__all__ = ["BINARY", "SANDBOX", "QemuRuntime", "argv", "host_tsc_khz", "kernel_cmdline", "qemu_message"]
