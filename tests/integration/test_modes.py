"""Update modes through real shards: async order, bounded staleness, sync rounds, a dead trainer."""

from __future__ import annotations

import itertools
import json
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import torch

from optserve.client import (
    ModelRestored,
    ParameterServerClient,
    PushRefused,
    RoundClosed,
    StalePush,
)
from optserve.common.errors import Aborted, FailedPrecondition
from tests.helpers import auth
from tests.helpers.models import SHAPES, gradient, initial_weights, leader_log

TRAINER = Path(__file__).resolve().parents[1] / "helpers" / "trainer.py"
# Sync rounds the two live trainers run after the third one dies (each waits out the timeout).
ROUNDS_AFTER_KILL = 3


def oracle(initial, fused=True):
    params = {n: torch.nn.Parameter(t.clone()) for n, t in initial.items()}
    return params, torch.optim.Adam(params.values(), lr=0.01, fused=fused)


def test_async_pushes_from_four_trainers_apply_in_the_logged_order(service, client, model_name):
    initial = initial_weights()
    client.create_model(model_name, initial, {"name": "adam", "lr": 0.01}, num_shards=2)

    def train(k):
        with ParameterServerClient(service.address) as c:
            version = 0
            for i in range(50):
                _, version = c.push_and_pull(
                    model_name, gradient(k, i), version=version, trainer=f"t{k}-{i}"
                )

    with ThreadPoolExecutor(4) as pool:
        list(pool.map(train, range(4)))
    weights, version = client.pull(model_name)
    assert version == 200
    log = leader_log(service, model_name)
    assert [entry["version"] for entry in log] == list(range(1, 201))
    # Replay the pushes in the order the server logged them, with torch's Adam.
    params, opt = oracle(initial)
    for entry in log:
        (name,) = entry["trainers"]
        k, i = (int(x) for x in name[1:].split("-"))
        for pname, g in gradient(k, i).items():
            params[pname].grad = g
        opt.step()
    for name, p in params.items():
        assert (weights[name] - p.detach()).abs().max() <= 1e-6, name


def test_push_beyond_max_staleness_is_refused_and_changes_nothing(client, model_name):
    mode = {"mode": "async", "max_staleness": 1}
    info = client.create_model(
        model_name, initial_weights(), {"name": "sgd", "lr": 0.1}, num_shards=2, mode=mode
    )
    assert info.mode.max_staleness == 1
    for i in range(3):
        client.push(model_name, gradient(0, i), version=i)
    before, version = client.pull(model_name)
    assert version == 3
    with pytest.raises(StalePush, match="stale") as refused:
        client.push(model_name, gradient(0, 9), version=1)
    # One meaning a trainer acts on (pull, go on), its status code kept for other clients.
    assert isinstance(refused.value, PushRefused) and isinstance(refused.value, FailedPrecondition)
    after, version = client.pull(model_name)
    assert version == 3
    for name in before:
        assert torch.equal(before[name], after[name])
    client.push(model_name, gradient(0, 9), version=2)  # 1 update old: within the bound
    assert client.pull(model_name)[1] == 4


def test_a_push_from_the_future_is_refused(client, model_name):
    client.create_model(model_name, initial_weights(), {"name": "sgd", "lr": 0.1}, num_shards=2)
    with pytest.raises(ModelRestored, match="version 5.*pull") as refused:
        client.push(model_name, gradient(0, 0), version=5)
    assert isinstance(refused.value, PushRefused) and isinstance(refused.value, Aborted)
    assert client.pull(model_name)[1] == 0


def test_sync_rounds_average_the_trainers_on_three_shards(service, client, model_name):
    initial = initial_weights()
    mode = {"mode": "sync", "trainers": 3, "round_timeout_s": 120}
    client.create_model(model_name, initial, {"name": "adam", "lr": 0.01}, num_shards=3, mode=mode)

    def train(k):
        with ParameterServerClient(service.address) as c:
            versions = []
            for i in range(10):
                _, version = c.push_and_pull(
                    model_name, gradient(k, i), version=i, trainer=f"trainer{k}"
                )
                versions.append(version)
            return versions

    with ThreadPoolExecutor(3) as pool:
        versions = list(pool.map(train, range(3)))
    assert versions == [list(range(1, 11))] * 3
    params, opt = oracle(initial, fused=False)
    for i in range(10):
        for name in SHAPES:
            params[name].grad = sum(gradient(k, i)[name] for k in range(3)) / 3
        opt.step()
    weights, version = client.pull(model_name)
    assert version == 10
    for name, p in params.items():
        assert (weights[name] - p.detach()).abs().max() <= 1e-6, name
    assert all(len(entry["pushes"]) == 3 for entry in leader_log(service, model_name))


def test_sync_push_for_a_closed_round_is_aborted(client, model_name):
    mode = {"mode": "sync", "trainers": 2, "round_timeout_s": 0.5}
    client.create_model(model_name, initial_weights(), {"name": "sgd", "lr": 0.1}, mode=mode)
    assert client.push(model_name, gradient(0, 0), version=0, trainer="a") == 1  # alone, late
    with pytest.raises(RoundClosed, match="pull"):
        client.push(model_name, gradient(1, 0), version=0, trainer="b")
    assert client.pull(model_name)[1] == 1


