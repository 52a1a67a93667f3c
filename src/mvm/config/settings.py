"""Host settings: one table feeds `mvm config`, the JSON file, and the code that reads them."""

from __future__ import annotations

import json
import os
from dataclasses import dataclass

from mvm.config import paths
from mvm.errors import InvalidInput


@dataclass(frozen=True)
class Setting:
    key: str
    default: str
    help: str


SETTINGS: dict[str, Setting] = {
    s.key: s
    for s in (
        Setting(
            "nixpkgs",
            "",
            "flake ref that a flake's `nixpkgs` input is pointed at (empty: use the flake's own)",
        ),
        Setting("accel", "auto", "QEMU accelerator: auto (probe KVM speed), kvm or tcg"),
        Setting("backend", "qemu", "runtime backend: qemu or firecracker"),
    )
}


def load() -> dict[str, str]:
    values = {k: s.default for k, s in SETTINGS.items()}
    try:
        stored = json.loads(paths.config_path().read_text())
    except FileNotFoundError:
        stored = {}
    values.update({k: str(v) for k, v in stored.items() if k in SETTINGS})
    return values


def get(key: str) -> str:
    if key not in SETTINGS:
        raise InvalidInput(f"unknown setting {key!r}", f"known: {', '.join(SETTINGS)}")
    return load()[key]


def set_value(key: str, value: str) -> None:
    if key not in SETTINGS:
        raise InvalidInput(f"unknown setting {key!r}", f"known: {', '.join(SETTINGS)}")
    path = paths.config_path()
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        stored = json.loads(path.read_text())
    except FileNotFoundError:
        stored = {}
    stored[key] = value
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(stored, indent=2, sort_keys=True) + "\n")
    os.replace(tmp, path)
