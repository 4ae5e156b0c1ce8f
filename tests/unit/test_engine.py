"""Every rule on a flat buffer equals its torch.optim oracle run per parameter (spec 6.1)."""

from __future__ import annotations

import inspect

import pytest
import torch

from optserve.client.config import AdamConfig, SGDConfig, parse_optimizer_config
from optserve.server.engine import build_rule

SHAPES = [(4, 5), (7,), (2, 3, 2, 2)]

# (our config, the oracle's constructor): one table drives every contract below.
CASES = {
    "sgd": ({"name": "sgd", "lr": 0.05}, lambda p: torch.optim.SGD(p, lr=0.05)),
    "sgd-momentum": (
        {"name": "sgd", "lr": 0.05, "momentum": 0.9},
        lambda p: torch.optim.SGD(p, lr=0.05, momentum=0.9),
    ),
    "sgd-nesterov-l2": (
        {"name": "sgd", "lr": 0.05, "momentum": 0.9, "nesterov": True, "weight_decay": 0.01},
        lambda p: torch.optim.SGD(p, lr=0.05, momentum=0.9, nesterov=True, weight_decay=0.01),
    ),
    "sgd-dampening-maximize": (
        {"name": "sgd", "lr": 0.01, "momentum": 0.5, "dampening": 0.3, "maximize": True},
        lambda p: torch.optim.SGD(p, lr=0.01, momentum=0.5, dampening=0.3, maximize=True),
    ),
    "adam": ({"name": "adam", "lr": 0.01}, lambda p: torch.optim.Adam(p, lr=0.01)),
    "adam-l2-betas": (
        {"name": "adam", "lr": 0.003, "betas": [0.8, 0.99], "eps": 1e-6, "weight_decay": 0.1},
        lambda p: torch.optim.Adam(p, lr=0.003, betas=(0.8, 0.99), eps=1e-6, weight_decay=0.1),
    ),
    "adam-amsgrad": (
        {"name": "adam", "lr": 0.01, "amsgrad": True},
        lambda p: torch.optim.Adam(p, lr=0.01, amsgrad=True),
    ),
}


def seeded(shape, seed):
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed))


def run_both(case, steps=30, dtype=torch.float32):
    config, oracle_factory = CASES[case]
    params = [torch.nn.Parameter(seeded(s, i).to(dtype)) for i, s in enumerate(SHAPES)]
    oracle = oracle_factory(params)
    rule = build_rule(parse_optimizer_config(config))
    flat = torch.cat([p.detach().reshape(-1) for p in params]).clone()
    state = rule.init_state(flat)
    for step in range(steps):
        grads = [seeded(s, 1000 * step + i).to(dtype) for i, s in enumerate(SHAPES)]
        for p, g in zip(params, grads, strict=True):
            p.grad = g
        oracle.step()
        rule.apply(flat, torch.cat([g.reshape(-1) for g in grads]), state, config["lr"])
    return flat, torch.cat([p.detach().reshape(-1) for p in params]), oracle, state


@pytest.mark.parametrize("case", sorted(CASES))
def test_flat_rule_equals_torch_oracle(case):
    ours, oracle, _, _ = run_both(case)
    assert torch.equal(ours, oracle), (ours - oracle).abs().max()


@pytest.mark.parametrize("case", sorted(CASES))
def test_state_matches_oracle_state(case):
    _, _, oracle, state = run_both(case, steps=5)
    for key in ("exp_avg", "exp_avg_sq", "max_exp_avg_sq", "momentum_buffer"):
        per_param = [oracle.state[p].get(key) for p in oracle.param_groups[0]["params"]]
        if per_param[0] is None:
            assert key not in state
            continue
        assert torch.equal(state[key], torch.cat([t.reshape(-1) for t in per_param]))
    if "step" in oracle.state[oracle.param_groups[0]["params"][0]]:
        assert state["step"] == 5


@pytest.mark.parametrize("case", sorted(CASES))
def test_float64_agrees(case):
    ours, oracle, _, _ = run_both(case, steps=10, dtype=torch.float64)
    assert (ours.double() - oracle).abs().max() <= 1e-6


@pytest.mark.parametrize("case", sorted(CASES))
def test_zero_lr_changes_nothing(case):
    config = {**CASES[case][0], "lr": 0.0}
    rule = build_rule(parse_optimizer_config(config))
    flat = seeded(20, 0)
    before = flat.clone()
    state = rule.init_state(flat)
    for step in range(3):
        rule.apply(flat, seeded(20, step + 1), state, 0.0)
    assert torch.equal(flat, before)


@pytest.mark.parametrize("case", sorted(CASES))
def test_converges_on_a_quadratic(case):
    config = {**CASES[case][0], "maximize": False, "weight_decay": 0.0}
    rule = build_rule(parse_optimizer_config(config))
    target = seeded(16, 3)
    x = torch.zeros(16)
    state = rule.init_state(x)
    # Adam's steps are about lr in size whatever the gradient, so it needs a small lr to settle.
    lr = 0.01 if config["name"] == "adam" else 0.05
    for _ in range(1000):
        rule.apply(x, 2 * (x - target), state, lr)
    assert (x - target).abs().max() < 1e-2


def test_sgd_without_momentum_keeps_no_state():
    rule = build_rule(SGDConfig(lr=0.1))
    state = rule.init_state(torch.zeros(3))
    rule.apply(torch.zeros(3), torch.ones(3), state, 0.1)
    assert state == {}


@pytest.mark.parametrize(
    "ours, oracle",
    [(SGDConfig, torch.optim.SGD), (AdamConfig, torch.optim.Adam)],
)
def test_defaults_are_the_oracles(ours, oracle):
    signature = inspect.signature(oracle.__init__).parameters
    for field, info in ours.model_fields.items():
        if field == "name":
            continue
        assert field in signature, f"{field} is not an argument of {oracle.__name__}"
        default = signature[field].default
        assert info.default == (tuple(default) if isinstance(default, tuple) else default), field
