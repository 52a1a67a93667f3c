"""Composing the host context from this process's environment — once, at the edge: the state
layout (MVM_HOME, MVM_RUNTIME_DIR), the settings, the SQLite store and flock leases, the runtime
the settings choose, and the test seams."""

from __future__ import annotations

import contextlib
import os
from pathlib import Path

from mvm.config.host import Host
from mvm.config.paths import Layout
from mvm.config.settings import Settings
from mvm.errors import InvalidInput
from mvm.lifecycle.specs import RUNTIME_MODE
from mvm.runtime.base import Runtime
from mvm.services.tenants import TENANTS_MODE
from mvm.store import FileLocks, SqliteFences, SqliteStore, Store
from mvm.store.sqlite import HOME_MODE
from mvm.util import private


def host(store: Store | None = None, layout: Layout | None = None) -> Host:
    layout = layout or Layout.from_env()
    make_private(layout)
    settings = Settings.load(layout)
    db = layout.db_path()
    test_runtime = os.environ.get("MVM_TEST_RUNTIME")

    def runtime() -> Runtime:
        from mvm.runtime import select

        if test_runtime:
            return _test_runtime(test_runtime)
        return select.runtime(settings, layout)

    def backend_runtime(backend: str) -> Runtime:
        from mvm.runtime import select

        return select.runtime_for_backend(backend, settings, layout)

    return Host(layout=layout, settings=settings, store=store or SqliteStore(db),
                locks=FileLocks(layout.locks_dir(), SqliteFences(db)), runtime_factory=runtime,
                backend_factory=None if test_runtime else backend_runtime,  # (the double runs every pool)
                store_factory=lambda: SqliteStore(db),
                crash_after=os.environ.get("MVM_TEST_CRASH_AFTER") or None,
                fail_before=os.environ.get("MVM_TEST_FAIL_BEFORE") or None)


def _test_runtime(value: str) -> Runtime:
    """MVM_TEST_RUNTIME=fake:<ledger>: the tests' named double (tests/doubles/fake_runtime.py,
    importable only where the tests are) instead of a hypervisor, so that a CLI or agent
    process a test starts acts on the same fake VMs as the test. Nothing else is accepted."""
    kind, _, ledger = value.partition(":")
    if kind != "fake" or not ledger:
        raise InvalidInput(f"MVM_TEST_RUNTIME={value!r} is not fake:<ledger file>",
                           "unset MVM_TEST_RUNTIME (it is a test seam)")
    import importlib

    double = importlib.import_module("tests.doubles.fake_runtime")
    rt: Runtime = double.FakeRuntime(Path(ledger))
    return rt


#: Left in a state home once what an older mvm made there was made private.
PRIVATE_MARK = ".files-private"


def make_private(layout: Layout) -> None:
    """Once per state home: what an older mvm made readable to other users (0644 disks and
    images under 0755 directories) becomes 0600 and 0700. Host assets (the default kernel, the
    built-in flake, the offline package set) and settings are no tenant's and stay as they are."""
    home = layout.home
    mark = home / PRIVATE_MARK
    if not home.is_dir() or mark.exists():
        return
    with contextlib.suppress(OSError):  # (a full disk, someone else's home: reads still work)
        for tree in (home / "tenants", layout.locks_dir(), layout.runtime_dir()):
            if tree.is_dir():
                private.tighten(tree)
        for f in home.glob(layout.db_path().name + "*"):
            private.tighten(f)
        for d, mode in ((home / "tenants", TENANTS_MODE), (layout.runtime_dir(), RUNTIME_MODE)):
            if d.is_dir():
                d.chmod(mode)
        if home.stat().st_mode & 0o777 & ~HOME_MODE:  # (the home only ever loses bits)
            home.chmod(home.stat().st_mode & HOME_MODE)
        private.write(mark, b"")
