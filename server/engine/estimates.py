"""What a rule's state says about the gradient, in rule-free terms (spec 5.1), and the report of
a migration. Every rule reads its state into `Estimates` and seeds itself from them
(`estimates` / `seed` on each rule), so `migrate` needs no table of pairs.

Estimates, each only once the source has taken an update (t > 0):
    g_hat   the first moment in gradient units
    s_hat   the second moment (never AMSGrad's Vmax)
    first   the first moment as the rule keeps it, when it is an EMA of g started at 0
            (Adam family's M, centered RMSprop's G): a target with the same decay keeps it
    second  likewise the second moment (Adam family's V, RMSprop's and AdaDelta's Q)
    shared  state whose meaning other rules share verbatim (RMSprop's and AdaDelta's Q, the
            Adam family's Vmax, AdaBound's base_lr)
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal

import torch

Action = Literal["kept", "converted", "fresh", "dropped"]
# migrate: state converted as the spec says; reset: fresh; keep (the same rule only): every
# state value as it is, as torch does when a param group's hyperparameter changes.
Policy = Literal["migrate", "reset", "keep"]


@dataclass
class MigrationReport:
    """For every state key: what happened to it and why."""

    source: str
    target: str
    policy: str
    entries: dict[str, tuple[Action, str]] = field(default_factory=dict)

    def set(self, key: str, action: Action, why: str) -> None:
        self.entries[key] = (action, why)

    def as_dict(self) -> dict[str, Any]:
        return {
            "source": self.source,
            "target": self.target,
            "policy": self.policy,
            "keys": {k: {"action": a, "why": w} for k, (a, w) in sorted(self.entries.items())},
        }


@dataclass(frozen=True)
class Ema:
    """X <- beta X + (1 - beta) x, from X = 0, after t updates: X / (1 - beta^t) estimates x."""

    value: torch.Tensor
    beta: float
    t: int

    @property
    def hat(self) -> torch.Tensor:
        return self.value / (1 - self.beta**self.t)

    def as_decay(self, beta: float) -> tuple[torch.Tensor, Action, str]:
        """The same average as a target with decay `beta` would hold after t updates."""
        if beta == self.beta:
            return self.value.clone(), "kept", "same moment, same beta"
        scaled = self.value * ((1 - beta**self.t) / (1 - self.beta**self.t))
        return scaled, "converted", f"beta {self.beta} -> {beta}: X_hat (1 - beta^t) (C4)"


@dataclass
class Estimates:
    source: str
    step: int = 0
    first: Ema | None = None
    second: Ema | None = None
    g_hat: torch.Tensor | None = None
    s_hat: torch.Tensor | None = None
    shared: dict[str, Any] = field(default_factory=dict)
    # True when `step` counts the same thing as the Adam family's (the moments' updates)
    moments_counter: bool = False
    # appended to the reason of a first-moment conversion (AdaBound's limit, C1')
    note: str = ""

    def __post_init__(self) -> None:
        if self.g_hat is None and self.first is not None:
            self.g_hat = self.first.hat
        if self.s_hat is None and self.second is not None:
            self.s_hat = self.second.hat
