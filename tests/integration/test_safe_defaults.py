"""Safe by default off loopback (issue 17), with real processes, real Ray and real HTTP: `serve`
exits non-zero before starting anything, the metrics endpoint binds 127.0.0.1 and wants its
token, and a burst of scrapes asks the shards once."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
from prometheus_client.metrics_core import GaugeMetricFamily

from optserve.server.metrics import CoordinatorMetrics
from optserve.server.metrics.endpoint import ScrapeCache
from tests.helpers import auth
from tests.helpers.http_get import get

OPTSERVE = [sys.executable, "-m", "optserve.server.cli"]
METRICS_TOKEN = "metrics-token-for-the-test-0123456789"


def test_serve_off_loopback_without_tls_exits_nonzero_and_serves_nothing():
    env = {**os.environ, "OPTSERVE_TOKENS": auth.TOKENS_JSON}
    result = subprocess.run(
        [*OPTSERVE, "serve", "--host", "0.0.0.0", "--port", "0"],
        capture_output=True, text=True, env=env, timeout=120,
    )  # fmt: skip
    assert result.returncode == 1
    assert "without TLS" in result.stderr and "--insecure" in result.stderr
    assert "serving on" not in result.stdout and "Ray" not in result.stderr


class CountingShard:
    """A shard's metrics call, counted."""

    def __init__(self) -> None:
        self.calls = 0

    def metrics(self) -> list:
        self.calls += 1
        gauge = GaugeMetricFamily("optserve_test_fan_out", "calls this shard answered")
        gauge.add_metric([], self.calls)
        return [gauge]

    def count(self) -> int:
        return self.calls


def test_a_burst_of_scrapes_asks_each_real_shard_once(ray_session):
    ray = ray_session
    shards = [ray.remote(CountingShard).options(num_cpus=0).remote() for _ in range(2)]
    metrics = CoordinatorMetrics(shards=lambda: shards)
    # The real fan-out over Ray; a window long enough that the burst never outlives it.
    metrics._scrape_cache = ScrapeCache(metrics._fan_out, ttl_s=3600.0)
    port = metrics.serve("127.0.0.1", 0)
    try:
        texts = [get(f"http://127.0.0.1:{port}/metrics")[1] for _ in range(5)]
        assert ray.get([s.count.remote() for s in shards]) == [1, 1]
        # Both shards answered the one fan-out, merged into one series.
        assert all("optserve_test_fan_out 2.0" in text for text in texts)
    finally:
        metrics.stop()
        for shard in shards:
            ray.kill(shard)


@pytest.mark.slow
def test_a_service_with_a_metrics_token_binds_loopback_and_wants_the_token(ray_session):
    from optserve.server.runtime import start_service

    service = start_service(
        host="127.0.0.1", port=0, name="optserve-metrics-token-test", edge=auth.edge_config(),
        metrics_port=0, metrics_token=METRICS_TOKEN,
    )  # fmt: skip
    try:
        assert service.metrics_address is not None
        assert service.metrics_address.startswith("127.0.0.1:")
        url = f"http://{service.metrics_address}/metrics"
        assert get(url)[0] == 401
        assert get(url, auth.ADMIN)[0] == 401  # the gRPC tokens are not the metrics token
        status, text = get(url, METRICS_TOKEN)
        assert status == 200 and "optserve_models" in text
    finally:
        service.stop(grace_s=1.0)
