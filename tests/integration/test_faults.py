"""Faults of the service itself: a coordinator killed under load, a control change it left half
done, a shard that breaks, a creator that goes away, and nothing left behind by drops and stops.

Each test runs its own service (a coordinator actor of its own name) on the session's Ray, so
killing or stopping it touches no other test's models.
"""

from __future__ import annotations

import os
import signal
import socket
import threading
import time

import pytest
import ray
import torch

from optserve.client import ParameterServerClient, RemoteOptimizer
from optserve.common.config import parse_optimizer_config
from optserve.common.errors import OptserveError, Unavailable
from optserve.server.coordinator import control
from optserve.server.engine.group import GroupEngine
from optserve.server.runtime import start_service
from tests.helpers import auth
from tests.helpers.models import SHAPES, gradient, initial_weights

pytestmark = pytest.mark.slow

ADAM = {"name": "adam", "lr": 0.01}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def kill_coordinator(svc) -> None:
    pid = ray.get(svc.actor.__ray_call__.remote(lambda self: os.getpid()), timeout=60)
    os.kill(pid, signal.SIGKILL)


def wait_until_back(svc, model: str, timeout_s: float = 180) -> None:
    """Until the restarted coordinator answers for `model` again."""
    deadline = time.monotonic() + timeout_s
    with ParameterServerClient(svc.address, timeout_s=10) as c:
        while True:
            try:
                c.describe_model(model)
                return
            except OptserveError:
                assert time.monotonic() < deadline, "the coordinator did not come back"
                time.sleep(0.25)


def service_actors(service: str) -> list[str]:
    return [a["name"] for a in ray.util.list_named_actors(all_namespaces=True)
            if a["name"].startswith(f"optserve-shard:{service}:")]  # fmt: skip


def live_groups(service: str) -> list[str]:
    prefix = f"optserve-pg:{service}:"
    return [g["name"] for g in ray.util.placement_group_table().values()
            if g["name"].startswith(prefix) and g["state"] != "REMOVED"]  # fmt: skip


def flat(tensors) -> torch.Tensor:
    return torch.cat([tensors[n].reshape(-1) for n in SHAPES])


@pytest.fixture()
def own_service(ray_session, tmp_path, request):
    """A service of this test's own, on a fixed port (a restarted coordinator binds it again)."""
    name = f"optserve-{request.node.name[:40]}".replace("_", "-")
    svc = start_service(port=free_port(), checkpoint_dir=str(tmp_path), name=name,
                        edge=auth.edge_config())  # fmt: skip
    yield svc, name
    svc.stop(grace_s=1.0)


