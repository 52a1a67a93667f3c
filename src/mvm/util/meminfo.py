"""The host's memory as the kernel reports it (/proc/meminfo)."""

from __future__ import annotations

from pathlib import Path

from mvm.errors import HostUnsupported

MEMINFO = Path("/proc/meminfo")


def available_mib(path: Path = MEMINFO) -> int:
    """MemAvailable in MiB: what can be given to new processes without swapping (the kernel's
    own estimate, page cache that can be dropped included)."""
    try:
        text = path.read_text()
    except OSError as e:
        raise HostUnsupported(f"cannot read {path}: {e.strerror}", "is /proc mounted?") from e
    for line in text.splitlines():
        key, _, value = line.partition(":")
        if key == "MemAvailable":
            parts = value.split()
            if parts and parts[0].isdigit():
                return int(parts[0]) // 1024  # (kB)
    raise HostUnsupported(f"{path} has no MemAvailable line", "mvm needs Linux 3.14 or later")
