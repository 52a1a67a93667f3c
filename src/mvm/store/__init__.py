"""Desired and observed state (`Store`) and leases (`Locks`): protocols and their embedded
implementations (SQLite, flock)."""

from mvm.store.base import Fencer, Lease, Locks, Store
from mvm.store.locks import FileLocks, pool_lock_name, quota_lock_name, tenant_lock_name
from mvm.store.sqlite import SqliteFences, SqliteStore

__all__ = ["Fencer", "FileLocks", "Lease", "Locks", "SqliteFences", "SqliteStore", "Store",
           "pool_lock_name", "quota_lock_name", "tenant_lock_name"]
