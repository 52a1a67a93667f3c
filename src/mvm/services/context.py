"""Composing the host context from this process's environment — once, at the edge: the state
layout (MVM_HOME, MVM_RUNTIME_DIR), the settings, the SQLite store and flock leases, the runtime
the settings choose, and the test seams."""

from __future__ import annotations

import os

from mvm.config.host import Host
from mvm.config.paths import Layout
from mvm.config.settings import Settings
from mvm.runtime.base import Runtime
from mvm.store import FileLocks, SqliteStore, Store


def host(store: Store | None = None, layout: Layout | None = None) -> Host:
    layout = layout or Layout.from_env()
    settings = Settings.load(layout)
    db = layout.db_path()

    def runtime() -> Runtime:
        from mvm.runtime import select

        return select.runtime(settings, layout)

    return Host(layout=layout, settings=settings, store=store or SqliteStore(db),
                locks=FileLocks(layout.locks_dir()), runtime_factory=runtime,
                store_factory=lambda: SqliteStore(db),
                crash_after=os.environ.get("MVM_TEST_CRASH_AFTER") or None,
                fail_before=os.environ.get("MVM_TEST_FAIL_BEFORE") or None)
