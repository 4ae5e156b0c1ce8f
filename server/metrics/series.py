"""The series every process serves, and how they are also recorded in Ray's metrics."""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Iterable, Mapping
from typing import Any

import grpc
from prometheus_client import (
    CollectorRegistry,
    Counter,
    Histogram,
    disable_created_metrics,
)
from prometheus_client.metrics_core import (
    Metric,
)

log = logging.getLogger(__name__)

# `*_created` series double every counter and histogram for a timestamp nobody graphs.
disable_created_metrics()

# Every series the endpoint serves (the names as scraped; histograms add _bucket/_sum/_count).
SERIES = (
    "optserve_models",
    "optserve_model_version",
    "optserve_model_lr",
    "optserve_trainers",
    "optserve_pushes_total",
    "optserve_gradient_events_total",
    "optserve_received_bytes_total",
    "optserve_sent_bytes_total",
    "optserve_update_seconds",
    "optserve_round_wait_seconds",
    "optserve_staleness",
    "optserve_errors_total",
    "optserve_checkpoint_seconds",
    "optserve_checkpoint_failures_total",
    "optserve_checkpoint_fallbacks_total",
    "optserve_shard_broken",
    "optserve_updates_since_checkpoint",
    "optserve_last_checkpoint_timestamp_seconds",
)
# Served once a fault happened (a labelled counter has no sample before its first event).
FAULT_SERIES = ("optserve_checkpoint_failures_total", "optserve_checkpoint_fallbacks_total")
# A trainer counts in `optserve_trainers` for this long after its last push.
TRAINER_WINDOW_S = 300.0
MAX_TRAINERS = 10_000
# How long a scrape waits for a shard's families; a shard that does not answer is left out.
SHARD_SCRAPE_TIMEOUT_S = 5.0

UPDATE_BUCKETS = (1e-4, 5e-4, 1e-3, 2.5e-3, 5e-3, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5)
WAIT_BUCKETS = (1e-4, 1e-3, 5e-3, 0.01, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 300)
STALENESS_BUCKETS = (0, 1, 2, 4, 8, 16, 32, 64, 128, 256)
CHECKPOINT_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 900)
# How often the series read from state at scrape time (version, lr, trainers, the gradient
# policy's counters, the model count) are published to Ray's metrics.
RAY_PUBLISH_INTERVAL_S = 5.0


def ray_boundaries(buckets: Iterable[float]) -> list[float]:
    """Ray's histograms take positive boundaries only: a 0 boundary (staleness) becomes half the
    smallest positive one, which counts the same integer observations."""
    positive = [b for b in buckets if b > 0]
    return sorted({*positive, *(min(positive) / 2 for b in buckets if b == 0)})


def ray_tags(service: str | None) -> dict[str, str] | None:
    """The tags every Ray twin of a service's series carries (None: no twins). Ray's own tags
    tell nodes and processes apart, not two optserve services on one cluster."""
    return None if service is None else {"service": service}


def _ray_metric(kind: str, name: str, documentation: str, labels: Iterable[str],
                buckets: Iterable[float] | None = None) -> Any:  # fmt: skip
    """Ray's twin of one series; its node's metrics agent exports it as `ray_<name>`. None if
    Ray refuses it: the series is then served on the endpoint alone."""
    from ray.util import metrics as ray_metrics

    tags = tuple(labels)
    try:
        if kind == "counter":
            return ray_metrics.Counter(name, documentation, tag_keys=tags)
        if kind == "gauge":
            return ray_metrics.Gauge(name, documentation, tag_keys=tags)
        assert buckets is not None
        return ray_metrics.Histogram(name, documentation, ray_boundaries(buckets), tag_keys=tags)
    except Exception:  # noqa: BLE001 - a metric must never stop a shard or the coordinator
        log.warning("%s is not recorded in Ray's metrics", name, exc_info=True)
        return None


class Series:
    """A counter or histogram of this process's registry and, where `ray` gives the constant
    tags of its twin in Ray's metrics (the service), that twin; `labels()` gives one labelled
    series that records to both."""

    def __init__(
        self,
        registry: CollectorRegistry,
        name: str,
        documentation: str,
        labels: Iterable[str],
        *,
        buckets: Iterable[float] | None = None,
        ray: Mapping[str, str] | None = None,
    ) -> None:
        self._labels = tuple(labels)
        if buckets is None:
            self._prom: Any = Counter(name, documentation, self._labels, registry=registry)
        else:
            self._prom = Histogram(
                name, documentation, self._labels, buckets=tuple(buckets), registry=registry
            )
        self._ray_tags = dict(ray or {})
        self._ray = None
        if ray is not None:
            kind = "counter" if buckets is None else "histogram"
            tag_keys = [*self._ray_tags, *self._labels]
            self._ray = _ray_metric(kind, name, documentation, tag_keys, buckets)

    def labels(self, *values: str) -> _Labelled:
        tags = {**self._ray_tags, **dict(zip(self._labels, values, strict=True))}
        return _Labelled(self._prom.labels(*values), self._ray, tags)


