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

from typing import Any, NamedTuple, TypeVar

import torch

from optserve.common.config import (
    AdaBoundConfig,
    AdamConfig,
    AdamWConfig,
    AMSGradConfig,
    RAdamConfig,
    RangerConfig,
)
from optserve.server.engine import ops
from optserve.server.engine.base import ElementwiseRule, ScalarsT, State
from optserve.server.engine.estimates import Ema, Estimates, MigrationReport

FamilyConfigT = TypeVar(
    "FamilyConfigT",
    bound=AdamConfig | AdamWConfig | AMSGradConfig | AdaBoundConfig | RAdamConfig | RangerConfig,
)


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


def moments(
    weights: torch.Tensor, grad: torch.Tensor, state: State, s: Any
) -> tuple[torch.Tensor, torch.Tensor]:
    """The first half of an Adam or RAdam step, as torch orders it: weight decay (decoupled,
    or L2 into the gradient), then M and V updated in place; returns them. `s` has the fields
    lr, beta1, beta2, weight_decay, maximize, l2 and decoupled."""
    if s.decoupled:
        weights.mul_(1 - s.lr * s.weight_decay)
    g = ops.gradient(grad, weights, s.maximize, s.l2, s.weight_decay)
    exp_avg, exp_avg_sq = state["exp_avg"], state["exp_avg_sq"]
    ops.lerp_(exp_avg, g, 1 - s.beta1)
    ops.addcmul_(exp_avg_sq.mul_(s.beta2), g, g, 1 - s.beta2)
    return exp_avg, exp_avg_sq


class AdamFamily(ElementwiseRule[FamilyConfigT, ScalarsT]):
    """Adam, AdamW, AMSGrad, AdaBound, RAdam and Ranger's RAdam keep the same moments: M and V,
    EMAs of g and g^2 with decays beta1 and beta2, and their shared counter t."""

    def estimates(self, state: State) -> Estimates:
        t = int(state["step"])
        if t == 0:
            return Estimates(self.config.name, moments_counter=True)
        beta1, beta2 = self.config.betas
        shared = {"max_exp_avg_sq": state["max_exp_avg_sq"]} if "max_exp_avg_sq" in state else {}
        return Estimates(
            self.config.name, t, first=Ema(state["exp_avg"], beta1, t),
            second=Ema(state["exp_avg_sq"], beta2, t), shared=shared, moments_counter=True,
        )  # fmt: skip

    def seed(self, new: State, est: Estimates, report: MigrationReport) -> None:
        if est.s_hat is None:
            return  # C9: a first moment without a second moment is unsafe; start fresh
        beta1, beta2 = self.config.betas
        t = new["step"] = est.step
        if est.moments_counter:
            report.set("step", "kept", "the moments' shared counter")
        else:
            report.set("step", "converted", f"age of the second-moment estimate ({t})")
        if est.second is not None:
            new["exp_avg_sq"], action, why = est.second.as_decay(beta2)
            report.set("exp_avg_sq", action, why)
        else:
            new["exp_avg_sq"] = est.s_hat * (1 - beta2**t)
            report.set("exp_avg_sq", "converted", "V := s_hat (1 - beta2^t) (C4)")
        if est.first is not None:
            new["exp_avg"], action, why = est.first.as_decay(beta1)
            report.set("exp_avg", action, why)
        elif est.g_hat is not None:
            new["exp_avg"] = est.g_hat * (1 - beta1**t)
            report.set("exp_avg", "converted", "M := g_hat (1 - beta1^t) (C7)")
        else:
            report.set("exp_avg", "fresh", "no first-moment estimate; M warms up by itself (C9)")
        if "max_exp_avg_sq" not in new:
            return
        if "max_exp_avg_sq" in est.shared:
            new["max_exp_avg_sq"] = est.shared["max_exp_avg_sq"].clone()
            report.set("max_exp_avg_sq", "kept", "same running maximum")
        else:
            new["max_exp_avg_sq"] = new["exp_avg_sq"].clone()
            report.set("max_exp_avg_sq", "converted", "Vmax := V, as if switched on now (C6)")

    def retune(
        self, old: ElementwiseRule, state: State, new: State, report: MigrationReport
    ) -> None:
        if getattr(old.config, "betas", None) != self.config.betas:
            self.seed(new, old.estimates(state), report)  # the moments change meaning (C4)
        else:
            super().retune(old, state, new, report)


class Adam(AdamFamily[AdamConfig | AdamWConfig | AMSGradConfig, AdamScalars]):
    name = "adam"

    def identity(self) -> tuple[str, bool]:
        return (
            "adam" if self.config.name == "amsgrad" else self.config.name,
            is_amsgrad(self.config),
        )

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
        exp_avg, exp_avg_sq = moments(weights, grad, state, s)
        if s.amsgrad:
            max_exp_avg_sq = state["max_exp_avg_sq"]
            torch.maximum(max_exp_avg_sq, exp_avg_sq, out=max_exp_avg_sq)
            denom = (max_exp_avg_sq.sqrt() / s.bias_correction2_sqrt).add_(s.eps)
        else:
            denom = (exp_avg_sq.sqrt() / s.bias_correction2_sqrt).add_(s.eps)
        ops.addcdiv_(weights, exp_avg, denom, -s.step_size)
