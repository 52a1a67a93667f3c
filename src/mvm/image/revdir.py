"""A revision directory is made beside its final place and swapped in whole: both builders
(the host's `pipeline.step_pack` and the builder microVM's `builder.on_host.collect`) go through here,
so a crash leaves either the old revision or the new one, never half of one."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from mvm.util import private


@contextlib.contextmanager
def staging(revs: Path, name: str) -> Iterator[Path]:
    """A fresh temporary directory in `revs` (the caller holds the pool's lock, so what a
    crashed build left there is garbage and is swept first); removed if the block fails."""
    private.mkdirs(revs)
    for stale in [*revs.glob(".tmp-*"), *revs.glob(".old-*")]:
        shutil.rmtree(stale, ignore_errors=True)
    tmp = revs / f".tmp-{name}-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(mode=0o700)
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def install(tmp: Path, final: Path, manifest: dict[str, Any]) -> None:
    """Write the manifest last, then put `tmp` at `final` (a `--force` rebuild replaces an
    existing revision whole)."""
    private.write(tmp / "manifest.json", json.dumps(manifest, indent=2, sort_keys=True).encode() + b"\n")
    if final.exists():
        old = final.with_name(f".old-{final.name}-{os.getpid()}")
        os.rename(final, old)
        os.rename(tmp, final)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.rename(tmp, final)
