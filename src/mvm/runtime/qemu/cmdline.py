"""QEMU's command line for a VM (pure: same inputs, same list) and what QEMU says in its log.

Facts this relies on are in /work/shared/QEMU-HERE.md. In short: `tsc_early_khz` on the
kernel command line (TCG guests otherwise hang in TSC calibration), `-cpu qemu64,+arat`
under TCG, `console=ttyS0,115200`, ACPI kept on, identical device order on boot and
restore (it fixes each device's virtio-mmio slot).
"""

from __future__ import annotations

import contextlib
import functools
import os
import re
from pathlib import Path

from mvm.errors import InvalidInput
from mvm.runtime import console, jail
from mvm.runtime.base import VmSpec

BINARY = "qemu-system-x86_64"

# Files in spec.run_dir.
QMP_SOCK = "qmp.sock"
AGENT_SOCK = "agent.sock"
PID_FILE = "qemu.pid"
#: QEMU's own messages (`-D`): also where errors after daemonizing go.
QEMU_LOG = "qemu.log"

AGENT_PORT = "mvm.agent"
#: microvm has no PCI: every device is one of at most 8 virtio-mmio slots.
MAX_MMIO_DEVICES = 8
#: TCG translation cache. The default (1 GiB of address space, touched as code is translated)
#: lets each guest keep ~50 MB of translated code resident; memory, not CPU, limits density.
TCG_TB_MIB = 64
#: QEMU's seccomp filter for a jailed hypervisor: no obsolete syscalls, no setuid & co, no
#: fork/exec, no scheduler or affinity changes.
SANDBOX = "on,obsolete=deny,elevateprivileges=deny,spawn=deny,resourcecontrol=deny"

#: Hypervisor-specific guest parameters, the first `console=` wins its options (baud), so ours
#: go first. The rest is the trimmed line measured fastest under TCG (QEMU-HERE.md) plus
#: `panic=-1 reboot=t` so a panicking or rebooting guest ends the process (`-no-reboot`)
#: instead of hanging or looping, as Firecracker does.
BASE_PARAMS = (
    "console=ttyS0,115200",
    "quiet",
    "panic=-1",
    "reboot=t",
    "pci=off",
    "cryptomgr.notests",
    "i8042.noaux",
    "i8042.nomux",
    "i8042.nopnp",
    "i8042.dumbkbd",
    "8250.nr_uarts=1",
    "init_on_alloc=0",
    "random.trust_cpu=on",
)

_QEMU_ID = re.compile(r"[A-Za-z][A-Za-z0-9_.-]{0,63}")


def _opt(value: str | Path) -> str:
    """A value inside a QEMU `key=value,...` option: commas are escaped by doubling."""
    return str(value).replace(",", ",,")


def _abs(path: Path) -> str:
    # QEMU changes to / when it daemonizes; every path it opens later must be absolute.
    return os.path.abspath(path)


def _disk_id(disk_id: str) -> str:
    if not _QEMU_ID.fullmatch(disk_id):
        raise InvalidInput(f"disk id {disk_id!r} is not usable as a device id",
                           "use letters, digits, '-', '_' or '.', starting with a letter")
    return f"disk-{disk_id}"



def check_accel(accel: str) -> str:
    if accel not in ("tcg", "kvm"):
        raise InvalidInput(f"unknown accelerator {accel!r}", "use tcg or kvm")
    return accel


def kernel_cmdline(cmdline: str, tsc_khz: int | None) -> str:
    params = list(BASE_PARAMS)
    if tsc_khz:
        params.append(f"tsc_early_khz={tsc_khz}")
    return " ".join([*params, cmdline]).strip()


