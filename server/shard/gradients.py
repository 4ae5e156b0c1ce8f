"""One shard's part of the gradient policy: the edge where a push's slice is checked, once.

A slice that arrives is made this shard's fp32 tensor on its device (in a pooled buffer when
the push brought one), its length checked, its NaN/Inf counted (refused, zeroed or left for the
leader to skip the whole push, as the model's policy says) and its sum of squares taken when
the policy clips by norm. The leader decides from every shard's counts (shard/sequencer.py);
nothing after this checks the gradient again.
"""

from __future__ import annotations

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
    (0 when the policy needs no norm, or when a non-finite push will be skipped)."""
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
    bad = count_nonfinite(grad)
    if bad and policy.nonfinite == "reject":
        raise InvalidArgument(
            f"gradient for group {name!r} has {bad} NaN/Inf element(s); nothing was "
            "applied (the model's gradient policy rejects them)"
        )
    if bad and policy.nonfinite == "zero":
        torch.nan_to_num_(grad, nan=0.0, posinf=0.0, neginf=0.0)
    sumsq = 0.0
    if policy.needs_norm and not (bad and policy.nonfinite == "skip"):
        sumsq = float(torch.linalg.vector_norm(grad)) ** 2
    return grad, bad, sumsq
