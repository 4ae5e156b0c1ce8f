"""AdaDelta, as torch.optim.Adadelta (spec 1.6; Zeiler 2012).

    g <- g + lambda * theta                                    (L2)
    Q <- rho * Q + (1 - rho) * g^2
    D_step = sqrt(D + eps) / sqrt(Q + eps) * g                 (eps inside both square roots)
    D <- rho * D + (1 - rho) * D_step^2                        (the unscaled step)
    theta <- theta - gamma * D_step                            (gamma = 1 is Zeiler's rule)

State: `square_avg` (Q), `acc_delta` (D), `step` (counted, unused).
"""

from __future__ import annotations

from typing import NamedTuple

import torch

from optserve.common.config import AdadeltaConfig
from optserve.server.engine import ops
from optserve.server.engine.base import ElementwiseRule, State
from optserve.server.engine.estimates import Estimates, MigrationReport
from optserve.server.engine.rmsprop import seed_square_average, square_average_estimates


class AdadeltaScalars(NamedTuple):
    lr: float
    rho: float
    eps: float
    weight_decay: float
    maximize: bool
    decay: bool


class Adadelta(ElementwiseRule[AdadeltaConfig, AdadeltaScalars]):
    name = "adadelta"

    def init_state(self, weights: torch.Tensor) -> State:
        return {
            "step": 0,
            "square_avg": torch.zeros_like(weights),
            "acc_delta": torch.zeros_like(weights),
        }

    def estimates(self, state: State) -> Estimates:
        return square_average_estimates("adadelta", state, self.config.rho)

    def seed(self, new: State, est: Estimates, report: MigrationReport) -> None:
        if seed_square_average(new, est, report):
            report.set("acc_delta", "fresh", "no counterpart anywhere (C8)")

    def prepare(self, state: State, lr: float, weights: torch.Tensor) -> AdadeltaScalars:
        cfg = self.config
        state["step"] += 1
        return AdadeltaScalars(
            lr, cfg.rho, cfg.eps, cfg.weight_decay, cfg.maximize, cfg.weight_decay != 0
        )

    @staticmethod
    def update(weights: torch.Tensor, grad: torch.Tensor, state: State, s: AdadeltaScalars) -> None:
        g = ops.gradient(grad, weights, s.maximize, s.decay, s.weight_decay)
        square_avg, acc_delta = state["square_avg"], state["acc_delta"]
        ops.addcmul_(square_avg.mul_(s.rho), g, g, 1 - s.rho)
        std = square_avg.add(s.eps).sqrt_()
        delta = acc_delta.add(s.eps).sqrt_()
        delta.div_(std).mul_(g)
        ops.addcmul_(acc_delta.mul_(s.rho), delta, delta, 1 - s.rho)
        ops.add_(weights, delta, -s.lr)
