"""Checkpoints: consistent snapshots, restore into a fresh server, resharding, bad checkpoints."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import ray
import torch

from optserve.client import ParameterServerClient
from optserve.common.errors import FailedPrecondition, ModelRestored, NotFound
from tests.helpers.models import checkpoint_engine

SHAPES = {"weight": (4, 5), "bias": (7,), "kernel": (2, 3, 2, 2)}
RULES = {
    "sgd": {"name": "sgd", "lr": 0.05, "momentum": 0.9, "weight_decay": 0.01},
    "adagrad": {"name": "adagrad", "lr": 0.05, "lr_decay": 0.01},
    "rmsprop": {"name": "rmsprop", "lr": 0.01, "centered": True, "momentum": 0.5},
    "adadelta": {"name": "adadelta"},
    "adam": {"name": "adam", "lr": 0.01},
    "adamw": {"name": "adamw", "lr": 0.01, "weight_decay": 0.1},
    "amsgrad": {"name": "amsgrad", "lr": 0.01},
    "adabound": {"name": "adabound", "lr": 0.01, "amsbound": True},
    "radam": {"name": "radam", "lr": 0.01},
    "ranger": {"name": "ranger", "lr": 0.01, "k": 4},
}


def cases():
    for name, config in RULES.items():
        yield name, config
        if name != "ranger":
            yield f"{name}+lookahead", {**config, "lookahead": {"k": 3, "alpha": 0.5}}


def initial_weights(seed=0):
    generator = torch.Generator().manual_seed(seed)
    return {name: torch.randn(shape, generator=generator) for name, shape in SHAPES.items()}


def gradient(step):
    generator = torch.Generator().manual_seed(500 + step)
    return {name: torch.randn(shape, generator=generator) for name, shape in SHAPES.items()}


def full_state(service, model):
    """Every shard's state dict, joined per group: tensors concatenated, scalars per shard."""
    shards = ray.get(service.actor.shard_actors.remote(model))
    states = ray.get([s.state_dict.remote() for s in shards])
    joined = {}
    for group in states[0]["groups"]:
        parts = [s["groups"][group] for s in states]
        joined[f"{group}/weights"] = torch.cat([p["weights"] for p in parts])
        for key in parts[0]["state"]:
            values = [p["state"][key] for p in parts]
            if isinstance(values[0], torch.Tensor):
                joined[f"{group}/{key}"] = torch.cat(values)
            else:
                joined[f"{group}/{key}"] = values
    return {s["version"] for s in states}, joined, states[0]["schedule_state"]


@pytest.mark.slow  # 19 rule cases, two shard actors each: about 3 minutes here
@pytest.mark.parametrize("case, config", list(cases()), ids=[c for c, _ in cases()])
def test_checkpoint_restores_bit_identically_into_a_fresh_server(
    service, second_service, client, model_name, case, config
):
    client.create_model(model_name, initial_weights(), config,
                        schedule={"name": "exponential", "gamma": 0.97})  # fmt: skip
    for i in range(5):
        client.push(model_name, gradient(i), version=i)
    done = client.checkpoint(model_name)
    assert done["version"] == 5
    with ParameterServerClient(second_service.address) as fresh:
        try:
            info = fresh.restore(model_name, num_shards=1)
            assert info.version == 5
            assert full_state(second_service, model_name)[0] == {5}
            versions, before, schedule = full_state(service, model_name)
            _, after, schedule_after = full_state(second_service, model_name)
            assert before.keys() == after.keys() and schedule == schedule_after
            for key, value in before.items():
                if isinstance(value, torch.Tensor):
                    assert torch.equal(value, after[key]), key
                else:
                    assert value == after[key], key
            for i in range(5, 15):  # the next 10 updates equal the uninterrupted run's
                client.push(model_name, gradient(i), version=i)
                fresh.push(model_name, gradient(i), version=i)
            ours, version = client.pull(model_name)
            theirs, version_fresh = fresh.pull(model_name)
            assert version == version_fresh == 15
            for name in SHAPES:
                assert torch.equal(ours[name], theirs[name]), name
        finally:
            fresh.drop_model(model_name)


