"""AdaGrad, as torch.optim.Adagrad (spec 1.4; Duchi et al. 2011).

    t <- t + 1;  g <- g + lambda * theta                  (L2)
    gamma_t = gamma / (1 + (t - 1) * lr_decay)
    S <- S + g^2
    theta <- theta - gamma_t * g / (sqrt(S) + eps)        (eps outside the sqrt; default 1e-10)

State: `sum` (starts at initial_accumulator_value), `step`.
"""

from __future__ import annotations

import torch

from optserve.common.config import AdagradConfig
from optserve.server.engine.base import Rule, Scalars, State, maybe_maximize


class Adagrad(Rule[AdagradConfig]):
    name = "adagrad"

    def init_state(self, weights: torch.Tensor) -> State:
        return {
            "step": 0,
            "sum": torch.full_like(weights, self.config.initial_accumulator_value),
        }

    def prepare(self, state: State, lr: float, weights: torch.Tensor) -> Scalars:
        state["step"] += 1
        return {"clr": lr / (1 + (float(state["step"]) - 1) * self.config.lr_decay)}

    def update(self, weights: torch.Tensor, grad: torch.Tensor, state: State, s: Scalars) -> None:
        cfg = self.config
        g = maybe_maximize(grad, cfg.maximize)
        if cfg.weight_decay != 0:
            g = g.add(weights, alpha=cfg.weight_decay)
        state_sum = state["sum"]
        state_sum.addcmul_(g, g, value=1)
        std = state_sum.sqrt().add_(cfg.eps)
        weights.addcdiv_(g, std, value=-s["clr"])
