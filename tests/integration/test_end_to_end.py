"""Real Ray, real gRPC on loopback: trainers in other processes against the oracle."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import grpc
import pytest
import ray
import torch

from optserve.client import ParameterServerClient, RemoteOptimizer
from optserve.common.codec import encode_tensor
from optserve.common.errors import AlreadyExists, InvalidArgument, NotFound, Unavailable
from optserve.common.wire import chunk_frames, header_frame
from optserve.v1 import coordinator_pb2, coordinator_pb2_grpc, shard_pb2, shard_pb2_grpc
from tests.helpers import auth

TRAINER = Path(__file__).resolve().parents[1] / "helpers" / "trainer.py"

ORACLES = {
    "adam": (
        {"name": "adam", "lr": 0.01},
        lambda ps: torch.optim.Adam(ps, lr=0.01),
    ),
    "sgd-momentum": (
        {"name": "sgd", "lr": 0.05, "momentum": 0.9},
        lambda ps: torch.optim.SGD(ps, lr=0.05, momentum=0.9),
    ),
}


def run_trainer(address, model, optimizer, tmp_path, steps=50, seed=0):
    out = tmp_path / f"{model}.pt"
    result = subprocess.run(
        [
            sys.executable,
            str(TRAINER),
            "--address",
            address,
            "--model",
            model,
            "--optimizer",
            json.dumps(optimizer),
            "--steps",
            str(steps),
            "--seed",
            str(seed),
            "--out",
            str(out),
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    return torch.load(out, weights_only=True)


def replay(record, oracle_factory, with_state=False):
    params = {n: torch.nn.Parameter(t.clone()) for n, t in record["initial"].items()}
    opt = oracle_factory(list(params.values()))
    for grads in record["grads"]:
        for name, p in params.items():
            p.grad = grads[name]
        opt.step()
    weights = {n: p.detach() for n, p in params.items()}
    if not with_state:
        return weights
    state = {
        key: torch.cat([opt.state[p][key].reshape(-1) for p in params.values()])
        for key in opt.state[params["weight"]]
        if key != "step"
    }
    return weights, state


@pytest.mark.parametrize("rule", sorted(ORACLES))
def test_trainer_process_matches_local_oracle(service, client, model_name, tmp_path, rule):
    optimizer, oracle = ORACLES[rule]
    record = run_trainer(service.address, model_name, optimizer, tmp_path)
    expected, expected_state = replay(record, oracle, with_state=True)
    assert record["version"] == 50
    pulled, version = client.pull(model_name)
    assert version == 50
    for name, value in expected.items():
        assert (record["final"][name] - value).abs().max() <= 1e-6, name
        assert (pulled[name] - value).abs().max() <= 1e-6, name
    assert not torch.equal(record["final"]["weight"], record["initial"]["weight"])
    # The optimizer state on the server is torch's state, flattened (same keys, same values).
    (shard,) = ray.get(service.actor.shard_actors.remote(model_name))
    saved = ray.get(shard.state_dict.remote())
    state = saved["groups"]["default"]["state"]
    assert saved["version"] == 50 and expected_state
    assert set(state) - {"step"} == set(expected_state)
    for key, value in expected_state.items():
        assert (state[key] - value).abs().max() <= 1e-6, key


def test_sharded_model_matches_oracle(service, client, model_name, tmp_path):
    optimizer, oracle = ORACLES["adam"]
    generator = torch.Generator().manual_seed(5)
    initial = {
        "a": torch.randn(33, generator=generator),
        "b": torch.randn(4, 4, generator=generator),
    }
    info = client.create_model(model_name, initial, optimizer, num_shards=3)
    assert len(info.shards) == 3 and len({s.address for s in info.shards}) == 3
    grads = [
        {n: torch.randn(t.shape, generator=generator) for n, t in initial.items()}
        for _ in range(10)
    ]
    for g in grads:
        client.push(model_name, g)
    pulled, version = client.pull(model_name)
    expected = replay({"initial": initial, "grads": grads}, oracle)
    assert version == 10
    for name in initial:  # shards use torch's fused Adam: a few ulp from the for-loop oracle
        assert (pulled[name] - expected[name]).abs().max() <= 1e-6


def test_remote_optimizer_joins_an_existing_model(service, client, model_name):
    client.create_model(model_name, {"w": torch.full((3,), 2.0)}, {"name": "sgd", "lr": 0.5})
    local = torch.nn.Parameter(torch.zeros(3))
    opt = RemoteOptimizer([("w", local)], address=service.address, model=model_name)
    assert torch.equal(local.detach(), torch.full((3,), 2.0))  # loaded the server's weights
    local.grad = torch.ones(3)
    opt.step()
    assert torch.equal(local.detach(), torch.full((3,), 1.5))
    assert opt.version == 1
    opt.close()


def test_remote_optimizer_refuses_a_mismatched_model(service, client, model_name):
    client.create_model(model_name, {"w": torch.zeros(3)}, {"name": "sgd"})
    with pytest.raises(InvalidArgument, match=r"\[4\] float32 here but \[3\]"):
        RemoteOptimizer(
            [("w", torch.nn.Parameter(torch.zeros(4)))], address=service.address, model=model_name
        )
    with pytest.raises(NotFound, match="optimizer="):
        RemoteOptimizer(
            [("w", torch.nn.Parameter(torch.zeros(4)))],
            address=service.address,
            model=model_name + "-absent",
        )


def test_describe_list_and_drop(client, model_name):
    info = client.create_model(
        model_name, {"w": torch.zeros(2, 2), "b": torch.zeros(2)}, {"name": "adam", "lr": 0.1}
    )
    described = client.describe_model(model_name)
    assert [p.name for p in described.params] == ["w", "b"]
    assert [p.shape for p in described.params] == [(2, 2), (2,)]
    assert described.optimizer.lr == 0.1 and described.optimizer.betas == (0.9, 0.999)
    assert described.version == 0 and info.shards == described.shards
    assert model_name in client.list_models()
    with pytest.raises(AlreadyExists):
        client.create_model(model_name, {"w": torch.zeros(1)}, {"name": "sgd"})
    client.drop_model(model_name)
    assert model_name not in client.list_models()
    with pytest.raises(NotFound):
        client.describe_model(model_name)


def test_unknown_model_is_not_found(client):
    for call in (
        lambda: client.describe_model("no-such-model"),
        lambda: client.pull("no-such-model"),
        lambda: client.push("no-such-model", {}),
        lambda: client.drop_model("no-such-model"),
    ):
        with pytest.raises(NotFound) as info:
            call()
        assert info.value.code == grpc.StatusCode.NOT_FOUND


@pytest.mark.parametrize(
    "spec, message",
    [
        ({"name": "bad name!", "params": [("w", [2])], "optimizer": {"name": "sgd"}}, "model name"),
        ({"name": "ok", "params": [("w", [2])], "optimizer": {"name": "nadamw"}}, "nadamw"),
        ({"name": "ok", "params": [("w", [2])], "optimizer": {"name": "adam", "lr": -1}}, "-1"),
        ({"name": "ok", "params": [("w", [2]), ("w", [3])], "optimizer": {"name": "sgd"}}, "twice"),
        ({"name": "ok", "params": [("w", [-2])], "optimizer": {"name": "sgd"}}, "shape"),
        ({"name": "ok", "params": [], "optimizer": {"name": "sgd"}}, "no parameters"),
    ],
)
def test_create_with_bad_spec_is_invalid_argument(service, model_name, spec, message):
    name = model_name if spec["name"] == "ok" else spec["name"]
    request = coordinator_pb2.ModelSpec(
        name=name,
        params=[coordinator_pb2.ParamSpec(name=n, dtype=1, shape=s) for n, s in spec["params"]],
        optimizer_json=json.dumps(spec["optimizer"]),
    )
    with auth.channel(service.address) as channel:
        stub = coordinator_pb2_grpc.CoordinatorStub(channel)
        with pytest.raises(grpc.RpcError) as info:
            stub.CreateModel(iter([coordinator_pb2.CreateModelRequest(spec=request)]), timeout=60)
        assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert message in info.value.details()
        with pytest.raises(grpc.RpcError) as info:
            stub.DescribeModel(coordinator_pb2.DescribeModelRequest(model=name), timeout=60)
        assert info.value.code() == grpc.StatusCode.NOT_FOUND


def test_a_new_model_serves_nothing_until_every_shard_has_its_initial_values(
    service, client, model_name
):
    spec = coordinator_pb2.ModelSpec(
        name=model_name,
        params=[coordinator_pb2.ParamSpec(name="w", dtype=1, shape=[4]),
                coordinator_pb2.ParamSpec(name="b", dtype=1, shape=[3])],
        optimizer_json='{"name": "sgd", "lr": 0.5}',
        num_shards=2,
    )  # fmt: skip
    create = coordinator_pb2.CreateModelRequest(spec=spec)
    with auth.channel(service.address) as channel:
        stub = coordinator_pb2_grpc.CoordinatorStub(channel)
        # Initial values no longer ride the CreateModel stream: anything after the spec is refused.
        with pytest.raises(grpc.RpcError) as info:
            stub.CreateModel(iter([create, create]), timeout=60)
        assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert "Shard/Load" in info.value.details()
        assert model_name not in stub.ListModels(coordinator_pb2.ListModelsRequest()).models
        reply = stub.CreateModel(iter([create]), timeout=60)
    assert reply.initializing and len(reply.shards) == 2
    with pytest.raises(Unavailable, match="still receiving"):
        client.pull(model_name)
    values = torch.arange(7.0)

    def load(shard, groups):
        frames = [header_frame(shard_pb2.LoadHeader(model=model_name))]
        for group, (a, b) in groups:
            frames += list(chunk_frames(group, values[a:b]))
        with auth.channel(shard.address) as channel:
            return channel.stream_unary(
                "/optserve.v1.Shard/Load", request_serializer=lambda m: m,
                response_deserializer=shard_pb2.LoadResponse.FromString,
            )(iter(frames), timeout=60)  # fmt: skip

    first, second = sorted(reply.shards, key=lambda s: s.index)
    ranges = [[(r.group, (r.start, r.end)) for r in s.ranges] for s in (first, second)]
    with pytest.raises(grpc.RpcError) as info:  # a slice short: refused, nothing taken
        load(first, [(g, (a, b - 1)) for g, (a, b) in ranges[0]])
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert load(first, ranges[0]).version == 0
    with pytest.raises(grpc.RpcError) as info:  # once only
        load(first, ranges[0])
    assert info.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    with pytest.raises(Unavailable):  # the second shard has nothing yet
        client.pull(model_name)
    load(second, ranges[1])
    weights, version = client.pull(model_name)
    assert version == 0 and torch.equal(torch.cat([weights["w"], weights["b"]]), values)
    deadline = time.monotonic() + 30  # the coordinator's watch sees every shard ready
    while client.describe_model(model_name).initializing:
        assert time.monotonic() < deadline
        time.sleep(0.2)
    assert client.push(model_name, {"w": torch.ones(4), "b": torch.ones(3)}) == 1


@pytest.fixture()
def raw_shard(client, model_name):
    """A 3-parameter Adam model with one update applied, and a raw stub to its shard."""
    generator = torch.Generator().manual_seed(2)
    initial = {
        n: torch.randn(s, generator=generator)
        for n, s in {"weight": (4, 5), "bias": (7,), "kernel": (2, 3, 2, 2)}.items()
    }
    info = client.create_model(model_name, initial, {"name": "adam", "lr": 0.01})
    client.push(model_name, {n: torch.ones_like(t) for n, t in initial.items()})
    channel = auth.channel(info.shards[0].address)
    yield model_name, shard_pb2_grpc.ShardStub(channel), info.numel
    channel.close()


def push_raw(stub, model, chunks, version=1):
    requests = [shard_pb2.PushRequest(header=shard_pb2.PushHeader(model=model, version=version))]
    requests += [shard_pb2.PushRequest(chunk=c) for c in chunks]
    return stub.Push(iter(requests), timeout=60)


@pytest.mark.parametrize(
    "make_chunks, message",
    [
        (lambda n: encode_tensor("default", torch.ones(n - 1)), "shape"),
        (lambda n: encode_tensor("default", torch.ones(n, 1)), "shape"),
        (lambda n: encode_tensor("default", torch.ones(n, dtype=torch.float64)), "dtype"),
        (lambda n: encode_tensor("default", torch.full((n,), float("nan"))), "NaN"),
        (lambda n: encode_tensor("other", torch.ones(n)), "unknown"),
        (lambda n: list(encode_tensor("default", torch.ones(n), 64))[:-1], "ended inside"),
        (lambda n: [], "without"),
    ],
)
def test_bad_gradient_is_invalid_argument_and_changes_nothing(
    client, raw_shard, make_chunks, message
):
    model, stub, numel = raw_shard
    before, version = client.pull(model)
    with pytest.raises(grpc.RpcError) as info:
        push_raw(stub, model, list(make_chunks(numel)))
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT, info.value.details()
    assert message in info.value.details()
    after, version_after = client.pull(model)
    assert version_after == version == 1
    assert all(torch.equal(before[n], after[n]) for n in before)


@pytest.mark.parametrize("garbage", [b"\x0f", b"\x12\x80", b"\x12\x05ab", b"\x0a\x03abc"])
def test_malformed_push_bytes_are_invalid_argument_and_change_nothing(client, raw_shard, garbage):
    model, _, numel = raw_shard
    info = client.describe_model(model)
    before, version = client.pull(model)
    with auth.channel(info.shards[0].address) as channel:
        push = channel.stream_unary(
            "/optserve.v1.Shard/Push",
            request_serializer=lambda b: b,
            response_deserializer=shard_pb2.PushResponse.FromString,
        )
        header = shard_pb2.PushRequest(header=shard_pb2.PushHeader(model=model, version=1))
        for frames in ([garbage], [header.SerializeToString(), garbage]):
            with pytest.raises(grpc.RpcError) as error:
                push(iter(frames), timeout=60)
            assert error.value.code() == grpc.StatusCode.INVALID_ARGUMENT, error.value.details()
    after, version_after = client.pull(model)
    assert version_after == version
    assert all(torch.equal(before[n], after[n]) for n in before)


def test_raw_push_and_pull_in_half_precision(client, raw_shard):
    model, stub, numel = raw_shard
    reply = push_raw(
        stub, model, list(encode_tensor("default", torch.ones(numel, dtype=torch.bfloat16)))
    )
    assert (reply.version, reply.staleness) == (2, 0)
    half, _ = client.pull(model, wire_dtype=torch.float16)
    full, _ = client.pull(model)
    assert all((half[n] - full[n]).abs().max() < 1e-2 for n in full)


def test_push_to_the_wrong_model_on_a_shard_is_not_found(raw_shard):
    model, stub, numel = raw_shard
    with pytest.raises(grpc.RpcError) as info:
        push_raw(stub, model + "-other", list(encode_tensor("default", torch.ones(numel))))
    assert info.value.code() == grpc.StatusCode.NOT_FOUND


def test_client_refuses_bad_gradients_before_sending(client, raw_shard):
    model, _, _ = raw_shard
    good = {"weight": torch.ones(4, 5), "bias": torch.ones(7), "kernel": torch.ones(2, 3, 2, 2)}
    cases = [
        ({**good, "bias": torch.ones(8)}, "shape"),
        ({**good, "bias": torch.ones(7, dtype=torch.float64)}, "dtype"),
        ({**good, "bias": torch.ones(7, dtype=torch.int64)}, "dtype"),
        ({k: v for k, v in good.items() if k != "bias"}, "missing"),
        ({**good, "extra": torch.ones(1)}, "extra"),
        ({**good, "bias": torch.full((7,), float("inf"))}, "NaN or Inf"),
    ]
    for grads, message in cases:
        with pytest.raises(InvalidArgument, match=message) as info:
            client.push(model, grads)
        assert info.value.code == grpc.StatusCode.INVALID_ARGUMENT
    assert client.describe_model(model).version == 1


def test_health_and_reflection(service, client, model_name):
    from grpc_health.v1 import health_pb2, health_pb2_grpc
    from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

    info = client.create_model(model_name, {"w": torch.zeros(2)}, {"name": "sgd"})
    for address, service_name in (
        (service.address, "optserve.v1.Coordinator"),
        (info.shards[0].address, "optserve.v1.Shard"),
    ):
        with auth.channel(address) as channel:
            health = health_pb2_grpc.HealthStub(channel)
            for name in ("", service_name):
                reply = health.Check(health_pb2.HealthCheckRequest(service=name), timeout=30)
                assert reply.status == health_pb2.HealthCheckResponse.SERVING
            reflect = reflection_pb2_grpc.ServerReflectionStub(channel)
            request = reflection_pb2.ServerReflectionRequest(list_services="")
            reply = next(reflect.ServerReflectionInfo(iter([request]), timeout=30))
            names = {s.name for s in reply.list_services_response.service}
            assert service_name in names and "grpc.health.v1.Health" in names


def test_oversized_message_is_resource_exhausted_and_changes_nothing(client, raw_shard):
    from optserve.v1 import tensor_pb2

    model, stub, numel = raw_shard
    before, version = client.pull(model)
    for size in (5 << 20, (4 << 20) + 1):  # over gRPC's message limit; over the chunk limit
        chunk = tensor_pb2.TensorChunk(name="default", dtype=1, shape=[numel], data=b"\0" * size)
        with pytest.raises(grpc.RpcError) as info:
            push_raw(stub, model, [chunk])
        assert info.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED, info.value.details()
    after, version_after = client.pull(model)
    assert version_after == version
    assert all(torch.equal(before[n], after[n]) for n in before)


def test_everything_stays_on_loopback(ray_session, service, client, model_name):
    info = client.create_model(model_name, {"w": torch.zeros(2)}, {"name": "sgd"}, num_shards=2)
    assert service.address.startswith("127.0.0.1:")
    assert all(s.address.startswith("127.0.0.1:") for s in info.shards)
    assert {node["NodeManagerAddress"] for node in ray_session.nodes()} == {"127.0.0.1"}


def test_frozen_parameters_stay_local(service, model_name):
    trainable = torch.nn.Parameter(torch.ones(2))
    frozen = torch.nn.Parameter(torch.ones(3), requires_grad=False)
    opt = RemoteOptimizer(
        [("w", trainable), ("frozen", frozen)],
        address=service.address,
        model=model_name,
        optimizer={"name": "sgd", "lr": 1.0},
    )
    assert [p.name for p in opt.client.describe_model(model_name).params] == ["w"]
    trainable.grad = torch.ones(2)
    opt.step()
    assert torch.equal(trainable.detach(), torch.zeros(2))
    assert torch.equal(frozen, torch.ones(3))
    opt.close()


def test_client_recovers_when_the_model_is_recreated(service, client, model_name):
    client.create_model(model_name, {"w": torch.zeros(2)}, {"name": "sgd", "lr": 1.0})
    client.pull(model_name)  # caches the layout
    with ParameterServerClient(service.address) as other:
        other.drop_model(model_name)
        other.create_model(model_name, {"w": torch.full((2,), 5.0)}, {"name": "sgd", "lr": 1.0})
    assert client.push(model_name, {"w": torch.ones(2)}, version=0) == 1
    weights, version = client.pull(model_name)
    assert version == 1 and torch.equal(weights["w"], torch.full((2,), 4.0))


def test_size_limits_and_long_configs_give_clear_statuses(service, model_name):
    huge = coordinator_pb2.ModelSpec(
        name=model_name,
        params=[coordinator_pb2.ParamSpec(name="w", dtype=4, shape=[1 << 40])],  # 8 TiB fp64
        optimizer_json='{"name": "sgd"}',
    )
    long_config = coordinator_pb2.ModelSpec(
        name=model_name,
        params=[coordinator_pb2.ParamSpec(name="w", dtype=1, shape=[1])],
        optimizer_json=json.dumps({"name": "sgd", **{f"k{i}": "x" * 100 for i in range(200)}}),
    )
    with auth.channel(service.address) as channel:
        stub = coordinator_pb2_grpc.CoordinatorStub(channel)
        for spec, code in (
            (huge, grpc.StatusCode.RESOURCE_EXHAUSTED),
            (long_config, grpc.StatusCode.INVALID_ARGUMENT),
        ):
            with pytest.raises(grpc.RpcError) as info:
                stub.CreateModel(iter([coordinator_pb2.CreateModelRequest(spec=spec)]), timeout=60)
            assert info.value.code() == code, info.value.details()
            assert len(info.value.details()) <= 1000
        assert model_name not in stub.ListModels(coordinator_pb2.ListModelsRequest()).models


def test_groups_schedule_swap_and_metrics_through_the_server(client, model_name):
    generator = torch.Generator().manual_seed(9)
    initial = {
        "w": torch.randn(6, 4, generator=generator),
        "b": torch.randn(4, generator=generator),
    }
    info = client.create_model(
        model_name, initial, {"name": "adamw", "lr": 0.01, "weight_decay": 0.1},
        groups={"no_decay": {"params": ["b"], "weight_decay": 0.0}},
        schedule={"name": "plateau", "rule": "torch", "factor": 0.5, "patience": 0,
                  "threshold": 0},
    )  # fmt: skip
    assert [g.name for g in info.groups] == ["no_decay", "default"]
    assert info.group_configs["no_decay"]["optimizer"]["weight_decay"] == 0.0
    assert info.group_configs["default"]["optimizer"]["weight_decay"] == 0.1
    # The oracle: torch AdamW with the same two groups and ReduceLROnPlateau.
    w, b = (torch.nn.Parameter(initial[n].clone()) for n in ("w", "b"))
    oracle = torch.optim.AdamW([{"params": [b], "weight_decay": 0.0}, {"params": [w]}],
                               lr=0.01, weight_decay=0.1)  # fmt: skip
    plateau = torch.optim.lr_scheduler.ReduceLROnPlateau(oracle, factor=0.5, patience=0,
                                                         threshold=0)  # fmt: skip
    for epoch, val in enumerate([1.0, 0.9, 0.95, 0.8]):
        for _ in range(3):
            g = {n: torch.randn(t.shape, generator=generator) for n, t in initial.items()}
            client.push(model_name, g)
            w.grad, b.grad = g["w"], g["b"]
            oracle.step()
        client.report_metric(model_name, "val_loss", val, step=epoch)
        plateau.step(val)
    pulled, version = client.pull(model_name)
    assert version == 12
    assert torch.allclose(pulled["w"], w.detach(), atol=1e-6)
    assert torch.allclose(pulled["b"], b.detach(), atol=1e-6)
    assert client.describe_model(model_name).group_configs["default"]["lr"] == 0.005

    # Swap to SGD with momentum: the group overrides carry over, the report names every key.
    report = client.set_optimizer(model_name, {"name": "sgd", "lr": 0.1, "momentum": 0.9})
    assert report["groups"]["default"]["keys"]["momentum_buffer"]["action"] == "converted"
    assert report["groups"]["default"]["keys"]["exp_avg_sq"]["action"] == "dropped"
    described = client.describe_model(model_name)
    assert described.optimizer.name == "sgd"
    assert described.group_configs["no_decay"]["optimizer"]["weight_decay"] == 0.0
    client.set_schedule(model_name, {"name": "constant"})
    assert client.describe_model(model_name).group_configs["default"]["lr"] == 0.1
    with pytest.raises(InvalidArgument):
        client.set_optimizer(model_name, {"name": "sgd", "lr": -1})
    with pytest.raises(InvalidArgument):
        client.set_optimizer(model_name, {"name": "adam"}, policy="keep-everything")
    with pytest.raises(InvalidArgument):
        client.report_metric(model_name, "val_loss", float("nan"))
    assert client.describe_model(model_name).optimizer.name == "sgd"


def test_a_large_group_is_compiled_before_its_first_push_and_gives_the_same_bits_anywhere(
    service, client, model_name
):
    """A group of >= COMPILE_MIN_ELEMENTS takes the compiled kernel on every shard (the whole
    group decides, not a shard's slice), compiled before the model takes a push: never by a
    race. Two shards give the bits the same kernel gives on the whole buffer here, and so does
    a restore onto one; both stay within a few ulp of torch's RMSprop."""
    from optserve.common.config import parse_optimizer_config
    from optserve.server.engine.group import GroupEngine
    from optserve.server.engine.kernels import COMPILE_MIN_ELEMENTS

    generator = torch.Generator().manual_seed(3)
    initial = {"w": torch.randn(COMPILE_MIN_ELEMENTS + 7, generator=generator)}
    config = {"name": "rmsprop", "lr": 0.01, "momentum": 0.5}
    client.create_model(model_name, initial, config, num_shards=2)
    status = client.status(model_name)
    assert status.groups["default"].kernel == "compiled", status.groups["default"]
    assert {s.groups["default"].path for s in status.shards} == {"compiled"}
    local = GroupEngine("default", initial["w"].clone(), parse_optimizer_config(config))
    assert local.fast_path == "compiled", local.kernel
    param = torch.nn.Parameter(initial["w"].clone())
    oracle = torch.optim.RMSprop([param], lr=0.01, momentum=0.5)
    for step in range(6):
        grad = torch.randn(initial["w"].shape, generator=generator)
        client.push(model_name, {"w": grad})
        local.step(grad.clone(), 0.01)
        param.grad = grad
        oracle.step()
        if step == 3:  # onto one shard from its checkpoint: a new process, compiled again
            client.checkpoint(model_name)
            client.restore(model_name, num_shards=1)
            assert client.status(model_name).groups["default"].kernel == "compiled"
    pulled, version = client.pull(model_name)
    assert version == 6 and torch.equal(pulled["w"], local.weights)
    torch.testing.assert_close(pulled["w"], param.detach(), rtol=1e-5, atol=1e-6)
