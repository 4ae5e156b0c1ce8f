"""What an update rule is: validated hyperparameters, explicit state, an in-place update."""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import Any, ClassVar, Generic, TypeVar

import torch
from pydantic import BaseModel

ConfigT = TypeVar("ConfigT", bound=BaseModel)

# A rule's state for one flat buffer: tensors named with torch.optim's keys, plus scalars
# (the step counter is a Python int here; torch keeps a 0-dim float32 tensor).
State = dict[str, Any]


class Rule(ABC, Generic[ConfigT]):
    """An element-wise update rule applied to one flat fp32 buffer.

    Subclasses implement the oracle's readable single-tensor path exactly (same operations in the
    same order), so a flat buffer gets bit-for-bit the per-parameter result (spec section 4).
    """

    name: ClassVar[str]

    def __init__(self, config: ConfigT) -> None:
        self.config = config

    @abstractmethod
    def init_state(self, weights: torch.Tensor) -> State:
        """The state a fresh oracle optimizer would start from for these weights."""

    @abstractmethod
    def apply(self, weights: torch.Tensor, grad: torch.Tensor, state: State, lr: float) -> None:
        """Update `weights` and `state` in place with gradient `grad` at learning rate `lr`."""
