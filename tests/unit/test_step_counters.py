"""Step counters are exact integers on every path (issue 18).

torch keeps `step` as a float32 tensor, which stops counting at 2^24 = 16,777,216 (spec section 3
and pitfall 9): 2^24 + 1 rounds back to 2^24. The engine's counter is a Python int on every path
(fused, compiled, chunked, reference), so it keeps counting past 2^24, never goes backwards, and a
checkpoint stores the step that was taken. The oracle for the updates at such a step is torch's
single-tensor path given the step as a float64 tensor, which it reads with `.item()`.
"""

from __future__ import annotations

import pytest
import torch

from optserve.common.config import parse_optimizer_config
from optserve.server.engine import build_rule, compiled
from optserve.server.engine.group import CHUNK_ELEMENTS, GroupEngine
from tests.unit.test_engine import seeded

BIG = 2**24  # float32 represents every integer up to here, and not 2^24 + 1
STEPS = 3

FUSED = {  # rules torch has a fused kernel for on the CPU: the engine's fast path takes it
    "adam": {"name": "adam", "lr": 0.01},
    "adamw": {"name": "adamw", "lr": 0.01, "weight_decay": 0.1},
    "amsgrad": {"name": "amsgrad", "lr": 0.01},
    "adagrad": {"name": "adagrad", "lr": 0.05, "lr_decay": 1e-6},
    "adam+lookahead": {"name": "adam", "lr": 0.01, "lookahead": {"k": 2}},
    "radam": {"name": "radam", "lr": 0.01},  # on fused Adam's kernel (engine/fused.py)
    "ranger": {"name": "ranger", "lr": 0.01, "k": 2},
}
EAGER = {  # rules without one: the compiled and chunked paths serve them
    "radam": {"name": "radam", "lr": 0.01},  # on the eager and compiled kernels too
    "adabound": {"name": "adabound", "lr": 0.01},
    "rmsprop": {"name": "rmsprop", "lr": 0.01},
    "adadelta": {"name": "adadelta"},
    "ranger": {"name": "ranger", "lr": 0.01, "k": 2},
}


def at_big_step(
    config: dict, numel: int, path: str = "fast", kernel: str | None = None
) -> GroupEngine:
    engine = GroupEngine("g", seeded(numel, 1, torch.float32), parse_optimizer_config(config),
                         path=path, kernel=kernel)  # fmt: skip
    engine.state["step"] = BIG
    return engine


def step_and_check_counter(engine: GroupEngine, steps: int = STEPS) -> None:
    numel = engine.weights.numel()
    for i in range(steps):
        engine.step(seeded(numel, 100 + i, torch.float32), engine.config.lr)
        assert engine.state["step"] == BIG + i + 1, (engine.fast_path, engine.state["step"])
        assert type(engine.state["step"]) is int


def assert_round_trips(engine: GroupEngine) -> None:
    """A checkpoint's state dict keeps the exact step, and the restored engine counts on."""
    saved = engine.state_dict()
    assert saved["state"]["step"] == BIG + STEPS and type(saved["state"]["step"]) is int
    restored = GroupEngine("g", engine.weights.clone(), parse_optimizer_config({"name": "sgd"}),
                           path="reference")  # fmt: skip
    restored.load_state_dict(saved)
    assert restored.state["step"] == BIG + STEPS
    restored.step(seeded(engine.weights.numel(), 7, torch.float32), engine.config.lr)
    assert restored.state["step"] == BIG + STEPS + 1


@pytest.mark.parametrize("case", sorted(FUSED))
def test_fused_path_counts_past_2_to_the_24(case):
    fused = at_big_step(FUSED[case], 1000)
    assert fused.fast_path == "fused"
    reference = at_big_step(FUSED[case], 1000, path="reference")
    step_and_check_counter(fused)
    step_and_check_counter(reference)
    # The kernel saw the step (within a float32 ulp) in its bias corrections and lr_decay.
    torch.testing.assert_close(fused.weights, reference.weights, rtol=1e-5, atol=1e-6)
    assert_round_trips(fused)


@pytest.mark.parametrize("case", sorted(EAGER))
def test_chunked_path_counts_past_2_to_the_24(case):
    chunked = at_big_step(EAGER[case], CHUNK_ELEMENTS + 100, kernel="eager")
    assert chunked.fast_path == "chunked"
    step_and_check_counter(chunked)
    assert_round_trips(chunked)


@pytest.mark.parametrize("case", sorted(FUSED.keys() | EAGER.keys()))
def test_reference_path_counts_past_2_to_the_24(case):
    reference = at_big_step({**FUSED, **EAGER}[case], 100, path="reference")
    step_and_check_counter(reference)
    assert_round_trips(reference)


@pytest.mark.parametrize("case", ["radam", "adabound"])
def test_compiled_path_counts_past_2_to_the_24(case):
    config = parse_optimizer_config(EAGER[case])
    rule = build_rule(config)
    weights = seeded(1000, 1, torch.float32)
    state = rule.init_state(weights)
    state["step"] = BIG
    kernel = compiled.CompiledStep(rule, weights)  # compiled by the time it returns
    assert kernel.ready, kernel.error
    for i in range(STEPS):
        grad = seeded(1000, 100 + i, torch.float32)
        kernel.step(weights, grad, state, rule.prepare(state, config.lr, weights))
        assert state["step"] == BIG + i + 1 and type(state["step"]) is int


@pytest.mark.parametrize(
    ("config", "torch_cls", "torch_kwargs"),
    [
        ({"name": "adam", "lr": 0.01, "betas": [0.9, 0.9999999]}, torch.optim.Adam,
         {"betas": (0.9, 0.9999999)}),
        ({"name": "adagrad", "lr": 0.05, "lr_decay": 1e-6}, torch.optim.Adagrad,
         {"lr_decay": 1e-6}),
        ({"name": "radam", "lr": 0.01, "betas": [0.9, 0.9999999]}, torch.optim.RAdam,
         {"betas": (0.9, 0.9999999)}),
    ],
    ids=lambda v: v["name"] if isinstance(v, dict) and "name" in v else "",
)  # fmt: skip
def test_updates_past_2_to_the_24_match_torch_with_an_exact_step(config, torch_cls, torch_kwargs):
    """At t > 2^24 the step still matters: beta2 = 1 - 1e-7 gives 1 - beta2^t = 0.81, and
    lr_decay 1e-6 divides the lr by 17.8. torch's single-tensor path, handed a float64 step
    (exact to 2^53), is the oracle; the engine's reference path matches it to the bit."""
    weights = seeded(50, 1)
    engine = GroupEngine("g", weights.clone(), parse_optimizer_config(config), path="reference")
    param = torch.nn.Parameter(weights.clone())
    oracle = torch_cls([param], lr=config["lr"], foreach=False, **torch_kwargs)
    warm = seeded(50, 2).abs()
    engine.state["step"] = BIG
    for key, value in engine.state.items():
        if key != "step" and isinstance(value, torch.Tensor):
            value.copy_(warm)  # a warm state, the same on both sides
    oracle.state[param] = {
        k: torch.tensor(float(v), dtype=torch.float64) if k == "step" else v.clone()
        for k, v in engine.state.items()
    }
    for i in range(STEPS):
        grad = seeded(50, 100 + i)
        engine.step(grad.clone(), config["lr"])
        param.grad = grad.clone()
        oracle.step()
    assert engine.state["step"] == BIG + STEPS == oracle.state[param]["step"].item()
    assert torch.equal(engine.weights, param.detach())
