"""RAdam, as torch.optim.RAdam (spec 1.11; Liu et al. 2020).

    t <- t + 1
    g <- g + lambda theta  (L2)  |  theta <- theta (1 - gamma lambda)  (decoupled_weight_decay)
    M <- beta1 M + (1 - beta1) g;  V <- beta2 V + (1 - beta2) g^2;  M_hat = M / bc1
    rho_inf = 2 / (1 - beta2) - 1;  rho_t = rho_inf - 2 t beta2^t / bc2
    rho_t > 5:  r_t = sqrt((rho_t - 4)(rho_t - 2) rho_inf / ((rho_inf - 4)(rho_inf - 2) rho_t))
                theta <- theta - gamma M_hat r_t sqrt(bc2) / (sqrt(V) + eps)
    else:       theta <- theta - gamma M_hat                 (momentum step, always taken)

State: `exp_avg`, `exp_avg_sq`, `step`. The threshold is 5 (torch); Ranger exposes it.
"""

from __future__ import annotations

from typing import NamedTuple

import torch

from optserve.common.config import RAdamConfig, RangerConfig
from optserve.server.engine import ops
from optserve.server.engine.adam import AdamFamily, moments
from optserve.server.engine.base import State


class RAdamScalars(NamedTuple):
    lr: float
    beta1: float
    beta2: float
    eps: float
    weight_decay: float
    bias_correction1: float
    bias_correction2: float
    rect: float  # r_t (0 while not rectified)
    maximize: bool
    l2: bool
    decoupled: bool
    rectified: bool  # rho_t > threshold: changes once, early in a run


class RAdam(AdamFamily[RAdamConfig | RangerConfig, RAdamScalars]):
    name = "radam"
    step_flags = ("rectified",)

    @property
    def decoupled(self) -> bool:
        return self.config.name == "ranger" or bool(
            getattr(self.config, "decoupled_weight_decay", False)
        )

    @property
    def threshold(self) -> float:
        return float(getattr(self.config, "N_sma_threshold", 5.0))

    def init_state(self, weights: torch.Tensor) -> State:
        return {
            "step": 0,
            "exp_avg": torch.zeros_like(weights),
            "exp_avg_sq": torch.zeros_like(weights),
        }

    def prepare(self, state: State, lr: float, weights: torch.Tensor) -> RAdamScalars:
        cfg = self.config
        beta1, beta2 = cfg.betas
        state["step"] += 1
        step = float(state["step"])
        bias_correction1 = 1 - beta1**step
        bias_correction2 = 1 - beta2**step
        rho_inf = 2 / (1 - beta2) - 1
        rho_t = rho_inf - 2 * step * (beta2**step) / bias_correction2
        rectified = rho_t > self.threshold
        rect = 0.0
        if rectified:
            rect = (
                (rho_t - 4) * (rho_t - 2) * rho_inf / ((rho_inf - 4) * (rho_inf - 2) * rho_t)
            ) ** 0.5
        decays = cfg.weight_decay != 0
        return RAdamScalars(
            lr, beta1, beta2, cfg.eps, cfg.weight_decay, bias_correction1, bias_correction2, rect,
            bool(getattr(cfg, "maximize", False)), decays and not self.decoupled,
            decays and self.decoupled, rectified,
        )  # fmt: skip

    @staticmethod
    def update(weights: torch.Tensor, grad: torch.Tensor, state: State, s: RAdamScalars) -> None:
        exp_avg, exp_avg_sq = moments(weights, grad, state, s)
        bias_corrected_exp_avg = exp_avg / s.bias_correction1
        if s.rectified:
            adaptive_lr = (s.bias_correction2**0.5) / exp_avg_sq.sqrt().add_(s.eps)
            ops.add_(weights, bias_corrected_exp_avg * s.lr * adaptive_lr * s.rect, -1.0)
        else:
            ops.add_(weights, bias_corrected_exp_avg * s.lr, -1.0)
