"""The compiled path (engine/compiled.py): each rule's own `update`, compiled, against the same
`update` run eagerly (the reference path).

Each structural variant compiles once per process (a few seconds cold; inductor caches on disk).
"""

from __future__ import annotations

import pytest
import torch

from optserve.common.config import parse_optimizer_config
from optserve.server.engine import build_rule, compiled, kernels
from optserve.server.engine.fused import fused_available
from optserve.server.engine.group import GroupEngine
from tests.unit.test_engine import CASES, seeded

NUMEL = 5000  # below CHUNK_ELEMENTS: without the kernel, the engine would take the reference path


def _base(config):
    rule = build_rule(config)
    return getattr(rule, "inner", rule)


# Rules that take the compiled path here: those torch has no fused kernel for on this device
# (the others' compiled kernels serve devices without one; tested on their own below).
COMPILED_CASES = sorted(
    key
    for key, cfg in CASES.items()
    if not fused_available(_base(parse_optimizer_config(cfg)), torch.device("cpu"))
)


@pytest.fixture
def compile_small(monkeypatch):
    """Let the engine compile buffers of test size."""
    monkeypatch.setattr(kernels, "COMPILE_MIN_ELEMENTS", 1)
    monkeypatch.delenv("OPTSERVE_COMPILE", raising=False)


def test_the_rules_without_a_fused_kernel_take_the_compiled_path():
    names = {parse_optimizer_config(CASES[key]).name for key in COMPILED_CASES}
    # RAdam, Ranger: fused Adam's kernel; sgd: Delayed Nesterov (delay > 1), which torch's
    # fused SGD cannot run
    assert names == {"rmsprop", "adadelta", "adabound", "sgd"}
    delayed = {key for key in COMPILED_CASES if CASES[key]["name"] == "sgd"}
    assert all(CASES[key].get("delay", 1) > 1 for key in delayed)


@pytest.mark.parametrize("case", COMPILED_CASES)
def test_compiled_path_equals_reference_path(case, compile_small):
    config = parse_optimizer_config(CASES[case])
    fast = GroupEngine("g", seeded(NUMEL, 1, torch.float32), config)
    ref = GroupEngine("g", seeded(NUMEL, 1, torch.float32), config, path="reference")
    assert fast.fast_path == "compiled", fast.kernel  # compiled before the constructor returned
    record = "compiled+sync" if config.lookahead else "compiled"
    assert fast.kernel.kernel == "compiled" and fast.describe()["kernel"] == record
    lr = config.lr
    # Once compiled, changing every per-step number (lr, bias corrections, bounds) and the
    # buffer length must not compile again: they travel as tensors, shapes are dynamic.
    with torch._dynamo.config.patch(error_on_recompile=True):
        for step in range(30):
            if step == 15:
                lr *= 0.3
            grad = seeded(NUMEL, step + 10, torch.float32)
            fast.step(grad.clone(), lr)
            ref.step(grad.clone(), lr)
    torch.testing.assert_close(fast.weights, ref.weights, rtol=1e-5, atol=1e-6)
    assert set(fast.state) == set(ref.state)
    for key, value in ref.state.items():
        if isinstance(value, torch.Tensor):
            torch.testing.assert_close(fast.state[key], value, rtol=1e-5, atol=1e-5)
        else:
            assert fast.state[key] == value, key


@pytest.mark.parametrize(
    "config",
    [
        {"name": "adagrad", "lr": 0.05, "lr_decay": 0.01, "weight_decay": 0.01},
        {"name": "sgd", "lr": 0.05, "momentum": 0.9, "nesterov": True},
        {"name": "adamw", "lr": 0.01, "amsgrad": True},
    ],
    ids=lambda c: c["name"],
)
def test_rules_with_a_fused_kernel_compile_too(config):
    """For devices without torch's fused kernel (Adagrad on CUDA): the same `update`, compiled.
    SGD's first step (the buffer is created as a copy of g) is a compiled variant of its own."""
    config = parse_optimizer_config(config)
    rule = build_rule(config)
    weights, ref_weights = seeded(NUMEL, 1, torch.float32), seeded(NUMEL, 1, torch.float32)
    state, ref_state = rule.init_state(weights), rule.init_state(ref_weights)
    step = compiled.CompiledStep(rule, weights)
    assert step.ready, step.error
    with torch._dynamo.config.patch(error_on_recompile=True):
        for i in range(20):
            grad = seeded(NUMEL, i + 10, torch.float32)
            step.step(weights, grad, state, rule.prepare(state, config.lr, weights))
            rule.apply(ref_weights, grad, ref_state, config.lr)
    torch.testing.assert_close(weights, ref_weights, rtol=1e-5, atol=1e-6)
    for key, value in ref_state.items():
        if isinstance(value, torch.Tensor):
            torch.testing.assert_close(state[key], value, rtol=1e-5, atol=1e-6)


