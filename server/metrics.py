"""Prometheus metrics of the coordinator and the shards, served on a port of their own.

Every process keeps its own `prometheus_client` registry: each shard counts what its data plane
does (bytes, update and wait times; the model's leader also counts pushes, staleness, trainers and
the gradient policy's actions), the coordinator counts checkpoints and its own errors. The
coordinator's HTTP endpoint (`optserve serve --metrics-port`) gathers every shard's families over
Ray when scraped and merges them, so one scrape target covers the whole service.

With Ray's metrics on (the default of `optserve serve`; `--no-ray-metrics` turns them off),
every series is also recorded in Ray's metrics (`ray.util.metrics`), the Ray convention for an
application's metrics: each node's Ray metrics agent exports them beside Ray's own, as
`ray_optserve_*` with a `service` label (the coordinator actor's name) and Ray's node and worker
labels, to whatever already scrapes the Ray cluster (Ray's Prometheus service discovery,
KubeRay's PodMonitor). Exporting needs `ray[default]` on the nodes; with a minimal Ray the
series are recorded (a few microseconds each) but not exported.
"""

from __future__ import annotations

import collections
import contextlib
import logging
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Mapping
from typing import Any

import grpc
from prometheus_client import (
    CollectorRegistry,
    Counter,
    Histogram,
    disable_created_metrics,
    start_http_server,
)
from prometheus_client.metrics_core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    Metric,
)
from prometheus_client.registry import Collector

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
    "optserve_shard_broken",
    "optserve_updates_since_checkpoint",
    "optserve_last_checkpoint_timestamp_seconds",
)
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


class Trainers:
    """The trainers that push to a model (its leader shard sees every push): for status and
    `optserve_trainers`. Keeps the most recent MAX_TRAINERS."""

    def __init__(self, clock: Callable[[], float] = time.time) -> None:
        self._clock = clock
        self._lock = threading.Lock()
        self._seen: dict[str, dict[str, Any]] = {}

    def saw(self, trainer: str, peer: str, based_on: int) -> None:
        """A push of `trainer`, computed on version `based_on`, arrived."""
        with self._lock:
            entry = self._seen.pop(trainer, None) or {
                "pushes": 0, "applied": 0, "refused": 0, "staleness": 0,
                "first_seen": self._clock(),
            }  # fmt: skip
            entry.update(
                pushes=entry["pushes"] + 1, last_seen=self._clock(), peer=peer, version=based_on
            )
            self._seen[trainer] = entry  # most recent last
            while len(self._seen) > MAX_TRAINERS:
                del self._seen[next(iter(self._seen))]

    def decided(self, trainer: str, staleness: int, applied: bool) -> None:
        with self._lock:
            entry = self._seen.get(trainer)
            if entry is not None:
                entry["applied" if applied else "refused"] += 1
                entry["staleness"] = staleness

    def active(self, window_s: float = TRAINER_WINDOW_S) -> int:
        cutoff = self._clock() - window_s
        with self._lock:
            return sum(1 for e in self._seen.values() if e["last_seen"] >= cutoff)

    def snapshot(self, newest: int = MAX_TRAINERS) -> dict[str, dict[str, Any]]:
        """The `newest` most recently seen trainers, each with `idle_s` (seconds since its
        last push, by this process's clock)."""
        now = self._clock()
        with self._lock:
            recent = list(self._seen.items())[-newest:] if newest > 0 else []
            return {name: {**e, "idle_s": now - e["last_seen"]} for name, e in recent}


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


