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

from optserve.client.config import SGDConfig
from optserve.server.engine.base import Rule, State


class SGD(Rule[SGDConfig]):
    name = "sgd"

    def init_state(self, weights: torch.Tensor) -> State:
        return {}

    def apply(self, weights: torch.Tensor, grad: torch.Tensor, state: State, lr: float) -> None:
        cfg = self.config
        d_p = grad if not cfg.maximize else -grad
        if cfg.weight_decay != 0:
            d_p = d_p.add(weights, alpha=cfg.weight_decay)
        if cfg.momentum != 0:
            buf = state.get("momentum_buffer")
            if buf is None:
                buf = d_p.detach().clone()
                state["momentum_buffer"] = buf
            else:
                buf.mul_(cfg.momentum).add_(d_p, alpha=1 - cfg.dampening)
            d_p = d_p.add(buf, alpha=cfg.momentum) if cfg.nesterov else buf
        weights.add_(d_p, alpha=-lr)
