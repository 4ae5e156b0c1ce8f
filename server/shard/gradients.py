"""One shard's part of the gradient policy: the edge where a push's slice is checked, once.

A slice that arrives is made this shard's fp32 tensor on its device (in a pooled buffer when
the push brought one), its length checked, its NaN/Inf counted (refused, zeroed or left for the
leader to skip the whole push, as the model's policy says) and its sum of squares taken, in the
same pass: under `reject` a slice whose squares overflow float32 is refused too, since its
update would leave the optimizer state infinite. The leader decides from every shard's counts
(shard/sequencer.py); nothing after this checks the gradient again.
"""

from __future__ import annotations

import math

import torch

from optserve.common.codec import count_nonfinite
from optserve.common.config import GradientPolicy
from optserve.common.errors import InvalidArgument


def checked_slice(
    name: str,
    grad: torch.Tensor,
    length: int,
    policy: GradientPolicy,
    device: torch.device,
    pooled: torch.Tensor | None = None,
) -> tuple[torch.Tensor, int, float]:
    """Group `name`'s slice as this shard keeps it, its NaN/Inf count and its sum of squares
    (0 when a non-finite push will be skipped; inf when the squares overflow float32)."""
    grad = grad.reshape(-1)
    if pooled is not None and grad.numel() == length:
        if grad.data_ptr() != pooled.data_ptr():  # another dtype: converted into it
            pooled.copy_(grad)
        grad = pooled
    # The decoded gradient is ours: kept as it is when it is already fp32 here.
    grad = grad.to(device, torch.float32)
    if grad.numel() != length:
        raise InvalidArgument(
            f"gradient for group {name!r} has {grad.numel()} elements; this shard holds {length}"
        )
    # One pass: the sum of squares is finite only if every element is, and if no square
    # overflows (a "finite" 3e38 that would make Adam's V infinite and freeze the model).
    sumsq = float(torch.linalg.vector_norm(grad)) ** 2 if grad.numel() else 0.0
    bad = 0 if math.isfinite(sumsq) else count_nonfinite(grad)
    if bad and policy.nonfinite == "reject":
        raise InvalidArgument(
            f"gradient for group {name!r} has {bad} NaN/Inf element(s); nothing was "
            "applied (the model's gradient policy rejects them)"
        )
    if not bad and not math.isfinite(sumsq) and policy.nonfinite == "reject":
        raise InvalidArgument(
            f"gradient for group {name!r} has a sum of squares beyond float32 (elements near "
            "or above 1e19): its update would make the optimizer state infinite; nothing was "
            "applied (the model's gradient policy rejects non-finite gradients)"
        )
    if bad and policy.nonfinite == "zero":
        torch.nan_to_num_(grad, nan=0.0, posinf=0.0, neginf=0.0)
        sumsq = float(torch.linalg.vector_norm(grad)) ** 2
    if bad and policy.nonfinite == "skip":
        sumsq = 0.0
    # Whatever the policy, the leader judges the norm: far beyond training, the update is
    # verified on copies before it is applied (shard/verdicts.py).
    return grad, bad, sumsq
