"""What an update rule is: validated hyperparameters, explicit state, an element-wise update.

A step is split in two, as optax splits state from update:

* `prepare(state, lr)` advances the rule's counters and computes the step's scalars (bias
  corrections, bounds, the rectification term, whether Lookahead syncs) once per step;
* `update(weights, grad, state, scalars)` is purely element-wise and in place.

Because `update` is element-wise, running it on consecutive slices of a flat buffer gives exactly
the result of running it on the whole buffer; the chunked fast path relies on that.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Sequence
from typing import Any, ClassVar, Generic, TypeVar

import torch
from pydantic import BaseModel

ConfigT = TypeVar("ConfigT", bound=BaseModel)

# A rule's state for one flat buffer: tensors named with torch.optim's keys, plus scalars
# (counters are Python ints here; torch keeps `step` as a 0-dim float32 tensor).
State = dict[str, Any]
Scalars = dict[str, Any]
# (offset, shape) of each parameter tensor lying wholly inside a flat buffer.
TensorViews = Sequence[tuple[int, tuple[int, ...]]]


def maybe_maximize(grad: torch.Tensor, maximize: bool) -> torch.Tensor:
    return -grad if maximize else grad


class Rule(ABC, Generic[ConfigT]):
    """An element-wise update rule applied to one flat fp32 buffer.

    Subclasses follow the oracle's readable single-tensor path exactly (same operations in the
    same order), so a flat buffer gets bit-for-bit the per-parameter result (spec section 4).
    """

    name: ClassVar[str]

    def __init__(self, config: ConfigT) -> None:
        self.config = config

    @abstractmethod
    def init_state(self, weights: torch.Tensor) -> State:
        """The state a fresh oracle optimizer would start from for these weights."""

    def prepare(self, state: State, lr: float, weights: torch.Tensor) -> Scalars:
        """Advance counters, create lazily made state, and compute this step's scalars.

        Called once per step with the whole buffer; `update` may then run slice by slice.
        """
        return {"lr": lr}

    @abstractmethod
    def update(
        self, weights: torch.Tensor, grad: torch.Tensor, state: State, scalars: Scalars
    ) -> None:
        """The element-wise part of the step, in place on `weights` and the state tensors."""

    def preprocess(self, grad: torch.Tensor, views: TensorViews) -> None:
        """Per-tensor work on the gradient before the step (gradient centralization)."""

    def apply(self, weights: torch.Tensor, grad: torch.Tensor, state: State, lr: float) -> None:
        """One whole step: the readable reference path."""
        self.update(weights, grad, state, self.prepare(state, lr, weights))
