"""Pure logic of the metrics module: merging families, trainer tracking, the leader's series."""

from __future__ import annotations

import grpc
from prometheus_client import generate_latest
from prometheus_client.metrics_core import CounterMetricFamily
from prometheus_client.parser import text_string_to_metric_families
from prometheus_client.registry import Collector, CollectorRegistry

from optserve.server.metrics import ShardMetrics, Trainers, UpdateTimer, merge


def exposition(families) -> dict:
    class Fixed(Collector):
        def collect(self):
            return families

    registry = CollectorRegistry(auto_describe=False)
    registry.register(Fixed())
    text = generate_latest(registry).decode()
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


def test_merge_keeps_one_family_per_name_and_every_shard_apart():
    a, b = ShardMetrics("m", 0), ShardMetrics("m", 1)
    for metrics in (a, b):
        metrics.errors("/optserve.v1.Shard/Push", grpc.StatusCode.ABORTED)
        metrics.received_bytes.inc(10)
    b.update_seconds.observe(0.002)
    merged = merge([*a.families(), *b.families()])
    assert len({f.name for f in merged}) == len(merged)
    samples = exposition(merged)
    for shard in ("0", "1"):
        errors = (("code", "ABORTED"), ("component", "shard"), ("method", "Push"),
                  ("model", "m"), ("shard", shard))  # fmt: skip
        assert samples["optserve_errors_total", errors] == 1
        assert samples["optserve_received_bytes_total", (("model", "m"), ("shard", shard))] == 10


def test_merge_adds_up_samples_with_equal_labels():
    one, two = (CounterMetricFamily("x", "x", labels=["a"]) for _ in range(2))
    one.add_metric(["1"], 2)
    two.add_metric(["1"], 3)
    two.add_metric(["2"], 1)
    assert exposition(merge([one, two])) == {
        ("x_total", (("a", "1"),)): 5,
        ("x_total", (("a", "2"),)): 1,
    }


def test_trainers_counts_recent_ones_and_remembers_each():
    now = [1000.0]
    trainers = Trainers(clock=lambda: now[0])
    trainers.saw("a", "ipv4:127.0.0.1:1", based_on=1)
    trainers.decided("a", staleness=0, applied=True)
    now[0] += 400
    trainers.saw("b", "ipv4:127.0.0.1:2", based_on=2)
    trainers.decided("b", staleness=3, applied=False)
    trainers.saw("b", "ipv4:127.0.0.1:2", based_on=3)
    trainers.decided("b", staleness=1, applied=True)
    assert trainers.active(window_s=300) == 1
    assert trainers.active(window_s=1000) == 2
    seen = trainers.snapshot()
    assert seen["b"]["pushes"] == 2 and seen["b"]["applied"] == seen["b"]["refused"] == 1
    assert seen["b"]["version"] == 3 and seen["b"]["staleness"] == 1
    assert seen["a"]["idle_s"] == 400.0
    assert list(trainers.snapshot(newest=1)) == ["b"]


def test_only_the_leader_serves_model_wide_series():
    follower = ShardMetrics("m", 1)
    follower.arrived("t", "peer", 0)
    follower.decided("t", "peer", 0, applied=True)
    names = {f.name for f in follower.families()}
    assert "optserve_model_version" not in names and "optserve_pushes" not in names
    leader = ShardMetrics("m", 0)
    leader.lead(lambda: {"version": 7, "lr": {"default": 0.5}, "gradient_counters": {"clipped": 2}})
    leader.arrived("t", "peer", 6)
    leader.decided("t", "peer", staleness=0, applied=True)
    leader.arrived("t", "peer", 2)
    leader.decided("t", "peer", staleness=5, applied=False)  # refused: not a push applied
    samples = {s.name: s for f in leader.families() for s in f.samples}
    assert samples["optserve_model_version"].value == 7
    assert samples["optserve_model_lr"].labels == {"model": "m", "group": "default"}
    assert samples["optserve_pushes_total"].value == 1
    assert samples["optserve_staleness_count"].value == 1
    assert samples["optserve_gradient_events_total"].labels["event"] == "clipped"
    assert samples["optserve_trainers"].value == 1


def test_the_update_timer_observes_cpu_updates_and_never_raises():
    metrics = ShardMetrics("m", 0)
    timer = metrics.update_timer
    assert isinstance(timer, UpdateTimer)
    timer.end(timer.begin("cpu"))
    timer.end(None)  # a failed begin
    timer.end("not a start")  # a broken one: logged, not raised
    count = {s.name: s.value for f in metrics.families() for s in f.samples}
    assert count["optserve_update_seconds_count"] == 1
