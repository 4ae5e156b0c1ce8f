"""Delayed Nesterov, `sgd` with `delay` > 1 (engine/delayed_nesterov.py; Liu, Douillard et al.
2024, Algorithm 3). Its match with the paper's rule (tests/unit/oracles.py) over many steps, on
every path, and its state round trip are in test_engine's CASES; here: delay 1 is torch's SGD bit
for bit, what a window of pushes adds up to, the kernel it takes, and its migrations."""

from __future__ import annotations

import pytest
import torch

from optserve.common.config import parse_optimizer_config
from optserve.common.errors import InvalidArgument
from optserve.server.engine import build_rule
from optserve.server.engine.delayed_nesterov import DelayedNesterov
from optserve.server.engine.fused import fused_available
from optserve.server.engine.group import CHUNK_ELEMENTS, GroupEngine
from optserve.server.engine.kernels import (
    COMPILE_MIN_ELEMENTS,
    choose,
    compile_switched_off,
    compiler_problem,
)
from optserve.server.engine.sgd import SGD
from tests.unit.test_engine import seeded

DN = {"name": "sgd", "lr": 0.7, "momentum": 0.9, "nesterov": True, "delay": 4}
NESTEROV = {**DN, "delay": 1}
N = 300


def engine(config, weights=None, path="reference"):
    w = seeded(N, 0) if weights is None else weights.clone()
    return GroupEngine("g", w, parse_optimizer_config(config), path=path)


def run(eng, gradients):
    for g in gradients:
        eng.step(g.clone(), eng.config.lr)


def stream(steps, seed=0, dtype=torch.float64):
    return [seeded(N, 1000 * seed + i, dtype) for i in range(steps)]


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize(
    "config",
    [
        {"name": "sgd", "lr": 0.05},
        {"name": "sgd", "lr": 0.05, "momentum": 0.9, "dampening": 0.1, "weight_decay": 0.01},
        {"name": "sgd", "lr": 0.7, "momentum": 0.9, "nesterov": True, "maximize": True},
    ],
    ids=["plain", "momentum", "nesterov"],
)
def test_delay_one_is_torch_sgd_bit_for_bit(config, dtype):
    """`delay: 1` (the default, here written out) builds the SGD rule itself, whose reference
    path is op for op torch's single-tensor SGD: equal bits, not merely close ones."""
    config = {**config, "delay": 1}
    assert type(build_rule(parse_optimizer_config(config))) is SGD
    weights = seeded(N, 0, dtype)
    ours = engine(config, weights)
    param = torch.nn.Parameter(weights.clone())
    options = {k: v for k, v in config.items() if k not in ("name", "delay")}
    oracle = torch.optim.SGD([param], foreach=False, **options)
    for g in stream(50, dtype=dtype):
        ours.step(g.clone(), config["lr"])
        param.grad = g.clone()
        oracle.step()
    assert torch.equal(ours.weights, param.detach())


def test_a_window_of_pushes_is_one_nesterov_step_on_their_mean():
    """At every window's end, DN has moved the weights exactly as torch's Nesterov SGD does
    when it steps once per window with the window's mean gradient (DN's purpose: one momentum
    update per N stale pseudo-gradients). In between, each push moves them by lr * g / N."""
    delay, windows = 4, 12
    gradients = stream(delay * windows, seed=1)
    dn = engine(DN)
    param = torch.nn.Parameter(seeded(N, 0))
    nesterov = torch.optim.SGD([param], lr=0.7, momentum=0.9, nesterov=True)
    for w in range(windows):
        window = gradients[w * delay : (w + 1) * delay]
        for i, g in enumerate(window):
            before = dn.weights.clone()
            dn.step(g.clone(), 0.7)
            if i < delay - 1:
                assert torch.allclose(before - dn.weights, 0.7 * g / delay, rtol=0, atol=1e-14)
                assert dn.state["delay_counter"] == i + 1
        param.grad = torch.stack(window).mean(0)
        nesterov.step()
        assert dn.state["delay_counter"] == 0 and not dn.state["delay_buffer"].any()
        assert (dn.weights - param.detach()).abs().max() < 1e-12, w
        assert (
            dn.state["momentum_buffer"] - nesterov.state[param]["momentum_buffer"]
        ).abs().max() < 1e-12


