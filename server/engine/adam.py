"""Adam and AMSGrad, as torch.optim.Adam (spec 1.7 and 1.9; Kingma & Ba 2015, Reddi et al. 2018).

    t <- t + 1
    g <- g + lambda * theta                                   (L2, if weight_decay != 0)
    M <- beta1 * M + (1 - beta1) * g
    V <- beta2 * V + (1 - beta2) * g^2
    Vmax <- max(Vmax, V)                                      (amsgrad; V below reads Vmax)
    theta <- theta - (gamma / bc1) * M / (sqrt(V) / sqrt(bc2) + eps)
    with bc1 = 1 - beta1^t, bc2 = 1 - beta2^t

State: `exp_avg` (M), `exp_avg_sq` (V), `max_exp_avg_sq` (amsgrad only), `step` (t).
"""

from __future__ import annotations

import torch

from optserve.client.config import AdamConfig
from optserve.server.engine.base import Rule, State


class Adam(Rule[AdamConfig]):
    name = "adam"

    def init_state(self, weights: torch.Tensor) -> State:
        state: State = {
            "step": 0,
            "exp_avg": torch.zeros_like(weights),
            "exp_avg_sq": torch.zeros_like(weights),
        }
        if self.config.amsgrad:
            state["max_exp_avg_sq"] = torch.zeros_like(weights)
        return state

    def apply(self, weights: torch.Tensor, grad: torch.Tensor, state: State, lr: float) -> None:
        cfg = self.config
        beta1, beta2 = cfg.betas
        g = grad if not cfg.maximize else -grad
        state["step"] += 1
        step = float(state["step"])
        if cfg.weight_decay != 0:
            g = g.add(weights, alpha=cfg.weight_decay)
        exp_avg, exp_avg_sq = state["exp_avg"], state["exp_avg_sq"]
        exp_avg.lerp_(g, 1 - beta1)
        exp_avg_sq.mul_(beta2).addcmul_(g, g, value=1 - beta2)
        bias_correction1 = 1 - beta1**step
        bias_correction2 = 1 - beta2**step
        step_size = lr / bias_correction1
        bias_correction2_sqrt = bias_correction2**0.5
        if cfg.amsgrad:
            max_exp_avg_sq = state["max_exp_avg_sq"]
            torch.maximum(max_exp_avg_sq, exp_avg_sq, out=max_exp_avg_sq)
            denom = (max_exp_avg_sq.sqrt() / bias_correction2_sqrt).add_(cfg.eps)
        else:
            denom = (exp_avg_sq.sqrt() / bias_correction2_sqrt).add_(cfg.eps)
        weights.addcdiv_(exp_avg, denom, value=-step_size)