class ShardMetrics:
    """What one shard measures. `leader_view()` (set on the model's leader) supplies the
    model-wide gauges and the gradient policy's counters at scrape time. With `ray_service`,
    every series is recorded in Ray's metrics too, tagged with that service's name."""

    def __init__(self, model: str, shard: int, ray_service: str | None = None) -> None:
        self.model = model
        self.registry = CollectorRegistry(auto_describe=False)
        self._ray = ray = ray_tags(ray_service)
        at = (model, str(shard))
        both = ["model", "shard"]
        r = self.registry
        self.received_bytes = Series(
            r, "optserve_received_bytes", "Gradient bytes pushed to a shard", both, ray=ray
        ).labels(*at)
        self.sent_bytes = Series(
            r, "optserve_sent_bytes", "Weight bytes pulled from a shard", both, ray=ray
        ).labels(*at)
        self.update_seconds = Series(
            r, "optserve_update_seconds", "Time to apply one update on a shard", both,
            buckets=UPDATE_BUCKETS, ray=ray,
        ).labels(*at)  # fmt: skip
        self.round_wait_seconds = Series(
            r,
            "optserve_round_wait_seconds",
            "Time from a push's arrival on a shard until its update is decided "
            "(in sync mode, the wait for the round to fill)",
            both, buckets=WAIT_BUCKETS, ray=ray,
        ).labels(*at)  # fmt: skip
        self.errors = ErrorCounter(r, "shard", model, str(shard), ray=ray)
        self.update_timer = UpdateTimer(self.update_seconds)
        self.trainers = Trainers()
        self.shard = str(shard)
        self.leader_view: Callable[[], dict[str, Any]] | None = None
        self.health: Callable[[], dict[str, Any]] | None = None
        self._pushes: Any = None
        self._staleness: Any = None
        self._leader = _StateCollector(self)
        self.registry.register(self._leader)
        self._publisher: RayPublisher | None = None

    def _publish_state(self) -> None:
        """Publish the gauges read from state to Ray's metrics too (once)."""
        if self._ray is not None and self._publisher is None:
            self._publisher = RayPublisher(self._leader.collect, self._ray)

    def watch_health(self, health: Callable[[], dict[str, Any]]) -> None:
        """Serve `optserve_shard_broken` from `health()` (ShardState.health)."""
        self.health = health
        self._publish_state()

    def lead(self, view: Callable[[], dict[str, Any]]) -> None:
        """Make this shard its model's leader: it counts pushes and staleness model-wide."""
        self.leader_view = view
        self._pushes = Series(
            self.registry, "optserve_pushes", "Pushes applied (each push of a sync round counts)",
            ["model"], ray=self._ray,
        ).labels(self.model)  # fmt: skip
        self._staleness = Series(
            self.registry,
            "optserve_staleness",
            "Versions between the one a push was computed on and the one it was applied to",
            ["model"], buckets=STALENESS_BUCKETS, ray=self._ray,
        ).labels(self.model)  # fmt: skip
        self._publish_state()

    def stop(self) -> None:
        if self._publisher is not None:
            self._publisher.stop()

    def decided(self, trainer: str, peer: str, staleness: int, applied: bool) -> None:
        """The leader's decision on a push of `trainer`: applied (as part of an update) or
        refused."""
        if self._pushes is None:
            return
        if applied:
            self._pushes.inc()
            self._staleness.observe(staleness)
        self.trainers.decided(trainer or peer, staleness, applied)

    def arrived(self, trainer: str, peer: str, based_on: int) -> None:
        """The leader received a push (applied or not): the trainer is alive."""
        if self._pushes is not None:
            self.trainers.saw(trainer or peer, peer, based_on)

    def waited(self, seconds: float) -> None:
        """A staged push waited this long for its decision (its sync round, the leader)."""
        self.round_wait_seconds.observe(seconds)

    def families(self) -> list[Metric]:
        self.update_timer.drain()
        return list(self.registry.collect())


