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

import torch

from optserve.common.config import RAdamConfig, RangerConfig
from optserve.server.engine.base import Rule, Scalars, State, maybe_maximize


class RAdam(Rule[RAdamConfig | RangerConfig]):
    name = "radam"

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

    def prepare(self, state: State, lr: float, weights: torch.Tensor) -> Scalars:
        beta1, beta2 = self.config.betas
        state["step"] += 1
        step = float(state["step"])
        bias_correction1 = 1 - beta1**step
        bias_correction2 = 1 - beta2**step
        rho_inf = 2 / (1 - beta2) - 1
        rho_t = rho_inf - 2 * step * (beta2**step) / bias_correction2
        rect = None
        if rho_t > self.threshold:
            rect = (
                (rho_t - 4) * (rho_t - 2) * rho_inf / ((rho_inf - 4) * (rho_inf - 2) * rho_t)
            ) ** 0.5
        return {
            "lr": lr,
            "bias_correction1": bias_correction1,
            "bias_correction2": bias_correction2,
            "rect": rect,
        }

    def update(self, weights: torch.Tensor, grad: torch.Tensor, state: State, s: Scalars) -> None:
        cfg = self.config
        beta1, beta2 = cfg.betas
        lr = s["lr"]
        g = maybe_maximize(grad, getattr(cfg, "maximize", False))
        if cfg.weight_decay != 0:
            if self.decoupled:
                weights.mul_(1 - lr * cfg.weight_decay)
            else:
                g = g.add(weights, alpha=cfg.weight_decay)
        exp_avg, exp_avg_sq = state["exp_avg"], state["exp_avg_sq"]
        exp_avg.lerp_(g, 1 - beta1)
        exp_avg_sq.mul_(beta2).addcmul_(g, g, value=1 - beta2)
        bias_corrected_exp_avg = exp_avg / s["bias_correction1"]
        if s["rect"] is not None:
            adaptive_lr = (s["bias_correction2"] ** 0.5) / exp_avg_sq.sqrt().add_(cfg.eps)
            weights.add_(bias_corrected_exp_avg * lr * adaptive_lr * s["rect"], alpha=-1.0)
        else:
            weights.add_(bias_corrected_exp_avg * lr, alpha=-1.0)
