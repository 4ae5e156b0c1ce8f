"""Forks through faults (issue 19): a fork recovers from its first checkpoint (the copy it started
from) like any model, and a promoted fork's aliases survive a coordinator crash (adopted from
its shards' catalogue entries)."""

from __future__ import annotations

import time

import pytest
import ray
import torch

from optserve.client import ParameterServerClient
from optserve.common.errors import Unavailable
from tests.integration.test_faults import kill_coordinator, own_service, wait_until_back

pytestmark = pytest.mark.slow
ADAM = {"name": "adam", "lr": 0.01}
__all__ = ["own_service"]  # a fixture of test_faults, used here


def test_a_fork_recovers_from_its_first_checkpoint(service, client, model_name):
    fork = f"{model_name}-fork"
    client.create_model(model_name, {"w": torch.zeros(8)}, ADAM)
    client.push(model_name, {"w": torch.ones(8)})
    try:
        client.fork(model_name, fork)
        at_fork, _ = client.pull(fork)
        client.push(fork, {"w": torch.ones(8)})
        victim = ray.get(service.actor.shard_actors.remote(fork))[0]
        ray.get(victim.__ray_call__.remote(lambda self: self._state.mark_broken("test")))
        deadline = time.monotonic() + 120
        while True:
            try:
                status = client.status(fork)
                if status.audit[-1].action == "restore" and status.audit[-1].caller == "recovery":
                    break
            except Unavailable:
                pass
            assert time.monotonic() < deadline, "the fork did not come back by itself"
            time.sleep(0.2)
        weights, version = client.pull(fork)
        assert version == 1 and torch.equal(weights["w"], at_fork["w"])
        assert (status.forked_from, status.fork_version) == (model_name, 1)
    finally:
        client.drop_model(fork)


def test_a_promoted_forks_aliases_survive_a_coordinator_crash(own_service):
    svc, _ = own_service
    with ParameterServerClient(svc.address) as c:
        c.create_model("main", {"w": torch.zeros(8)}, ADAM)
        c.push("main", {"w": torch.ones(8)})
        c.fork("main", "main-sgd", optimizer={"name": "sgd", "lr": 0.1})
        c.promote("main-sgd")
    kill_coordinator(svc)
    wait_until_back(svc, "main-sgd")
    with ParameterServerClient(svc.address) as c:
        info = c.describe_model("main")
        assert (info.name, info.aliases, info.forked_from) == ("main-sgd", ("main",), "main")
        assert c.list_models() == ["main-sgd"]
