"""The state tree under MVM_HOME (DESIGN §8). Every function takes validated IDs only."""

from __future__ import annotations

import os
from pathlib import Path


def home() -> Path:
    env = os.environ.get("MVM_HOME")
    if env:
        return Path(env)
    if os.geteuid() == 0:
        return Path("/var/lib/mvm")
    return Path.home() / ".local" / "share" / "mvm"


def db_path() -> Path:
    return home() / "mvm.db"


def config_path() -> Path:
    return home() / "config.json"


def kernel_dir() -> Path:
    """mvm's default guest kernel: vmlinux, initrd, and a manifest."""
    return home() / "kernel"


def offline_nixpkgs_dir() -> Path:
    return home() / "nixpkgs-offline"


def builtin_flake_dir() -> Path:
    return home() / "builtin-flake"


def locks_dir() -> Path:
    return home() / "locks"


def secrets_runtime_dir() -> Path:
    """Memory-backed storage for clear-text secrets images (never on disk)."""
    return Path(os.environ.get("MVM_RUNTIME_DIR", "/dev/shm")) / f"mvm-{_home_tag()}"


def runtime_dir() -> Path:
    """Short paths for sockets and pid files (a Unix socket path must fit in 108 bytes)."""
    return Path(os.environ.get("MVM_RUNTIME_DIR", "/run/mvm")) / _home_tag()


def _home_tag() -> str:
    import hashlib

    return hashlib.sha256(str(home().resolve()).encode()).hexdigest()[:10]


def tenant_dir(tenant: str) -> Path:
    return home() / "tenants" / tenant


def secrets_file(tenant: str) -> Path:
    return tenant_dir(tenant) / "secrets.json"


def pool_dir(tenant: str, pool: str) -> Path:
    return tenant_dir(tenant) / "pools" / pool


def artifacts_dir(tenant: str, pool: str) -> Path:
    return pool_dir(tenant, pool) / "artifacts"


def revisions_dir(tenant: str, pool: str) -> Path:
    return artifacts_dir(tenant, pool) / "revisions"


def revision_dir(tenant: str, pool: str, rev: str) -> Path:
    return revisions_dir(tenant, pool) / rev


def current_link(tenant: str, pool: str) -> Path:
    return artifacts_dir(tenant, pool) / "current"


def builds_dir(tenant: str, pool: str) -> Path:
    return pool_dir(tenant, pool) / "builds"


def instance_dir(tenant: str, pool: str, instance: str) -> Path:
    return pool_dir(tenant, pool) / "instances" / instance
