"""A shard's metrics: its data plane, and on a model's leader its trainers and pushes."""

from __future__ import annotations

import collections
import logging
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

from prometheus_client import (
    CollectorRegistry,
)
from prometheus_client.metrics_core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    Metric,
)
from prometheus_client.registry import Collector

from optserve.server.metrics.series import (
    GRADIENT_EVENTS,
    MAX_TRAINERS,
    STALENESS_BUCKETS,
    TRAINER_WINDOW_S,
    UPDATE_BUCKETS,
    WAIT_BUCKETS,
    ErrorCounter,
    RayPublisher,
    Series,
    ray_tags,
)

log = logging.getLogger(__name__)


class Trainers:
    """The trainers that push to a model (its leader shard sees every push): for status and
    `optserve_trainers`. Keeps the most recent MAX_TRAINERS."""

    def __init__(self, clock: Callable[[], float] = time.time) -> None:
        self._clock = clock
        self._lock = threading.Lock()
        self._seen: dict[str, dict[str, Any]] = {}

    def saw(self, trainer: str, peer: str, based_on: int, local_steps: int = 0) -> None:
        """A push of `trainer`, computed on version `based_on`, arrived (`local_steps`: its
        inner steps so far, under local SGD)."""
        with self._lock:
            entry = self._seen.pop(trainer, None) or {
                "pushes": 0, "applied": 0, "refused": 0, "staleness": 0,
                "first_seen": self._clock(),
            }  # fmt: skip
            entry.update(
                pushes=entry["pushes"] + 1, last_seen=self._clock(), peer=peer, version=based_on,
                local_steps=local_steps,
            )  # fmt: skip
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

    def arrived(self, trainer: str, peer: str, based_on: int, local_steps: int = 0) -> None:
        """The leader received a push (applied or not): the trainer is alive."""
        if self._pushes is not None:
            self.trainers.saw(trainer or peer, peer, based_on, local_steps)

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
            "What the gradient policy did: skipped, zeroed, clipped or refused pushes; updates "
            "verified on copies, and refused for leaving non-finite values",
            labels=["model", "event"],
        )
        for event, count in sorted(state["gradient_counters"].items()):
            events.add_metric([model, GRADIENT_EVENTS.get(event, event)], count)
        yield events
