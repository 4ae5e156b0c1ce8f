"""Pure logic of the metrics module: merging families, trainer tracking, the leader's series,
and what is recorded in Ray's metrics (through a recorder standing in for `ray.util.metrics`)."""

from __future__ import annotations

import grpc
import pytest
from prometheus_client import generate_latest
from prometheus_client.metrics_core import CounterMetricFamily
from prometheus_client.parser import text_string_to_metric_families
from prometheus_client.registry import Collector, CollectorRegistry

from optserve.server import metrics as metrics_module
from optserve.server.metrics import (
    STALENESS_BUCKETS,
    UPDATE_BUCKETS,
    CoordinatorMetrics,
    ShardMetrics,
    Trainers,
    UpdateTimer,
    merge,
    ray_boundaries,
)


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


def spying(cls):
    """A subclass of one of Ray's metric classes that records what it is given, after Ray's own
    checks (tag keys and values, positive bounds, positive increments) passed. Ray's metric
    objects record without a running Ray; nothing is exported."""

    class Spy(cls):
        def __init__(self, name, description="", *args, **kwargs):
            super().__init__(name, description, *args, **kwargs)
            self.calls: list[tuple[str, float, dict]] = []
            made[name] = self

        def inc(self, value=1.0, tags=None):
            super().inc(value, tags)
            self.calls.append(("inc", value, tags))

        def observe(self, value, tags=None):
            super().observe(value, tags)
            self.calls.append(("observe", value, tags))

        def set(self, value, tags=None):
            super().set(value, tags)
            self.calls.append(("set", value, tags))

    return Spy


made: dict = {}


@pytest.fixture()
def ray_metrics(monkeypatch):
    """{name: the Ray metric object made for it}, each recording its calls."""
    from ray.util import metrics as ray_util_metrics

    made.clear()
    for kind in ("Counter", "Gauge", "Histogram"):
        monkeypatch.setattr(ray_util_metrics, kind, spying(getattr(ray_util_metrics, kind)))
    return made


SERVICE = {"service": "optserve-test"}


def test_ray_boundaries_are_positive_and_count_the_same_integers():
    assert ray_boundaries(STALENESS_BUCKETS)[:3] == [0.5, 1, 2]
    assert ray_boundaries((0.1, 1)) == [0.1, 1]
    assert ray_boundaries((0, 2, 4)) == [1, 2, 4]


def test_with_ray_on_every_recorded_series_has_a_twin_with_the_same_labels(ray_metrics):
    metrics = ShardMetrics("m", 1, ray_service="optserve-test")
    metrics.received_bytes.inc(10)
    metrics.received_bytes.inc(0)  # counted in the registry, not sent to Ray (it refuses 0)
    metrics.round_wait_seconds.observe(0.25)
    metrics.update_timer.end(metrics.update_timer.begin("cpu"))
    metrics.errors("/optserve.v1.Shard/Push", grpc.StatusCode.ABORTED)
    at = {**SERVICE, "model": "m", "shard": "1"}
    assert ray_metrics["optserve_received_bytes"].calls == [("inc", 10.0, at)]
    assert ray_metrics["optserve_round_wait_seconds"].calls == [("observe", 0.25, at)]
    (timed,) = ray_metrics["optserve_update_seconds"].calls
    assert timed[0] == "observe" and timed[2] == at
    assert ray_metrics["optserve_errors"].calls == [
        ("inc", 1.0, {**at, "component": "shard", "method": "Push", "code": "ABORTED"})
    ]
    assert ray_metrics["optserve_update_seconds"].boundaries == list(UPDATE_BUCKETS)
    # The registry the endpoint serves counts the same, without the service label.
    samples = {s.name: s for f in metrics.families() for s in f.samples}
    assert samples["optserve_received_bytes_total"].value == 10
    assert samples["optserve_received_bytes_total"].labels == {"model": "m", "shard": "1"}
    metrics.stop()


def test_with_ray_off_nothing_is_recorded_in_ray(ray_metrics):
    metrics = ShardMetrics("m", 0)
    metrics.lead(lambda: {"version": 1, "lr": {}, "gradient_counters": {}})
    metrics.received_bytes.inc(10)
    metrics.decided("t", "peer", staleness=0, applied=True)
    assert ray_metrics == {}


