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

from typing import NamedTuple

import torch

from optserve.common.config import RMSpropConfig
from optserve.server.engine import ops
from optserve.server.engine.base import ElementwiseRule, State


class RMSpropScalars(NamedTuple):
    lr: float
    alpha: float
    eps: float
    momentum: float
    weight_decay: float
    maximize: bool
    decay: bool
    centered: bool
    has_momentum: bool  # momentum > 0


class RMSprop(ElementwiseRule[RMSpropConfig, RMSpropScalars]):
    name = "rmsprop"

    def init_state(self, weights: torch.Tensor) -> State:
        state: State = {"step": 0, "square_avg": torch.zeros_like(weights)}
        if self.config.momentum > 0:
            state["momentum_buffer"] = torch.zeros_like(weights)
        if self.config.centered:
            state["grad_avg"] = torch.zeros_like(weights)
        return state

    def prepare(self, state: State, lr: float, weights: torch.Tensor) -> RMSpropScalars:
        cfg = self.config
        state["step"] += 1
        return RMSpropScalars(
            lr, cfg.alpha, cfg.eps, cfg.momentum, cfg.weight_decay, cfg.maximize,
            cfg.weight_decay != 0, cfg.centered, cfg.momentum > 0,
        )  # fmt: skip

    @staticmethod
    def update(weights: torch.Tensor, grad: torch.Tensor, state: State, s: RMSpropScalars) -> None:
        g = -grad if s.maximize else grad
        if s.decay:
            g = ops.add(g, weights, s.weight_decay)
        square_avg = state["square_avg"]
        ops.addcmul_(square_avg.mul_(s.alpha), g, g, 1 - s.alpha)
        if s.centered:
            grad_avg = state["grad_avg"]
            ops.lerp_(grad_avg, g, 1 - s.alpha)
            avg = ops.addcmul(square_avg, grad_avg, grad_avg, -1).sqrt_()
        else:
            avg = square_avg.sqrt()
        avg = avg.add_(s.eps)
        if s.has_momentum:
            buf = state["momentum_buffer"]
            buf.mul_(s.momentum).addcdiv_(g, avg)
            ops.add_(weights, buf, -s.lr)
        else:
            ops.addcdiv_(weights, g, avg, -s.lr)
