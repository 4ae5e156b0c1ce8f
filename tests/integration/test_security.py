"""Security at the edge, through real servers: tokens and roles on every RPC, model scopes, TLS,
the per-client stream limit, and what a refused or broken push leaves behind (nothing)."""

from __future__ import annotations

import contextlib
import datetime
import ipaddress
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import grpc
import pytest
import ray
import torch

from optserve.client import ParameterServerClient
from optserve.common.codec import encode_tensor
from optserve.common.errors import NotFound, PermissionDenied, ResourceExhausted, Unavailable
from optserve.common.wire import chunk_frames, header_frame
from optserve.v1 import coordinator_pb2, coordinator_pb2_grpc, shard_pb2, shard_pb2_grpc
from tests.helpers import auth

SGD = {"name": "sgd", "lr": 0.1}


def shard_actors(service, model):
    return ray.get(service.actor.shard_actors.remote(model))


def fingerprint(service, model):
    """Every shard's digest (version, weights, all optimizer state, configs, schedule state)."""
    return ray.get([a.digest.remote() for a in shard_actors(service, model)])


def staged(service, model):
    return [i["staged"] for i in ray.get([a.info.remote() for a in shard_actors(service, model)])]


def wait_until_in_round(service, model, pushes, timeout_s=60.0):
    """Until the leader's open sync round holds `pushes` pushes (its sequencer's own list)."""
    (leader, *_) = shard_actors(service, model)

    def in_round():
        return ray.get(leader.__ray_call__.remote(lambda a: len(a._service.sequencer._round)))

    deadline = time.monotonic() + timeout_s
    while in_round() < pushes:
        assert time.monotonic() < deadline, f"{in_round()} of {pushes} pushes in the round"
        time.sleep(0.02)


def wait_until_nothing_staged(service, model, timeout_s=10.0):
    deadline = time.monotonic() + timeout_s
    while any(staged(service, model)) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert staged(service, model) == [0] * len(shard_actors(service, model))


# ---- tokens and roles --------------------------------------------------------------------------


def coordinator_calls(model):
    """(method, call(stub, metadata)) for every Coordinator RPC, each aimed at `model`: every one
    would change or reveal something if it were let through."""
    spec = coordinator_pb2.ModelSpec(
        name="scoped-new-" + model[-20:],
        params=[coordinator_pb2.ParamSpec(name="w", dtype=1, shape=[2])],
        optimizer_json='{"name": "sgd"}',
    )

    def create(stub, md):
        return stub.CreateModel(
            iter([coordinator_pb2.CreateModelRequest(spec=spec)]), timeout=60, metadata=md
        )

    c = coordinator_pb2
    return {
        "CreateModel": ("admin", create),
        "DescribeModel": (
            "trainer",
            lambda s, md: s.DescribeModel(
                c.DescribeModelRequest(model=model), timeout=30, metadata=md
            ),
        ),
        "ListModels": (
            "trainer",
            lambda s, md: s.ListModels(c.ListModelsRequest(), timeout=30, metadata=md),
        ),
        "DropModel": (
            "admin",
            lambda s, md: s.DropModel(c.DropModelRequest(model=model), timeout=30, metadata=md),
        ),
        "SetOptimizer": (
            "admin",
            lambda s, md: s.SetOptimizer(
                c.SetOptimizerRequest(model=model, optimizer_json='{"name": "adam"}'),
                timeout=30,
                metadata=md,
            ),
        ),
        "SetHyperparameters": (
            "admin",
            lambda s, md: s.SetHyperparameters(
                c.SetHyperparametersRequest(model=model, changes_json='{"lr": 5.0}'),
                timeout=30,
                metadata=md,
            ),
        ),
        "SetSchedule": (
            "admin",
            lambda s, md: s.SetSchedule(
                c.SetScheduleRequest(
                    model=model, schedule_json='{"name": "exponential", "gamma": 0.5}'
                ),
                timeout=30,
                metadata=md,
            ),
        ),
        "ReportMetric": (
            "trainer",
            lambda s, md: s.ReportMetric(
                c.ReportMetricRequest(model=model, name="loss", value=1.0), timeout=30, metadata=md
            ),
        ),
        "Status": (
            "trainer",
            lambda s, md: s.Status(c.StatusRequest(model=model), timeout=30, metadata=md),
        ),
        "Checkpoint": (
            "admin",
            lambda s, md: s.Checkpoint(c.CheckpointRequest(model=model), timeout=60, metadata=md),
        ),
        "ListCheckpoints": (
            "trainer",
            lambda s, md: s.ListCheckpoints(
                c.ListCheckpointsRequest(model=model), timeout=30, metadata=md
            ),
        ),
        "Restore": (
            "admin",
            lambda s, md: s.Restore(c.RestoreRequest(model=model), timeout=60, metadata=md),
        ),
        "Fork": (
            "admin",
            lambda s, md: s.Fork(
                c.ForkRequest(model=model, new_name=f"{model}-fork"), timeout=60, metadata=md
            ),
        ),
        "Promote": (
            "admin",
            lambda s, md: s.Promote(c.PromoteRequest(model=model), timeout=30, metadata=md),
        ),
    }


