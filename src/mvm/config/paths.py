"""The state tree (DESIGN §8) as a value: a `Layout` is made once, at the edge, from MVM_HOME
(and MVM_RUNTIME_DIR), and passed in; nothing below reads the environment for it. Every
method takes validated IDs only."""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass
from pathlib import Path


def default_home() -> Path:
    env = os.environ.get("MVM_HOME")
    if env:
        return Path(env)
    if os.geteuid() == 0:
        return Path("/var/lib/mvm")
    return Path.home() / ".local" / "share" / "mvm"


#: `tenants/` may be passed through (a jailed hypervisor opens its own files below it), not
#: listed; each tenant's directory is 0700.
TENANTS_MODE = 0o711
#: The runtime root and this home's directory in it may be passed through, not listed; each
#: instance's run directory is 0700.
RUNTIME_MODE = 0o711


@dataclass(frozen=True)
class Layout:
    home: Path
    #: Where the short runtime paths (sockets, pid files) and, when set, the clear-text
    #: secrets images go: /run/mvm and /dev/shm unless MVM_RUNTIME_DIR says otherwise.
    runtime_root: Path | None = None

    @classmethod
    def from_env(cls) -> Layout:
        root = os.environ.get("MVM_RUNTIME_DIR")
        return cls(default_home(), Path(root) if root else None)

    def db_path(self) -> Path:
        return self.home / "mvm.db"

    def config_path(self) -> Path:
        return self.home / "config.json"

    def kernel_dir(self) -> Path:
        """mvm's default guest kernel: vmlinux, initrd, and a manifest."""
        return self.home / "kernel"

    def offline_nixpkgs_dir(self) -> Path:
        return self.home / "nixpkgs-offline"

    def builder_dir(self) -> Path:
        """The builder microVM's image and manifest, and the package set's export."""
        return self.home / "builder"

    def builtin_flake_dir(self) -> Path:
        return self.home / "builtin-flake"

    def locks_dir(self) -> Path:
        return self.home / "locks"

    def agent_socket(self) -> Path:
        """The agent's API socket (root only, in a 0700 directory)."""
        return self.home / "agent" / "api.sock"

    def kvm_probe_cache(self) -> Path:
        """Where the KVM speed verdict is kept (re-probed after each host reboot)."""
        return self.home / "kvm-probe.json"

    def jail_verdict(self) -> Path:
        """Whether this host can jail hypervisors, as `mvm setup` decided (runtime/jail.Verdict)."""
        return self.home / "jail.json"

    def secrets_runtime_dir(self) -> Path:
        """Memory-backed storage for clear-text secrets images (never on disk)."""
        return (self.runtime_root or Path("/dev/shm")) / f"mvm-{self._tag()}"

    def runtime_dir(self) -> Path:
        """Short paths for sockets and pid files (a Unix socket path must fit in 108 bytes)."""
        return (self.runtime_root or Path("/run/mvm")) / self._tag()

    def _tag(self) -> str:
        return hashlib.sha256(str(self.home.resolve()).encode()).hexdigest()[:10]

    def tenant_dir(self, tenant: str) -> Path:
        return self.home / "tenants" / tenant

    def secrets_file(self, tenant: str) -> Path:
        return self.tenant_dir(tenant) / "secrets.json"

    def pool_dir(self, tenant: str, pool: str) -> Path:
        return self.tenant_dir(tenant) / "pools" / pool

    def artifacts_dir(self, tenant: str, pool: str) -> Path:
        return self.pool_dir(tenant, pool) / "artifacts"

    def revisions_dir(self, tenant: str, pool: str) -> Path:
        return self.artifacts_dir(tenant, pool) / "revisions"

    def revision_dir(self, tenant: str, pool: str, rev: str) -> Path:
        return self.revisions_dir(tenant, pool) / rev

    def current_link(self, tenant: str, pool: str) -> Path:
        return self.artifacts_dir(tenant, pool) / "current"

    def builds_dir(self, tenant: str, pool: str) -> Path:
        return self.pool_dir(tenant, pool) / "builds"

    def instance_dir(self, tenant: str, pool: str, instance: str) -> Path:
        return self.pool_dir(tenant, pool) / "instances" / instance
