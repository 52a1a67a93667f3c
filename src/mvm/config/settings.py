"""Host settings: one table feeds `mvm config`, the JSON file, and the typed `Settings` the code
reads (loaded once, at the edge, into the host context)."""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from dataclasses import dataclass, fields
from enum import StrEnum

from mvm.config.paths import Layout
from mvm.errors import InvalidInput


class Accel(StrEnum):
    AUTO = "auto"  # probe KVM's speed; TCG when it is slow
    KVM = "kvm"
    TCG = "tcg"


class Jail(StrEnum):
    AUTO = "auto"  # jail every hypervisor where the host allows it
    REQUIRED = "required"  # refuse to start one that cannot be jailed
    OFF = "off"


class Backend(StrEnum):
    QEMU = "qemu"
    FIRECRACKER = "firecracker"


class Builder(StrEnum):
    VM = "vm"  # the ephemeral builder microVM (tenants' flakes never evaluated on the host)
    HOST = "host"  # the host's Nix: trusted single-tenant hosts only


def _mib(value: str) -> int:
    if not (value.isascii() and value.isdigit()) or int(value) >= 2**40:
        raise InvalidInput(f"{value!r} is not a whole number of MiB (0 or more)")
    return int(value)


def _choice(enum: type[StrEnum]) -> Callable[[str], StrEnum]:
    def parse(value: str) -> StrEnum:
        try:
            return enum(value)
        except ValueError:
            raise InvalidInput(f"{value!r} is not one of {', '.join(e.value for e in enum)}") from None
    return parse


def _uid_base(value: str) -> int:
    if not value.isdigit() or not 1000 <= int(value) <= 2**31 - 2_000_001:
        raise InvalidInput(f"{value!r} is not a uid base between 1000 and {2**31 - 2_000_001}")
    return int(value)


@dataclass(frozen=True)
class Setting:
    key: str
    default: str
    help: str
    parse: Callable[[str], object] = str


SETTINGS: dict[str, Setting] = {
    s.key: s
    for s in (
        Setting("nixpkgs", "",
                "flake ref that a flake's `nixpkgs` input is pointed at (empty: use the flake's own)"),
        Setting("accel", "auto", "QEMU accelerator: auto (probe KVM speed), kvm or tcg", _choice(Accel)),
        Setting("backend", "qemu", "runtime backend: qemu or firecracker", _choice(Backend)),
        Setting("jail", "auto", "jail each hypervisor (own uid, namespaces, seccomp, cgroup): auto "
                "(where the host allows), required, or off", _choice(Jail)),
        Setting("jail-uid-base", "1900000000", "jailed hypervisors run as uids/gids above this number",
                _uid_base),
        Setting("builder", "vm", "where `pool build` runs Nix: vm (the builder microVM) or "
                "host (trusted single-tenant hosts only)", _choice(Builder)),
        Setting("mem-reserve", "512", "MiB of host memory a start or wake must leave available "
                "(beyond the instance's RAM and its hypervisor's overhead)", _mib),
    )
}


@dataclass(frozen=True)
class Settings:
    nixpkgs: str = ""
    accel: Accel = Accel.AUTO
    backend: Backend = Backend.QEMU
    jail: Jail = Jail.AUTO
    jail_uid_base: int = 1_900_000_000
    builder: Builder = Builder.VM
    mem_reserve: int = 512

    @classmethod
    def load(cls, layout: Layout) -> Settings:
        values = raw(layout)
        return cls(**{f.name: SETTINGS[_key(f.name)].parse(values[_key(f.name)])  # type: ignore[arg-type]
                      for f in fields(cls)})


def _key(field_name: str) -> str:
    return field_name.replace("_", "-")


def raw(layout: Layout) -> dict[str, str]:
    """Every setting as text (defaults for those never set); unknown keys in the file ignored."""
    values = {k: s.default for k, s in SETTINGS.items()}
    try:
        stored = json.loads(layout.config_path().read_text())
    except FileNotFoundError:
        stored = {}
    values.update({k: str(v) for k, v in stored.items() if k in SETTINGS})
    return values


def _known(key: str) -> Setting:
    if key not in SETTINGS:
        raise InvalidInput(f"unknown setting {key!r}", f"known: {', '.join(SETTINGS)}")
    return SETTINGS[key]


def get(layout: Layout, key: str) -> str:
    _known(key)
    return raw(layout)[key]


def set_value(layout: Layout, key: str, value: str) -> None:
    """Validated, then written atomically; an empty value restores the default."""
    setting = _known(key)
    try:
        setting.parse(value or setting.default)
    except InvalidInput as e:
        raise InvalidInput(f"setting {key}: {e.message}", setting.help) from None
    path = layout.config_path()
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        stored = json.loads(path.read_text())
    except FileNotFoundError:
        stored = {}
    if value:
        stored[key] = value
    else:
        stored.pop(key, None)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(stored, indent=2, sort_keys=True) + "\n")
    os.replace(tmp, path)