def test_training_goes_on_through_a_coordinator_crash_and_loses_nothing(own_service):
    """SIGKILL the coordinator while two RemoteOptimizer trainers push: they go on, pushing
    straight to the shards; the restarted coordinator adopts the shards; the model then equals
    an engine replay of every acknowledged push."""
    svc, _ = own_service
    initial = initial_weights(3)
    with ParameterServerClient(svc.address) as c:
        c.create_model("crash", initial, ADAM, num_shards=2)
        addresses = [s.address for s in c.describe_model("crash").shards]
    acknowledged: dict[tuple[str, int], dict[str, torch.Tensor]] = {}
    killed, back = threading.Event(), threading.Event()
    during: list[int] = []  # versions acknowledged while the coordinator was down
    errors: list[BaseException] = []

    def train(k: int) -> None:
        try:
            params = {n: torch.nn.Parameter(t.clone()) for n, t in initial.items()}
            opt = RemoteOptimizer(params.items(), address=svc.address, model="crash",
                                  trainer=f"t{k}", recover_timeout_s=240)  # fmt: skip
            step, after = 0, 0
            while after < 40:
                grads = gradient(k, step)
                for name, p in params.items():
                    p.grad = grads[name].clone()
                based_on, dropped = opt.version, opt.dropped_pushes
                opt.step()
                if opt.dropped_pushes == dropped:
                    acknowledged[(opt.trainer, based_on)] = grads
                    if killed.is_set() and not back.is_set():
                        during.append(opt.version)
                # The coordinator's path, which waits out its restart: one trainer only, so
                # that the other never waits on the coordinator and keeps pushing throughout.
                if k == 0 and step % 15 == 0:
                    opt.report_metric("loss", float(step), step=step)
                step += 1
                after += back.is_set()
                time.sleep(0.005)
            opt.close()
        except BaseException as exc:  # noqa: BLE001 - reported below
            errors.append(exc)

    threads = [threading.Thread(target=train, args=(k,)) for k in range(2)]
    for thread in threads:
        thread.start()
    with ParameterServerClient(svc.address) as c:
        deadline = time.monotonic() + 120
        while c.describe_model("crash").version < 30:
            assert time.monotonic() < deadline and not errors, errors
            time.sleep(0.05)
    kill_coordinator(svc)
    killed.set()
    wait_until_back(svc, "crash")
    back.set()
    for thread in threads:
        thread.join(timeout=300)
    assert not errors, errors
    assert during, "no push was acknowledged while the coordinator was down"

    with ParameterServerClient(svc.address) as c:
        info = c.describe_model("crash")
        assert [s.address for s in info.shards] == addresses  # adopted, not restored
        status = c.status("crash", history=1000)
        weights, version = c.pull("crash")
    assert "restore" not in [e["action"] for e in status["audit"]]
    log = ray.get(ray.get(svc.actor.shard_actors.remote("crash"))[0].decisions.remote())
    decided = [(t, b) for e in log for t, b in zip(e["trainers"], e["based_on"], strict=True)]
    assert set(acknowledged) <= set(decided)  # no acknowledged update was lost
    assert version == len(log) == len(decided)
    # The replay runs the engine on the shards' own slices: a fused kernel's vector tail may
    # round an element differently than its main loop, so the cut must be the same to match
    # bit for bit.
    cuts = [s.ranges["default"] for s in info.shards]
    engines = [GroupEngine("default", flat(initial)[a:b].clone(), parse_optimizer_config(ADAM))
               for a, b in cuts]  # fmt: skip
    for key in decided:
        grad = flat(acknowledged[key])
        for engine, (a, b) in zip(engines, cuts, strict=True):
            engine.step(grad[a:b].clone(), ADAM["lr"])
    assert torch.equal(flat(weights), torch.cat([e.weights for e in engines]))


def test_a_control_change_cut_short_by_a_crash_is_finished_on_every_shard(own_service):
    svc, _ = own_service
    with ParameterServerClient(svc.address) as c:
        c.create_model("cut", initial_weights(), ADAM, num_shards=2)
        for step in range(3):
            c.push("cut", gradient(0, step), version=step)
    leader, other = ray.get(svc.actor.shard_actors.remote("cut"))
    # What the coordinator does for a swap, stopped after the first shard applied it.
    sgd = {"name": "sgd", "lr": 0.1, "momentum": 0.9}
    config = parse_optimizer_config(sgd)
    op = control.new_op(
        "set_optimizer", {"configs": {"default": config}, "policy": "migrate"},
        entry={"optimizer": config},
        history={"audit": control.audit_entry("test", "set_optimizer", ADAM, sgd)},
    )  # fmt: skip
    boundary = ray.get(leader.pause_updates.remote(op["op_id"], op))
    ray.get(leader.control.remote({**op, "at_version": boundary}))
    kill_coordinator(svc)
    wait_until_back(svc, "cut")
    with ParameterServerClient(svc.address) as c:
        status = c.status("cut")
        assert [s["groups"]["default"]["rule"] for s in status["shards"]] == ["sgd", "sgd"]
        assert status["optimizer"]["name"] == "sgd"
        assert status["audit"][-1]["action"] == "set_optimizer"
        assert status["audit"][-1]["version"] == boundary == 3
        assert c.push("cut", gradient(0, 3), version=3) == 4  # updates flow again
    assert ray.get(leader.paused.remote()) is None and ray.get(other.version.remote()) == 4


