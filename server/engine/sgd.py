"""SGD, heavy-ball momentum and Nesterov, as torch.optim.SGD (spec 1.1 and 1.3).

    g <- g + lambda * theta                               (L2, if weight_decay != 0)
    B <- g                      on the first step (not damped)
    B <- mu * B + (1 - tau) * g afterwards
    d <- g + mu * B (nesterov)  |  d <- B (classical)     |  d <- g (mu = 0)
    theta <- theta - gamma * d

State: `momentum_buffer` (only when momentum != 0, created by the first step). torch rescales
the whole accumulated history when gamma changes, since B is kept in gradient units.
"""

from __future__ import annotations

from typing import NamedTuple

import torch

from optserve.common.config import SGDConfig
from optserve.server.engine import ops
from optserve.server.engine.base import ElementwiseRule, State


class SGDScalars(NamedTuple):
    lr: float
    momentum: float
    dampening: float
    weight_decay: float
    maximize: bool
    nesterov: bool
    has_momentum: bool  # momentum != 0
    decay: bool  # weight_decay != 0
    first: bool  # the buffer is created by this step


class SGD(ElementwiseRule[SGDConfig, SGDScalars]):
    name = "sgd"
    step_flags = ("first",)

    def init_state(self, weights: torch.Tensor) -> State:
        return {}

    def prepare(self, state: State, lr: float, weights: torch.Tensor) -> SGDScalars:
        cfg = self.config
        first = cfg.momentum != 0 and "momentum_buffer" not in state
        if first:
            # torch creates the buffer at the first step as a copy of g (undamped); it is
            # allocated here and filled by `update`, so slices can be updated independently.
            state["momentum_buffer"] = torch.empty_like(weights)
        return SGDScalars(
            lr, cfg.momentum, cfg.dampening, cfg.weight_decay, cfg.maximize, cfg.nesterov,
            cfg.momentum != 0, cfg.weight_decay != 0, first,
        )  # fmt: skip

    @staticmethod
    def update(weights: torch.Tensor, grad: torch.Tensor, state: State, s: SGDScalars) -> None:
        d_p = -grad if s.maximize else grad
        if s.decay:
            d_p = ops.add(d_p, weights, s.weight_decay)
        if s.has_momentum:
            buf = state["momentum_buffer"]
            if s.first:
                buf.copy_(d_p)
            else:
                ops.add_(buf.mul_(s.momentum), d_p, 1 - s.dampening)
            d_p = ops.add(d_p, buf, s.momentum) if s.nesterov else buf
        ops.add_(weights, d_p, -s.lr)