def test_a_four_shard_checkpoint_restores_onto_fewer_shards(
    service, second_service, client, model_name
):
    """Onto 3: every new shard's slice cuts across old ones. (The restore plan onto any
    number, 4 -> 2 included, is checked without Ray in tests/unit/test_checkpoint_store.py.)"""
    shards = 3
    config = {"name": "adam", "lr": 0.01, "lookahead": {"k": 2, "alpha": 0.5}}
    client.create_model(model_name, initial_weights(1), config, num_shards=4)
    for i in range(4):
        client.push(model_name, gradient(i), version=i)
    client.checkpoint(model_name)
    with ParameterServerClient(second_service.address) as fresh:
        try:
            info = fresh.restore(model_name, num_shards=shards)
            assert len(info.shards) == shards
            ours, _ = client.pull(model_name)
            theirs, version = fresh.pull(model_name)
            assert version == 4
            assert all(torch.equal(ours[n], theirs[n]) for n in SHAPES)
            for i in range(4, 9):
                client.push(model_name, gradient(i), version=i)
                fresh.push(model_name, gradient(i), version=i)
            ours, _ = client.pull(model_name)
            theirs, _ = fresh.pull(model_name)
            for name in SHAPES:  # fused kernels are element-wise: the cut does not matter
                torch.testing.assert_close(theirs[name], ours[name], rtol=0, atol=1e-7)
        finally:
            fresh.drop_model(model_name)


def test_restore_in_place_rolls_back_and_tells_trainers_to_pull(client, model_name):
    client.create_model(model_name, initial_weights(), {"name": "sgd", "lr": 0.1}, num_shards=2)
    client.push(model_name, gradient(0), version=0)
    saved, _ = client.pull(model_name)
    client.checkpoint(model_name)
    for i in range(1, 4):
        client.push(model_name, gradient(i), version=i)
    info = client.restore(model_name)
    assert info.version == 1 and len(info.shards) == 2
    with (
        ParameterServerClient(client.address) as trainer,
        pytest.raises(ModelRestored, match="pull"),
    ):
        trainer.push(model_name, gradient(9), version=3)  # its gradient is from version 3
    weights, version = client.pull(model_name)
    assert version == 1 and all(torch.equal(weights[n], saved[n]) for n in SHAPES)
    audit = client.status(model_name)["audit"]
    assert [e["action"] for e in audit][-2:] == ["checkpoint", "restore"]


def test_checkpoints_are_listed_and_pruned(client, model_name):
    client.create_model(model_name, initial_weights(), {"name": "sgd", "lr": 0.1})
    names = []
    for i in range(5):
        client.push(model_name, gradient(i), version=i)
        names.append(client.checkpoint(model_name)["name"])
    listed = client.list_checkpoints(model_name)
    assert [c["name"] for c in listed] == names[-3:]  # the server keeps the newest 3
    assert [c["version"] for c in listed] == [3, 4, 5]


