"""SGD, heavy-ball momentum and Nesterov, as torch.optim.SGD (spec 1.1 and 1.3).

    g <- g + lambda * theta                               (L2, if weight_decay != 0)
    B <- g                      on the first step (not damped)
    B <- mu * B + (1 - tau) * g afterwards
    d <- g + mu * B (nesterov)  |  d <- B (classical)     |  d <- g (mu = 0)
    theta <- theta - gamma * d

State: `momentum_buffer` (only when momentum != 0, created by the first step). torch rescales
the whole accumulated history when gamma changes, since B is kept in gradient units.

`delay` > 1 is Delayed Nesterov, the asynchronous local-SGD outer optimizer: another update with
the same B (engine/delayed_nesterov.py); `delay` = 1, the default, is the rule above.
"""

from __future__ import annotations

from typing import NamedTuple

import torch

from optserve.common.config import SGDConfig
from optserve.server.engine import ops
from optserve.server.engine.base import ElementwiseRule, ScalarsT, State
from optserve.server.engine.estimates import Estimates, MigrationReport


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


def _scale(config: SGDConfig) -> tuple[float, float]:
    return config.momentum, config.dampening


class SGDFamily(ElementwiseRule[SGDConfig, ScalarsT]):
    """What every `sgd` config shares: the momentum buffer B, its meaning and its migration
    (SGD here; Delayed Nesterov, `delay` > 1, in engine/delayed_nesterov.py)."""

    name = "sgd"

    def estimates(self, state: State) -> Estimates:
        cfg = self.config
        est = Estimates("sgd")
        # (mu >= 1 or tau >= 1 accumulate without a stationary point: no estimate)
        if "momentum_buffer" in state and 0 < cfg.momentum < 1 > cfg.dampening:
            buf = state["momentum_buffer"]
            est.g_hat = (1 - cfg.momentum) * buf / (1 - cfg.dampening)
        return est

    def seed(self, new: State, est: Estimates, report: MigrationReport) -> None:
        mu, tau = self.config.momentum, self.config.dampening
        if mu == 0:
            return
        if mu >= 1:
            why = "momentum >= 1 has no stationary buffer to convert to"
            report.set("momentum_buffer", "fresh", why)
        elif est.first is not None and est.first.beta == mu and tau == 0:
            new["momentum_buffer"] = est.first.value / (1 - mu)
            why = "B := M / (1 - beta1), exact for mu = beta1 (C1)"
            report.set("momentum_buffer", "converted", why + est.note)
        elif est.g_hat is not None:
            new["momentum_buffer"] = (1 - tau) * est.g_hat / (1 - mu)
            why = "B := (1 - tau) g_hat / (1 - mu), stationary approximation (C1, C7)"
            report.set("momentum_buffer", "converted", why + est.note)

    def retune(
        self, old: ElementwiseRule, state: State, new: State, report: MigrationReport
    ) -> None:
        """B is kept in gradient units scaled by (1 - tau) / (1 - mu): new ones rescale it."""
        if "momentum_buffer" not in state or self.config.momentum == 0:
            return
        (old_mu, old_tau), (mu, tau) = _scale(old.config), _scale(self.config)
        buf = state["momentum_buffer"].clone()
        if (old_mu, old_tau) == (mu, tau):
            report.set("momentum_buffer", "kept", "momentum and Nesterov share B exactly")
        elif max(old_mu, old_tau, mu, tau) >= 1:  # no stationary scale to convert between
            report.set("momentum_buffer", "kept", "momentum or dampening >= 1: B as is")
        else:
            buf.mul_((1 - tau) * (1 - old_mu) / ((1 - old_tau) * (1 - mu)))
            why = "B (1 - tau_new)(1 - mu_old) / ((1 - tau_old)(1 - mu_new))"
            report.set("momentum_buffer", "converted", why)
        new["momentum_buffer"] = buf


class SGD(SGDFamily[SGDScalars]):
    step_flags = ("first",)

    def init_state(self, weights: torch.Tensor) -> State:
        return {}

    def lazy_keys(self) -> tuple[str, ...]:
        return ("momentum_buffer",) if self.config.momentum != 0 else ()

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
        d_p = ops.gradient(grad, weights, s.maximize, s.decay, s.weight_decay)
        if s.has_momentum:
            buf = state["momentum_buffer"]
            if s.first:
                buf.copy_(d_p)
            else:
                ops.add_(buf.mul_(s.momentum), d_p, 1 - s.dampening)
            d_p = ops.add(d_p, buf, s.momentum) if s.nesterov else buf
        ops.add_(weights, d_p, -s.lr)
