"""Schedules against torch.optim.lr_scheduler (or a hand trace where torch has none)."""

from __future__ import annotations

import json
import math

import pytest
import torch

from optserve.common.config import parse_optimizer_config, parse_schedule_config
from optserve.common.errors import InvalidArgument
from optserve.server.engine.schedules import build_schedule
from optserve.server.shard.state import GroupInit, ShardState
from tests.helpers.shard import push

BASE_LR = 0.1
STEPS = 100


def torch_lrs(make_scheduler, steps=STEPS):
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=BASE_LR)
    scheduler = make_scheduler(opt)
    lrs = []
    for _ in range(steps):
        lrs.append(opt.param_groups[0]["lr"])
        opt.step()
        scheduler.step()
    return lrs


S = torch.optim.lr_scheduler
CASES = {
    "constant": ({"name": "constant"}, lambda o: S.LambdaLR(o, lambda t: 1.0)),
    "step": ({"name": "step", "step_size": 7, "gamma": 0.5}, lambda o: S.StepLR(o, 7, 0.5)),
    "multistep": (
        {"name": "multistep", "milestones": [10, 30, 31], "gamma": 0.3},
        lambda o: S.MultiStepLR(o, [10, 30, 31], 0.3),
    ),
    "exponential-gamma": (
        {"name": "exponential", "gamma": 0.97},
        lambda o: S.ExponentialLR(o, 0.97),
    ),
    "exponential-survey": (
        {"name": "exponential", "r": 40},
        lambda o: S.ExponentialLR(o, 10 ** (-1 / 40)),
    ),
    "reciprocal": (
        {"name": "reciprocal", "r": 20, "c": 0.7},
        lambda o: S.LambdaLR(o, lambda t: (1 + t / 20) ** -0.7),
    ),
    "cosine": (
        {"name": "cosine", "T_max": 60, "eta_min": 0.001},
        lambda o: S.CosineAnnealingLR(o, T_max=60, eta_min=0.001),
    ),
    "warmup": (
        {"name": "warmup", "warmup_steps": 10},
        lambda o: S.LambdaLR(o, lambda t: min(1.0, t / 10)),
    ),
    "warmup-cosine": (
        {"name": "warmup", "warmup_steps": 10, "then": {"name": "cosine", "T_max": 50}},
        lambda o: S.SequentialLR(
            o, [S.LambdaLR(o, lambda t: t / 10), S.CosineAnnealingLR(o, T_max=50)], [10]
        ),
    ),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_schedule_matches_torch(case):
    config, make = CASES[case]
    schedule = build_schedule(parse_schedule_config(config))
    ours = [schedule.lr(BASE_LR, t) for t in range(STEPS)]
    expected = torch_lrs(make)
    for t, (a, b) in enumerate(zip(ours, expected, strict=True)):
        assert math.isclose(a, b, rel_tol=1e-9, abs_tol=1e-12), (t, a, b)


@pytest.mark.parametrize("case", ["step", "exponential-survey", "warmup-cosine"])
@pytest.mark.parametrize("rule", ["adam", "sgd"])
def test_updates_under_a_schedule_match_torch(case, rule):
    config, make = CASES[case]
    optimizer = {"name": rule, "lr": BASE_LR, **({"momentum": 0.9} if rule == "sgd" else {})}
    param = torch.nn.Parameter(torch.randn(30, generator=torch.Generator().manual_seed(0)))
    shard = ShardState(
        "m", 0, {"default": GroupInit(param.detach().clone(), parse_optimizer_config(optimizer))},
        schedule=config, path="reference",
    )  # fmt: skip
    torch_opt = (torch.optim.Adam if rule == "adam" else torch.optim.SGD)(
        [param], lr=BASE_LR, **({"momentum": 0.9} if rule == "sgd" else {})
    )
    scheduler = make(torch_opt)
    for step in range(60):
        grad = torch.randn(30, generator=torch.Generator().manual_seed(step + 1))
        param.grad = grad.clone()
        torch_opt.step()
        scheduler.step()
        push(shard, {"default": grad}, shard.version)
    _, weights = shard.snapshot()
    assert torch.allclose(weights["default"], param.detach(), rtol=1e-5, atol=1e-6)


VALIDATION = [1.0, 0.9, 0.95, 0.8, 0.85, 0.7]


@pytest.mark.parametrize(
    "rule, expected",
    [
        ("torch", [1.0, 1.0, 0.5, 0.5, 0.25, 0.25]),  # the spec's verified torch sequence
        ("newbob", [1.0, 1.0, 0.5, 0.25, 0.125, 0.0625]),  # halve every epoch once triggered
    ],
)
def test_plateau_example_from_the_spec(rule, expected):
    config = {"name": "plateau", "rule": rule, "factor": 0.5, "patience": 0, "threshold": 0}
    schedule = build_schedule(parse_schedule_config(config))
    lrs = []
    for value in VALIDATION:
        schedule.observe("val_loss", value)
        lrs.append(schedule.lr(1.0, 0))
    assert lrs == expected


def test_torch_plateau_matches_reduce_lr_on_plateau_with_defaults():
    values = [1.0, 0.99, 0.98] + [0.98] * 30 + [0.5] + [0.6] * 25
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
    torch_sched = S.ReduceLROnPlateau(opt, cooldown=2)
    ours = build_schedule(
        parse_schedule_config({"name": "plateau", "rule": "torch", "cooldown": 2})
    )
    for value in values:
        torch_sched.step(value)
        ours.observe("val_loss", value)
        assert math.isclose(ours.lr(1.0, 0), opt.param_groups[0]["lr"], rel_tol=1e-12)


# Settings of ReduceLROnPlateau's arguments, eps in particular (issue 18: `eps` was accepted and
# ignored); each runs on three groups at once, since torch applies eps per group.
PLATEAU_SETTINGS = [
    {"factor": 0.5, "patience": 0, "eps": 0.3},
    {"factor": 0.5, "patience": 0, "eps": 0.3, "threshold": 0.0},
    {"factor": 0.1, "patience": 2, "eps": 1e-3, "cooldown": 1},
    {"factor": 0.7, "patience": 1, "eps": 0.05, "min_lr": 0.2},
    {"factor": 0.5, "patience": 0, "eps": 0.0, "min_lr": 0.1, "threshold": 0.05,
     "threshold_mode": "abs"},
    {"factor": 0.3, "patience": 0, "eps": 0.01, "mode": "max", "threshold": 0.01},
    {"factor": 0.5, "patience": 0},  # torch's default eps 1e-8
]  # fmt: skip
GROUP_LRS = [1.0, 0.3, 0.05]


def _metric_streams():
    gen = torch.Generator().manual_seed(3)
    noisy = (1.0 / (1 + torch.arange(40) / 10) + 0.05 * torch.randn(40, generator=gen)).tolist()
    walk = (1.0 + 0.1 * torch.randn(40, generator=gen).cumsum(0)).tolist()
    return {"worsening": [1.0 + i for i in range(12)], "noisy": noisy, "walk": walk}


@pytest.mark.parametrize("stream", sorted(_metric_streams()))
@pytest.mark.parametrize("setting", PLATEAU_SETTINGS, ids=lambda s: json.dumps(s))
def test_torch_plateau_matches_reduce_lr_on_plateau(setting, stream):
    """Every group's lr after every report is torch's (bit for bit: the same multiplications),
    and a report says it changed the lr exactly when torch changed some group's lr."""
    groups = [{"params": [torch.nn.Parameter(torch.zeros(1))], "lr": lr} for lr in GROUP_LRS]
    opt = torch.optim.SGD(groups, lr=1.0)
    torch_sched = S.ReduceLROnPlateau(opt, **setting)
    ours = build_schedule(parse_schedule_config({"name": "plateau", "rule": "torch", **setting}))
    for value in _metric_streams()[stream]:
        before = [group["lr"] for group in opt.param_groups]
        torch_sched.step(value)
        expected = [group["lr"] for group in opt.param_groups]
        changed = ours.observe("val_loss", value, GROUP_LRS)
        assert [ours.lr(lr, 0) for lr in GROUP_LRS] == expected, (value, expected)
        assert changed == (before != expected)


def test_plateau_eps_example_from_the_issue():
    """lr 1, factor 0.5, eps 0.3: 1 -> 0.5 is applied, 0.5 -> 0.25 (0.25 < eps) is not, for
    good. newbob applies eps the same way."""
    for rule in ("torch", "newbob"):
        config = {"name": "plateau", "rule": rule, "factor": 0.5, "patience": 0, "eps": 0.3}
        schedule = build_schedule(parse_schedule_config(config))
        lrs = []
        for value in (1.0, 2.0, 3.0, 4.0, 5.0):
            schedule.observe("val_loss", value, [1.0])
            lrs.append(schedule.lr(1.0, 0))
        assert lrs == [1.0, 0.5, 0.5, 0.5, 0.5], rule
        assert schedule.lr(0.1, 0) == 0.1  # a group whose every reduction is below eps


def test_plateau_report_says_whether_a_group_lr_changed():
    shard = ShardState(
        "m", 0, {"default": GroupInit(torch.zeros(4), parse_optimizer_config({"name": "sgd",
                                                                               "lr": 1.0}))},
        schedule={"name": "plateau", "rule": "torch", "factor": 0.5, "patience": 0, "eps": 0.3},
        path="reference",
    )  # fmt: skip
    assert [shard.report_metric("val_loss", v) for v in (1.0, 2.0, 3.0)] == [False, True, False]
    assert shard.lr("default") == 0.5


def test_plateau_state_round_trips_and_reads_the_older_scale():
    config = parse_schedule_config({"name": "plateau", "rule": "torch", "factor": 0.5,
                                    "patience": 0, "min_lr": 0.01})  # fmt: skip
    schedule = build_schedule(config)
    for value in (1.0, 2.0, 3.0, 4.0):
        schedule.observe("val_loss", value)
    restored = build_schedule(config)
    restored.load_state_dict(schedule.state_dict())
    assert restored.lr(0.2, 0) == schedule.lr(0.2, 0) == 0.025
    older = {**schedule.state_dict(), "scale": 0.125}  # what a checkpoint held before
    del older["reductions"]
    restored = build_schedule(config)
    restored.load_state_dict(older)
    assert restored.reductions == 3 and restored.lr(0.2, 0) == 0.025


def test_plateau_ignores_other_metrics_and_round_trips():
    schedule = build_schedule(parse_schedule_config({"name": "plateau", "metric": "val_acc",
                                                     "mode": "max"}))  # fmt: skip
    assert not schedule.observe("loss", 5.0)
    schedule.observe("val_acc", 0.5)
    assert schedule.observe("val_acc", 0.4)
    saved = schedule.state_dict()
    other = build_schedule(parse_schedule_config({"name": "plateau", "metric": "val_acc",
                                                  "mode": "max"}))  # fmt: skip
    other.load_state_dict(saved)
    assert other.lr(1.0, 0) == schedule.lr(1.0, 0) == 0.5


@pytest.mark.parametrize(
    "config",
    [
        {"name": "step"},
        {"name": "step", "step_size": 0},
        {"name": "exponential", "gamma": 0.9, "r": 3},
        {"name": "multistep", "milestones": []},
        {"name": "cosine", "T_max": 10, "eta_min": -1},
        {"name": "plateau", "factor": 1.5},
        {"name": "warmup", "warmup_steps": 5, "then": {"name": "nope"}},
        {"name": "linear"},
    ],
)
def test_invalid_schedules_are_refused(config):
    with pytest.raises(InvalidArgument):
        parse_schedule_config(config)