def test_delay_needs_nesterov_and_a_whole_number_of_at_least_one():
    for config, quoted in [
        ({"name": "sgd", "delay": 4}, "requires nesterov=true"),
        ({"name": "sgd", "delay": 4, "momentum": 0.9}, "requires nesterov=true"),
        ({**DN, "delay": 0}, "greater than or equal to 1"),
        ({**DN, "delay": 2.5}, "2.5"),
        ({**DN, "delay": "4"}, "'4'"),
    ]:
        with pytest.raises(InvalidArgument) as info:
            parse_optimizer_config(config)
        assert quoted in str(info.value), (config, str(info.value))


def test_it_never_takes_torchs_fused_sgd_and_swaps_back_to_it():
    """torch's fused SGD cannot run DN: the group steps with the rule's own update (eager, or
    compiled on a large group where this machine compiles); swapped back to delay 1, plain SGD
    takes the fused kernel again, as a fresh SGD group would."""
    cpu = torch.device("cpu")
    assert fused_available(build_rule(parse_optimizer_config(NESTEROV)), cpu)  # type: ignore[arg-type]
    rule = build_rule(parse_optimizer_config(DN))
    assert isinstance(rule, DelayedNesterov) and not fused_available(rule, cpu)
    eng = GroupEngine("g", torch.zeros(N), parse_optimizer_config(NESTEROV))
    assert eng.kernel.kernel == "fused"
    eng.set_optimizer(parse_optimizer_config(DN), "migrate")
    assert eng.kernel.kernel == "eager" and eng._fused is None
    assert eng.describe()["scalars"] == {"delay_counter": 0}
    eng.set_optimizer(parse_optimizer_config(NESTEROV), "migrate")
    assert eng.kernel.kernel == "fused"
    # A large group: the compiled kernel where this machine compiles (test_compiled runs it).
    big = choose("sgd", fused_available(rule, cpu), COMPILE_MIN_ELEMENTS, cpu)
    compiles = compiler_problem("cpu") is None and not compile_switched_off()
    assert big.kernel == ("compiled" if compiles else "eager")


def test_stays_finite_sees_the_window_overflow_and_changes_nothing():
    """The window's sum can overflow where no single gradient does; `stays_finite` finds it
    on copies, leaving the weights, the buffers and the counter as they were."""
    n = CHUNK_ELEMENTS + 10
    eng = GroupEngine("g", torch.ones(n), parse_optimizer_config({**DN, "lr": 1e-30}))
    grad = torch.zeros(n)
    grad[-1] = 3e38  # float32's largest is 3.4e38: two of them sum to inf
    assert eng.stays_finite(grad, 1e-30)
    eng.step(grad.clone(), 1e-30)
    saved = {k: v.clone() if isinstance(v, torch.Tensor) else v for k, v in eng.state.items()}
    weights = eng.weights.clone()
    assert not eng.stays_finite(grad, 1e-30)
    assert eng.stays_finite(torch.ones(n), 1e-30)
    assert torch.equal(eng.weights, weights) and eng.state["delay_counter"] == 1
    for key, value in saved.items():
        if isinstance(value, torch.Tensor):
            assert torch.equal(eng.state[key], value), key


def test_a_checkpoint_without_the_window_is_refused():
    eng = engine(DN)
    run(eng, stream(3))
    saved = eng.state_dict()
    del saved["state"]["delay_buffer"]
    with pytest.raises(ValueError, match="delay_buffer"):
        engine({"name": "sgd"}).load_state_dict(saved)


# ---- migration (spec section 5) ---------------------------------------------------------------


def actions(report):
    return {key: action for key, (action, _) in report.entries.items()}


def test_nesterov_to_delayed_nesterov_keeps_the_momentum_and_opens_a_window():
    eng = engine(NESTEROV)
    run(eng, stream(10))
    momentum = eng.state["momentum_buffer"].clone()
    report = eng.set_optimizer(parse_optimizer_config(DN), "migrate")
    assert actions(report) == {"momentum_buffer": "kept", "delay_buffer": "fresh",
                               "delay_counter": "fresh"}  # fmt: skip
    assert torch.equal(eng.state["momentum_buffer"], momentum)
    assert eng.state["delay_counter"] == 0 and not eng.state["delay_buffer"].any()
    # The first window closes on m as Nesterov left it: m <- mu m + mean g.
    window = stream(4, seed=2)
    run(eng, window)
    expected = 0.9 * momentum + torch.stack(window).mean(0)
    assert (eng.state["momentum_buffer"] - expected).abs().max() < 1e-12