def test_engine_steps_eagerly_and_says_why_if_compiling_fails(compile_small, monkeypatch):
    def broken(fn):
        def fail(*args, **kwargs):
            raise RuntimeError("no compiler here")

        return fail

    monkeypatch.setattr(compiled, "_compiled", broken)
    config = parse_optimizer_config({"name": "rmsprop", "lr": 0.01})
    fast = GroupEngine("g", seeded(NUMEL, 1, torch.float32), config)
    ref = GroupEngine("g", seeded(NUMEL, 1, torch.float32), config, path="reference")
    assert fast._compiled is None and fast.fast_path == "reference"
    assert fast.kernel.kernel == "eager" and "no compiler here" in fast.kernel.why
    for step in range(5):
        grad = seeded(NUMEL, step, torch.float32)
        fast.step(grad.clone(), 0.01)
        ref.step(grad.clone(), 0.01)
    assert torch.equal(fast.weights, ref.weights)


def test_compiling_can_be_turned_off(compile_small, monkeypatch):
    monkeypatch.setenv("OPTSERVE_COMPILE", "off")
    engine = GroupEngine("g", torch.zeros(NUMEL), parse_optimizer_config({"name": "rmsprop"}))
    assert engine._compiled is None and engine.fast_path == "reference"
    assert engine.kernel == kernels.Choice("eager", "OPTSERVE_COMPILE=off")


def test_small_groups_are_not_compiled_and_the_group_not_the_slice_decides():
    config = parse_optimizer_config({"name": "adabound"})
    engine = GroupEngine("g", torch.zeros(NUMEL), config)
    assert engine._compiled is None and engine.kernel.kernel == "eager"
    assert "fewer than" in engine.kernel.why
    # A shard's small slice of a large group takes the group's kernel, as every shard does.
    if kernels.compiler_problem("cpu") is None and not kernels.compile_switched_off():
        part = GroupEngine("g", torch.zeros(NUMEL), config,
                           group_numel=kernels.COMPILE_MIN_ELEMENTS)  # fmt: skip
        assert part.kernel.kernel == "compiled" and part.fast_path == "compiled"


def test_eager_steps_stay_bit_exact_while_a_kernel_compiles_elsewhere():
    """A compile in one thread must not change how another thread's eager steps round (ops.py
    asks whether *this* frame is being traced, not whether a compile runs somewhere)."""
    import threading

    config = parse_optimizer_config({"name": "adadelta", "lr": 0.5, "weight_decay": 0.01})

    rule = build_rule(config)
    start, grad = seeded(NUMEL, 1, torch.float32), seeded(NUMEL, 2, torch.float32)

    def eager_run():  # one step from the same start: any other rounding shows
        weights = start.clone()
        rule.apply(weights, grad.clone(), rule.init_state(weights), config.lr)
        return weights

    baseline = eager_run()
    # a structure no other test compiles (maximize), so that this compile really traces
    other = build_rule(
        parse_optimizer_config({"name": "rmsprop", "centered": True, "maximize": True})
    )
    compiling = threading.Thread(target=compiled.CompiledStep, args=(other, torch.zeros(NUMEL)))
    compiling.start()
    overlapped = runs = 0
    while compiling.is_alive():
        overlapped += torch.compiler.is_compiling()  # a compile session is open in the process
        assert torch.equal(eager_run(), baseline)
        runs += 1
    compiling.join()
    assert runs > 0
    if not overlapped:
        pytest.skip(f"the compile ended before an eager run overlapped it ({runs} runs)")


