"""AdaDelta, as torch.optim.Adadelta (spec 1.6; Zeiler 2012).

    g <- g + lambda * theta                                    (L2)
    Q <- rho * Q + (1 - rho) * g^2
    D_step = sqrt(D + eps) / sqrt(Q + eps) * g                 (eps inside both square roots)
    D <- rho * D + (1 - rho) * D_step^2                        (the unscaled step)
    theta <- theta - gamma * D_step                            (gamma = 1 is Zeiler's rule)

State: `square_avg` (Q), `acc_delta` (D), `step` (counted, unused).
"""

from __future__ import annotations

import torch

from optserve.common.config import AdadeltaConfig
from optserve.server.engine.base import Rule, Scalars, State, maybe_maximize


class Adadelta(Rule[AdadeltaConfig]):
    name = "adadelta"

    def init_state(self, weights: torch.Tensor) -> State:
        return {
            "step": 0,
            "square_avg": torch.zeros_like(weights),
            "acc_delta": torch.zeros_like(weights),
        }

    def prepare(self, state: State, lr: float, weights: torch.Tensor) -> Scalars:
        state["step"] += 1
        return {"lr": lr}

    def update(self, weights: torch.Tensor, grad: torch.Tensor, state: State, s: Scalars) -> None:
        cfg = self.config
        g = maybe_maximize(grad, cfg.maximize)
        if cfg.weight_decay != 0:
            g = g.add(weights, alpha=cfg.weight_decay)
        square_avg, acc_delta = state["square_avg"], state["acc_delta"]
        square_avg.mul_(cfg.rho).addcmul_(g, g, value=1 - cfg.rho)
        std = square_avg.add(cfg.eps).sqrt_()
        delta = acc_delta.add(cfg.eps).sqrt_()
        delta.div_(std).mul_(g)
        acc_delta.mul_(cfg.rho).addcmul_(delta, delta, value=1 - cfg.rho)
        weights.add_(delta, alpha=-s["lr"])
