"""The in-place operations of the rules' `update` that take a scalar factor, spelled once for both
the eager and the compiled path.

Eagerly, each is exactly torch's call (`a.add_(b, alpha=x)`, `a.lerp_(b, w)`, ...), as the
oracles make it, so the reference path stays bit-exact. While `torch.compile` traces, a scalar
passed as `alpha`, `value` or a lerp weight would be baked into the kernel as a constant (and a
new lr would compile again); there the factor is multiplied in as an operand instead, which
keeps it an input of the compiled code. Inductor rounds the two spellings alike within a few
ulp (spec section 2).
"""

from __future__ import annotations

import torch

# Dynamo folds this to True while it traces and it is False everywhere else; not
# `is_compiling`, which is True in every thread while any compile runs in the process.
from torch.compiler import is_dynamo_compiling as is_compiling

Tensor = torch.Tensor


def add(a: Tensor, b: Tensor, alpha: float) -> Tensor:
    """a + alpha * b, as a new tensor."""
    return a + b * alpha if is_compiling() else a.add(b, alpha=alpha)


def add_(a: Tensor, b: Tensor, alpha: float) -> Tensor:
    """a <- a + alpha * b."""
    return a.add_(b * alpha) if is_compiling() else a.add_(b, alpha=alpha)


def lerp_(a: Tensor, b: Tensor, weight: float) -> Tensor:
    """a <- a + weight * (b - a)."""
    return a.lerp_(b, a.new_ones(()) * weight) if is_compiling() else a.lerp_(b, weight)


def addcmul(a: Tensor, b: Tensor, c: Tensor, value: float) -> Tensor:
    """a + value * b * c, as a new tensor."""
    return a + b * c * value if is_compiling() else a.addcmul(b, c, value=value)


def addcmul_(a: Tensor, b: Tensor, c: Tensor, value: float) -> Tensor:
    """a <- a + value * b * c."""
    return a.add_(b * c * value) if is_compiling() else a.addcmul_(b, c, value=value)


def addcdiv_(a: Tensor, b: Tensor, c: Tensor, value: float) -> Tensor:
    """a <- a + value * b / c."""
    return a.add_(b / c * value) if is_compiling() else a.addcdiv_(b, c, value=value)


def gradient(
    grad: Tensor, weights: Tensor, maximize: bool, decay: bool, weight_decay: float
) -> Tensor:
    """The gradient a rule reads: negated to maximize, plus weight_decay * weights when it
    decays by L2 (a new tensor then; `grad` itself otherwise)."""
    g = -grad if maximize else grad
    return add(g, weights, weight_decay) if decay else g