def test_delayed_nesterov_to_nesterov_keeps_the_momentum_and_drops_the_window():
    eng = engine(DN)
    run(eng, stream(10))  # two windows closed, two pushes open
    report = eng.set_optimizer(parse_optimizer_config(NESTEROV), "migrate")
    assert actions(report) == {"momentum_buffer": "kept", "delay_buffer": "dropped",
                               "delay_counter": "dropped"}  # fmt: skip
    assert set(eng.state) == {"momentum_buffer"}


@pytest.mark.parametrize("delay, carried", [(8, True), (3, True), (2, False)])
def test_a_new_delay_carries_the_open_window_when_it_still_fits(delay, carried):
    eng = engine(DN)
    run(eng, stream(6))  # one window closed, two pushes open
    window = eng.state["delay_buffer"].clone()
    report = eng.set_optimizer(parse_optimizer_config({**DN, "delay": delay}), "migrate")
    assert actions(report)["momentum_buffer"] == "kept"
    assert actions(report)["delay_buffer"] == ("kept" if carried else "fresh")
    assert eng.state["delay_counter"] == (2 if carried else 0)
    assert torch.equal(eng.state["delay_buffer"], window if carried else torch.zeros(N))


def test_a_swap_to_the_same_config_continues_the_run_bit_for_bit():
    gradients = stream(23)
    a, b = engine(DN), engine(DN)
    run(a, gradients[:10])
    run(b, gradients[:10])
    report = b.set_optimizer(parse_optimizer_config(DN), "migrate")
    assert set(actions(report).values()) == {"kept"}
    run(a, gradients[10:])
    run(b, gradients[10:])
    assert torch.equal(a.weights, b.weights)


def test_keep_with_a_smaller_delay_closes_the_window_at_the_next_push():
    eng = engine(DN)
    run(eng, stream(3))  # three pushes open
    report = eng.set_optimizer(parse_optimizer_config({**DN, "delay": 2}), "keep")
    assert set(actions(report).values()) == {"kept"} and eng.state["delay_counter"] == 3
    momentum = eng.state["momentum_buffer"].clone()
    window = eng.state["delay_buffer"].clone()
    g = seeded(N, 99)
    eng.step(g.clone(), 0.7)
    assert eng.state["delay_counter"] == 0
    assert torch.allclose(eng.state["momentum_buffer"], 0.9 * momentum + (window + g) / 2)


def test_adam_to_delayed_nesterov_converts_its_first_moment():
    eng = engine({"name": "adam", "lr": 0.01})
    run(eng, [0.3 + g for g in stream(50)])
    report = eng.set_optimizer(parse_optimizer_config(DN), "migrate")
    assert actions(report) == {"momentum_buffer": "converted", "delay_buffer": "fresh",
                               "delay_counter": "fresh", "exp_avg": "dropped",
                               "exp_avg_sq": "dropped", "step": "dropped"}  # fmt: skip
    assert eng.state["momentum_buffer"].mean() > 1  # about 0.3 / (1 - 0.9) = 3


@pytest.mark.parametrize("pushes, estimated", [(3, False), (6, True)])
def test_its_momentum_estimates_the_gradient_once_a_window_has_closed(pushes, estimated):
    """m is zero until the first window closes: before, it says nothing of the gradient. To
    the Adam family nothing carries either way (C9: SGD keeps no second moment)."""
    eng = engine(DN)
    run(eng, [0.3 + g for g in stream(pushes)])
    g_hat = eng.rule.estimates(eng.state).g_hat
    assert (g_hat is not None) == estimated
    if g_hat is not None:  # (1 - mu) m, SGD's stationary reading of its buffer
        assert torch.equal(g_hat, (1 - 0.9) * eng.state["momentum_buffer"])
    report = eng.set_optimizer(parse_optimizer_config({"name": "adam", "lr": 0.01}), "migrate")
    assert actions(report) == {"exp_avg": "fresh", "exp_avg_sq": "fresh", "step": "fresh",
                               "momentum_buffer": "dropped", "delay_buffer": "dropped",
                               "delay_counter": "dropped"}  # fmt: skip
