"""Adam, AdamW and AMSGrad, as torch.optim.Adam / AdamW (spec 1.7-1.9; Kingma & Ba 2015,
Loshchilov & Hutter 2019, Reddi et al. 2018).

    t <- t + 1
    g <- g + lambda * theta      (Adam: L2)  |  theta <- theta (1 - gamma lambda)  (AdamW)
    M <- beta1 * M + (1 - beta1) * g
    V <- beta2 * V + (1 - beta2) * g^2
    Vmax <- max(Vmax, V)                                      (AMSGrad; the denominator reads Vmax)
    theta <- theta - (gamma / bc1) * M / (sqrt(V) / sqrt(bc2) + eps)
    with bc1 = 1 - beta1^t, bc2 = 1 - beta2^t

State: `exp_avg` (M), `exp_avg_sq` (V), `max_exp_avg_sq` (AMSGrad only), `step` (t).
"""

from __future__ import annotations

import torch

from optserve.common.config import AdamConfig, AdamWConfig, AMSGradConfig
from optserve.server.engine.base import Rule, Scalars, State, maybe_maximize


class Adam(Rule[AdamConfig | AdamWConfig | AMSGradConfig]):
    name = "adam"

    @property
    def amsgrad(self) -> bool:
        return self.config.name == "amsgrad" or bool(getattr(self.config, "amsgrad", False))

    @property
    def decoupled(self) -> bool:
        return self.config.name == "adamw"

    def init_state(self, weights: torch.Tensor) -> State:
        state: State = {
            "step": 0,
            "exp_avg": torch.zeros_like(weights),
            "exp_avg_sq": torch.zeros_like(weights),
        }
        if self.amsgrad:
            state["max_exp_avg_sq"] = torch.zeros_like(weights)
        return state

    def prepare(self, state: State, lr: float, weights: torch.Tensor) -> Scalars:
        beta1, beta2 = self.config.betas
        state["step"] += 1
        step = float(state["step"])
        bias_correction1 = 1 - beta1**step
        bias_correction2 = 1 - beta2**step
        return {
            "lr": lr,
            "step_size": lr / bias_correction1,
            "bias_correction2_sqrt": bias_correction2**0.5,
        }

    def update(self, weights: torch.Tensor, grad: torch.Tensor, state: State, s: Scalars) -> None:
        cfg = self.config
        beta1, beta2 = cfg.betas
        g = maybe_maximize(grad, cfg.maximize)
        if cfg.weight_decay != 0:
            if self.decoupled:
                weights.mul_(1 - s["lr"] * cfg.weight_decay)
            else:
                g = g.add(weights, alpha=cfg.weight_decay)
        exp_avg, exp_avg_sq = state["exp_avg"], state["exp_avg_sq"]
        exp_avg.lerp_(g, 1 - beta1)
        exp_avg_sq.mul_(beta2).addcmul_(g, g, value=1 - beta2)
        if self.amsgrad:
            max_exp_avg_sq = state["max_exp_avg_sq"]
            torch.maximum(max_exp_avg_sq, exp_avg_sq, out=max_exp_avg_sq)
            denom = (max_exp_avg_sq.sqrt() / s["bias_correction2_sqrt"]).add_(cfg.eps)
        else:
            denom = (exp_avg_sq.sqrt() / s["bias_correction2_sqrt"]).add_(cfg.eps)
        weights.addcdiv_(exp_avg, denom, value=-s["step_size"])
