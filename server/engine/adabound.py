"""AdaBound and AMSBound, as the authors' adabound 0.0.5 (spec 1.10; Luo et al. 2019).

    t <- t + 1;  g <- g + lambda * theta                      (L2)
    M <- beta1 M + (1 - beta1) g;  V <- beta2 V + (1 - beta2) g^2;  (AMSBound: Vmax, read below)
    eta = gamma sqrt(bc2) / bc1 / (sqrt(V) + eps)              (eps-hat form)
    f = final_lr * gamma / base_lr
    lo = f (1 - 1 / (gamma_b t + 1));  hi = f (1 + 1 / (gamma_b t))
    theta <- theta - clip(eta, lo, hi) * M

base_lr is the lr when the rule was built; adabound keeps it as an attribute outside its
state_dict, so a restore would change f. Here it is state (`base_lr`) and round-trips.
State: `exp_avg`, `exp_avg_sq` (+ `max_exp_avg_sq`), `step`, `base_lr`.
"""

from __future__ import annotations

import math

import torch

from optserve.common.config import AdaBoundConfig
from optserve.server.engine.base import Rule, Scalars, State


class AdaBound(Rule[AdaBoundConfig]):
    name = "adabound"

    def init_state(self, weights: torch.Tensor) -> State:
        state: State = {
            "step": 0,
            "base_lr": self.config.lr,
            "exp_avg": torch.zeros_like(weights),
            "exp_avg_sq": torch.zeros_like(weights),
        }
        if self.config.amsbound:
            state["max_exp_avg_sq"] = torch.zeros_like(weights)
        return state

    def prepare(self, state: State, lr: float, weights: torch.Tensor) -> Scalars:
        cfg = self.config
        beta1, beta2 = cfg.betas
        if state["base_lr"] == 0:  # built with lr 0: the first real lr becomes the base
            state["base_lr"] = lr
        state["step"] += 1
        step = state["step"]
        bias_correction1 = 1 - beta1**step
        bias_correction2 = 1 - beta2**step
        final_lr = cfg.final_lr * lr / state["base_lr"] if state["base_lr"] else 0.0
        return {
            "step_size": lr * math.sqrt(bias_correction2) / bias_correction1,
            "lower_bound": final_lr * (1 - 1 / (cfg.gamma * step + 1)),
            "upper_bound": final_lr * (1 + 1 / (cfg.gamma * step)),
        }

    def update(self, weights: torch.Tensor, grad: torch.Tensor, state: State, s: Scalars) -> None:
        cfg = self.config
        beta1, beta2 = cfg.betas
        g = grad
        if cfg.weight_decay != 0:
            g = g.add(weights, alpha=cfg.weight_decay)
        exp_avg, exp_avg_sq = state["exp_avg"], state["exp_avg_sq"]
        exp_avg.mul_(beta1).add_(g, alpha=1 - beta1)
        exp_avg_sq.mul_(beta2).addcmul_(g, g, value=1 - beta2)
        if cfg.amsbound:
            max_exp_avg_sq = state["max_exp_avg_sq"]
            torch.max(max_exp_avg_sq, exp_avg_sq, out=max_exp_avg_sq)
            denom = max_exp_avg_sq.sqrt().add_(cfg.eps)
        else:
            denom = exp_avg_sq.sqrt().add_(cfg.eps)
        step_size = torch.full_like(denom, s["step_size"])
        step_size.div_(denom).clamp_(s["lower_bound"], s["upper_bound"]).mul_(exp_avg)
        weights.add_(-step_size)