def argv(spec: VmSpec, accel: str, incoming: bool = False, *, tsc_khz: int | None = None,
         binary: str = BINARY, tb_size_mib: int | None = TCG_TB_MIB,
         fds: jail.Fds | None = None) -> list[str]:
    """The complete QEMU command line for spec. Pure: same inputs, same list.

    Device order is fixed (disks in the given order, agent channel, network) and identical
    with or without `incoming`, which only appends `-incoming defer -S`. With `fds` (jailed,
    see runtime/jail.py) QEMU opens nothing of the VM's by path but its kernel and initrd:
    disks and the console come as fdsets, the TAP and the listening QMP and agent sockets as
    descriptors; it runs in the foreground (pid 1 of its PID namespace; the seccomp sandbox
    forbids the fork of `-daemonize`), its messages on stderr, its pid file private to it.
    """
    check_accel(accel)
    devices = len(spec.disks) + 1 + (1 if spec.net else 0)
    if devices > MAX_MMIO_DEVICES:
        raise InvalidInput(f"{spec.name}: {devices} devices, microvm has "
                           f"{MAX_MMIO_DEVICES} virtio-mmio slots",
                           "attach fewer disks")
    run_dir = Path(_abs(spec.run_dir))
    if accel == "tcg":
        accel_args = ["-accel", f"tcg,tb-size={tb_size_mib}" if tb_size_mib else "tcg",
                      "-cpu", "qemu64,+arat"]
    else:
        accel_args = ["-accel", "kvm", "-cpu", "host"]
    args = [
        binary,
        "-name", _opt(spec.name),
        "-M", "microvm",
        *accel_args,
        "-m", f"{spec.mem_mib}M",
        "-smp", str(spec.vcpus),
        "-nodefaults", "-no-user-config", "-display", "none",
        "-no-reboot",
        "-kernel", _abs(spec.kernel),
    ]
    if spec.initrd is not None:
        args += ["-initrd", _abs(spec.initrd)]
    args += ["-append", kernel_cmdline(spec.cmdline, tsc_khz)]
    if fds is not None:
        args += ["-sandbox", SANDBOX]
    for n, disk in enumerate(spec.disks):
        node = _disk_id(disk.id)
        if fds is not None:
            args += [a for fd in fds.disks[n] for a in ("-add-fd", f"fd={fd},set={n + 1}")]
        path = f"/dev/fdset/{n + 1}" if fds is not None else _opt(_abs(disk.path))
        # Jailed, QEMU's own image locks (OFD locks on each descriptor) guard nothing — it can
        # open no image but the descriptors mvm hands it, and the lifecycle never gives one disk
        # to two hypervisors — and they break a resume after a snapshot ended or was cancelled:
        # re-activating the disk then takes the write lock on the set's other descriptor, which
        # the first still holds ("Failed to get write lock").
        locking = ",file.locking=off" if fds is not None else ""
        args += [
            "-drive",
            f"file={path},if=none,id={node},format=raw,"
            f"readonly={'on' if disk.read_only else 'off'},cache=writeback{locking}",
            "-device", f"virtio-blk-device,drive={node}",
        ]
    agent = f"fd={fds.agent}" if fds is not None else f"path={_opt(run_dir / AGENT_SOCK)}"
    args += [
        "-device", "virtio-serial-device",
        "-chardev", f"socket,id=agent,{agent},server=on,wait=off",
        "-device", f"virtserialport,chardev=agent,name={AGENT_PORT}",
    ]
    if spec.net is not None:
        tap = (f"fd={fds.tap}" if fds is not None and fds.tap is not None
               else f"ifname={_opt(spec.net.tap)},script=no,downscript=no")
        args += [
            "-netdev", f"tap,id=net0,{tap}",
            "-device", f"virtio-net-device,netdev=net0,mac={spec.net.mac}",
        ]
    if fds is not None:
        console_set = len(spec.disks) + 1
        args += ["-add-fd", f"fd={fds.console},set={console_set}"]
        console_out, qmp_sock = f"/dev/fdset/{console_set}", f"fd={fds.qmp}"
    else:
        # a FIFO that mvm's logger keeps within a cap (runtime/console.py)
        console_out, qmp_sock = _opt(run_dir / console.PIPE), f"path={_opt(run_dir / QMP_SOCK)}"
    args += [
        "-chardev", f"file,id=console,path={console_out},append=on",
        "-serial", "chardev:console",
        "-chardev", f"socket,id=qmp,{qmp_sock},server=on,wait=off",
        "-mon", "chardev=qmp,mode=control",
    ]
    if fds is None:
        args += ["-D", str(run_dir / QEMU_LOG)]
    args += ["-pidfile", str(run_dir / PID_FILE)]
    if fds is None:
        args += ["-daemonize"]
    if incoming:
        args += ["-incoming", "defer", "-S"]
    return args


@functools.cache
def host_tsc_khz() -> int | None:
    """The host TSC frequency; a TCG guest's TSC runs at it (see `tsc_early_khz`)."""
    sysfs = Path("/sys/devices/system/cpu/cpu0/tsc_freq_khz")
    with contextlib.suppress(OSError, ValueError):
        return int(sysfs.read_text().strip())
    try:
        cpuinfo = Path("/proc/cpuinfo").read_text()
    except OSError:
        return None
    first = cpuinfo.split("\n\n", 1)[0]
    flags = re.search(r"^flags\s*:(.*)$", first, re.M)
    mhz = re.search(r"^cpu MHz\s*:\s*([0-9.]+)", first, re.M)
    # Without a constant TSC, "cpu MHz" is the current clock, not the TSC's.
    if not mhz or not flags or "constant_tsc" not in flags.group(1).split():
        return None
    return round(float(mhz.group(1)) * 1000)


def qemu_message(text: str) -> str:
    """What QEMU said went wrong, without its program-name prefix: the first explicit
    `error:` line if there is one, else the last few non-warning lines."""
    lines = [re.sub(r"^qemu-system-\w+:\s*", "", ln.strip())
             for ln in text.strip().splitlines() if ln.strip()]
    flagged = [ln[len("error:"):].strip() for ln in lines if ln.startswith("error:")]
    if flagged:
        return flagged[0]
    errors = [ln for ln in lines if not ln.startswith("warning:")] or lines
    return "; ".join(errors[-3:])

