"""Live control: swaps, re-tuning and schedules take effect at one version on every shard."""

from __future__ import annotations

import io
import json
import re
import threading
from concurrent.futures import ThreadPoolExecutor
from contextlib import redirect_stdout

import pytest
import ray
import torch

from optserve.client import ParameterServerClient
from optserve.common.config import parse_optimizer_config, parse_schedule_config
from optserve.common.errors import InvalidArgument
from optserve.server import cli
from optserve.server.engine.group import GroupEngine
from optserve.server.engine.schedules import build_schedule
from tests.helpers.models import SHAPES, gradient, initial_weights, leader_log


def flat(tensors):
    return torch.cat([tensors[name].reshape(-1) for name in SHAPES])


def replay(initial, optimizer, log, audit, grads_by_trainer, schedule=None):
    """The same updates, with the same control changes at the versions the server reported,
    through the update engine on one flat buffer."""
    engine = GroupEngine("default", flat(initial).clone(), parse_optimizer_config(optimizer))
    sched = build_schedule(parse_schedule_config(schedule))
    changes = sorted(audit, key=lambda entry: entry["version"])
    for entry in log:
        version = entry["version"]
        while changes and changes[0]["version"] == version - 1:
            change = changes.pop(0)
            if change["action"] == "set_optimizer":
                new = dict(change["new"])
                policy = new.pop("policy")
                engine.set_optimizer(parse_optimizer_config(new), policy)
            elif change["action"] == "set_schedule":
                sched = build_schedule(parse_schedule_config(change["new"]))
        (name,) = entry["trainers"]
        engine.step(flat(grads_by_trainer[name]).clone(), sched.lr(engine.config.lr, version - 1))
    return engine