def shard_calls(model, numel):
    header = shard_pb2.PushHeader(model=model, version=0, push_id="auth-test")

    def load_requests():
        return iter(
            [
                shard_pb2.LoadRequest(header=shard_pb2.LoadHeader(model=model)),
                *[
                    shard_pb2.LoadRequest(chunk=c)
                    for c in encode_tensor("default", torch.ones(numel))
                ],
            ]
        )

    def push_requests():
        return iter(
            [
                shard_pb2.PushRequest(header=header),
                *[
                    shard_pb2.PushRequest(chunk=c)
                    for c in encode_tensor("default", torch.ones(numel))
                ],
            ]
        )

    return {
        "Push": ("trainer", lambda s, md: s.Push(push_requests(), timeout=30, metadata=md)),
        "PushPull": (
            "trainer",
            lambda s, md: list(s.PushPull(push_requests(), timeout=30, metadata=md)),
        ),
        "Pull": (
            "trainer",
            lambda s, md: list(s.Pull(shard_pb2.PullRequest(model=model), timeout=30, metadata=md)),
        ),
        "Load": ("admin", lambda s, md: s.Load(load_requests(), timeout=30, metadata=md)),
    }


def bearer(token):
    return (("authorization", f"Bearer {token}"),)


def refused(call, stub, metadata, code):
    with pytest.raises(grpc.RpcError) as error:
        call(stub, metadata)
    assert error.value.code() == code, (code, error.value.details())
    return error.value.details()