def test_the_leaders_state_is_published_to_ray_as_gauges_and_growing_counters(ray_metrics):
    state = {"version": 3, "lr": {"default": 0.5}, "gradient_counters": {"clipped": 2}}
    leader = ShardMetrics("m", 0, ray_service="optserve-test")
    leader.lead(lambda: state)
    leader.stop()  # no background publishing: this test publishes by hand
    leader.arrived("t", "peer", 3)
    leader.decided("t", "peer", staleness=0, applied=True)
    at = {**SERVICE, "model": "m"}
    assert ray_metrics["optserve_pushes"].calls == [("inc", 1.0, at)]
    assert ray_metrics["optserve_staleness"].calls == [("observe", 0.0, at)]
    assert ray_metrics["optserve_staleness"].boundaries[0] == 0.5  # counts staleness 0
    publisher = leader._publisher
    publisher.publish()
    state.update(version=5, gradient_counters={"clipped": 2, "skipped_nonfinite": 1})
    publisher.publish()
    state.update(gradient_counters={"clipped": 1, "skipped_nonfinite": 1})  # went down
    publisher.publish()
    assert [c[1] for c in ray_metrics["optserve_model_version"].calls] == [3.0, 5.0, 5.0]
    assert ray_metrics["optserve_model_lr"].calls[0] == ("set", 0.5, {**at, "group": "default"})
    assert ray_metrics["optserve_trainers"].calls[0][1:] == (1.0, at)
    events = [(c[1], c[2]["event"]) for c in ray_metrics["optserve_gradient_events"].calls]
    # 2 clipped, then 1 skipped (clipped did not grow), then clipped started over at 1.
    assert events == [(2.0, "clipped"), (1.0, "skipped"), (1.0, "clipped")]


def test_a_family_that_cannot_be_published_does_not_stop_the_others(ray_metrics, caplog):
    class Broken:
        name, type, documentation = "optserve_broken", "counter", "x"

        @property
        def samples(self):
            raise RuntimeError("broken")

    good = CounterMetricFamily("optserve_good", "y", labels=["model"])
    good.add_metric(["m"], 3)
    publisher = metrics_module.RayPublisher(lambda: [Broken(), good], SERVICE)
    publisher.stop()
    publisher.publish()
    publisher.publish()
    assert ray_metrics["optserve_good"].calls == [("inc", 3.0, {**SERVICE, "model": "m"})]
    warned = [r for r in caplog.records if "optserve_broken" in r.getMessage()]
    assert len(warned) == 1  # once, not at every publication


def test_a_series_ray_refuses_is_still_served_by_the_endpoint(ray_metrics, monkeypatch):
    from ray.util import metrics as ray_util_metrics

    def refuse(*args, **kwargs):
        raise ValueError("refused")

    monkeypatch.setattr(ray_util_metrics, "Histogram", refuse)
    metrics = ShardMetrics("m", 0, ray_service="optserve-test")
    metrics.update_seconds.observe(0.5)
    metrics.received_bytes.inc(2)
    samples = {s.name: s.value for f in metrics.families() for s in f.samples}
    assert samples["optserve_update_seconds_count"] == 1
    assert ray_metrics["optserve_received_bytes"].calls[0][1] == 2.0


def test_the_coordinator_publishes_its_model_count_and_checkpoint_times(ray_metrics):
    models = [2]
    coordinator = CoordinatorMetrics(models=lambda: models[0], ray_service="optserve-test")
    coordinator.stop()
    coordinator.checkpoint_seconds.labels("m").observe(1.5)
    coordinator._publisher.publish()
    models[0] = 1
    coordinator._publisher.publish()
    assert ray_metrics["optserve_checkpoint_seconds"].calls == [
        ("observe", 1.5, {**SERVICE, "model": "m"})
    ]
    assert ray_metrics["optserve_models"].calls == [("set", 2.0, SERVICE), ("set", 1.0, SERVICE)]


def test_a_ray_recording_that_fails_never_fails_the_call(ray_metrics):
    metrics = ShardMetrics("m", 0, ray_service="optserve-test")
    ray_metrics["optserve_sent_bytes"].inc = None  # not callable: recording raises
    metrics.sent_bytes.inc(4)
    assert {s.name: s.value for f in metrics.families() for s in f.samples}[
        "optserve_sent_bytes_total"
    ] == 4
