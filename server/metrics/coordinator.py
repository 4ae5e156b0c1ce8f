"""The coordinator's metrics, and the one endpoint that merges every shard's."""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Callable, Iterable, Iterator, Sequence
from typing import Any

from prometheus_client import CollectorRegistry
from prometheus_client.metrics_core import (
    GaugeMetricFamily,
    Metric,
)
from prometheus_client.registry import Collector

from optserve.server.metrics.endpoint import ScrapeCache, serve_metrics
from optserve.server.metrics.series import (
    CHECKPOINT_BUCKETS,
    SHARD_SCRAPE_TIMEOUT_S,
    ErrorCounter,
    RayPublisher,
    Series,
    ray_tags,
)

log = logging.getLogger(__name__)


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
    too, tagged with that service's name (each shard records its own). A scrape asks the shards
    at most about once a second (`ScrapeCache`); the coordinator's own series are always fresh."""

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
        self.checkpoint_failures = Series(
            self.registry,
            "optserve_checkpoint_failures",
            "Checkpoint faults of a model, by reason: disk_full, io, timeout, shard_down, "
            "dropped, drop_mark (a drop the store could not record), error",
            ["model", "reason"],
            ray=ray,
        )
        self.checkpoint_fallbacks = Series(
            self.registry,
            "optserve_checkpoint_fallbacks",
            "Broken checkpoints a restore or recovery passed over for an older one, by reason",
            ["model", "reason"],
            ray=ray,
        )
        self._shards = shards or list
        self._models = models or (lambda: 0)
        self._checkpoints = checkpoints or list
        self._server: Any = None
        self._scrape_cache = ScrapeCache(self._fan_out)
        self._publisher = RayPublisher(self._gauges, ray) if ray is not None else None

    def checkpoint_failure(self, model: str, reason: str) -> None:
        self.checkpoint_failures.labels(model, reason).inc()

    def checkpoint_fallback(self, model: str, reason: str) -> None:
        self.checkpoint_fallbacks.labels(model, reason).inc()

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
        """Every family of the service, merged (the shards' from the scrape cache)."""
        families: list[Metric] = [*self._gauges(), *self.registry.collect()]
        families.extend(self._scrape_cache.get(self._shards()))
        return merge(families)

    def _fan_out(self, handles: Sequence[Any]) -> list[Metric]:
        """Every shard's families (one Ray call each; a shard that is late or dead is left out
        of this scrape)."""
        import ray

        families: list[Metric] = []
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
        return families

    def serve(self, host: str, port: int, token_digest: str | None = None) -> int:
        """Serve the metrics at http://host:port/metrics (port 0: any free one); return the
        port. With `token_digest` (the SHA-256 of a bearer token), a scrape must carry that
        token."""
        outer = self

        class _Everything(Collector):
            def collect(self) -> Iterator[Metric]:
                yield from outer.collect()

        registry = CollectorRegistry(auto_describe=False)
        registry.register(_Everything())
        try:
            self._server = serve_metrics(registry, host, port, token_digest)
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