def test_ten_swaps_under_load_land_at_one_version_on_every_shard(service, client, model_name):
    initial = initial_weights()
    adam = {"name": "adam", "lr": 0.01}
    sgd = {"name": "sgd", "lr": 0.05, "momentum": 0.9}
    client.create_model(model_name, initial, adam, num_shards=3)
    pushed: dict[str, dict[str, torch.Tensor]] = {}
    stop = threading.Event()

    def train(k):
        with ParameterServerClient(service.address) as c:
            version, i = 0, 0
            while not stop.is_set() or i < 5:
                name = f"t{k}-{i}"
                pushed[name] = gradient(k, i)
                _, version = c.push_and_pull(model_name, pushed[name], version=version,
                                             trainer=name)  # fmt: skip
                i += 1

    reports = []
    with ThreadPoolExecutor(3) as pool:
        futures = [pool.submit(train, k) for k in range(3)]
        for swap in range(10):
            target = sgd if swap % 2 == 0 else adam
            reports.append(client.set_optimizer(model_name, target))
            if swap == 4:
                reports.append(client.set_hyperparameters(model_name, lr=0.02))
            if swap == 6:
                client.set_schedule(model_name, {"name": "exponential", "gamma": 0.99})
        stop.set()
        for future in futures:
            future.result()
    versions = [r["version"] for r in reports]
    assert versions == sorted(versions)
    status = client.status(model_name)
    assert {s["version"] for s in status["shards"]} == {status["version"]}
    assert {s["groups"]["default"]["rule"] for s in status["shards"]} == {"adam"}
    actions = [entry["action"] for entry in status["audit"]]
    assert actions.count("set_optimizer") == 11 and actions.count("set_schedule") == 1
    assert all(entry["caller"] for entry in status["audit"])
    log = leader_log(service, model_name)
    assert [e["version"] for e in log] == list(range(1, status["version"] + 1))
    engine = replay(initial, adam, log, status["audit"], pushed)
    weights, _ = client.pull(model_name)
    torch.testing.assert_close(flat(weights), engine.weights, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize(
    "before, after, policy",
    [
        ({"name": "adam", "lr": 0.01}, {"name": "sgd", "lr": 0.01, "momentum": 0.9}, "migrate"),
        ({"name": "adam", "lr": 0.01}, {"name": "amsgrad", "lr": 0.01}, "migrate"),
        ({"name": "adam", "lr": 0.01}, {"name": "ranger", "lr": 0.01}, "migrate"),
        ({"name": "radam", "lr": 0.01}, {"name": "adabound", "lr": 0.01}, "reset"),
        (
            {"name": "sgd", "lr": 0.05, "momentum": 0.5},
            {"name": "sgd", "lr": 0.05, "momentum": 0.5, "lookahead": {"k": 3, "alpha": 0.5}},
            "migrate",
        ),
    ],  # fmt: skip
    ids=["adam-sgd-C1", "adam-amsgrad", "adam-ranger", "radam-adabound-reset", "lookahead-on"],
)
def test_swaps_through_the_server_match_the_engine(service, client, model_name, before, after,
                                                   policy):  # fmt: skip
    initial = initial_weights(3)
    client.create_model(model_name, initial, before, num_shards=2)
    local = GroupEngine("default", flat(initial).clone(), parse_optimizer_config(before))
    for i in range(6):
        client.push(model_name, gradient(0, i), version=i)
        local.step(flat(gradient(0, i)), local.config.lr)
    weights_at_swap, _ = client.pull(model_name)
    report = client.set_optimizer(model_name, after, policy=policy)
    assert report["version"] == 6 and report["groups"]["default"]["policy"] == policy
    local_report = local.set_optimizer(parse_optimizer_config(after), policy)
    assert report["groups"]["default"]["keys"] == local_report.as_dict()["keys"]
    if policy == "migrate" and "ranger" in after["name"] or "lookahead" in after:
        # Entering Lookahead (Ranger) seeds the slow weights from the current weights (C11).
        shards = ray.get(service.actor.shard_actors.remote(model_name))
        slow = torch.cat([ray.get(s.state_dict.remote())["groups"]["default"]["state"]
                          ["slow_buffer"] for s in shards])  # fmt: skip
        assert torch.equal(slow, flat(weights_at_swap))
    for i in range(6, 12):
        client.push(model_name, gradient(0, i), version=i)
        local.step(flat(gradient(0, i)), local.config.lr)
    weights, version = client.pull(model_name)
    assert version == 12
    torch.testing.assert_close(flat(weights), local.weights, rtol=1e-5, atol=1e-6)


def test_lr_and_schedule_changes_take_effect_at_the_stated_version(client, model_name):
    client.create_model(model_name, initial_weights(), {"name": "sgd", "lr": 0.1}, num_shards=3)
    for i in range(3):
        client.push(model_name, gradient(0, i), version=i)
    report = client.set_hyperparameters(model_name, lr=0.01)
    assert report["version"] == 3 and report["optimizer"]["lr"] == 0.01
    version = client.set_schedule(model_name, {"name": "step", "step_size": 2, "gamma": 0.5})
    assert version == 3
    status = client.status(model_name)
    assert all(s["version"] == 3 for s in status["shards"])
    assert status["groups"]["default"]["lr"] == pytest.approx(0.005)  # 0.01 * 0.5^(3 // 2)
    assert [e["version"] for e in status["audit"]] == [3, 3]
    assert status["audit"][0]["old"]["lr"] == 0.1 and status["audit"][0]["new"]["lr"] == 0.01


@pytest.mark.parametrize(
    "rule, expected",
    [("torch", [1.0, 1.0, 0.5, 0.5, 0.25, 0.25]), ("newbob", [1.0, 1.0, 0.5, 0.25, 0.125, 0.0625])],
)
def test_plateau_fed_by_report_metric_halves_the_lr_as_the_spec_says(
    client, model_name, rule, expected
):
    schedule = {"name": "plateau", "rule": rule, "factor": 0.5, "patience": 0, "threshold": 0}
    client.create_model(model_name, initial_weights(), {"name": "sgd", "lr": 1.0},
                        num_shards=2, schedule=schedule)  # fmt: skip
    lrs = []
    for epoch, value in enumerate([1.0, 0.9, 0.95, 0.8, 0.85, 0.7]):
        client.report_metric(model_name, "val_loss", value, step=epoch)
        lrs.append(client.status(model_name)["groups"]["default"]["lr"])  # after the epoch
    assert lrs == pytest.approx(expected)
    metrics = client.status(model_name)["metrics"]
    assert [m["value"] for m in metrics] == [1.0, 0.9, 0.95, 0.8, 0.85, 0.7]


@pytest.mark.parametrize(
    "call",
    [
        lambda c, m: c.set_optimizer(m, {"name": "adamax"}),
        lambda c, m: c.set_optimizer(m, {"name": "sgd", "lr": -0.1}),
        lambda c, m: c.set_optimizer(m, {"name": "adam", "betas": [0.9, 1.0]}),
        lambda c, m: c.set_optimizer(m, {"name": "adam", "bogus": 1}),
        lambda c, m: c.set_hyperparameters(m, lr=-1.0),
        lambda c, m: c.set_hyperparameters(m, betas=[1.5, 0.9]),
        lambda c, m: c.set_hyperparameters(m, momentum_typo=0.9),
        lambda c, m: c.set_hyperparameters(m, name="sgd"),
        lambda c, m: c.set_schedule(m, {"name": "cosine", "T_max": -3}),
    ],
    ids=[
        "unknown-rule",
        "negative-lr",
        "beta-1",
        "unknown-key",
        "hp-negative-lr",
        "hp-beta",
        "hp-unknown-key",
        "hp-rule-change",
        "bad-schedule",
    ],  # fmt: skip
)
def test_invalid_changes_are_refused_and_change_nothing(client, model_name, call):
    client.create_model(model_name, initial_weights(), {"name": "adam", "lr": 0.01}, num_shards=2)
    client.push(model_name, gradient(0, 0))
    before = client.status(model_name)
    with pytest.raises(InvalidArgument):
        call(client, model_name)
    after = client.status(model_name)
    for key in ("version", "optimizer", "schedule", "audit", "groups"):
        assert after[key] == before[key], key


def test_cli_status_set_optimizer_and_set_schedule(service, client, model_name):
    client.create_model(model_name, initial_weights(), {"name": "adam", "lr": 0.01}, num_shards=2)
    client.push(model_name, gradient(0, 0))

    def run(*argv):
        out = io.StringIO()
        with redirect_stdout(out):
            code = cli.main([argv[0], "--address", service.address, "--model", model_name,
                             *argv[1:]])  # fmt: skip
        return code, out.getvalue()

    code, out = run("set-optimizer", json.dumps({"name": "sgd", "lr": 0.05, "momentum": 0.9}))
    assert code == 0 and "from version 1 on" in out and "momentum_buffer: converted" in out
    code, out = run("set-optimizer", "--set", "lr=0.02", "--set", "nesterov=true")
    assert code == 0 and '"nesterov": true' in out
    code, out = run("set-schedule", json.dumps({"name": "exponential", "gamma": 0.5}))
    assert code == 0 and "from version 1 on" in out
    code, out = run("status")
    # A table of one row per field: the version, the rule, then the audit log.
    assert code == 0 and re.search(r"^version\s+1$", out, re.M), out
    assert re.search(r"^optimizer\s+\{.*\"name\": \"sgd\"", out, re.M), out
    assert "set_optimizer" in out and "set_schedule" in out, out
    code, out = run("status", "--json")
    status = json.loads(out)
    assert status["optimizer"]["nesterov"] is True and len(status["audit"]) == 3
    assert cli.main(["set-optimizer", "--address", service.address, "--model", model_name,
                     json.dumps({"name": "nope"})]) == 2  # fmt: skip