class _Labelled:
    __slots__ = ("_prom", "_ray", "_tags")

    def __init__(self, prom: Any, ray: Any, tags: dict[str, str]) -> None:
        self._prom, self._ray, self._tags = prom, ray, tags

    def inc(self, amount: float = 1.0) -> None:
        self._prom.inc(amount)
        if self._ray is not None and amount > 0:  # Ray's counters refuse 0
            self._record(self._ray.inc, amount)

    def observe(self, value: float) -> None:
        self._prom.observe(value)
        if self._ray is not None:
            self._record(self._ray.observe, value)

    def _record(self, record: Callable[..., None], value: float) -> None:
        try:
            record(float(value), tags=self._tags)
        except Exception:  # noqa: BLE001 - a metric must never fail the call it counts
            log.debug("recording a Ray metric failed", exc_info=True)


class RayPublisher:
    """Publishes families read at scrape time (gauges of state, and counters kept elsewhere)
    to Ray's metrics every `interval_s`, from a daemon thread, each sample with the constant
    `tags` added: gauges are set, counters advance by what they grew since the last
    publication (a counter at 0 is not sent: Ray's counters only take increments)."""

    def __init__(
        self,
        collect: Callable[[], Iterable[Metric]],
        tags: Mapping[str, str],
        interval_s: float = RAY_PUBLISH_INTERVAL_S,
    ) -> None:
        self._collect = collect
        self._tags = dict(tags)
        self._lock = threading.Lock()
        self._metrics: dict[tuple, Any] = {}
        self._published: dict[tuple, float] = {}
        self._failing: set[str] = set()
        self._stop = threading.Event()
        self._thread = threading.Thread(
            target=self._run, args=(interval_s,), name="optserve-ray-metrics", daemon=True
        )
        self._thread.start()

    def publish(self) -> None:
        with self._lock:
            for family in self._collect():
                try:
                    self._publish(family)
                except Exception:  # noqa: BLE001 - the other families are still published
                    if family.name not in self._failing:  # once, not every interval
                        self._failing.add(family.name)
                        log.warning("cannot publish %s to Ray's metrics", family.name,
                                    exc_info=True)  # fmt: skip

    def _publish(self, family: Metric) -> None:
        for sample in family.samples:
            tags = {**self._tags, **sample.labels}
            kind = "gauge" if family.type == "gauge" else "counter"
            key = (family.name, tuple(sorted(tags)))
            if key not in self._metrics:
                self._metrics[key] = _ray_metric(kind, family.name, family.documentation, key[1])
            metric = self._metrics[key]
            if metric is None:
                continue
            if kind == "gauge":
                metric.set(float(sample.value), tags=tags)
                continue
            series = (family.name, tuple(sorted(tags.items())))
            previous = self._published.get(series, 0.0)
            # A counter that went down started over: all of its value is new. (None does today:
            # a restored model's leader is a new process, with a new publisher.)
            grown = sample.value - previous if sample.value >= previous else sample.value
            if grown > 0:
                metric.inc(float(grown), tags=tags)
            self._published[series] = sample.value

    def _run(self, interval_s: float) -> None:
        while not self._stop.wait(interval_s):
            self.publish()

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not threading.current_thread():
            self._thread.join(timeout=5.0)


class ErrorCounter:
    """`optserve_errors_total{component,model,shard,method,code}` of one endpoint (EdgeGuard's
    `on_error`). A shard's carry its model and index; the coordinator's leave them empty. Every
    series lives in one process, so a scrape never adds up counters of processes that come and
    go (which would look like counter resets)."""

    def __init__(
        self,
        registry: CollectorRegistry,
        component: str,
        model: str = "",
        shard: str = "",
        ray: Mapping[str, str] | None = None,
    ) -> None:
        self._where = (component, model, shard)
        self._counter = Series(
            registry,
            "optserve_errors",
            "RPCs answered with an error, by gRPC status code",
            ["component", "model", "shard", "method", "code"],
            ray=ray,
        )

    def __call__(self, method: str, code: grpc.StatusCode) -> None:
        self._counter.labels(*self._where, method.rsplit("/", 1)[-1], code.name).inc()


# The sequencer's counter names -> the `event` label.
GRADIENT_EVENTS = {
    "skipped_nonfinite": "skipped",
    "zeroed_nonfinite": "zeroed",
    "clipped": "clipped",
    "refused_norm": "refused_norm",
    # Updates computed on copies first (a gradient norm beyond VERIFY_ABOVE_NORM), and those
    # refused because they would have left non-finite weights or state.
    "verified": "verified",
    "refused_nonfinite_update": "refused_nonfinite_update",
}
