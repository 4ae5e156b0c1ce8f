"""The Prometheus endpoint: scraped over real HTTP, parsed with Prometheus's text-format parser;
and the same series exported by Ray's metrics agent (`ray.util.metrics`, the Ray convention)."""

from __future__ import annotations

import time
import urllib.request

import pytest
import torch
from prometheus_client.parser import text_string_to_metric_families

from optserve.client import Aborted, ParameterServerClient, Unauthenticated
from optserve.server.metrics import FAULT_SERIES, SERIES
from optserve.server.runtime import COORDINATOR_NAME


def scrape(service) -> dict[str, list]:
    """{sample name: [(labels, value), ...]} from one GET of /metrics."""
    assert service.metrics_address is not None, "the session service serves metrics"
    return scrape_url(f"http://{service.metrics_address}/metrics")


def scrape_url(url: str) -> dict[str, list]:
    with urllib.request.urlopen(url, timeout=30) as reply:
        assert reply.status == 200
        assert reply.headers["Content-Type"].startswith("text/plain")
        text = reply.read().decode()
    samples: dict[str, list] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            samples.setdefault(sample.name, []).append((sample.labels, sample.value))
    return samples


def value(samples, name, **labels) -> float:
    """The one sample of `name` whose labels include `labels`."""
    found = [v for ls, v in samples.get(name, []) if all(ls.get(k) == x for k, x in labels.items())]
    assert len(found) == 1, f"{name}{labels}: {found} in {samples.get(name)}"
    return found[0]


def total(samples, name, **labels) -> float:
    return sum(
        v for ls, v in samples.get(name, []) if all(ls.get(k) == x for k, x in labels.items())
    )


def test_metrics_count_pushes_bytes_times_staleness_errors_and_checkpoints(
    service, client, model_name
):
    before = scrape(service)
    params = {"w": torch.zeros(300), "b": torch.zeros(20)}
    numel = 320
    client.create_model(model_name, params, {"name": "sgd", "lr": 0.1}, num_shards=2)
    grads = {"w": torch.ones(300), "b": torch.ones(20)}
    for step in range(4):
        client.push(model_name, grads, version=step, trainer=f"t{step % 2}")
    client.push(model_name, grads, version=2, trainer="t0")  # two updates stale
    weights, _ = client.push_and_pull(model_name, grads, version=5, trainer="t1")
    assert weights["w"].shape == (300,)
    client.pull(model_name)
    with pytest.raises(Aborted):  # a version from the future: refused by the shards
        client.push(model_name, grads, version=999)
    bad = ParameterServerClient(service.address, token="not-a-valid-token-0123456789")
    with bad, pytest.raises(Unauthenticated):
        bad.list_models()
    client.checkpoint(model_name)

    samples = scrape(service)
    for name in set(SERIES) - set(FAULT_SERIES):  # every documented series is served
        assert any(s == name or s.startswith(f"{name}_") for s in samples), name
    pushes = 6
    assert value(samples, "optserve_pushes_total", model=model_name) == pushes
    assert value(samples, "optserve_model_version", model=model_name) == pushes
    assert value(samples, "optserve_model_lr", model=model_name, group="default") == 0.1
    assert value(samples, "optserve_trainers", model=model_name) == 3  # t0, t1, and a peer
    assert value(samples, "optserve_models") == len(client.list_models())
    # Every push carries the whole gradient once, split over the shards (fp32).
    received = total(samples, "optserve_received_bytes_total", model=model_name)
    assert received == (pushes + 1) * numel * 4  # the refused push's bytes arrived too
    assert total(samples, "optserve_sent_bytes_total", model=model_name) == 2 * numel * 4
    for shard in ("0", "1"):
        count = value(samples, "optserve_update_seconds_count", model=model_name, shard=shard)
        assert count == pushes
        assert value(samples, "optserve_update_seconds_sum", model=model_name, shard=shard) > 0
        waited = value(samples, "optserve_round_wait_seconds_count", model=model_name, shard=shard)
        assert waited == pushes + 1  # the refused push waited for its decision too
    assert value(samples, "optserve_staleness_count", model=model_name) == pushes
    assert value(samples, "optserve_staleness_bucket", model=model_name, le="0.0") == pushes - 1
    assert value(samples, "optserve_staleness_bucket", model=model_name, le="2.0") == pushes
    # Each shard refused the push from the future once; the coordinator the bad token once.
    for shard in ("0", "1"):
        refused = {"component": "shard", "model": model_name, "shard": shard, "method": "Push"}
        assert value(samples, "optserve_errors_total", **refused, code="ABORTED") == 1
        assert total(samples, "optserve_errors_total", **refused) == 1
    denied = {"component": "coordinator", "method": "ListModels", "code": "UNAUTHENTICATED"}
    assert total(samples, "optserve_errors_total", **denied) == 1 + total(
        before, "optserve_errors_total", **denied
    )
    assert value(samples, "optserve_checkpoint_seconds_count", model=model_name) == 1
    assert value(samples, "optserve_checkpoint_seconds_sum", model=model_name) > 0

    # Status shows the trainers the leader saw.
    trainers = client.status(model_name)["trainers"]
    (anonymous,) = (name for name in trainers if name not in ("t0", "t1"))
    assert anonymous.startswith("ipv4:127.0.0.1:")  # no trainer name: its peer address
    assert trainers[anonymous]["refused"] == 1 and trainers[anonymous]["applied"] == 0
    assert trainers["t0"]["applied"] == 3 and trainers["t1"]["applied"] == 3
    assert trainers["t0"]["staleness"] == 2 and trainers["t0"]["version"] == 2


