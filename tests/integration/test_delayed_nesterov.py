"""Delayed Nesterov (`sgd` with `delay` > 1, the async local-SGD outer optimizer) on the real
server, Ray and gRPC: its updates against the paper's rule written out here (tests/unit/oracles.py)
on two shards, its window in status, a checkpoint round trip, and swaps in and out of it."""

from __future__ import annotations

import pytest
import torch

from optserve.client import InvalidArgument
from tests.unit.oracles import PaperDelayedNesterov

DN = {"name": "sgd", "lr": 0.7, "momentum": 0.9, "nesterov": True, "delay": 3}


def _gradients(seed: int, count: int) -> list[dict[str, torch.Tensor]]:
    generator = torch.Generator().manual_seed(seed)
    return [
        {"w": torch.randn(6, 5, generator=generator), "b": torch.randn(5, generator=generator)}
        for _ in range(count)
    ]


def test_delayed_nesterov_on_the_server_is_the_papers_rule(service, client, model_name):
    initial = _gradients(0, 1)[0]
    client.create_model(model_name, initial, DN, num_shards=2)
    params = {n: torch.nn.Parameter(t.clone()) for n, t in initial.items()}
    oracle = PaperDelayedNesterov(params.values(), **{k: v for k, v in DN.items() if k != "name"})
    for g in _gradients(1, 7):  # two windows closed, one push open
        client.push(model_name, g)
        for n, p in params.items():
            p.grad = g[n]
        oracle.step()
    pulled, version = client.pull(model_name)
    assert version == 7
    for n, p in params.items():
        assert torch.allclose(pulled[n], p.detach(), rtol=0, atol=1e-6), n
    group = client.status(model_name).groups["default"]
    assert group.state == {"delay_counter": 1} and group.kernel == "eager"
    assert group.optimizer["delay"] == 3

    # A checkpoint keeps the open window: after a restore the same pushes give the same bits.
    client.checkpoint(model_name)
    more = _gradients(2, 4)
    for g in more:
        client.push(model_name, g)
    before, _ = client.pull(model_name)
    client.restore(model_name)
    assert client.status(model_name).groups["default"].state == {"delay_counter": 1}
    for g in more:
        client.push(model_name, g)
    after, _ = client.pull(model_name)
    assert all(torch.equal(after[n], before[n]) for n in before)

    # Bad input changes nothing; a swap to plain Nesterov keeps m and drops the window.
    with pytest.raises(InvalidArgument, match="nesterov"):
        client.set_optimizer(model_name, {"name": "sgd", "momentum": 0.9, "delay": 3})
    assert client.describe_model(model_name).optimizer.delay == 3
    report = client.set_optimizer(model_name, {**DN, "delay": 1})
    keys = report["groups"]["default"]["keys"]
    assert keys["momentum_buffer"]["action"] == "kept"
    assert keys["delay_buffer"]["action"] == keys["delay_counter"]["action"] == "dropped"
    group = client.status(model_name).groups["default"]
    assert group.state == {} and group.kernel == "fused"
    report = client.set_optimizer(model_name, DN)
    keys = report["groups"]["default"]["keys"]
    assert keys["momentum_buffer"]["action"] == "kept"
    assert keys["delay_buffer"]["action"] == "fresh"
