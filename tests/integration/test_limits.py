"""Limits that hold against one client, through a real server with small limits: what a token,
or an address, may hold at once (whatever connections it opens), a stream that stops moving,
a ReportMetric storm, the control-call rate, and Sequence's per-shard keys."""

from __future__ import annotations

import dataclasses
import itertools
import os
import threading
import time
import uuid
from concurrent.futures import ThreadPoolExecutor

import grpc
import pytest
import ray
import torch

from optserve.client import ParameterServerClient, ResourceExhausted
from optserve.common.wire import chunk_frames, header_frame
from optserve.v1 import coordinator_pb2, coordinator_pb2_grpc, shard_pb2
from tests.helpers import auth

SGD = {"name": "sgd", "lr": 0.1}
_names = itertools.count()


@pytest.fixture(scope="module")
def limited(ray_session):
    """A server whose allowances are tiny: per token 4 calls (8 per address) on every
    endpoint, 1 pull in flight (2 per address), 32 bytes staged (one 8-float slice), 5 control
    calls a second."""
    from optserve.server.runtime import start_service

    edge = dataclasses.replace(
        auth.edge_config(),
        max_streams_per_client=4, max_streams_per_address=8,
        max_coordinator_calls_per_client=4, max_coordinator_calls_per_address=8,
        max_pulls_per_client=1, max_pulls_per_address=2,
        max_staged_bytes_per_client=32, max_staged_bytes_per_address=64,
        control_calls_per_s=5.0,
    )  # fmt: skip
    svc = start_service(port=0, name="optserve-limits-test", edge=edge)
    yield svc
    svc.stop(grace_s=1.0)


@pytest.fixture(scope="module")
def bystander(limited):
    """A model of another tenant, for calls that must go through while one client misbehaves."""
    name = scoped_name()
    with ParameterServerClient(limited.address) as admin:
        admin.create_model(name, {"w": torch.zeros(8)}, SGD)
    return name


def scoped_name():
    # "scoped-*": every test token may use it, the scoped ones too.
    return f"scoped-limits-{next(_names)}-{uuid.uuid4().hex[:6]}"


def shards(service, model):
    return ray.get(service.actor.shard_actors.remote(model))


def held(actor, what, token):
    """(by the token, by the address 127.0.0.1) of one of an endpoint's allowances."""

    def read(a, what=what, token=token):
        from optserve.server.edge.limits import Client

        if what == "staging":
            allowance = a._service.staging
        else:
            allowance = getattr(a._server.guard.limits, what)
        return allowance.held(Client(token, "127.0.0.1"))

    return ray.get(actor.__ray_call__.remote(read))


def wait_for(check, what, timeout_s=60.0):
    deadline = time.monotonic() + timeout_s
    while not check():
        assert time.monotonic() < deadline, what
        time.sleep(0.02)


def open_stream(address, token, method, frames):
    """A Push or PushPull call on its own connection, fed by `frames` (bytes)."""
    channel = auth.channel(address, token)
    if method == "Push":
        call = channel.stream_unary(
            "/optserve.v1.Shard/Push",
            request_serializer=lambda b: b,
            response_deserializer=shard_pb2.PushResponse.FromString,
        )
        return channel, call.future(frames, timeout=60)
    call = channel.stream_stream(
        "/optserve.v1.Shard/PushPull",
        request_serializer=lambda b: b,
        response_deserializer=lambda b: b,
    )
    return channel, call(frames, timeout=60)


def header_then_wait(model, release):
    yield header_frame(shard_pb2.PushHeader(model=model, version=0, push_id=uuid.uuid4().hex))
    release.wait(60)


def test_pulls_in_flight_are_per_token_and_per_address_not_per_connection(limited):
    model = scoped_name()
    with ParameterServerClient(limited.address) as client:
        info = client.create_model(model, {"w": torch.zeros(8)}, SGD)
        (leader,) = shards(limited, model)
        address = info.shards[0].address
        release = threading.Event()
        opened = []
        try:
            # One PushPull held open by the admin token: its one pull in flight.
            opened.append(open_stream(address, auth.ADMIN, "PushPull",
                                      header_then_wait(model, release)))  # fmt: skip
            wait_for(lambda: held(leader, "pulls", "admin") == (1, 1), "the first pull held")
            # The same token on a new connection: refused, the limit is the token's.
            channel, again = open_stream(address, auth.ADMIN, "PushPull", iter([]))
            with channel, pytest.raises(grpc.RpcError) as error:
                next(again)
            assert error.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
            assert "max_pulls_per_client" in error.value.details()
            # Another token has its own allowance, until the address's (2) is used up.
            opened.append(open_stream(address, auth.TRAINER, "PushPull",
                                      header_then_wait(model, release)))  # fmt: skip
            wait_for(lambda: held(leader, "pulls", "trainer") == (1, 2), "the second pull held")
            third = ParameterServerClient(limited.address, token=auth.SCOPED_TRAINER)
            with third, pytest.raises(ResourceExhausted, match="max_pulls_per_address"):
                third.pull(model)
            # Gone from the admin token's first connection, the pull is the token's again.
            opened[0][1].cancel()
            wait_for(lambda: held(leader, "pulls", "admin") == (0, 1), "the pull given back")
            assert client.pull(model)[1] == 0
        finally:
            release.set()
            for channel, call in opened:
                call.cancel()
                channel.close()
        wait_for(lambda: held(leader, "calls", "admin") == (0, 0), "every call given back")


