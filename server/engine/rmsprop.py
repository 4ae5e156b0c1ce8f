"""RMSProp, as torch.optim.RMSprop (spec 1.5; Hinton's lecture 6e).

    g <- g + lambda * theta                                    (L2)
    Q <- alpha * Q + (1 - alpha) * g^2                         (no bias correction)
    centered: G <- alpha * G + (1 - alpha) * g;  a = sqrt(Q - G^2) + eps
    else:     a = sqrt(Q) + eps
    momentum mu > 0: Bn <- mu * Bn + g / a;  theta <- theta - gamma * Bn
    else:            theta <- theta - gamma * g / a

State: `square_avg` (+ `momentum_buffer` of normalised steps, + `grad_avg`), `step` (counted,
unused). RMSprop's `momentum_buffer` is scale-free, unlike SGD's (spec 1.5 note ii).
"""

from __future__ import annotations

import torch

from optserve.common.config import RMSpropConfig
from optserve.server.engine.base import Rule, Scalars, State, maybe_maximize


class RMSprop(Rule[RMSpropConfig]):
    name = "rmsprop"

    def init_state(self, weights: torch.Tensor) -> State:
        state: State = {"step": 0, "square_avg": torch.zeros_like(weights)}
        if self.config.momentum > 0:
            state["momentum_buffer"] = torch.zeros_like(weights)
        if self.config.centered:
            state["grad_avg"] = torch.zeros_like(weights)
        return state

    def prepare(self, state: State, lr: float, weights: torch.Tensor) -> Scalars:
        state["step"] += 1
        return {"lr": lr}

    def update(self, weights: torch.Tensor, grad: torch.Tensor, state: State, s: Scalars) -> None:
        cfg = self.config
        g = maybe_maximize(grad, cfg.maximize)
        if cfg.weight_decay != 0:
            g = g.add(weights, alpha=cfg.weight_decay)
        square_avg = state["square_avg"]
        square_avg.mul_(cfg.alpha).addcmul_(g, g, value=1 - cfg.alpha)
        if cfg.centered:
            grad_avg = state["grad_avg"]
            grad_avg.lerp_(g, 1 - cfg.alpha)
            avg = square_avg.addcmul(grad_avg, grad_avg, value=-1).sqrt_()
        else:
            avg = square_avg.sqrt()
        avg = avg.add_(cfg.eps)
        if cfg.momentum > 0:
            buf = state["momentum_buffer"]
            buf.mul_(cfg.momentum).addcdiv_(g, avg)
            weights.add_(buf, alpha=-s["lr"])
        else:
            weights.addcdiv_(g, avg, value=-s["lr"])
