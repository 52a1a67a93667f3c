"""Is KVM worth using here? Opening /dev/kvm is not enough: time a tiny guest.

On some hosts (nested virtualization gone wrong) /dev/kvm opens and VMs are created, but
guest code runs at a few million instructions per second — far slower than TCG. So the
probe boots a 64 KiB firmware image that counts down a register and writes to QEMU's
`isa-debug-exit` port: a healthy KVM host finishes in well under a second, including
QEMU's own start-up; a broken one does not finish before the deadline and is killed.
The verdict is cached per host boot (`/proc/sys/kernel/random/boot_id`).
"""

from __future__ import annotations

import json
import os
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from mvm.errors import CommandFailed, HostUnsupported, InvalidInput
from mvm.runtime.qemu import BINARY, qemu_message
from mvm.util.proc import run

KVM_DEVICE = Path("/dev/kvm")
DEFAULT_TIMEOUT = 4.0
#: A healthy host runs the probe (QEMU start-up included) in ~0.1 s.
FAST_ENOUGH = 1.5

# 20 M iterations of `dec ecx; jnz`: ~10 ms on hardware, ~0.1 s under TCG, ~20 s on the
# broken KVM this was written for.
_LOOP = 20_000_000
# Real mode at F000:FFC0 — mov ecx,N; 1: dec ecx; jnz 1b; mov al,0x10; out 0xf4,al; hlt.
_CODE = (bytes.fromhex("66B9") + _LOOP.to_bytes(4, "little")
         + bytes.fromhex("6649" "75FC" "B010" "E6F4" "F4" "EBFD"))
# isa-debug-exit makes QEMU exit with (value << 1) | 1.
_EXIT_CODE = (0x10 << 1) | 1


def probe_image() -> bytes:
    """A 64 KiB BIOS image: the reset vector (offset 0xFFF0) jumps back to the loop at 0xFFC0."""
    img = bytearray(b"\xf4" * 0x10000)
    img[0xFFC0:0xFFC0 + len(_CODE)] = _CODE
    img[0xFFF0:0xFFF2] = bytes.fromhex("EBCE")  # jmp short 0xFFC0
    return bytes(img)


@dataclass(frozen=True)
class AccelProbe:
    usable: bool
    fast: bool
    seconds: float | None
    reason: str


def _boot_id() -> str:
    try:
        return Path("/proc/sys/kernel/random/boot_id").read_text().strip()
    except OSError:
        return ""


def _read_cache(cache: Path, key: str) -> AccelProbe | None:
    try:
        raw = json.loads(cache.read_text())
        if raw.pop("key") != key:
            return None
        return AccelProbe(**raw)
    except (OSError, ValueError, KeyError, TypeError):
        return None


def _write_cache(cache: Path, key: str, result: AccelProbe) -> None:
    cache.parent.mkdir(parents=True, exist_ok=True)
    tmp = cache.with_name(cache.name + ".tmp")
    tmp.write_text(json.dumps({"key": key, **asdict(result)}, indent=2) + "\n")
    os.replace(tmp, cache)


def _kvm_opens() -> str | None:
    """None if /dev/kvm opens read-write, else why not."""
    try:
        fd = os.open(KVM_DEVICE, os.O_RDWR | os.O_CLOEXEC)
    except FileNotFoundError:
        return f"{KVM_DEVICE} does not exist (no KVM module, or not passed into this host)"
    except PermissionError:
        return f"no permission to open {KVM_DEVICE}"
    except OSError as e:
        return f"cannot open {KVM_DEVICE}: {e.strerror}"
    os.close(fd)
    return None


def probe_kvm(timeout: float = DEFAULT_TIMEOUT, cache: Path | None = None, *,
              binary: str = BINARY, accel: str = "kvm", cpu: str = "host") -> AccelProbe:
    """Whether KVM opens and runs a tiny guest fast. `accel`/`cpu` exist for testing the
    probe itself under TCG."""
    key = f"{_boot_id()} {binary} {accel} {cpu}"
    if cache is not None and (hit := _read_cache(cache, key)) is not None:
        return hit
    result = _probe(timeout, binary, accel, cpu)
    if cache is not None:
        _write_cache(cache, key, result)
    return result


def _probe(timeout: float, binary: str, accel: str, cpu: str) -> AccelProbe:
    if accel == "kvm" and (why := _kvm_opens()) is not None:
        return AccelProbe(False, False, None, why)
    with tempfile.TemporaryDirectory(prefix="mvm-kvm-probe-") as tmp:
        bios = Path(tmp) / "probe.bin"
        bios.write_bytes(probe_image())
        args = [binary, "-M", "microvm", "-accel", accel, "-cpu", cpu, "-m", "16M",
                "-nodefaults", "-no-user-config", "-display", "none",
                "-bios", str(bios), "-device", "isa-debug-exit,iobase=0xf4,iosize=0x04"]
        start = time.monotonic()
        try:
            proc = run(args, timeout=timeout, check=False)
        except CommandFailed as e:
            if e.returncode == 124:
                return AccelProbe(True, False, None,
                                  f"a tiny {accel} guest did not finish in {timeout:g}s "
                                  "(guest code runs far slower than emulation)")
            return AccelProbe(False, False, None, e.message)
        seconds = round(time.monotonic() - start, 3)
    if proc.returncode != _EXIT_CODE:
        why = qemu_message(proc.stderr.decode(errors="replace")) or f"exit {proc.returncode}"
        return AccelProbe(False, False, seconds, f"QEMU could not run a {accel} guest: {why}")
    if seconds > FAST_ENOUGH:
        return AccelProbe(True, False, seconds,
                          f"a tiny {accel} guest took {seconds:g}s (healthy: ~0.1s)")
    return AccelProbe(True, True, seconds, f"a tiny {accel} guest ran in {seconds:g}s")


def choose_accel(setting: str, cache: Path | None = None,
                 timeout: float = DEFAULT_TIMEOUT) -> str:
    """'tcg' or 'kvm' for the `accel` setting: 'auto' probes, 'kvm' insists, 'tcg' forces."""
    if setting == "tcg":
        return "tcg"
    if setting == "kvm":
        if (why := _kvm_opens()) is not None:
            raise HostUnsupported(f"accel is set to kvm, but {why}",
                                  "run `mvm config set accel auto` (or tcg)")
        return "kvm"
    if setting == "auto":
        return "kvm" if probe_kvm(timeout, cache).fast else "tcg"
    raise InvalidInput(f"unknown accel setting {setting!r}", "use auto, kvm or tcg")