def test_staged_push_bytes_are_charged_per_token_until_the_push_is_decided(limited):
    model = scoped_name()
    with (
        ParameterServerClient(limited.address) as admin,
        ParameterServerClient(limited.address, token=auth.TRAINER) as trainer,
    ):
        info = admin.create_model(model, {"w": torch.zeros(8)}, SGD)
        (leader,) = shards(limited, model)
        release = threading.Event()
        # A push of the admin token that has begun: its slice (8 fp32 = 32 bytes) is charged.
        channel, held_open = open_stream(
            info.shards[0].address, auth.ADMIN, "Push", header_then_wait(model, release)
        )
        try:
            wait_for(lambda: held(leader, "staging", "admin") == (32, 32), "the push staged")
            # Another push of the same token, on its own connection, would stage 32 more.
            with pytest.raises(ResourceExhausted, match="max_staged_bytes_per_client"):
                admin.push(model, {"w": torch.full((8,), 100.0)})
            # Another token has room (the address has 64 bytes) and is applied.
            assert trainer.push(model, {"w": torch.ones(8)}) == 1
        finally:
            release.set()  # the held push ends short: refused, and its bytes given back
            with pytest.raises(grpc.RpcError):
                held_open.result(timeout=60)
            channel.close()
        wait_for(lambda: held(leader, "staging", "admin") == (0, 0), "the staged bytes freed")
        assert held(leader, "staging", "trainer") == (0, 0)
        # Only the trainer's push counted; the admin token pushes again.
        weights, version = admin.pull(model)
        assert version == 1 and torch.allclose(weights["w"], torch.full((8,), -0.1))
        assert admin.push(model, {"w": torch.ones(8)}) == 2


