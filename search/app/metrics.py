"""The service's Prometheus metrics, one registry per app (tests run several apps in one process).

Under `serve --workers N` the workers are separate processes: `serve` sets PROMETHEUS_MULTIPROC_DIR
(before any worker imports prometheus_client), every worker writes its samples to files there, and
`/metrics` on any worker answers the sum over all of them (`exposition`). Gauges that describe one
worker (its generation, its model, its drift window) carry a `pid` label there ("liveall").
"""
from __future__ import annotations

import os
import warnings
from typing import TYPE_CHECKING

from prometheus_client import Counter, CollectorRegistry, Gauge, Histogram, generate_latest, multiprocess

from ltr.drift import PROMETHEUS_GAUGES

if TYPE_CHECKING:
    from search.app.state import ServingState

STAGE_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5)


class ServiceMetrics:
    def __init__(self) -> None:
        if multiprocess_dir():  # clear() is a no-op there (it warns each time): series are zeroed instead
            warnings.filterwarnings("ignore", message="Clearing labels has not been implemented", category=UserWarning)
        self.registry = CollectorRegistry()
        self.requests = Counter("ltr_search_requests_total", "HTTP requests by route and status",
                                ["method", "route", "status"], registry=self.registry)
        self.latency = Histogram("ltr_search_request_seconds", "HTTP request latency by route", ["route"],
                                 buckets=STAGE_BUCKETS, registry=self.registry)
        self.stages = Histogram("ltr_search_stage_seconds", "search latency per pipeline stage", ["stage"],
                                buckets=STAGE_BUCKETS, registry=self.registry)
        self.events = Counter("ltr_search_events_total", "behaviour events stored, by type", ["type"], registry=self.registry)
        self.index_info = Gauge("ltr_search_index_generation_info", "the active index generation (value 1)",
                                ["index", "generation"], registry=self.registry, multiprocess_mode="liveall")
        self.model_info = Gauge("ltr_search_model_info", "the active ranking model (value 1; 'none' = fused order)",
                                ["version"], registry=self.registry, multiprocess_mode="liveall")
        self.interleaved = Counter("ltr_search_interleaved_requests_total",
                                   "ltr requests served as an interleaving of the active model (A) and B",
                                   ["model_a", "model_b"], registry=self.registry)
        self.shadow_scorings = Counter("ltr_search_shadow_scorings_total",
                                       "ltr request windows the shadow model also ranked (logged, never shown)",
                                       ["model"], registry=self.registry)
        self.drift = {name: Gauge(name, help_text, list(labels), registry=self.registry, multiprocess_mode="liveall")
                      for name, (help_text, labels) in PROMETHEUS_GAUGES.items()}
        self.behaviour_failures = Counter("ltr_search_behaviour_update_failures_total",
                                          "event batches stored but not yet applied to the behaviour aggregates "
                                          "(the next batch or `ltr-search behaviour update` catches up)",
                                          registry=self.registry)
        self.experiment_failures = Counter("ltr_search_experiment_failures_total",
                                           "experiment failures (served responses unaffected), by experiment and stage",
                                           ["experiment", "stage"], registry=self.registry)
        self.backend_errors = Counter("ltr_search_backend_errors_total",
                                      "requests answered 503 because the Elasticsearch backend failed", registry=self.registry)
        self.store_failures = Counter("ltr_search_store_write_failures_total",
                                      "writes that failed on an unavailable store (searches are still served; "
                                      "store=request_log: pages not logged, store=events: batches answered 503)",
                                      ["store"], registry=self.registry)
        self.degraded: dict[str, str] = {}  # store -> its last write error, until a write succeeds; /ready reports it

    def set_generation(self, index: str, generation: str) -> None:
        _set_only(self.index_info, (index, generation))

    def set_model(self, version: str | None) -> None:
        _set_only(self.model_info, (version or "none",))

    def store_failed(self, store: str, exc: BaseException) -> None:
        """A write to `store` failed: counted, and the store is degraded until a write succeeds."""
        self.store_failures.labels(store).inc()
        self.degraded[store] = f"{type(exc).__name__}: {exc}"

    def store_ok(self, store: str) -> None:
        if store in self.degraded:
            self.degraded.pop(store, None)

    def degraded_reasons(self) -> dict[str, str]:
        """Store -> its last write error, for stores not written successfully since (a copy: request
        threads change the dict while /ready reads it)."""
        return dict(self.degraded)

    def exposition(self) -> bytes:
        """The Prometheus text: this app's registry, or every worker's samples under `serve --workers N`."""
        if not multiprocess_dir():
            return generate_latest(self.registry)
        registry = CollectorRegistry()
        multiprocess.MultiProcessCollector(registry)
        return generate_latest(registry)


def multiprocess_dir() -> str | None:
    """The shared samples folder of `serve --workers N` (prometheus_client's multiprocess mode)."""
    return os.environ.get("PROMETHEUS_MULTIPROC_DIR") or None


def _set_only(gauge: Gauge, labels: tuple[str, ...]) -> None:
    """One series at 1, the others gone. In multiprocess mode a cleared series would live on in
    the worker's file with its last value, so every earlier series is first set to 0."""
    for child in list(gauge._metrics.values()):  # prometheus_client keeps no public list of children
        child.set(0)
    if not multiprocess_dir():
        gauge.clear()
    gauge.labels(*labels).set(1)


def refresh_generation_metrics(metrics: ServiceMetrics, state: "ServingState") -> None:
    """The served generation and model, and the experiment models that failed to load."""
    snapshot = state.snapshot
    if snapshot is not None:
        metrics.set_generation(snapshot.index.name, snapshot.index.generation_id)
        metrics.set_model(snapshot.model_version)
        for experiment, _ in snapshot.experiments.errors if snapshot.experiments else ():
            metrics.experiment_failures.labels(experiment, "load").inc()
