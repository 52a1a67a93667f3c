"""The host context every operation runs in: passed in, never read from globals on the way.

It holds the state layout, the typed settings, the store, the locks, a factory for the
hypervisor runtime (made once, on first use), the clock, and two test seams, each
`<action>:<step>`: MVM_TEST_CRASH_AFTER kills the process with SIGKILL right after that step
of a transition is recorded (the way a real crash would: no cleanup runs), and
MVM_TEST_FAIL_BEFORE makes that step fail, so tests can show that the next command (or the
failing one) leaves a consistent state.

It is composed at the edge (`services.context.host()` for the CLI, the agent, the tests).
"""

from __future__ import annotations

import os
import signal
import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING

from mvm.config.paths import Layout
from mvm.config.settings import Settings
from mvm.errors import RuntimeFailure
from mvm.util import meminfo

if TYPE_CHECKING:
    from mvm.runtime.base import Runtime
    from mvm.store import FileLocks, Store


@dataclass
class Host:
    layout: Layout
    settings: Settings
    store: Store
    locks: FileLocks
    runtime_factory: Callable[[], Runtime]
    clock: Callable[[], float] = time.time
    crash_after: str | None = None
    fail_before: str | None = None
    #: A store connection for another thread (SQLite connections are per thread).
    store_factory: Callable[[], Store] | None = None
    _runtime: Runtime | None = field(default=None, repr=False)
    #: The host's available memory in MiB (admission of starts and wakes); tests replace it.
    mem_available: Callable[[], int] = meminfo.available_mib
    #: Makes the runtime of a pool whose backend is not the host's (`pool create --backend`);
    #: None: every pool runs on `runtime()` (tests that inject one runtime).
    backend_factory: Callable[[str], Runtime] | None = None
    _runtimes: dict[str, Runtime] = field(default_factory=dict, repr=False)

    @property
    def home(self) -> Path:
        return self.layout.home

    def runtime(self) -> Runtime:
        if self._runtime is None:
            self._runtime = self.runtime_factory()
        return self._runtime

    def runtime_for(self, backend: str) -> Runtime:
        """The runtime of a pool's backend ("" or the host's own: `runtime()`), made once."""
        if not backend or backend == self.settings.backend.value or self.backend_factory is None:
            return self.runtime()
        if backend not in self._runtimes:
            self._runtimes[backend] = self.backend_factory(backend)
        return self._runtimes[backend]

    def for_thread(self) -> Host:
        """The same host with a store connection of its own."""
        store = self.store_factory() if self.store_factory is not None else self.store
        return replace(self, store=store, _runtime=self.runtime())

    def crash_point(self, action: str, step: str) -> None:
        if self.crash_after == f"{action}:{step}":
            os.kill(os.getpid(), signal.SIGKILL)

    def fail_point(self, action: str, step: str) -> None:
        if self.fail_before == f"{action}:{step}":
            raise RuntimeFailure(f"injected failure before {action} step {step} (MVM_TEST_FAIL_BEFORE)")