def test_interrupted_and_corrupt_checkpoints(service, client, model_name, checkpoint_dir):
    client.create_model(model_name, initial_weights(), {"name": "adam", "lr": 0.01}, num_shards=2)
    client.push(model_name, gradient(0), version=0)
    good = client.checkpoint(model_name)
    client.push(model_name, gradient(1), version=1)
    # A write that died before its manifest: not listed, never loaded.
    partial = Path(checkpoint_dir) / model_name / "9999999999999-000000000002-abc"
    partial.mkdir()
    (partial / "shard-00000-of-00002.safetensors").write_bytes(b"half a file")
    (partial / "manifest.json.tmp").write_text("{")
    assert [c["name"] for c in client.list_checkpoints(model_name)] == [good["name"]]
    running, version = client.pull(model_name)
    # A damaged shard file of the newest is refused and the running model is untouched.
    newest = client.checkpoint(model_name)
    files = sorted((Path(checkpoint_dir) / model_name / newest["name"]).glob("shard-*"))
    assert len(files) == 2 and newest["bytes"] == sum(f.stat().st_size for f in files)
    manifest = json.loads(files[0].with_name("manifest.json").read_text())
    at = manifest["shards"][1]["tensors"]["default/state/exp_avg"]["offset"]
    data = bytearray(files[1].read_bytes())
    data[at + 3] ^= 0xFF  # in shard 1's exp_avg (the file's fillers are not state)
    files[1].write_bytes(bytes(data))
    with pytest.raises(FailedPrecondition, match="checksum"):
        client.restore(model_name, newest["name"])
    after, version_after = client.pull(model_name)
    assert version_after == version == 2
    assert all(torch.equal(running[n], after[n]) for n in SHAPES)
    # Asked for the newest, the server falls back to the newest sound one.
    assert client.restore(model_name).version == 1
    assert client.status(model_name)["audit"][-1]["new"]["checkpoint"] == good["name"]
    # A checkpoint of another model put in its place is refused too.
    third = client.checkpoint(model_name)
    manifest = Path(checkpoint_dir) / model_name / third["name"] / "manifest.json"
    body = json.loads(manifest.read_text())
    body["model"] = "someone-else"
    manifest.write_text(json.dumps(body))
    with pytest.raises(FailedPrecondition, match="holds model"):
        client.restore(model_name, third["name"])
    with pytest.raises(NotFound):
        client.restore(model_name, "0000000000000-000000000000-abc")
    # No shard of the refused restores was left behind.
    shards = [a["name"] for a in ray.util.list_named_actors(all_namespaces=True)
              if f":{model_name}:" in a["name"]]  # fmt: skip
    assert len(shards) == 2


def test_periodic_checkpoints(client, model_name):
    client.create_model(model_name, initial_weights(), {"name": "sgd", "lr": 0.1},
                        checkpoint={"every_versions": 3})  # fmt: skip
    for i in range(7):
        client.push(model_name, gradient(i), version=i)
    import time

    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        versions = [c["version"] for c in client.list_checkpoints(model_name)]
        if versions and versions[-1] >= 6:
            break
        time.sleep(0.2)
    assert versions and versions[-1] >= 6 and all(v >= 3 for v in versions)