@pytest.mark.slow
def test_killed_trainer_does_not_hang_a_sync_round(service, client, model_name, tmp_path):
    timeout_s = 2.0
    mode = {"mode": "sync", "trainers": 3, "round_timeout_s": timeout_s}
    client.create_model(
        model_name, initial_weights(), {"name": "sgd", "lr": 0.01}, num_shards=2, mode=mode
    )
    victim = subprocess.Popen(
        [sys.executable, str(TRAINER), "--address", service.address, "--model", model_name,
         "--steps", "100000", "--trainer", "victim", "--out", str(tmp_path / "never.pt")],
        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
    )  # fmt: skip
    durations: dict[int, list[float]] = {0: [], 1: []}
    killed_at: list[int] = []  # the loop index at which trainer 0 killed the victim

    def victim_took_part() -> bool:
        return any(len(e["pushes"]) == 3 for e in leader_log(service, model_name))

    def train(k):
        with ParameterServerClient(service.address) as c:
            _, version = c.pull(model_name)
            # Rounds until the victim (importing torch meanwhile) has taken part in a full one,
            # then it dies, then ROUNDS_AFTER_KILL more rounds.
            for i in itertools.count():
                if k == 0 and not killed_at and victim_took_part():
                    victim.kill()
                    victim.wait(timeout=30)
                    killed_at.append(i)
                if killed_at and i > killed_at[0] + ROUNDS_AFTER_KILL:
                    return
                assert i < 100, "the victim never took part in a round"
                started = time.monotonic()
                try:
                    _, version = c.push_and_pull(
                        model_name, gradient(k, i), version=version, trainer=f"t{k}"
                    )
                except Aborted:  # our round closed while we were away: catch up
                    _, version = c.pull(model_name)
                if killed_at and i > killed_at[0]:
                    durations[k].append(time.monotonic() - started)

    try:
        with ThreadPoolExecutor(2) as pool:
            list(pool.map(train, range(2)))
    finally:
        victim.kill()
    log = leader_log(service, model_name)
    assert any(len(e["pushes"]) == 3 for e in log), "the victim never took part"
    assert len(log[-1]["pushes"]) == 2  # rounds after the kill close without it
    # Liveness, not speed: every round after the kill ends by its timeout plus a margin.
    margin_s = 15.0
    assert durations[0] and durations[1]
    assert max(durations[0] + durations[1]) <= timeout_s + margin_s


def test_push_and_pull_returns_the_updated_weights(client, model_name):
    client.create_model(model_name, {"w": torch.ones(5)}, {"name": "sgd", "lr": 0.5}, num_shards=3)
    weights, version = client.push_and_pull(
        model_name, {"w": torch.ones(5)}, pull_dtype=torch.bfloat16, wire_dtype=torch.float16
    )
    assert version == 1 and torch.equal(weights["w"], torch.full((5,), 0.5))
    assert json.loads(client.describe_model(model_name).mode.model_dump_json())["mode"] == "async"


def test_sequence_is_only_for_the_models_own_shards(client, model_name):
    import grpc

    from optserve.v1 import shard_pb2, shard_pb2_grpc

    info = client.create_model(
        model_name, initial_weights(), {"name": "sgd", "lr": 0.1}, num_shards=2
    )
    forged = shard_pb2.SequenceRequest(
        model=model_name, push_id="x", shard=1,
        header=shard_pb2.PushHeader(model=model_name, version=0, push_id="x"),
    )  # fmt: skip
    with auth.channel(info.shards[0].address) as channel:
        stub = shard_pb2_grpc.ShardStub(channel)
        # Even an admin token does not make a caller one of the model's shards.
        for metadata in ((), (("x-optserve-shard-secret", "guess"),)):
            with pytest.raises(grpc.RpcError) as error:
                stub.Sequence(forged, timeout=30, metadata=metadata)
            assert error.value.code() == grpc.StatusCode.UNAUTHENTICATED
    client.push(model_name, gradient(0, 0))  # the model still works, at version 1
    assert client.pull(model_name)[1] == 1


def test_a_slice_refused_by_one_shard_refuses_the_push_on_all_at_once(client, model_name):
    import grpc

    from optserve.common.wire import chunk_frames, header_frame
    from optserve.v1 import shard_pb2

    info = client.create_model(model_name, {"w": torch.zeros(10)}, {"name": "sgd", "lr": 0.1},
                               num_shards=2)  # fmt: skip
    header = header_frame(shard_pb2.PushHeader(model=model_name, version=0, push_id="p1"))
    slices = [torch.ones(5), torch.full((5,), float("nan"))]  # shard 1's slice is bad

    def push(k):
        with auth.channel(info.shards[k].address) as channel:
            call = channel.stream_unary(
                "/optserve.v1.Shard/Push", request_serializer=lambda b: b,
                response_deserializer=shard_pb2.PushResponse.FromString,
            )  # fmt: skip
            frames = [header, *chunk_frames("default", slices[k])]
            started = time.monotonic()
            with pytest.raises(grpc.RpcError) as error:
                call(iter(frames), timeout=120)
            return error.value.code(), time.monotonic() - started

    with ThreadPoolExecutor(2) as pool:
        results = list(pool.map(push, range(2)))
    assert [code for code, _ in results] == [grpc.StatusCode.INVALID_ARGUMENT] * 2
    assert max(seconds for _, seconds in results) < 30  # not the 60 s stage timeout
    weights, version = client.pull(model_name)
    assert version == 0 and torch.equal(weights["w"], torch.zeros(10))
