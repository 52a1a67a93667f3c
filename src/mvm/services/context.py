"""Composing the host context from this process's environment: the state home (MVM_HOME),
its SQLite store and flock leases, the runtime the settings choose, the test seams."""

from __future__ import annotations

import os

from mvm.config import paths
from mvm.config.host import Host
from mvm.store import SqliteStore, Store, default_locks


def _runtime():  # type: ignore[no-untyped-def]
    from mvm.runtime import select

    return select.runtime()


def host(store: Store | None = None) -> Host:
    db = paths.db_path()
    return Host(home=paths.home(), store=store or SqliteStore(db), locks=default_locks(),
                runtime_factory=_runtime, store_factory=lambda: SqliteStore(db),
                crash_after=os.environ.get("MVM_TEST_CRASH_AFTER") or None,
                fail_before=os.environ.get("MVM_TEST_FAIL_BEFORE") or None)