@pytest.mark.slow
def test_a_killed_shard_comes_back_from_the_checkpoint_and_training_goes_on(
    service, client, model_name, checkpoint_dir
):
    import os
    import signal
    import threading
    import time

    from optserve.client import RemoteOptimizer

    config = {"name": "adam", "lr": 0.01}
    initial = initial_weights(2)
    client.create_model(model_name, initial, config, num_shards=2)
    pushed: dict[tuple[str, int], dict[str, torch.Tensor]] = {}
    killed = threading.Event()
    after_kill = {}

    def train(k):
        params = {n: torch.nn.Parameter(t.clone()) for n, t in initial.items()}
        opt = RemoteOptimizer(params.items(), address=service.address, model=model_name,
                              trainer=f"t{k}", recover_timeout_s=240)  # fmt: skip
        try:
            i = 0
            while after_kill.get(k, 0) < 15:
                grads = gradient(100 * k + i)
                for name, p in params.items():
                    p.grad = grads[name].clone()
                pushed[(opt.trainer, opt.version)] = grads  # keyed as the leader logs it
                opt.step()
                i += 1
                if killed.is_set():
                    after_kill[k] = after_kill.get(k, 0) + 1
                time.sleep(0.005)
        finally:
            opt.close()

    threads = [threading.Thread(target=train, args=(k,)) for k in range(2)]
    for thread in threads:
        thread.start()
    deadline = time.monotonic() + 120
    while client.describe_model(model_name).version < 10 and time.monotonic() < deadline:
        time.sleep(0.05)
    saved = client.checkpoint(model_name)
    while client.describe_model(model_name).version < saved["version"] + 5:
        time.sleep(0.05)
    victim = ray.get(service.actor.shard_actors.remote(model_name))[1]
    os.kill(ray.get(victim.__ray_call__.remote(lambda self: os.getpid())), signal.SIGKILL)
    killed.set()
    for thread in threads:
        thread.join(timeout=300)
    assert not any(t.is_alive() for t in threads)
    status = client.status(model_name)
    assert [e["action"] for e in status["audit"]][-1] == "restore"
    assert {s["version"] for s in status["shards"]} == {status["version"]}
    assert status["version"] >= saved["version"] + 20  # both trainers went on after it
    # Replay from the checkpoint, in the order the new leader logged the pushes since.
    ckpt, engines = checkpoint_engine(checkpoint_dir, model_name, saved["name"])
    assert ckpt.version == saved["version"]
    engine = engines["default"]
    leader = ray.get(service.actor.shard_actors.remote(model_name))[0]
    for entry in ray.get(leader.decisions.remote()):
        ((trainer, based_on),) = zip(entry["trainers"], entry["based_on"], strict=True)
        grads = pushed[(trainer, based_on)]
        engine.step(torch.cat([grads[n].reshape(-1) for n in SHAPES]), 0.01)
    weights, version = client.pull(model_name)
    assert version == status["version"]
    flat = torch.cat([weights[n].reshape(-1) for n in SHAPES])
    torch.testing.assert_close(flat, engine.weights, rtol=1e-5, atol=1e-6)


@pytest.mark.slow
def test_a_restarted_coordinator_adopts_running_models_and_restores_lost_ones(
    ray_session, tmp_path
):
    """A running model is adopted as it is (no update rolled back); a model whose shards all
    died while the coordinator was down comes back from its newest checkpoint."""
    import os
    import signal
    import socket
    import time

    from optserve.server.runtime import start_service

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    svc = start_service(port=port, checkpoint_dir=str(tmp_path), name="optserve-restart-test")
    try:
        with ParameterServerClient(svc.address) as c:
            for model in ("kept", "gone"):
                c.create_model(model, initial_weights(), {"name": "adam", "lr": 0.01},
                               num_shards=2)  # fmt: skip
                for i in range(3):
                    c.push(model, gradient(i), version=i)
                c.checkpoint(model)
            for i in range(3, 5):  # after the checkpoint: kept by the running shards only
                c.push("kept", gradient(i), version=i)
            before, _ = c.pull("kept")
            saved, _ = c.pull("gone")
        gone = ray.get(svc.actor.shard_actors.remote("gone"))
        pid = ray.get(svc.actor.__ray_call__.remote(lambda self: os.getpid()))
        os.kill(pid, signal.SIGKILL)  # Ray restarts it; the shards go on meanwhile
        for shard in gone:  # while it is down, one model loses every shard
            ray.kill(shard)
        deadline = time.monotonic() + 180
        with ParameterServerClient(svc.address, timeout_s=10) as c:
            while True:
                try:
                    kept = c.describe_model("kept")
                    restored = c.describe_model("gone")
                    break
                except Exception:  # noqa: BLE001 - still restarting, or restoring
                    assert time.monotonic() < deadline, "the coordinator did not come back"
                    time.sleep(0.5)
            assert kept.version == 5 and len(kept.shards) == 2
            after, _ = c.pull("kept")
            assert all(torch.equal(before[n], after[n]) for n in SHAPES)
            assert c.push("kept", gradient(5), version=5) == 6
            assert restored.version == 3
            weights, _ = c.pull("gone")
            assert all(torch.equal(saved[n], weights[n]) for n in SHAPES)
            assert c.status("gone")["audit"][-1]["caller"] == "startup"
    finally:
        svc.stop(grace_s=1.0)