def test_every_rpc_checks_the_token_its_role_and_its_model_scope(service, client, model_name):
    info = client.create_model(model_name, {"w": torch.zeros(6)}, SGD, num_shards=1)
    client.push(model_name, {"w": torch.ones(6)})
    before, models = fingerprint(service, model_name), client.list_models()
    coordinator = coordinator_calls(model_name)
    shard = shard_calls(model_name, info.numel)
    unauthenticated = [(), bearer("not-a-token-0123456789abc"), (("authorization", "Basic x"),)]
    with (
        grpc.insecure_channel(service.address) as cc,
        grpc.insecure_channel(info.shards[0].address) as sc,
    ):
        stubs = {"c": coordinator_pb2_grpc.CoordinatorStub(cc), "s": shard_pb2_grpc.ShardStub(sc)}
        checked = 0
        for where, calls in (("c", coordinator), ("s", shard)):
            for method, (role, call) in calls.items():
                for metadata in unauthenticated:
                    refused(call, stubs[where], metadata, grpc.StatusCode.UNAUTHENTICATED)
                if role == "admin":
                    details = refused(
                        call, stubs[where], bearer(auth.TRAINER), grpc.StatusCode.PERMISSION_DENIED
                    )
                    assert "admin" in details, (method, details)
                if method != "ListModels":  # a scoped token on another model
                    for token in (auth.SCOPED_ADMIN, auth.SCOPED_TRAINER):
                        if role == "admin" and token == auth.SCOPED_TRAINER:
                            continue  # refused for its role already
                        if method == "CreateModel":
                            continue  # its model is named scoped-*: see the next test
                        refused(
                            call, stubs[where], bearer(token), grpc.StatusCode.PERMISSION_DENIED
                        )
                checked += 1
        assert checked == 18
        # Sequence is for the model's shards only, whatever the token.
        sequence = shard_pb2.SequenceRequest(
            model=model_name, push_id="x", header=shard_pb2.PushHeader(model=model_name)
        )
        for metadata in ((), bearer(auth.ADMIN)):
            refused(
                lambda s, md: s.Sequence(sequence, timeout=30, metadata=md),
                stubs["s"],
                metadata,
                grpc.StatusCode.UNAUTHENTICATED,
            )
    # Nothing changed: same models, same state on every shard, nothing staged.
    assert client.list_models() == models
    assert fingerprint(service, model_name) == before
    wait_until_nothing_staged(service, model_name)
    assert client.status(model_name)["audit"] == []
    # Health checks stay open (load balancers, Kubernetes probes).
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    with grpc.insecure_channel(service.address) as channel:
        reply = health_pb2_grpc.HealthStub(channel).Check(
            health_pb2.HealthCheckRequest(), timeout=30
        )
        assert reply.status == health_pb2.HealthCheckResponse.SERVING


def test_trainer_tokens_train_and_scoped_tokens_see_only_their_models(service, client, model_name):
    scoped = "scoped-" + model_name[-40:]
    client.create_model(model_name, {"w": torch.zeros(4)}, SGD, num_shards=2)
    try:
        with ParameterServerClient(service.address, token=auth.SCOPED_ADMIN) as admin:
            admin.create_model(scoped, {"w": torch.zeros(4)}, SGD, num_shards=2)
            assert admin.list_models() == [scoped]  # not the other models of the server
            with pytest.raises(PermissionDenied):
                admin.describe_model(model_name)
        with ParameterServerClient(service.address, token=auth.SCOPED_TRAINER) as trainer:
            weights, version = trainer.push_and_pull(scoped, {"w": torch.ones(4)})
            assert version == 1 and torch.allclose(weights["w"], torch.full((4,), -0.1))
            assert trainer.report_metric(scoped, "loss", 0.5) is False
            assert trainer.status(scoped)["version"] == 1
            with pytest.raises(PermissionDenied, match="admin"):
                trainer.set_hyperparameters(scoped, lr=1.0)
            with pytest.raises(PermissionDenied, match="not allowed to use model"):
                trainer.pull(model_name)
        with ParameterServerClient(service.address, token=auth.TRAINER) as trainer:
            assert trainer.push(model_name, {"w": torch.ones(4)}) == 1
            assert set(trainer.list_models()) >= {scoped, model_name}
        # The audit log names the token that made a control change.
        client.set_hyperparameters(scoped, lr=0.2)
        assert client.status(scoped)["audit"][-1]["caller"].startswith("token 'admin'")
        # A fork in its scope does not let a scoped token promote over a model outside it
        # (the promotion would drop that model and give its name to the fork).
        client.fork(model_name, f"{scoped}-f")
        scoped_admin = ParameterServerClient(service.address, token=auth.SCOPED_ADMIN)
        with scoped_admin, pytest.raises(PermissionDenied, match=repr(model_name)):
            scoped_admin.promote(f"{scoped}-f")
        assert client.describe_model(model_name).name == model_name  # nothing changed
        assert not client.describe_model(f"{scoped}-f").aliases
    finally:
        client.drop_model(scoped)
        with contextlib.suppress(NotFound):
            client.drop_model(f"{scoped}-f")