class UpdateTimer:
    """Times updates without stalling them: on the CPU with the clock, on CUDA with events
    that are read once the GPU has passed them (at the next update or scrape), so the update
    path never waits for the device."""

    MAX_PENDING = 1024

    def __init__(self, histogram: Any) -> None:
        self._histogram = histogram
        self._pending: collections.deque = collections.deque()
        self._lock = threading.Lock()

    def begin(self, device: Any) -> Any:
        try:
            if getattr(device, "type", "cpu") == "cuda":
                import torch

                event = torch.cuda.Event(enable_timing=True)
                event.record()
                return event
            return time.perf_counter()
        except Exception:  # noqa: BLE001 - timing must never fail an update
            return None

    def end(self, started: Any) -> None:
        try:
            if started is None:
                return
            if isinstance(started, float):
                self._histogram.observe(time.perf_counter() - started)
                return
            import torch

            finished = torch.cuda.Event(enable_timing=True)
            finished.record()
            with self._lock:
                self._pending.append((started, finished))
                while len(self._pending) > self.MAX_PENDING:
                    self._pending.popleft()
            self.drain()
        except Exception:  # noqa: BLE001
            log.debug("update timing failed", exc_info=True)

    def drain(self) -> None:
        """Observe the CUDA updates the device has finished."""
        with self._lock:
            while self._pending and self._pending[0][1].query():
                started, finished = self._pending.popleft()
                self._histogram.observe(started.elapsed_time(finished) / 1000.0)


class _StateCollector(Collector):
    """Gauges read at scrape time from a shard's state: whether it is broken; and on the
    model's leader, version, lr, trainers, and the gradient policy's counters."""

    def __init__(self, metrics: ShardMetrics) -> None:
        self._metrics = metrics

    def collect(self) -> Iterator[Metric]:
        model = self._metrics.model
        if self._metrics.health is not None:
            broken = GaugeMetricFamily(
                "optserve_shard_broken",
                "1 while a shard no longer matches its model's other shards (the coordinator "
                "then restores the model from its newest checkpoint)",
                labels=["model", "shard"],
            )
            broken.add_metric([model, self._metrics.shard],
                              float(self._metrics.health()["broken"] is not None))  # fmt: skip
            yield broken
        view = self._metrics.leader_view
        if view is None:
            return
        state = view()
        version = GaugeMetricFamily(
            "optserve_model_version", "Updates applied to the model", labels=["model"]
        )
        version.add_metric([model], state["version"])
        yield version
        lr = GaugeMetricFamily(
            "optserve_model_lr", "Current learning rate of each parameter group",
            labels=["model", "group"],
        )  # fmt: skip
        for group, value in sorted(state["lr"].items()):
            lr.add_metric([model, group], value)
        yield lr
        trainers = GaugeMetricFamily(
            "optserve_trainers",
            f"Distinct trainers that pushed in the last {TRAINER_WINDOW_S:.0f} seconds",
            labels=["model"],
        )
        trainers.add_metric([model], self._metrics.trainers.active())
        yield trainers
        events = CounterMetricFamily(
            "optserve_gradient_events",
            "What the gradient policy did: skipped, zeroed, clipped or refused pushes",
            labels=["model", "event"],
        )
        for event, count in sorted(state["gradient_counters"].items()):
            events.add_metric([model, GRADIENT_EVENTS.get(event, event)], count)
        yield events


# The sequencer's counter names -> the `event` label.
GRADIENT_EVENTS = {
    "skipped_nonfinite": "skipped",
    "zeroed_nonfinite": "zeroed",
    "clipped": "clipped",
    "refused_norm": "refused_norm",
}


def merge(families: Iterable[Metric]) -> list[Metric]:
    """One family per name (every shard serves the same families, with its own labels);
    samples with the same name and labels, if any, are added up."""
    merged: dict[str, Metric] = {}
    values: dict[str, dict[tuple, float]] = {}
    for family in families:
        target = merged.get(family.name)
        if target is None:
            target = merged[family.name] = Metric(family.name, family.documentation, family.type)
            values[family.name] = {}
        for sample in family.samples:
            key = (sample.name, tuple(sorted(sample.labels.items())))
            values[family.name][key] = values[family.name].get(key, 0.0) + sample.value
    for name, family in merged.items():
        for (sample_name, labels), value in values[name].items():
            family.add_sample(sample_name, dict(labels), value)
    return list(merged.values())


