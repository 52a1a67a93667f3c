"""Desired and observed state (`Store`) and leases (`Locks`): protocols and their embedded
implementations (SQLite, flock)."""

from mvm.store.base import Locks, Store
from mvm.store.locks import FileLocks, default_locks, lock, pool_lock, tenant_lock
from mvm.store.sqlite import SqliteStore

__all__ = ["FileLocks", "Locks", "SqliteStore", "Store", "default_locks", "lock", "pool_lock",
           "tenant_lock"]
