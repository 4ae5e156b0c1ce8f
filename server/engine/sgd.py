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

import torch

from optserve.common.config import SGDConfig
from optserve.server.engine.base import Rule, Scalars, State, maybe_maximize


class SGD(Rule[SGDConfig]):
    name = "sgd"

    def init_state(self, weights: torch.Tensor) -> State:
        return {}

    def prepare(self, state: State, lr: float, weights: torch.Tensor) -> Scalars:
        first = self.config.momentum != 0 and "momentum_buffer" not in state
        if first:
            # torch creates the buffer at the first step as a copy of g (undamped); it is
            # allocated here and filled by `update`, so slices can be updated independently.
            state["momentum_buffer"] = torch.empty_like(weights)
        return {"lr": lr, "first": first}

    def update(self, weights: torch.Tensor, grad: torch.Tensor, state: State, s: Scalars) -> None:
        cfg = self.config
        d_p = maybe_maximize(grad, cfg.maximize)
        if cfg.weight_decay != 0:
            d_p = d_p.add(weights, alpha=cfg.weight_decay)
        if cfg.momentum != 0:
            buf = state["momentum_buffer"]
            if s["first"]:
                buf.copy_(d_p)
            else:
                buf.mul_(cfg.momentum).add_(d_p, alpha=1 - cfg.dampening)
            d_p = d_p.add(buf, alpha=cfg.momentum) if cfg.nesterov else buf
        weights.add_(d_p, alpha=-s["lr"])
