"""Look inside a built ext4 image the way a guest would: mounted read-only, via chroot."""

from __future__ import annotations

import contextlib
import subprocess
import tempfile
from collections.abc import Iterator
from pathlib import Path


@contextlib.contextmanager
def mounted(image: Path) -> Iterator[Path]:
    d = Path(tempfile.mkdtemp(prefix="mvm-img-"))
    subprocess.run(["mount", "-o", "loop,ro", str(image), str(d)], check=True)
    try:
        yield d
    finally:
        subprocess.run(["umount", str(d)], check=True)
        d.rmdir()


def chroot(root: Path, *argv: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["/usr/sbin/chroot", str(root), *argv], capture_output=True, text=True, timeout=60,
                          env={"PATH": "/bin:/usr/bin", "HOME": "/", "LANG": "C.UTF-8"})
