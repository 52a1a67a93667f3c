"""The host context every operation runs in: passed in, never read from globals on the way.

It holds the state layout, the typed settings, the store and the locks (behind their protocols,
`store/base.py`), a factory for the hypervisor runtime (made once, on first use), the clock, the
host's available memory, and two hooks the lifecycle calls at each step of a transition:
`fail_point` right before the step runs, `crash_point` right after it is recorded. They do
nothing unless a test sets them (directly, or through the seams `compose.py` reads at the edge).

It is composed at the edge (`compose.compose()` for the CLI, the agent, tools); tests build it
with their doubles.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path

from mvm.config.paths import Layout
from mvm.config.settings import Settings
from mvm.runtime.base import Runtime
from mvm.store.base import Locks, Store
from mvm.util import meminfo

#: Called with a transition's action and one of its steps (`"start"`, `"boot"`).
StepHook = Callable[[str, str], None]


def no_hook(action: str, step: str) -> None:
    """The step hooks of a host that no test set: nothing happens."""


@dataclass
class Host:
    layout: Layout
    settings: Settings
    store: Store
    locks: Locks
    runtime_factory: Callable[[], Runtime]
    clock: Callable[[], float] = time.time
    #: Before each step of a transition runs: may raise, as the step would (a test's failure).
    fail_point: StepHook = no_hook
    #: Right after each step of a transition is recorded (a test's crash: SIGKILL).
    crash_point: StepHook = no_hook
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
