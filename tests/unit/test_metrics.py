"""Pure logic of the metrics module: merging families from several processes, trainer tracking."""

from __future__ import annotations

import grpc
from prometheus_client import generate_latest
from prometheus_client.parser import text_string_to_metric_families
from prometheus_client.registry import Collector, CollectorRegistry

from optserve.server.metrics import ShardMetrics, Trainers, merge


def test_merge_adds_up_equal_samples_and_keeps_one_family_per_name():
    a, b = ShardMetrics("m", 0), ShardMetrics("m", 1)
    for metrics in (a, b):
        metrics.errors("/optserve.v1.Shard/Push", grpc.StatusCode.ABORTED)
        metrics.received_bytes.inc(10)
    b.update_seconds.observe(0.002)
    merged = merge([*a.families(), *b.families()])
    assert len({f.name for f in merged}) == len(merged)

    class Fixed(Collector):
        def collect(self):
            return merged

    registry = CollectorRegistry(auto_describe=False)
    registry.register(Fixed())
    parsed = {
        s.name: s
        for family in text_string_to_metric_families(generate_latest(registry).decode())
        for s in family.samples
        if s.name == "optserve_errors_total"
    }
    errors = parsed["optserve_errors_total"]
    assert errors.value == 2  # one per shard process, same labels: added
    assert errors.labels == {"component": "shard", "method": "Push", "code": "ABORTED"}
    received = [
        (s.labels["shard"], s.value)
        for f in merged
        for s in f.samples
        if s.name == "optserve_received_bytes_total"
    ]
    assert sorted(received) == [("0", 10.0), ("1", 10.0)]  # distinct labels: kept apart


def test_trainers_counts_recent_ones_and_remembers_each():
    now = [1000.0]
    trainers = Trainers(clock=lambda: now[0])
    trainers.saw("a", "ipv4:127.0.0.1:1", version=1, staleness=0)
    now[0] += 400
    trainers.saw("b", "ipv4:127.0.0.1:2", version=2, staleness=1)
    trainers.saw("b", "ipv4:127.0.0.1:2", version=3, staleness=0)
    assert trainers.active(window_s=300) == 1
    assert trainers.active(window_s=1000) == 2
    seen = trainers.snapshot()
    assert seen["b"]["pushes"] == 2 and seen["b"]["version"] == 3
    assert seen["a"]["last_seen"] == 1000.0


def test_only_the_leader_serves_model_wide_series():
    follower = ShardMetrics("m", 1)
    names = {f.name for f in follower.families()}
    assert "optserve_model_version" not in names and "optserve_pushes" not in names
    leader = ShardMetrics("m", 0)
    leader.lead(lambda: {"version": 7, "lr": {"default": 0.5}, "gradient_counters": {"clipped": 2}})
    leader.applied("t", "peer", version=7, staleness=0)
    samples = {s.name: s for f in leader.families() for s in f.samples}
    assert samples["optserve_model_version"].value == 7
    assert samples["optserve_model_lr"].labels == {"model": "m", "group": "default"}
    assert samples["optserve_pushes_total"].value == 1
    assert samples["optserve_gradient_events_total"].labels["event"] == "clipped"
    assert samples["optserve_trainers"].value == 1
