"""Which kernel steps a group: chosen once from the model's config, never by a race.

Three kernels, each deterministic on its own (the same inputs give the same bits, whatever the
buffer's length or offset, so on any shard count):

* `fused`: torch's fused kernel, for the rules and devices torch has one for, RAdam and Ranger
  included (they step with fused Adam's kernel and RAdam's scalars: engine/fused.py);
* `compiled`: the rule's own `update` compiled by inductor (engine/compiled.py), for the other
  rules (RMSprop, AdaDelta, AdaBound, SGD's Delayed Nesterov) on groups of at least
  COMPILE_MIN_ELEMENTS elements (the whole group's, not a shard's slice: every shard of a model
  takes the same kernel);
* `eager`: the rule's `update` in torch's eager ops, slice by slice on a large CPU buffer
  (bit-identical to the reference path).

The kernels round a few operations differently (a few ulp per step), so the
kernel is part of a run's numerics: it is chosen when a group's rule is set (create, restore,
swap), shown per group in status and recorded in checkpoints; a restore takes the recorded one.
A compile happens before the group takes its first push, and inductor's on-disk cache
(TORCHINDUCTOR_CACHE_DIR, by default under the temporary directory) spares a restart or a
second shard on the same machine most of the work.
"""

from __future__ import annotations

import functools
import logging
import os
from dataclasses import dataclass

import torch

log = logging.getLogger(__name__)

KERNELS = ("fused", "compiled", "eager")
# Below this many elements in a group, a step costs well under a millisecond on any kernel and a
# compile (seconds of CPU) would not pay for itself; tests' small models stay eager.
COMPILE_MIN_ELEMENTS = 1 << 20


@dataclass(frozen=True)
class Choice:
    """A group's kernel and, when it is not the fastest there could be, why."""

    kernel: str
    why: str = ""


def compile_switched_off() -> bool:
    """OPTSERVE_COMPILE=off (or 0, false, no) in the environment: never compile."""
    return os.environ.get("OPTSERVE_COMPILE", "auto").lower() in ("off", "0", "false", "no")


@functools.cache
def compiler_problem(device_type: str = "cpu") -> str | None:
    """Why inductor cannot compile for `device_type` on this machine (None: it can): a C++
    compiler for the CPU, Triton for CUDA. Asked once per process."""
    if device_type == "cpu":
        from torch._inductor.cpp_builder import get_cpp_compiler

        try:
            get_cpp_compiler()
        except Exception:  # noqa: BLE001 - inductor's InvalidCxxCompiler, or anything it raises
            return "no C++ compiler (g++ or clang++) on the PATH"
        return None
    if device_type == "cuda":
        from torch.utils._triton import has_triton

        return None if has_triton() else "no Triton for CUDA"
    return f"inductor does not compile for {device_type!r} here"


def choose(rule_name: str, fused: bool, numel: int, device: torch.device) -> Choice:
    """The kernel for a group of `numel` elements (the whole group's) whose inner rule is
    `rule_name`; `fused` says whether torch has a fused kernel for it on `device`."""
    if fused:
        return Choice("fused")
    if numel < COMPILE_MIN_ELEMENTS:
        return Choice("eager", f"the group has fewer than {COMPILE_MIN_ELEMENTS:,} elements")
    if compile_switched_off():
        return Choice("eager", "OPTSERVE_COMPILE=off")
    problem = compiler_problem(device.type)
    if problem is not None:
        return Choice("eager", f"{problem}: {rule_name} steps in eager torch ops")
    return Choice("compiled")


def honour(recorded: str, choice: Choice, device: torch.device) -> Choice:
    """The kernel a restore takes: the one its checkpoint recorded, where this machine has it
    (the same bits as the run that wrote it); else what `choose` says, with why."""
    if recorded == choice.kernel or recorded not in KERNELS:
        return choice
    if recorded == "eager":
        return Choice("eager", "the run so far (a checkpoint) stepped with the eager kernel")
    why = "the run so far (a checkpoint) stepped with the compiled kernel"
    if recorded == "compiled" and choice.kernel == "fused":  # RAdam's, before it was fused
        off = compile_switched_off()
        problem = "OPTSERVE_COMPILE=off" if off else compiler_problem(device.type)
        if problem is None:
            return Choice("compiled", why)
        return Choice("fused", f"{why}, but here: {problem}; results differ by a few ulp a step")
    if recorded == "compiled" and choice.kernel == "eager":
        problem = compiler_problem(device.type) or choice.why
        return Choice("eager", f"{why}, but here: {problem}; results differ by a few ulp a step")
    return choice  # "fused" recorded where torch has none (another device): no choice
