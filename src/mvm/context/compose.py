"""Composing the host context from this process's environment — once, at the edge (the CLI, the
agent's API server, tools): the state layout (MVM_HOME, MVM_RUNTIME_DIR), the settings, the
SQLite store and flock leases, the runtime the settings choose, and the test seams.

The test seams are read here and nowhere else. A process a test starts (a CLI command, the
agent) gets the test's doubles through them, named by the test, so that nothing under src/
names a test module:

- MVM_TEST_RUNTIME=`<module>:<factory>[:<argument>]`: the runtime is `factory(argument)` (or
  `factory()`) from that module, instead of the hypervisor the settings choose, and it runs
  every pool whatever its backend: a CLI or agent process a test starts acts on the same fake
  VMs as the test;
- MVM_TEST_CRASH_AFTER=`<action>:<step>`: the process kills itself with SIGKILL right after that
  step of a transition is recorded (the way a real crash would: no cleanup runs);
- MVM_TEST_FAIL_BEFORE=`<action>:<step>`: that step fails before it runs;

so that tests can show that the next command (or the failing one) leaves a consistent state.
"""

from __future__ import annotations

import contextlib
import importlib
import os
import signal
from collections.abc import Callable

from mvm.config.paths import RUNTIME_MODE, TENANTS_MODE, Layout
from mvm.config.settings import Settings
from mvm.context.host import Host, StepHook, no_hook
from mvm.errors import InvalidInput, RuntimeFailure
from mvm.runtime.base import Runtime
from mvm.store import FileLocks, SqliteFences, SqliteStore, Store
from mvm.store.base import Waiting
from mvm.store.sqlite import HOME_MODE
from mvm.util import private

SEAM_HINT = "unset MVM_TEST_RUNTIME (it is a test seam)"


def compose(store: Store | None = None, layout: Layout | None = None,
            waiting: Waiting | None = None) -> Host:
    """The host context of this process. `waiting` is told when a lock is not free at once
    (the CLI prints it: a wait for another command is never silent)."""
    layout = layout or Layout.from_env()
    make_private(layout)
    settings = Settings.load(layout)
    db = layout.db_path()
    seam = os.environ.get("MVM_TEST_RUNTIME")
    test_runtime = named_factory(seam) if seam else None

    def runtime() -> Runtime:
        from mvm.runtime import select

        if test_runtime is not None:
            return test_runtime()
        return select.runtime(settings, layout)

    def backend_runtime(backend: str) -> Runtime:
        from mvm.runtime import select

        return select.runtime_for_backend(backend, settings, layout)

    locks = FileLocks(layout.locks_dir(), SqliteFences(db))
    locks.waiting = waiting
    crash, fail = os.environ.get("MVM_TEST_CRASH_AFTER"), os.environ.get("MVM_TEST_FAIL_BEFORE")
    return Host(layout=layout, settings=settings, store=store or SqliteStore(db), locks=locks,
                runtime_factory=runtime,
                backend_factory=None if test_runtime else backend_runtime,  # (the double runs every pool)
                store_factory=lambda: SqliteStore(db),
                crash_point=crash_after(crash) if crash else no_hook,
                fail_point=fail_before(fail) if fail else no_hook)


def named_factory(value: str) -> Callable[[], Runtime]:
    """MVM_TEST_RUNTIME's runtime: `<module>:<factory>[:<argument>]` (the argument may hold
    colons), the factory looked up now, from wherever this process can import it; the runtime
    made when it is first asked for, as the settings' runtime is."""
    module, colon, rest = value.partition(":")
    name, _, argument = rest.partition(":")
    if not colon or not all(p.isidentifier() for p in module.split(".")) or not name.isidentifier():
        raise InvalidInput(f"MVM_TEST_RUNTIME={value!r} is not <module>:<factory>[:<argument>]",
                           SEAM_HINT)
    try:
        factory = getattr(importlib.import_module(module), name)
    except (ImportError, AttributeError) as e:
        raise InvalidInput(f"MVM_TEST_RUNTIME={value!r}: {e}", SEAM_HINT) from None

    def make() -> Runtime:
        made = factory(argument) if argument else factory()
        if not isinstance(made, Runtime):
            raise InvalidInput(f"MVM_TEST_RUNTIME={value!r} made {type(made).__name__}, not a runtime",
                               SEAM_HINT)
        return made

    return make


def crash_after(at: str) -> StepHook:
    """A `crash_point` that kills this process with SIGKILL right after step `at`
    (`<action>:<step>`) of a transition is recorded, as a real crash would: no cleanup runs."""

    def crash(action: str, step: str) -> None:
        if f"{action}:{step}" == at:
            os.kill(os.getpid(), signal.SIGKILL)

    return crash


def fail_before(at: str) -> StepHook:
    """A `fail_point` that makes step `at` (`<action>:<step>`) of a transition fail before it
    runs."""

    def fail(action: str, step: str) -> None:
        if f"{action}:{step}" == at:
            raise RuntimeFailure(f"injected failure before {action} step {step} (MVM_TEST_FAIL_BEFORE)")

    return fail


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
