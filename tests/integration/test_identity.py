"""Through real servers: a trainer's identity comes from its token (a token cannot take another
token's trainer name to get its pushes refused; status shows trainer tokens names, not where the
trainers connect from), and concurrent Pull streams of one version read one shared snapshot."""

from __future__ import annotations

import time
import uuid
from concurrent.futures import ThreadPoolExecutor

import grpc
import ray
import torch

from optserve.client import ParameterServerClient
from optserve.common.wire import parse_frame
from optserve.v1 import shard_pb2, shard_pb2_grpc, tensor_pb2
from tests.helpers import auth
from tests.integration.test_security import shard_actors, wait_until_in_round

SGD = {"name": "sgd", "lr": 0.1}


def test_a_token_cannot_take_another_tokens_trainer_name(service):
    """A round of three on two shards: the scoped trainer token pushes as "worker", then the
    trainer token's "worker" and "w2" join the same round. Identities come from the tokens, so
    both "worker"s count (with names taken as said, the second was refused), and the second
    shard's leader hears the same identities as the leader's own shard."""
    model = f"scoped-identity-{uuid.uuid4().hex[:8]}"  # the scoped token's models: scoped-*
    admin = ParameterServerClient(service.address)
    thief = ParameterServerClient(service.address, token=auth.SCOPED_TRAINER)
    victim = ParameterServerClient(service.address, token=auth.TRAINER)
    mode = {"mode": "sync", "trainers": 3, "round_timeout_s": 120.0}
    admin.create_model(model, {"w": torch.zeros(8)}, SGD, num_shards=2, mode=mode)
    try:
        for c in (thief, victim):
            c.pull(model)
        grad = {"w": torch.ones(8)}
        with ThreadPoolExecutor(2) as pool:
            stolen = pool.submit(thief.push, model, grad, trainer="worker")
            wait_until_in_round(service, model, 1)
            own = pool.submit(victim.push, model, grad, trainer="worker")
            wait_until_in_round(service, model, 2)
            assert victim.push(model, grad, trainer="w2") == 1  # the third closes the round
            assert stolen.result(timeout=60) == 1 and own.result(timeout=60) == 1
        as_trainer = victim.status(model)
        assert set(as_trainer.trainers) == {"scoped-trainer/worker", "trainer/worker", "trainer/w2"}
        assert all(t.applied == 1 and t.peer == "" for t in as_trainer.trainers.values())
        as_admin = admin.status(model)  # an admin sees where each trainer connects from
        assert all(t.peer.startswith("ipv4:127.0.0.1:") for t in as_admin.trainers.values())
    finally:
        admin.drop_model(model)
        for c in (admin, thief, victim):
            c.close()


def test_concurrent_pulls_of_one_version_read_one_snapshot(service, client, model_name):
    """Eight fp32 Pull streams and one bf16 stream held open past their headers (more bytes
    than a stream's flow-control window, so none can finish unread): two snapshots, not nine;
    every stream sends the same weights, and the snapshots go once all are read."""
    numel = 8 << 20  # 32 MiB in fp32
    initial = torch.randn(numel, generator=torch.Generator().manual_seed(3))
    client.create_model(model_name, {"w": initial}, SGD, num_shards=1)
    (actor,) = shard_actors(service, model_name)
    address = ray.get(actor.address.remote())

    def snapshots():
        count = lambda a: (a._service.snapshots.taken, a._service.snapshots.live())  # noqa: E731
        return ray.get(actor.__ray_call__.remote(count))

    options = [("grpc.http2.bdp_probe", 0), ("grpc.max_receive_message_length", 64 << 20)]
    with auth.channel(address, auth.TRAINER, options=options) as channel:
        stub = shard_pb2_grpc.ShardStub(channel)
        fp32 = [stub.Pull(shard_pb2.PullRequest(model=model_name), timeout=120) for _ in range(8)]
        bf16 = stub.Pull(
            shard_pb2.PullRequest(model=model_name, dtype=tensor_pb2.DTYPE_BFLOAT16), timeout=120
        )
        streams = [*fp32, bf16]
        assert all(next(s).header.version == 0 for s in streams)
        assert snapshots() == (2, 2)
        received = [read_weights(s) for s in streams]
    for weights in received[:-1]:
        assert torch.equal(weights, initial)
    assert torch.equal(received[-1], initial.to(torch.bfloat16))
    deadline = time.monotonic() + 30  # the server's streams finish just after the client's
    while snapshots()[1] and time.monotonic() < deadline:
        time.sleep(0.05)
    assert snapshots() == (2, 0)


def read_weights(stream: grpc.Call) -> torch.Tensor:
    """The rest of a Pull stream of one tensor "w", joined."""
    parts, dtype = [], None
    for message in stream:
        chunk = parse_frame(message.SerializeToString(), shard_pb2.PullHeader)
        dtype = dtype or chunk.dtype
        parts.append(bytes(chunk.data))
    wire = torch.bfloat16 if dtype == tensor_pb2.DTYPE_BFLOAT16 else torch.float32
    return torch.frombuffer(bytearray(b"".join(parts)), dtype=wire)
