"""Local SGD's client logic (client/_local_sgd.py), without a server: inner optimizers built
from our configs, rounds, pseudo-gradients, and the refusals of bad input."""

from __future__ import annotations

import inspect

import pytest
import torch

from optserve.client import InvalidArgument, RemoteOptimizer
from optserve.client._local_sgd import LOCAL_RULES, LocalSGD, build_inner, local_sgd
from optserve.common.config import RULE_NAMES, SGDConfig


def _params() -> list[tuple[str, torch.nn.Parameter]]:
    torch.manual_seed(0)
    return [("w", torch.nn.Parameter(torch.randn(3, 2))), ("b", torch.nn.Parameter(torch.randn(2)))]


@pytest.mark.parametrize("name", sorted(LOCAL_RULES))
def test_each_local_rule_is_torchs_with_our_hyperparameters(name):
    params = [p for _, p in _params()]
    opt = build_inner({"name": name, "lr": 0.05, "weight_decay": 0.01}, params)
    cls, implied = LOCAL_RULES[name]
    assert type(opt) is cls and opt.defaults["lr"] == 0.05
    assert opt.defaults["weight_decay"] == 0.01
    assert all(opt.defaults[k] == v for k, v in implied.items())
    # It steps as torch's own optimizer with the same arguments does.
    ref_params = [p.detach().clone().requires_grad_() for p in params]
    ref = cls(ref_params, lr=0.05, weight_decay=0.01, **implied)
    for p, q in zip(params, ref_params, strict=True):
        p.grad = torch.full_like(p, 0.3)
        q.grad = torch.full_like(q, 0.3)
    opt.step()
    ref.step()
    for p, q in zip(params, ref_params, strict=True):
        torch.testing.assert_close(p, q, rtol=0, atol=0)


def test_betas_and_the_rest_reach_torch():
    opt = build_inner({"name": "adamw", "lr": 1e-3, "betas": [0.8, 0.95], "eps": 1e-6}, [
        torch.nn.Parameter(torch.zeros(2))
    ])  # fmt: skip
    assert opt.defaults["betas"] == (0.8, 0.95) and opt.defaults["eps"] == 1e-6


@pytest.mark.parametrize(
    "inner, said",
    [
        ({"name": "adabound"}, "cannot run on the trainer"),
        ({"name": "ranger"}, "cannot run on the trainer"),
        ({"name": "adam", "lookahead": {"k": 5}}, "lookahead"),
        ({"name": "lion"}, "known names"),
        ({"name": "adamw", "lr": -1}, "lr"),
    ],
)
def test_an_inner_rule_that_cannot_run_here_is_refused(inner, said):
    with pytest.raises(ValueError, match=said) as caught:
        build_inner(inner, [torch.nn.Parameter(torch.zeros(2))])
    assert isinstance(caught.value, InvalidArgument)


def test_every_rule_either_runs_locally_or_is_refused_by_name():
    for name in RULE_NAMES:
        if name not in LOCAL_RULES:
            with pytest.raises(InvalidArgument, match=name):
                build_inner({"name": name}, [torch.nn.Parameter(torch.zeros(2))])


@pytest.mark.parametrize("steps", [0, -3, 2.5, True, "4"])
def test_local_steps_below_one_or_not_an_integer_is_refused(steps):
    with pytest.raises(InvalidArgument, match="local_steps"):
        local_sgd(_params(), steps, {"name": "adamw"})


def test_local_steps_needs_an_inner_optimizer_and_the_default_is_per_step():
    assert local_sgd(_params(), 1, None) is None
    with pytest.raises(InvalidArgument, match="inner optimizer"):
        local_sgd(_params(), 4, None)


def test_remote_optimizer_refuses_bad_local_sgd_before_connecting():
    """Refused before any connection: the address is never dialled."""
    net = torch.nn.Linear(2, 1)
    for kwargs, said in [
        ({"local_steps": 0, "inner": {"name": "adamw"}}, "local_steps"),
        ({"local_steps": 5, "inner": {"name": "nope"}}, "known names"),
        ({"local_steps": 5, "inner": {"name": "ranger"}}, "cannot run on the trainer"),
        ({"local_steps": 5}, "inner optimizer"),
    ]:
        with pytest.raises(InvalidArgument, match=said):
            RemoteOptimizer(net.named_parameters(), address="127.0.0.1:1", model="m", **kwargs)


def test_a_round_is_h_inner_steps_then_the_pseudo_gradient():
    named = _params()
    local = LocalSGD(named, 3, {"name": "sgd", "lr": 0.1})
    start = {n: p.detach().clone() for n, p in named}
    for _, p in named:
        p.grad = torch.ones_like(p)
    assert local.step() is None and local.step() is None
    delta = local.step()
    assert delta is not None and local.steps == 3 and local.in_round == 3
    for name, p in named:  # three SGD steps of lr 0.1 on gradient 1: moved by -0.3
        torch.testing.assert_close(delta[name], start[name] - p)
        torch.testing.assert_close(delta[name], torch.full_like(p, 0.3))
    # New global weights: the next round starts from them; the step count goes on.
    with torch.no_grad():
        for _, p in named:
            p.fill_(1.0)
    local.begin_round()
    assert local.in_round == 0
    assert local.step() is None and local.steps == 4


def test_the_inner_optimizers_state_is_kept_across_rounds():
    named = _params()
    local = LocalSGD(named, 2, {"name": "adamw", "lr": 1e-2})
    for _, p in named:
        p.grad = torch.ones_like(p)
    for _ in range(2):
        local.step()
    local.begin_round()
    local.step()
    state = local.optimizer.state[named[0][1]]
    assert int(state["step"]) == 3 and float(state["exp_avg"].abs().sum()) > 0


def test_local_steps_1_with_an_inner_optimizer_pushes_each_steps_pseudo_gradient():
    named = _params()
    local = local_sgd(named, 1, {"name": "sgd", "lr": 0.5})
    assert local is not None
    for _, p in named:
        p.grad = torch.full_like(p, 2.0)
    delta = local.step()
    assert delta is not None
    for name, _ in named:
        torch.testing.assert_close(delta[name], torch.full_like(delta[name], 1.0))


def test_a_server_only_hyperparameter_runs_locally_only_at_its_default():
    """A field of our config that torch's class lacks (a server-side extension of the rule):
    at its default the rule is torch's and runs; set otherwise it is refused."""
    cls, _ = LOCAL_RULES["sgd"]
    extra = {
        k: f.default
        for k, f in SGDConfig.model_fields.items()
        if k not in ("name", "lookahead") and k not in inspect.signature(cls.__init__).parameters
    }
    if not extra:
        pytest.skip("SGDConfig has no field torch.optim.SGD lacks")
    params = [torch.nn.Parameter(torch.zeros(2))]
    config = {"name": "sgd", "lr": 0.1, "momentum": 0.9, "nesterov": True}
    assert type(build_inner({**config, **extra}, params)) is cls
    key, default = next(iter(extra.items()))
    with pytest.raises(InvalidArgument, match=key):
        build_inner({**config, key: default + 1}, params)