def test_a_push_stream_that_never_ends_is_cut(limited):
    model = scoped_name()
    with ParameterServerClient(limited.address) as client:
        info = client.create_model(model, {"w": torch.zeros(1 << 12)}, SGD)
        (leader,) = shards(limited, model)

        def shorten(a):  # this shard's streams may wait on their client for 0.5 s
            a._server.guard.limits.watch.idle_s = 0.5

        ray.get(leader.__ray_call__.remote(shorten))
        release = threading.Event()

        def half_then_wait():
            chunks = list(chunk_frames("default", torch.ones(1 << 12), 4096))
            yield header_frame(shard_pb2.PushHeader(model=model, version=0, push_id="slow"))
            yield from chunks[: len(chunks) // 2]
            release.wait(60)  # and then nothing, the stream left open

        channel, future = open_stream(info.shards[0].address, auth.ADMIN, "Push", half_then_wait())
        try:
            with pytest.raises(grpc.RpcError) as error:
                future.result(timeout=60)
            assert error.value.code() == grpc.StatusCode.CANCELLED
        finally:
            release.set()
            channel.close()
        # Its thread, its call and its staged bytes are free; nothing was applied.
        wait_for(lambda: held(leader, "calls", "admin") == (0, 0), "the call given back")
        assert held(leader, "staging", "admin") == (0, 0)
        assert client.pull(model)[1] == 0
        assert client.push(model, {"w": torch.ones(1 << 12)}) == 1


def test_a_report_metric_storm_does_not_block_another_models_control_calls(
    limited, bystander, tmp_path
):
    storm_model, other_model = scoped_name(), bystander
    gate, holding = str(tmp_path / "open"), str(tmp_path / "holding")
    with ParameterServerClient(limited.address) as admin:
        admin.create_model(storm_model, {"w": torch.zeros(8)}, SGD)
        (storm_leader,) = shards(limited, storm_model)

        def hold_metrics_thread(a, gate=gate, holding=holding):  # no metric taken for now
            open(holding, "w").close()
            deadline = time.monotonic() + 60
            while not os.path.exists(gate) and time.monotonic() < deadline:
                time.sleep(0.02)

        blocker = storm_leader.__ray_call__.options(concurrency_group="metrics").remote(
            hold_metrics_thread
        )
        # Calls from different callers reach an actor in no set order: the storm starts once
        # the leader's metrics thread is held (a report taken before would answer OK).
        wait_for(lambda: os.path.exists(holding), "the leader's metrics thread held")
        request = coordinator_pb2.ReportMetricRequest(model=storm_model, name="loss", value=1.0)

        def report():  # each on a connection of its own
            with auth.channel(limited.address, auth.TRAINER) as channel:
                stub = coordinator_pb2_grpc.CoordinatorStub(channel)
                try:
                    stub.ReportMetric(request, timeout=60)
                except grpc.RpcError as error:
                    return error.code()
                return grpc.StatusCode.OK

        coordinator = limited.actor
        try:
            with ThreadPoolExecutor(30) as pool:
                storm = [pool.submit(report) for _ in range(30)]
                # The trainer token holds its 4 coordinator calls, waiting on the leader.
                wait_for(lambda: held(coordinator, "calls", "trainer") == (4, 4), "4 held")
                # Another tenant's control calls go through meanwhile.
                admin.set_hyperparameters(other_model, lr=0.5)
                assert admin.report_metric(other_model, "loss", 0.25) is False
                assert not all(f.done() for f in storm)
                refused = [f.result() for f in storm if f.done()]
                assert refused and set(refused) == {grpc.StatusCode.RESOURCE_EXHAUSTED}
                open(gate, "w").close()
                codes = [f.result(timeout=60) for f in storm]
            assert codes.count(grpc.StatusCode.OK) == 4
        finally:
            open(gate, "w").close()
            ray.get(blocker, timeout=60)
        assert admin.pull(other_model)[1] == 0


def test_control_calls_are_rate_limited_per_token(limited, bystander):
    model = bystander
    with (
        ParameterServerClient(limited.address) as admin,
        ParameterServerClient(limited.address, token=auth.SCOPED_TRAINER) as trainer,
    ):
        # 5 a second in bursts of 10: a tight loop is refused well before 200 calls.
        with pytest.raises(ResourceExhausted, match="control_calls_per_s"):
            for step in range(200):
                trainer.report_metric(model, "loss", 1.0, step=step)
        assert step >= 9
        # Another token's bucket is its own.
        assert admin.report_metric(model, "loss", 1.0) is False


def test_metric_names_are_bounded(limited):
    from optserve.client import InvalidArgument
    from optserve.server.shard.actor import MAX_METRIC_NAMES

    model = scoped_name()
    with ParameterServerClient(limited.address) as admin:
        admin.create_model(model, {"w": torch.zeros(8)}, SGD)
        for bad in ("x" * 129, "", "line\nbreak"):
            with pytest.raises(InvalidArgument, match="printable characters"):
                admin.report_metric(model, bad, 1.0)
        (leader,) = shards(limited, model)

        def fill(a):  # all names but one already used
            a._metric_names.update(f"m{i}" for i in range(MAX_METRIC_NAMES - 1))

        ray.get(leader.__ray_call__.remote(fill))
        assert admin.report_metric(model, "last", 1.0) is False
        with pytest.raises(InvalidArgument, match=f"already has {MAX_METRIC_NAMES} metric names"):
            admin.report_metric(model, "one-more", 1.0)
        assert admin.report_metric(model, "m0", 2.0) is False  # a known name still goes


def test_sequence_checks_each_shards_own_key_first_and_says_nothing_else(limited):
    from optserve.server.shard.service import SEQUENCE_DENIED

    model = scoped_name()
    with ParameterServerClient(limited.address) as client:
        info = client.create_model(model, {"w": torch.zeros(8)}, SGD, num_shards=2)
        actors = shards(limited, model)
        shard1_key = ray.get(actors[1].__ray_call__.remote(lambda a: a._secret))

        def sequence(address, key, shard, name=model):
            request = shard_pb2.SequenceRequest(
                model=name, push_id="forged", shard=shard,
                header=shard_pb2.PushHeader(model=name, version=0, push_id="forged"),
            )  # fmt: skip
            metadata = () if key is None else (("x-optserve-shard-secret", key),)
            with auth.channel(address) as channel:
                call = channel.unary_unary(
                    "/optserve.v1.Shard/Sequence",
                    request_serializer=shard_pb2.SequenceRequest.SerializeToString,
                    response_deserializer=shard_pb2.SequenceDecision.FromString,
                )
                with pytest.raises(grpc.RpcError) as error:
                    call(request, timeout=30, metadata=metadata)
            return error.value.code(), error.value.details()

        leader, other = info.shards[0].address, info.shards[1].address
        denied = (grpc.StatusCode.UNAUTHENTICATED, SEQUENCE_DENIED)
        assert sequence(leader, None, 1) == denied
        assert sequence(leader, "guess", 1) == denied
        assert sequence(leader, shard1_key, 0) == denied  # shard 1's key speaks for shard 1 only
        assert sequence(leader, None, 1, name="no-such-model") == denied  # no NOT_FOUND
        assert sequence(other, shard1_key, 1) == denied  # not the leader: the same answer
        # With a right key the request is read: only now is the model named.
        code, _ = sequence(leader, shard1_key, 1, name="no-such-model")
        assert code == grpc.StatusCode.NOT_FOUND
        # The shards' own calls work: a push crosses both, at version 1.
        assert client.push(model, {"w": torch.ones(8)}) == 1
        assert client.pull(model)[1] == 1