def test_a_broken_shard_brings_its_model_back_from_the_checkpoint(service, client, model_name):
    client.create_model(model_name, initial_weights(), ADAM, num_shards=2)
    for step in range(3):
        client.push(model_name, gradient(0, step), version=step)
    saved = client.checkpoint(model_name)
    at_checkpoint, _ = client.pull(model_name)
    for step in range(3, 5):
        client.push(model_name, gradient(0, step), version=step)
    victim = ray.get(service.actor.shard_actors.remote(model_name))[1]
    ray.get(victim.__ray_call__.remote(lambda self: self._state.mark_broken("a test broke it")))
    deadline = time.monotonic() + 120
    while True:
        try:
            status = client.status(model_name)
            if status["audit"] and status["audit"][-1]["action"] == "restore":
                break
        except Unavailable:
            pass
        assert time.monotonic() < deadline, "the model did not come back by itself"
        time.sleep(0.2)
    assert status["audit"][-1]["caller"] == "recovery"
    assert {s["version"] for s in status["shards"]} == {saved["version"]}
    assert all(s["broken"] is None for s in status["shards"])
    weights, version = client.pull(model_name)
    assert version == 3 and all(torch.equal(weights[n], at_checkpoint[n]) for n in SHAPES)
    assert client.push(model_name, gradient(0, 3), version=3) == 4


def test_a_broken_shard_without_a_checkpoint_loses_the_model_and_says_so(
    service, client, model_name
):
    client.create_model(model_name, initial_weights(), ADAM, num_shards=2,
                        checkpoint={"enabled": False})  # fmt: skip
    client.push(model_name, gradient(0, 0), version=0)
    victim = ray.get(service.actor.shard_actors.remote(model_name))[1]
    ray.get(victim.__ray_call__.remote(lambda self: self._state.mark_broken("a test broke it")))
    deadline = time.monotonic() + 60
    while client.status(model_name)["lost"] is None:
        assert time.monotonic() < deadline
        time.sleep(0.2)
    status = client.status(model_name)
    assert "no checkpoint" in status["lost"]
    assert [s["broken"] for s in status["shards"]] == [None, "a test broke it"]
    with pytest.raises(Unavailable, match="a test broke it"):
        client.push(model_name, gradient(0, 1), version=1)
    with pytest.raises(Unavailable, match="is down"):
        client.set_hyperparameters(model_name, lr=0.1)
    text = _scrape(service)
    assert f'optserve_shard_broken{{model="{model_name}",shard="1"}} 1.0' in text


def _scrape(service) -> str:
    import urllib.request

    with urllib.request.urlopen(f"http://{service.metrics_address}/metrics", timeout=30) as r:
        return r.read().decode()


def test_drops_restores_and_a_stop_leave_no_actor_behind(ray_session, tmp_path):
    name = "optserve-cleanup-test"
    svc = start_service(port=0, checkpoint_dir=str(tmp_path), name=name, edge=auth.edge_config())
    try:
        with ParameterServerClient(svc.address) as c:
            for model in ("a", "b"):
                c.create_model(model, initial_weights(), ADAM, num_shards=2)
                c.push(model, gradient(0, 0), version=0)
            c.checkpoint("a")
            c.restore("a", num_shards=3)  # new shards; the old ones go
            assert len(service_actors(name)) == 5 and len(live_groups(name)) == 2
            c.drop_model("b")
            assert len(service_actors(name)) == 3 and len(live_groups(name)) == 1
    finally:
        svc.stop(grace_s=1.0)
    assert service_actors(name) == [] and live_groups(name) == []


def test_a_model_whose_initial_values_never_arrive_is_dropped(ray_session):
    from optserve.server.coordinator.catalogue import Limits
    from optserve.server.coordinator.core import Coordinator

    service = "optserve-abandoned-test"
    coordinator = Coordinator(limits=Limits(initial_values_timeout_s=2.0), service=service)
    try:
        coordinator.reserve("orphan")
        try:
            coordinator.create_model("orphan", [("w", (4,), torch.float32)],
                                     parse_optimizer_config(ADAM), num_shards=2)  # fmt: skip
        finally:
            coordinator.release("orphan")
        assert len(service_actors(service)) == 2
        deadline = time.monotonic() + 60
        while coordinator.list_models():
            assert time.monotonic() < deadline
            time.sleep(0.2)
        assert service_actors(service) == [] and live_groups(service) == []
    finally:
        coordinator.shutdown(1.0)
