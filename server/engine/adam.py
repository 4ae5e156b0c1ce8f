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

from typing import NamedTuple

import torch

from optserve.common.config import AdamConfig, AdamWConfig, AMSGradConfig
from optserve.server.engine import ops
from optserve.server.engine.base import ElementwiseRule, State


class AdamScalars(NamedTuple):
    lr: float
    beta1: float
    beta2: float
    eps: float
    weight_decay: float
    step_size: float  # gamma / bc1
    bias_correction2_sqrt: float
    maximize: bool
    l2: bool  # Adam's coupled decay (weight_decay != 0)
    decoupled: bool  # AdamW's decay (weight_decay != 0)
    amsgrad: bool


def is_amsgrad(config: AdamConfig | AdamWConfig | AMSGradConfig) -> bool:
    """`amsgrad` is `adam` with `amsgrad: true`: one rule spelled two ways."""
    return config.name == "amsgrad" or bool(getattr(config, "amsgrad", False))


class Adam(ElementwiseRule[AdamConfig | AdamWConfig | AMSGradConfig, AdamScalars]):
    name = "adam"

    def init_state(self, weights: torch.Tensor) -> State:
        state: State = {
            "step": 0,
            "exp_avg": torch.zeros_like(weights),
            "exp_avg_sq": torch.zeros_like(weights),
        }
        if is_amsgrad(self.config):
            state["max_exp_avg_sq"] = torch.zeros_like(weights)
        return state

    def prepare(self, state: State, lr: float, weights: torch.Tensor) -> AdamScalars:
        cfg = self.config
        beta1, beta2 = cfg.betas
        state["step"] += 1
        step = float(state["step"])
        bias_correction1 = 1 - beta1**step
        bias_correction2 = 1 - beta2**step
        decays, decoupled = cfg.weight_decay != 0, cfg.name == "adamw"
        return AdamScalars(
            lr, beta1, beta2, cfg.eps, cfg.weight_decay, lr / bias_correction1,
            bias_correction2**0.5, cfg.maximize, decays and not decoupled, decays and decoupled,
            is_amsgrad(cfg),
        )  # fmt: skip

    @staticmethod
    def update(weights: torch.Tensor, grad: torch.Tensor, state: State, s: AdamScalars) -> None:
        g = -grad if s.maximize else grad
        if s.decoupled:
            weights.mul_(1 - s.lr * s.weight_decay)
        if s.l2:
            g = ops.add(g, weights, s.weight_decay)
        exp_avg, exp_avg_sq = state["exp_avg"], state["exp_avg_sq"]
        ops.lerp_(exp_avg, g, 1 - s.beta1)
        ops.addcmul_(exp_avg_sq.mul_(s.beta2), g, g, 1 - s.beta2)
        if s.amsgrad:
            max_exp_avg_sq = state["max_exp_avg_sq"]
            torch.maximum(max_exp_avg_sq, exp_avg_sq, out=max_exp_avg_sq)
            denom = (max_exp_avg_sq.sqrt() / s.bias_correction2_sqrt).add_(s.eps)
        else:
            denom = (exp_avg_sq.sqrt() / s.bias_correction2_sqrt).add_(s.eps)
        ops.addcdiv_(weights, exp_avg, denom, -s.step_size)