# ---- TLS and the stream limit ------------------------------------------------------------------


def make_certificates():
    """A CA, and a server certificate it signed for 127.0.0.1 and localhost (PEM bytes)."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    now = datetime.datetime.now(datetime.UTC)

    def build(subject, issuer, key, signer, extensions):
        builder = (
            x509.CertificateBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, subject)]))
            .issuer_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, issuer)]))
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(minutes=5))
            .not_valid_after(now + datetime.timedelta(days=1))
        )
        for extension, critical in extensions:
            builder = builder.add_extension(extension, critical=critical)
        return builder.sign(signer, hashes.SHA256())

    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca = build(
        "optserve test CA",
        "optserve test CA",
        ca_key,
        ca_key,
        [(x509.BasicConstraints(ca=True, path_length=None), True)],
    )
    key = ec.generate_private_key(ec.SECP256R1())
    names = x509.SubjectAlternativeName(
        [x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]
    )
    cert = build("optserve", "optserve test CA", key, ca_key, [(names, False)])
    pem = serialization.Encoding.PEM
    key_pem = key.private_bytes(
        pem, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
    return ca.public_bytes(pem), cert.public_bytes(pem), key_pem


@pytest.fixture(scope="module")
def tls_service(ray_session):
    """A server with TLS on every endpoint, and low stream limits per token (4) and per
    address (8)."""
    from optserve.server.runtime import start_service

    ca, cert, key = make_certificates()
    edge = auth.edge_config(tls_cert=cert, tls_key=key, tls_ca=ca)
    edge = type(edge)(**{**edge.__dict__, "max_streams_per_client": 4,
                         "max_streams_per_address": 8})  # fmt: skip
    svc = start_service(port=0, name="optserve-tls-test", edge=edge)
    yield svc, ca
    svc.stop(grace_s=1.0)


def test_tls_clients_work_and_plaintext_clients_do_not(tls_service, model_name):
    service, ca = tls_service
    with ParameterServerClient(service.address, tls_ca=ca) as client:
        # Two shards: the push also crosses the shards' own TLS channel to their leader.
        info = client.create_model(model_name, {"w": torch.zeros(8)}, SGD, num_shards=2)
        assert client.push(model_name, {"w": torch.ones(8)}) == 1
        weights, version = client.pull(model_name)
        assert version == 1 and torch.allclose(weights["w"], torch.full((8,), -0.1))
        for address in (service.address, info.shards[0].address, info.shards[1].address):
            with auth.channel(address) as plain:  # plaintext, with a valid token
                stub = shard_pb2_grpc.ShardStub(plain)
                pull = shard_pb2.PullRequest(model=model_name)
                with pytest.raises(grpc.RpcError) as error:
                    list(stub.Pull(pull, timeout=10))
                assert error.value.code() == grpc.StatusCode.UNAVAILABLE
        # A client that trusts another CA refuses the server's certificate.
        other_ca, _, _ = make_certificates()
        wrong = ParameterServerClient(service.address, tls_ca=other_ca, timeout_s=10)
        with wrong, pytest.raises(Unavailable):
            wrong.list_models()
        assert client.pull(model_name)[1] == 1
        client.drop_model(model_name)


def test_a_client_holding_too_many_streams_gets_resource_exhausted(tls_service, model_name):
    service, ca = tls_service
    with ParameterServerClient(service.address, tls_ca=ca) as client:
        # The round closes when eight trainers pushed; the timeout only bounds a failure.
        mode = {"mode": "sync", "trainers": 8, "round_timeout_s": 120.0}
        client.create_model(model_name, {"w": torch.zeros(4)}, SGD, num_shards=1, mode=mode)
        client.pull(model_name)
        ones = {"w": torch.ones(4)}
        # Four pushes wait in the round (the limit is 4 per token); a fifth is refused at once,
        # even on a connection of its own: the limit is the token's, not the connection's.
        with (
            ThreadPoolExecutor(8) as pool,
            ParameterServerClient(service.address, tls_ca=ca, token=auth.TRAINER) as other,
            ParameterServerClient(service.address, tls_ca=ca) as same_token,
        ):
            waiting = [
                pool.submit(client.push, model_name, ones, trainer=f"t{i}") for i in range(4)
            ]
            wait_until_in_round(service, model_name, 4)
            with pytest.raises(ResourceExhausted, match="max_streams_per_client"):
                client.push(model_name, ones, trainer="t5")
            with pytest.raises(ResourceExhausted, match="max_streams_per_client"):
                same_token.push(model_name, ones, trainer="t5")
            # Another token has its own allowance: its four pushes complete the round.
            waiting += [
                pool.submit(other.push, model_name, ones, trainer=f"u{i}") for i in range(4)
            ]
            assert [f.result(timeout=60) for f in waiting] == [1] * 8
            # The slots were given back: both clients hold four streams again, the next round.
            assert client.pull(model_name)[1] == other.pull(model_name)[1] == 1
            again = [
                pool.submit(c.push, model_name, ones, trainer=f"{who}{i}")
                for who, c in (("t", client), ("u", other))
                for i in range(4)
            ]
            assert [f.result(timeout=60) for f in again] == [2] * 8
        client.drop_model(model_name)


def test_the_stream_limit_is_per_client_not_on_the_shards_own_calls(tls_service, model_name):
    """Six trainers (two tokens, three each) in one sync round on two shards: the second shard
    asks the leader about all six pushes at once over its one connection, more than a token's
    allowance of 4."""
    service, ca = tls_service
    clients = [
        ParameterServerClient(service.address, tls_ca=ca, token=token)
        for token in (auth.ADMIN, auth.TRAINER) * 3
    ]
    try:
        mode = {"mode": "sync", "trainers": 6, "round_timeout_s": 60.0}
        clients[0].create_model(model_name, {"w": torch.zeros(8)}, SGD, num_shards=2, mode=mode)
        for c in clients:
            c.pull(model_name)
        with ThreadPoolExecutor(6) as pool:
            pushes = [
                pool.submit(c.push, model_name, {"w": torch.ones(8)}, trainer=f"t{i}")
                for i, c in enumerate(clients)
            ]
            assert [f.result(timeout=120) for f in pushes] == [1] * 6
        clients[0].drop_model(model_name)
    finally:
        for c in clients:
            c.close()


def test_model_count_limit(ray_session):
    from optserve.server.coordinator.core import Coordinator, Limits

    coordinator = Coordinator(limits=Limits(max_models=2), watch=False)
    coordinator.reserve("a")
    coordinator.reserve("b")
    with pytest.raises(ResourceExhausted, match="limit of 2 models"):
        coordinator.reserve("c")
    coordinator.release("a")
    coordinator.reserve("c")


# ---- gradient hygiene --------------------------------------------------------------------------

GROUPS = {"no_decay": {"params": ["bias"], "weight_decay": 0.0}}


def two_group_model(seed=0):
    generator = torch.Generator().manual_seed(seed)
    return {
        "weight": torch.randn(6, 5, generator=generator),
        "bias": torch.randn(7, generator=generator),
    }


def random_gradient(step, scale=10.0):
    generator = torch.Generator().manual_seed(100 + step)
    return {
        "weight": scale * torch.randn(6, 5, generator=generator),
        "bias": scale * torch.randn(7, generator=generator),
    }


def state_without_version(service, model):
    states = ray.get([a.state_dict.remote() for a in shard_actors(service, model)])
    for s in states:
        s.pop("version")
    return states


def assert_same_state(a, b):
    for x, y in zip(a, b, strict=True):
        for group in x["groups"]:
            gx, gy = x["groups"][group], y["groups"][group]
            assert torch.equal(gx["weights"], gy["weights"])
            for key, value in gx["state"].items():
                other = gy["state"][key]
                assert (
                    torch.equal(value, other) if isinstance(value, torch.Tensor) else value == other
                )


def test_global_norm_clipping_equals_clip_grad_norm_on_the_full_gradient(
    service, client, model_name
):
    initial = two_group_model()
    adam = {"name": "adamw", "lr": 0.01, "weight_decay": 0.1}
    mode = {"mode": "async", "gradients": {"clip_norm": 1.5}}
    client.create_model(model_name, initial, adam, num_shards=3, groups=GROUPS, mode=mode)
    params = {n: torch.nn.Parameter(t.clone()) for n, t in initial.items()}
    oracle = torch.optim.AdamW(
        [{"params": [params["weight"]]}, {"params": [params["bias"]], "weight_decay": 0.0}],
        lr=0.01,
        weight_decay=0.1,
    )
    for step in range(6):
        grads = random_gradient(step, scale=10.0 if step % 2 else 0.01)  # clipped, then not
        client.push(model_name, grads)
        for name, p in params.items():
            p.grad = grads[name].clone()
        torch.nn.utils.clip_grad_norm_(params.values(), 1.5)
        oracle.step()
    weights, version = client.pull(model_name)
    assert version == 6
    for name, p in params.items():
        torch.testing.assert_close(weights[name], p.detach(), rtol=1e-5, atol=1e-6)
    assert client.status(model_name)["gradient_counters"]["clipped"] == 3


def nan_gradient(step):
    grads = random_gradient(step)
    grads["bias"][3] = float("nan")  # in one group, on one shard of several
    grads["weight"][0, 0] = float("inf")
    return grads


def test_nan_gradient_reject_is_refused_and_changes_nothing(service, client, model_name):
    info = client.create_model(
        model_name, two_group_model(), {"name": "adam"}, num_shards=2, groups=GROUPS
    )
    client.push(model_name, random_gradient(0))
    before = fingerprint(service, model_name)
    # The client refuses it before sending; the server does too (raw frames to the shards).
    with pytest.raises(Exception, match="NaN or Inf"):
        client.push(model_name, nan_gradient(1))
    flat = {
        g.name: torch.cat([nan_gradient(1)[p.name].reshape(-1) for p in g.params])
        for g in info.groups
    }
    header = header_frame(shard_pb2.PushHeader(model=model_name, version=1, push_id="nan-push"))

    def push(shard):
        with auth.channel(shard.address) as channel:
            call = channel.stream_unary(
                "/optserve.v1.Shard/Push",
                request_serializer=lambda b: b,
                response_deserializer=shard_pb2.PushResponse.FromString,
            )
            frames = [header] + [
                f for g, (a, b) in shard.ranges.items() for f in chunk_frames(g, flat[g][a:b])
            ]
            with pytest.raises(grpc.RpcError) as error:
                call(iter(frames), timeout=60)
            return error.value.code()

    with ThreadPoolExecutor(2) as pool:
        codes = list(pool.map(push, info.shards))
    assert codes == [grpc.StatusCode.INVALID_ARGUMENT] * 2
    assert fingerprint(service, model_name) == before
    wait_until_nothing_staged(service, model_name)


def test_nan_gradient_skip_takes_a_version_and_leaves_weights_and_state(
    service, client, model_name
):
    mode = {"mode": "async", "gradients": {"nonfinite": "skip"}}
    client.create_model(
        model_name,
        two_group_model(),
        {"name": "adam", "lr": 0.01},
        num_shards=2,
        groups=GROUPS,
        mode=mode,
    )
    assert client.push(model_name, random_gradient(0)) == 1
    before = state_without_version(service, model_name)
    assert client.push(model_name, nan_gradient(1)) == 2  # accepted: the version advances
    assert_same_state(state_without_version(service, model_name), before)
    status = client.status(model_name)
    assert status["version"] == 2 and status["gradient_counters"]["skipped_nonfinite"] == 1
    assert all(g["state"].get("step") == 1 for g in status["groups"].values())  # not 2
    client.push(model_name, random_gradient(2))
    assert client.status(model_name)["groups"]["default"]["state"]["step"] == 2


def test_nan_gradient_zero_applies_the_finite_part(service, client, model_name):
    mode = {"mode": "async", "gradients": {"nonfinite": "zero"}}
    initial = two_group_model()
    client.create_model(
        model_name, initial, {"name": "sgd", "lr": 0.5}, num_shards=2, groups=GROUPS, mode=mode
    )
    grads = nan_gradient(0)
    client.push(model_name, grads)
    weights, version = client.pull(model_name)
    assert version == 1
    for name, g in grads.items():
        expected = initial[name] - 0.5 * torch.nan_to_num(g, nan=0.0, posinf=0.0, neginf=0.0)
        torch.testing.assert_close(weights[name], expected)
    assert client.status(model_name)["gradient_counters"]["zeroed_nonfinite"] == 1


def test_max_push_norm_refuses_a_large_push_on_every_shard(service, client, model_name):
    from optserve.common.errors import InvalidArgument

    mode = {"mode": "async", "gradients": {"max_push_norm": 5.0}}
    client.create_model(
        model_name, two_group_model(), {"name": "adam"}, num_shards=3, groups=GROUPS, mode=mode
    )
    before = fingerprint(service, model_name)
    with pytest.raises(InvalidArgument, match="exceeds max_push_norm"):
        client.push(model_name, random_gradient(0, scale=1.0))  # norm about 6
    assert fingerprint(service, model_name) == before
    wait_until_nothing_staged(service, model_name)
    assert client.push(model_name, random_gradient(0, scale=0.5)) == 1


# ---- broken streams ----------------------------------------------------------------------------


def test_a_push_stream_that_breaks_off_leaves_nothing_on_any_shard(service, client, model_name):
    info = client.create_model(
        model_name, {"w": torch.zeros(1 << 16)}, {"name": "adam"}, num_shards=2
    )
    client.push(model_name, {"w": torch.ones(1 << 16)})
    before = fingerprint(service, model_name)
    header = header_frame(shard_pb2.PushHeader(model=model_name, version=1, push_id="cut"))
    release = threading.Event()

    def frames(shard, cut):
        ((group, (a, b)),) = shard.ranges.items()
        chunks = list(chunk_frames(group, torch.ones(b - a), 4096))
        yield header
        yield from chunks[: len(chunks) // 2] if cut else chunks
        if cut:
            release.wait(30)  # the trainer goes away mid-stream

    def push(shard, cut):
        with auth.channel(shard.address) as channel:
            call = channel.stream_unary(
                "/optserve.v1.Shard/Push",
                request_serializer=lambda b: b,
                response_deserializer=shard_pb2.PushResponse.FromString,
            )
            future = call.future(frames(shard, cut), timeout=60)
            if cut:
                time.sleep(1.0)
                future.cancel()
                release.set()
            try:
                future.result()
            except grpc.FutureCancelledError:
                return "cancelled"
            except grpc.RpcError as error:
                return error.code()
            return "ok"

    started = time.monotonic()
    with ThreadPoolExecutor(2) as pool:
        whole, cut = (
            pool.submit(push, info.shards[0], False),
            pool.submit(push, info.shards[1], True),
        )
        assert cut.result() == "cancelled"
        # The shard that got all of its slice hears at once that the push is off (the cut
        # stream reads as one that ended early, or as one that broke).
        assert whole.result() in (grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.ABORTED)
    assert time.monotonic() - started < 30  # not the stage timeout (60 s)
    assert fingerprint(service, model_name) == before
    wait_until_nothing_staged(service, model_name)
    assert client.push(model_name, {"w": torch.ones(1 << 16)}) == 2


def test_a_replayed_push_is_applied_once(service, client, model_name):
    info = client.create_model(model_name, {"w": torch.zeros(16)}, {"name": "adam"})
    frames = [
        header_frame(shard_pb2.PushHeader(model=model_name, version=0, push_id="once")),
        *chunk_frames("default", torch.ones(16)),
    ]
    with auth.channel(info.shards[0].address) as channel:
        call = channel.stream_unary(
            "/optserve.v1.Shard/Push",
            request_serializer=lambda b: b,
            response_deserializer=shard_pb2.PushResponse.FromString,
        )
        assert call(iter(frames), timeout=60).version == 1
        after_first = fingerprint(service, model_name)
        assert call(iter(frames), timeout=60).version == 1  # the same answer, not a second update
    assert fingerprint(service, model_name) == after_first
    assert staged(service, model_name) == [0]


def test_a_finite_overflowing_gradient_cannot_freeze_an_adam_model(client, model_name):
    """One push of 3e38 in every element (finite) used to make Adam's V infinite and freeze
    the weights for good; it is refused on every shard, and training goes on."""
    from optserve.common.errors import InvalidArgument

    client.create_model(model_name, {"w": torch.ones(1000)}, {"name": "adam", "lr": 0.1},
                        num_shards=2)  # fmt: skip
    before, version = client.pull(model_name)
    with pytest.raises(InvalidArgument, match="sum of squares"):
        client.push(model_name, {"w": torch.full((1000,), 3e38)})
    after, same = client.pull(model_name)
    assert same == version and torch.equal(after["w"], before["w"])
    client.push(model_name, {"w": torch.ones(1000)})
    moved, _ = client.pull(model_name)
    assert torch.allclose(moved["w"], before["w"] - 0.1)


def test_an_update_that_would_overflow_the_state_is_refused_on_every_shard(client, model_name):
    """AdaGrad's sum after two pushes of 1.5e19 (each finite, each square finite) would be
    infinite, freezing the element for good. The leader has the update verified on copies; one
    shard finds it non-finite, so no shard applies it; the version passes unchanged, the event
    is counted, and training goes on."""
    from optserve.common.errors import InvalidArgument

    client.create_model(model_name, {"w": torch.ones(1000)}, {"name": "adagrad", "lr": 0.1},
                        num_shards=2)  # fmt: skip
    huge = torch.zeros(1000)
    huge[-1] = 1.5e19  # in the second shard's slice
    assert client.push(model_name, {"w": huge}) == 1  # verified and finite: applied
    before, version = client.pull(model_name)
    with pytest.raises(InvalidArgument, match="non-finite"):
        client.push(model_name, {"w": huge})
    after, now = client.pull(model_name)
    assert now == version + 1 and torch.equal(after["w"], before["w"])
    client.push(model_name, {"w": torch.ones(1000)})
    moved, _ = client.pull(model_name)
    assert torch.isfinite(moved["w"]).all() and not torch.equal(moved["w"][:-1], before["w"][:-1])
    counters = client.status(model_name)["gradient_counters"]
    assert counters["verified"] == 2 and counters["refused_nonfinite_update"] == 1


def test_under_zero_a_gradient_whose_squares_overflow_cannot_freeze_adam(client, model_name):
    """The `zero` policy lets a finite 3e38 through the shard (only NaN/Inf are its business);
    Adam's V would be infinite: the verified update is refused, and nothing changes."""
    from optserve.common.errors import InvalidArgument

    mode = {"mode": "async", "gradients": {"nonfinite": "zero"}}
    client.create_model(model_name, {"w": torch.ones(100)}, {"name": "adam", "lr": 0.1},
                        mode=mode)  # fmt: skip
    with pytest.raises(InvalidArgument, match="non-finite"):
        client.push(model_name, {"w": torch.full((100,), 3e38)})
    weights, version = client.pull(model_name)
    assert version == 1 and torch.equal(weights["w"], torch.ones(100))
    assert client.status(model_name)["groups"]["default"]["state"]["step"] == 0
    client.push(model_name, {"w": torch.ones(100)})
    assert torch.allclose(client.pull(model_name)[0]["w"], torch.full((100,), 0.9))
