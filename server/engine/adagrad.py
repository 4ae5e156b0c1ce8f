"""AdaGrad, as torch.optim.Adagrad (spec 1.4; Duchi et al. 2011).

    t <- t + 1;  g <- g + lambda * theta                  (L2)
    gamma_t = gamma / (1 + (t - 1) * lr_decay)
    S <- S + g^2
    theta <- theta - gamma_t * g / (sqrt(S) + eps)        (eps outside the sqrt; default 1e-10)

State: `sum` (starts at initial_accumulator_value), `step`.
"""

from __future__ import annotations

from typing import NamedTuple

import torch

from optserve.common.config import AdagradConfig
from optserve.server.engine import ops
from optserve.server.engine.base import ElementwiseRule, State
from optserve.server.engine.estimates import Estimates, MigrationReport


class AdagradScalars(NamedTuple):
    clr: float  # gamma_t, the decayed learning rate
    eps: float
    weight_decay: float
    maximize: bool
    decay: bool


class Adagrad(ElementwiseRule[AdagradConfig, AdagradScalars]):
    name = "adagrad"

    def init_state(self, weights: torch.Tensor) -> State:
        return {
            "step": 0,
            "sum": torch.full_like(weights, self.config.initial_accumulator_value),
        }

    def estimates(self, state: State) -> Estimates:
        t = int(state["step"])
        est = Estimates("adagrad", t)
        if t > 0:  # S = S0 + sum of g^2
            est.s_hat = (state["sum"] - self.config.initial_accumulator_value) / t
        return est

    def seed(self, new: State, est: Estimates, report: MigrationReport) -> None:
        if est.s_hat is None:
            return
        t = new["step"] = est.step
        new["sum"] = self.config.initial_accumulator_value + t * est.s_hat
        report.set("sum", "converted", f"S0 + n * s_hat with n = {t} (C5)")
        report.set("step", "converted", f"age of the second-moment estimate ({t})")

    def prepare(self, state: State, lr: float, weights: torch.Tensor) -> AdagradScalars:
        cfg = self.config
        state["step"] += 1
        clr = lr / (1 + (float(state["step"]) - 1) * cfg.lr_decay)
        return AdagradScalars(clr, cfg.eps, cfg.weight_decay, cfg.maximize, cfg.weight_decay != 0)

    @staticmethod
    def update(weights: torch.Tensor, grad: torch.Tensor, state: State, s: AdagradScalars) -> None:
        g = ops.gradient(grad, weights, s.maximize, s.decay, s.weight_decay)
        state_sum = state["sum"]
        ops.addcmul_(state_sum, g, g, 1)
        std = state_sum.sqrt().add_(s.eps)
        ops.addcdiv_(weights, g, std, -s.clr)
