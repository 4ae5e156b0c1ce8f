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

from optserve.server.metrics.coordinator import CoordinatorMetrics, merge
from optserve.server.metrics.series import (
    FAULT_SERIES,
    SERIES,
    STALENESS_BUCKETS,
    TRAINER_WINDOW_S,
    UPDATE_BUCKETS,
    RayPublisher,
    ray_boundaries,
)
from optserve.server.metrics.shard import ShardMetrics, Trainers, UpdateTimer

__all__ = [
    "FAULT_SERIES",
    "SERIES",
    "STALENESS_BUCKETS",
    "TRAINER_WINDOW_S",
    "UPDATE_BUCKETS",
    "CoordinatorMetrics",
    "RayPublisher",
    "ShardMetrics",
    "Trainers",
    "UpdateTimer",
    "merge",
    "ray_boundaries",
]
