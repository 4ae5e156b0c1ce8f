"""AdaBound and AMSBound, as the authors' adabound 0.0.5 (spec 1.10; Luo et al. 2019).

    t <- t + 1;  g <- g + lambda * theta                      (L2)
    M <- beta1 M + (1 - beta1) g;  V <- beta2 V + (1 - beta2) g^2;  (AMSBound: Vmax, read below)
    eta = gamma sqrt(bc2) / bc1 / (sqrt(V) + eps)              (eps-hat form)
    f = final_lr * gamma / base_lr
    lo = f (1 - 1 / (gamma_b t + 1));  hi = f (1 + 1 / (gamma_b t))
    theta <- theta - clip(eta, lo, hi) * M

base_lr is the lr the optimizer was built with; adabound keeps it as an attribute outside its
state_dict, so a restore would change f. Here it is state (`base_lr`) and round-trips. A swap
(policy migrate or reset) builds the rule anew with the request's lr (spec C12: hyperparameters
come from the request), so base_lr becomes the new config's lr and the bounds close on final_lr
as configured, as with adabound built with that lr. Policy keep is a torch param-group edit:
base_lr stays, and f = final_lr * lr_new / base_lr, as adabound does after `group["lr"] = ...`.
State: `exp_avg`, `exp_avg_sq` (+ `max_exp_avg_sq`), `step`, `base_lr`.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch

from optserve.common.config import AdaBoundConfig
from optserve.server.engine import ops
from optserve.server.engine.adam import AdamFamily
from optserve.server.engine.base import ElementwiseRule, State
from optserve.server.engine.estimates import Estimates, MigrationReport


class AdaBoundScalars(NamedTuple):
    step_size: float  # gamma sqrt(bc2) / bc1
    lower_bound: float
    upper_bound: float
    beta1: float
    beta2: float
    eps: float
    weight_decay: float
    decay: bool
    amsbound: bool


class AdaBound(AdamFamily[AdaBoundConfig, AdaBoundScalars]):
    name = "adabound"

    def identity(self) -> tuple[str, bool]:
        return ("adabound", self.config.amsbound)

    def estimates(self, state: State) -> Estimates:
        est = super().estimates(state)
        est.shared["base_lr"] = state["base_lr"]
        est.note = "; AdaBound's limit is lr = final_lr * (1 - beta1) (C1')"
        return est

    def seed(self, new: State, est: Estimates, report: MigrationReport) -> None:
        super().seed(new, est, report)
        self._base_lr_from_request(new, est.shared.get("base_lr"), report)

    def retune(
        self, old: ElementwiseRule, state: State, new: State, report: MigrationReport
    ) -> None:
        super().retune(old, state, new, report)
        self._base_lr_from_request(new, state.get("base_lr"), report)

    def _base_lr_from_request(
        self, new: State, old_base_lr: float | None, report: MigrationReport
    ) -> None:
        """base_lr is the new config's lr (C12), as `reset` and a newly built adabound have it."""
        new["base_lr"] = self.config.lr
        if old_base_lr == self.config.lr:
            report.set("base_lr", "kept", "the bounds' lr scale, the same lr")
        else:
            report.set("base_lr", "fresh", "the new lr (C12): the bounds close on final_lr")

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

    def prepare(self, state: State, lr: float, weights: torch.Tensor) -> AdaBoundScalars:
        cfg = self.config
        beta1, beta2 = cfg.betas
        if state["base_lr"] == 0:  # built with lr 0: the first real lr becomes the base
            state["base_lr"] = lr
        state["step"] += 1
        step = state["step"]
        bias_correction1 = 1 - beta1**step
        bias_correction2 = 1 - beta2**step
        final_lr = cfg.final_lr * lr / state["base_lr"] if state["base_lr"] else 0.0
        return AdaBoundScalars(
            step_size=lr * math.sqrt(bias_correction2) / bias_correction1,
            lower_bound=final_lr * (1 - 1 / (cfg.gamma * step + 1)),
            upper_bound=final_lr * (1 + 1 / (cfg.gamma * step)),
            beta1=beta1, beta2=beta2, eps=cfg.eps, weight_decay=cfg.weight_decay,
            decay=cfg.weight_decay != 0, amsbound=cfg.amsbound,
        )  # fmt: skip

    @staticmethod
    def update(weights: torch.Tensor, grad: torch.Tensor, state: State, s: AdaBoundScalars) -> None:
        g = ops.gradient(grad, weights, False, s.decay, s.weight_decay)
        exp_avg, exp_avg_sq = state["exp_avg"], state["exp_avg_sq"]
        ops.add_(exp_avg.mul_(s.beta1), g, 1 - s.beta1)
        ops.addcmul_(exp_avg_sq.mul_(s.beta2), g, g, 1 - s.beta2)
        if s.amsbound:
            max_exp_avg_sq = state["max_exp_avg_sq"]
            torch.max(max_exp_avg_sq, exp_avg_sq, out=max_exp_avg_sq)
            denom = max_exp_avg_sq.sqrt().add_(s.eps)
        else:
            denom = exp_avg_sq.sqrt().add_(s.eps)
        # The authors' full_like(denom, step_size).div_(denom).clamp_(lower, upper), spelled with
        # 0-dim tensors: the same bits, and compiling does not specialise on the values.
        one = denom.new_ones(())
        step_size = (one * s.step_size).div(denom)
        step_size = torch.minimum(
            torch.maximum(step_size, one * s.lower_bound), one * s.upper_bound
        )
        step_size.mul_(exp_avg)
        weights.add_(-step_size)
