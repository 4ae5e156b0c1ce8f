"""RAdam and Ranger on torch's fused Adam kernel (engine/fused.py, issue 18).

Once rectified, RAdam's step is Adam's with lr r_t and eps / sqrt(bc2) (and decoupled decay
lambda / r_t), so the fast path runs fused Adam's kernel with those numbers: at fused Adam's
speed, with no compiler. These tests hold it to the oracles (torch.optim.RAdam, the paper's
Lookahead around it for Ranger) over a long run, to the reference path's bits before
rectification, and to its own bits on any slicing of the buffer (any shard count).
"""

from __future__ import annotations

import pytest
import torch

from optserve.common.config import parse_optimizer_config
from optserve.server.engine import kernels
from optserve.server.engine.group import GroupEngine
from tests.unit.test_engine import assert_close, seeded, trajectories

CONFIGS = {
    "radam": {"name": "radam", "lr": 0.01},
    "radam-l2": {"name": "radam", "lr": 0.01, "weight_decay": 0.1},
    "radam-decoupled": {
        "name": "radam",
        "lr": 0.01,
        "weight_decay": 0.1,
        "decoupled_weight_decay": True,
    },  # fmt: skip
    "radam-maximize": {"name": "radam", "lr": 0.003, "maximize": True, "betas": [0.8, 0.99]},
    "radam-eps": {"name": "radam", "lr": 0.01, "eps": 0.1},  # eps counts in the denominator
    "ranger": {"name": "ranger", "lr": 0.01, "weight_decay": 0.05},
    "ranger-gc": {"name": "ranger", "lr": 0.01, "use_gc": True, "k": 4, "alpha": 0.6},
}


@pytest.mark.parametrize("case", sorted(CONFIGS))
def test_fused_radam_follows_its_oracle_over_a_long_run(case):
    engine, expected = trajectories(CONFIGS[case], steps=200, dtype=torch.float32, path="fast")
    assert engine.kernel.kernel == "fused" and engine.fast_path == "fused"
    assert engine.state["step"] == 200 and type(engine.state["step"]) is int
    assert_close(engine.weights, expected, torch.float32)


@pytest.mark.parametrize("case", ["radam", "radam-decoupled"])
def test_a_new_lr_mid_run_reaches_the_kernel(case):
    engine, expected = trajectories(CONFIGS[case], steps=60, dtype=torch.float32, path="fast",
                                    lr_change=0.3)  # fmt: skip
    assert_close(engine.weights, expected, torch.float32)


def test_steps_before_rectification_are_the_reference_paths_bits():
    config = parse_optimizer_config(CONFIGS["radam-decoupled"])
    fast = GroupEngine("g", seeded(3000, 1, torch.float32), config)
    ref = GroupEngine("g", seeded(3000, 1, torch.float32), config, path="reference")
    for step in range(1, 9):  # rho_t > 5 from t = 6 on, with beta2 = 0.999
        grad = seeded(3000, 10 + step, torch.float32)
        fast.step(grad.clone(), config.lr)
        ref.step(grad.clone(), config.lr)
        if step <= 5:
            assert torch.equal(fast.weights, ref.weights), step
    # then fused Adam's kernel: a few ulp from RAdam's own ops (which proves it ran)
    assert not torch.equal(fast.weights, ref.weights)
    torch.testing.assert_close(fast.weights, ref.weights, rtol=1e-5, atol=1e-6)


def test_the_same_bits_on_any_slicing():
    """Each element sees the same arithmetic wherever it lies: 3 unaligned slices (3 shards)
    give the bits of the whole buffer, Lookahead's sync included."""
    numel, cuts = 100_003, (0, 33_331, 66_667, 100_003)
    config = parse_optimizer_config({"name": "ranger", "lr": 0.01, "k": 3})
    whole = GroupEngine("g", seeded(numel, 1, torch.float32), config)
    start = seeded(numel, 1, torch.float32)
    parts = [GroupEngine("g", start[a:b].clone(), config, group_numel=numel)
             for a, b in zip(cuts, cuts[1:], strict=False)]  # fmt: skip
    for step in range(12):
        grad = seeded(numel, 50 + step, torch.float32)
        whole.step(grad.clone(), config.lr)
        for part, a, b in zip(parts, cuts, cuts[1:], strict=False):
            part.step(grad[a:b].clone(), config.lr)
    assert all(p.kernel_record == whole.kernel_record for p in parts)
    assert torch.equal(torch.cat([p.weights for p in parts]), whole.weights)
    slow = torch.cat([p.state["slow_buffer"] for p in parts])
    assert torch.equal(slow, whole.state["slow_buffer"])


def test_a_checkpoint_written_by_the_compiled_kernel_is_continued_by_it():
    """RAdam compiled before it was fused: its checkpoints say so, and a restore keeps those
    bits where this machine compiles (else the fused kernel, saying what that costs)."""
    cpu = torch.device("cpu")
    kept = kernels.honour("compiled", kernels.Choice("fused"), cpu)
    compiles = kernels.compiler_problem("cpu") is None and not kernels.compile_switched_off()
    assert kept.kernel == ("compiled" if compiles else "fused"), kept
    assert "compiled kernel" in kept.why
    config = parse_optimizer_config({"name": "radam", "lr": 0.01})
    engine = GroupEngine("g", seeded(3000, 1, torch.float32), config, kernel="eager")
    assert engine.kernel.kernel == "eager" and engine._fused is None