class CoordinatorMetrics:
    """The coordinator's registry, and the collector that gathers every shard's at scrape time.

    `shards()` returns the Ray handles of every model's shards, `models()` how many models
    the server holds. With `ray_service`, the coordinator's series are recorded in Ray's metrics
    too, tagged with that service's name (each shard records its own)."""

    def __init__(
        self,
        shards: Callable[[], list[Any]] | None = None,
        models: Callable[[], int] | None = None,
        ray_service: str | None = None,
        checkpoints: Callable[[], list[tuple[str, int | None, float | None]]] | None = None,
    ) -> None:
        ray = ray_tags(ray_service)
        self.registry = CollectorRegistry(auto_describe=False)
        self.errors = ErrorCounter(self.registry, "coordinator", ray=ray)
        self.checkpoint_seconds = Series(
            self.registry,
            "optserve_checkpoint_seconds",
            "Time to take and write a checkpoint of a model",
            ["model"],
            buckets=CHECKPOINT_BUCKETS,
            ray=ray,
        )
        self._shards = shards or list
        self._models = models or (lambda: 0)
        self._checkpoints = checkpoints or list
        self._server: Any = None
        self._publisher = RayPublisher(self._gauges, ray) if ray is not None else None

    def _gauges(self) -> list[Metric]:
        models = GaugeMetricFamily("optserve_models", "Models the server holds")
        models.add_metric([], self._models())
        at_risk = GaugeMetricFamily(
            "optserve_updates_since_checkpoint",
            "Updates applied since the model's newest checkpoint: what losing a shard costs",
            labels=["model"],
        )
        last = GaugeMetricFamily(
            "optserve_last_checkpoint_timestamp_seconds",
            "Unix time of the model's newest checkpoint",
            labels=["model"],
        )
        for model, since, when in self._checkpoints():
            if since is not None:
                at_risk.add_metric([model], since)
            if when is not None:
                last.add_metric([model], when)
        return [models, at_risk, last]

    def collect(self) -> list[Metric]:
        """Every family of the service, merged."""
        import ray

        families: list[Metric] = [*self._gauges(), *self.registry.collect()]
        handles = self._shards()
        refs = [actor.metrics.remote() for actor in handles]
        if refs:
            ready, _ = ray.wait(refs, num_returns=len(refs), timeout=SHARD_SCRAPE_TIMEOUT_S)
            for ref in ready:
                try:
                    families.extend(ray.get(ref))
                except Exception as exc:  # noqa: BLE001 - a dead shard must not stop a scrape
                    log.warning("a shard's metrics are missing from this scrape: %r", exc)
            late = [ref for ref in refs if ref not in set(ready)]
            if late:
                log.warning("%d shard(s) did not answer the metrics scrape in time", len(late))
                for ref in late:  # not left queued behind whatever holds the shard
                    with contextlib.suppress(Exception):
                        ray.cancel(ref)
        return merge(families)

    def serve(self, host: str, port: int) -> int:
        """Serve the metrics at http://host:port/metrics (port 0: any free one); return the
        port."""
        outer = self

        class _Everything(Collector):
            def collect(self) -> Iterator[Metric]:
                yield from outer.collect()

        registry = CollectorRegistry(auto_describe=False)
        registry.register(_Everything())
        try:
            self._server, _ = start_http_server(port, addr=host.strip("[]"), registry=registry)
        except OSError as exc:
            raise RuntimeError(
                f"cannot serve metrics on {host}:{port} ({exc}); pick another --metrics-port, "
                "0 for any free one, or --no-metrics"
            ) from exc
        return int(self._server.server_address[1])

    def stop(self) -> None:
        if self._publisher is not None:
            self._publisher.stop()
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None
