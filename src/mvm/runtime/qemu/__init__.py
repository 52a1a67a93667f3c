"""The QEMU backend (see runtime.py)."""

from mvm.runtime.qemu.runtime import (
    BINARY,
    SANDBOX,
    QemuRuntime,
    argv,
    host_tsc_khz,
    kernel_cmdline,
    qemu_message,
)

__all__ = ["BINARY", "SANDBOX", "QemuRuntime", "argv", "host_tsc_khz", "kernel_cmdline", "qemu_message"]
