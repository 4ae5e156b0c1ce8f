"""Schedules against torch.optim.lr_scheduler (or a hand trace where torch has none)."""

from __future__ import annotations

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