def test_a_dropped_model_leaves_the_scrape(service, client, model_name):
    client.create_model(model_name, {"w": torch.zeros(4)}, {"name": "adam"})
    client.push(model_name, {"w": torch.ones(4)})
    assert value(scrape(service), "optserve_pushes_total", model=model_name) == 1
    client.drop_model(model_name)
    assert not [ls for ls, _ in scrape(service).get("optserve_pushes_total", [])
                if ls.get("model") == model_name]  # fmt: skip


def scrape_ray(ray) -> dict[str, list]:
    """Every live Ray node's metrics agent (the export port Ray picked), in one dict."""
    samples: dict[str, list] = {}
    nodes = [n for n in ray.nodes() if n["Alive"] and n.get("MetricsExportPort", -1) > 0]
    assert nodes, "no Ray node exports metrics: is ray[default] installed?"
    for node in nodes:
        url = f"http://{node['NodeManagerAddress']}:{node['MetricsExportPort']}/metrics"
        for name, found in scrape_url(url).items():
            samples.setdefault(name, []).extend(found)
    return samples


def test_the_series_are_exported_through_rays_metrics_agent_too(
    ray_session, service, client, model_name
):
    params = {"w": torch.zeros(300), "b": torch.zeros(20)}
    numel = 320
    # Every push's norm (sqrt(320)) is above clip_norm: each applied one is clipped.
    mode = {"mode": "async", "gradients": {"clip_norm": 1.0}}
    client.create_model(model_name, params, {"name": "sgd", "lr": 0.1}, num_shards=2, mode=mode)
    grads = {"w": torch.ones(300), "b": torch.ones(20)}
    for step in range(3):
        client.push(model_name, grads, version=step, trainer="t")
    with pytest.raises(Aborted):
        client.push(model_name, grads, version=999, trainer="t")
    client.pull(model_name)
    client.checkpoint(model_name)
    at = {"model": model_name}
    aborted = {**at, "component": "shard", "method": "Push", "code": "ABORTED"}
    expected = {
        "ray_optserve_pushes_total": 3,
        "ray_optserve_received_bytes_total": 4 * numel * 4,
        "ray_optserve_sent_bytes_total": numel * 4,
        "ray_optserve_update_seconds_count": 2 * 3,  # each shard applied 3 updates
        "ray_optserve_round_wait_seconds_count": 2 * 4,
        "ray_optserve_staleness_count": 3,
        "ray_optserve_errors_total": 2,  # each shard refused the push from the future
        "ray_optserve_checkpoint_seconds_count": 1,
        # Read from the leader's state and published every few seconds.
        "ray_optserve_model_version": 3,
        "ray_optserve_model_lr": 0.1,
        "ray_optserve_trainers": 1,
        "ray_optserve_gradient_events_total": 3,
    }
    labels = {
        "ray_optserve_errors_total": aborted,
        "ray_optserve_gradient_events_total": {**at, "event": "clipped"},
    }

    # Every series of the endpoint has its Ray twin, with the service's label and Ray's node and
    # worker labels (the session's other server is told apart by its own service label).
    def untwinned(samples: dict) -> list[str]:
        def mine(name: str) -> dict:
            return {"service": COORDINATOR_NAME} if name == "optserve_models" else at

        return [
            name
            for name in SERIES
            if name not in FAULT_SERIES  # served once a fault happened: test_checkpoint_faults
            and not any(
                all(ls.get(k) == v for k, v in mine(name).items())
                for s in samples
                if s.startswith(f"ray_{name}")
                for ls, _ in samples[s]
            )
        ]

    # Ray's agent exports what each process reports every few seconds (the shards' and the
    # coordinator's series each on their own schedule).
    deadline = time.monotonic() + 120
    while True:
        samples = scrape_ray(ray_session)
        got = {
            name: total(samples, name, **labels.get(name, at), service=COORDINATOR_NAME)
            for name in expected
        }
        missing = untwinned(samples)
        if (got == expected and not missing) or time.monotonic() > deadline:
            break
        time.sleep(1.0)
    assert got == expected
    assert not missing, missing
    # The endpoint counts the same.
    endpoint = scrape(service)
    assert {
        name: total(endpoint, name.removeprefix("ray_"), **labels.get(name, at))
        for name in expected
    } == expected
    pushes = samples["ray_optserve_pushes_total"]
    (labelled,) = [ls for ls, _ in pushes if ls["model"] == model_name]
    assert labelled["service"] == COORDINATOR_NAME
    assert {"NodeAddress", "SessionName", "WorkerId"} <= set(labelled)
