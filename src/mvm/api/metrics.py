"""`/metrics` (Prometheus): instances by tenant, pool and state, read from the store at each
scrape; transition and build durations and counts of refusals, reconcile errors and idle
moves, read from the events table incrementally (by id) at each scrape.

Durations come from the events' `duration` column (seconds a transition or build took);
events without one (older rows) are counted nowhere."""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterable
from typing import Any

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from mvm.context import Host
from mvm.model import Reason
from mvm.services import events, views

CONTENT_TYPE = CONTENT_TYPE_LATEST
#: Transition event kinds whose durations are measured, and their `action` label.
TRANSITIONS = {"instance.start": "boot", "instance.resume": "resume", "instance.wake": "wake",
               "instance.sleep": "sleep"}
TRANSITION_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1, 2, 3, 5, 10, 20, 30, 60, 120)
BUILD_BUCKETS = (1, 5, 15, 30, 60, 120, 300, 600, 1200, 1800, 3600)
BATCH = 10_000


class Instances(Collector):
    """`mvm_instances{tenant,pool,state}`: every pool, every state (0 included)."""

    def __init__(self, host: Callable[[], Host]) -> None:
        self.host = host

    def collect(self) -> Iterable[Metric]:
        g = GaugeMetricFamily("mvm_instances", "Instances by tenant, pool and state (from the store)",
                              labels=["tenant", "pool", "state"])
        counts = views.state_counts(self.host())
        for (tenant, pool, state), n in sorted(counts.items()):
            g.add_metric([tenant, pool, state], n)
        yield g


class Metrics:
    def __init__(self, host: Callable[[], Host]) -> None:
        self.host = host
        self.registry = CollectorRegistry(auto_describe=True)
        self.registry.register(Instances(host))
        r = self.registry
        self.transitions = Histogram("mvm_transition_seconds", "Seconds an instance transition took",
                                     ["action"], buckets=TRANSITION_BUCKETS, registry=r)
        self.builds = Histogram("mvm_build_seconds", "Seconds a pool build took", buckets=BUILD_BUCKETS,
                                registry=r)
        self.reconcile_errors = Counter("mvm_reconcile_errors", "Reconcile passes of a pool that failed",
                                        registry=r)
        self.refusals = Counter("mvm_admission_refusals", "Starts, wakes or scales refused by quota or memory "
                                "admission", registry=r)
        self.idle_moves = Counter("mvm_idle_moves", "Instances the idle policy moved (warm, sleep)", registry=r)
        for action in TRANSITIONS.values():
            self.transitions.labels(action)  # (each series present from the first scrape)
        self.after = 0
        self.lock = threading.Lock()

    def scrape(self) -> bytes:
        with self.lock:
            self._read_events()
            return generate_latest(self.registry)

    def _read_events(self) -> None:
        ctx = self.host()
        while True:
            rows = events.after(ctx, None, self.after, BATCH)
            for row in rows:
                self.count(row)
                self.after = max(self.after, int(row["id"]))
            if len(rows) < BATCH:
                return

    def count(self, row: dict[str, Any]) -> None:
        kind, reason, duration = str(row.get("kind", "")), row.get("reason"), row.get("duration")
        if isinstance(duration, int | float):
            if kind in TRANSITIONS:
                self.transitions.labels(TRANSITIONS[kind]).observe(duration)
            elif kind == "pool.build":
                self.builds.observe(duration)
        if kind == "agent.reconcile-error":
            self.reconcile_errors.inc()
        admission = getattr(Reason, "ADMISSION", "admission")
        if reason == admission or (kind.endswith("-refused") and reason in (Reason.QUOTA, admission)):
            self.refusals.inc()
        if reason == Reason.POLICY and kind.startswith("instance."):
            self.idle_moves.inc()