def test_the_kernel_is_chosen_from_the_rule_and_the_group_and_a_restore_keeps_the_recorded():
    cpu = torch.device("cpu")
    big = kernels.COMPILE_MIN_ELEMENTS
    assert kernels.choose("adam", True, 10, cpu) == kernels.Choice("fused")
    assert kernels.choose("radam", False, big - 1, cpu).kernel == "eager"
    compiled_here = kernels.compiler_problem("cpu") is None and not kernels.compile_switched_off()
    wanted = kernels.choose("radam", False, big, cpu)
    assert wanted.kernel == ("compiled" if compiled_here else "eager")
    # A checkpoint written by the eager kernel is continued by it, where a compiler is too;
    # one written compiled, where there is none, says what that costs.
    assert kernels.honour("eager", kernels.Choice("compiled"), cpu).kernel == "eager"
    assert kernels.honour("compiled", kernels.Choice("compiled"), cpu).kernel == "compiled"
    lost = kernels.honour("compiled", kernels.Choice("eager", "no C++ compiler"), cpu)
    assert lost.kernel == "eager" and "few ulp" in lost.why
    assert kernels.honour("unknown", wanted, cpu) == wanted


def test_a_restored_group_takes_its_recorded_kernel(compile_small):
    config = parse_optimizer_config({"name": "rmsprop", "lr": 0.01})
    engine = GroupEngine("g", seeded(NUMEL, 1, torch.float32), config)
    saved = engine.state_dict()
    assert saved["kernel"] == engine.kernel.kernel
    restored = GroupEngine("g", seeded(NUMEL, 1, torch.float32), config)
    restored.load_state_dict({**saved, "kernel": "eager"})
    assert restored.kernel.kernel == "eager" and restored.fast_path == "reference"
    again = GroupEngine("g", seeded(NUMEL, 1, torch.float32), config, kernel="eager")
    assert again.kernel.kernel == "eager" and "eager kernel" in again.kernel.why


@pytest.mark.parametrize(
    "config",
    [{"name": "adam", "lr": 0.01, "lookahead": {"k": 2, "alpha": 0.5}},
     {"name": "ranger", "lr": 0.01, "k": 2}],
    ids=["adam+lookahead", "ranger"],
)  # fmt: skip
def test_lookaheads_sync_is_compiled_with_the_fast_kernels(config, compile_small):
    """One pass over the weights and the slow weights (engine/lookahead.py's
    sync_slow_weights, compiled), within a few ulp of the eager sync's four."""
    config = parse_optimizer_config(config)
    fast = GroupEngine("g", seeded(NUMEL, 1, torch.float32), config)
    ref = GroupEngine("g", seeded(NUMEL, 1, torch.float32), config, path="reference")
    assert fast._sync is not None and ref._sync is None
    kernel = "fused"  # Adam's own; Ranger's RAdam on fused Adam's kernel
    assert fast.kernel_record == fast.state_dict()["kernel"] == f"{kernel}+sync"
    for step in range(7):
        grad = seeded(NUMEL, step + 10, torch.float32)
        fast.step(grad.clone(), config.lr)
        ref.step(grad.clone(), config.lr)
    assert fast.state["counter"] == ref.state["counter"] == 1
    torch.testing.assert_close(fast.weights, ref.weights, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(fast.state["slow_buffer"], ref.state["slow_buffer"])
    eager = GroupEngine("g", seeded(NUMEL, 1, torch.float32), config, kernel="eager")
    assert eager._sync is None  # the eager kernel syncs eagerly: bit-exact with the paper's
    # A checkpoint written with the eager sync is continued with it; a new lr keeps it too.
    kept = GroupEngine("g", seeded(NUMEL, 1, torch.float32), config, kernel=kernel)
    assert kept._sync is None and kept.kernel_record == kernel
    kept.set_optimizer(config.model_copy(update={"lr": 0.5 * config.lr}), "migrate")
    assert kept._sync is None and kept.kernel_record == kernel
