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
from optserve.server.engine.estimates import Ema, Estimates, MigrationReport


def square_average_estimates(name: str, state: State, beta: float) -> Estimates:
    """RMSprop's and AdaDelta's Q: an un-corrected EMA of g^2 that the two share verbatim."""
    t = int(state["step"])
    second = Ema(state["square_avg"], beta, t) if t > 0 else None
    return Estimates(name, t, second=second, shared={"square_avg": state["square_avg"]})


def seed_square_average(new: State, est: Estimates, report: MigrationReport) -> bool:
    """Q (and the counter) from another rule; False if it holds no second moment."""
    if "square_avg" in est.shared:
        new["square_avg"] = est.shared["square_avg"].clone()
        report.set("square_avg", "kept", "the same un-corrected EMA of g^2")
    elif est.s_hat is not None:
        new["square_avg"] = est.s_hat.clone()
        report.set("square_avg", "converted", "Q := s_hat, bias-corrected (C3)")
    else:
        return False
    new["step"] = est.step
    report.set("step", "converted", f"age of the second-moment estimate ({est.step})")
    return True


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

    def estimates(self, state: State) -> Estimates:
        cfg = self.config
        est = square_average_estimates("rmsprop", state, cfg.alpha)
        if est.step > 0 and "grad_avg" in state:
            est.first = Ema(state["grad_avg"], cfg.alpha, est.step)
            est.g_hat = est.first.hat
        elif est.step > 0 and "momentum_buffer" in state and cfg.momentum < 1:
            # Bn holds steps g / (sqrt(Q) + eps) (mu >= 1 accumulates without a stationary point)
            denom = state["square_avg"].sqrt().add_(cfg.eps)
            est.g_hat = (1 - cfg.momentum) * state["momentum_buffer"] * denom
        return est

    def seed(self, new: State, est: Estimates, report: MigrationReport) -> None:
        cfg = self.config
        if not seed_square_average(new, est, report) or est.g_hat is None:
            return
        if cfg.centered:
            # The two estimates come from EMAs of different horizons, so g_hat^2 may exceed Q
            # locally; centered RMSprop takes sqrt(Q - G^2), so G is clipped to keep that >= 0.
            bound = new["square_avg"].sqrt()
            new["grad_avg"] = torch.maximum(torch.minimum(est.g_hat, bound), -bound)
            report.set("grad_avg", "converted", "G := g_hat, clipped to |G| <= sqrt(Q) (C7)")
        if cfg.momentum >= 1:
            why = "momentum >= 1 has no stationary buffer to convert to"
            report.set("momentum_buffer", "fresh", why)
        elif cfg.momentum > 0:
            denom = new["square_avg"].sqrt().add_(cfg.eps)
            new["momentum_buffer"] = est.g_hat / ((1 - cfg.momentum) * denom)
            why = "Bn := g_hat / ((1 - mu)(sqrt(Q) + eps)) (C7)"
            report.set("momentum_buffer", "converted", why)

    def prepare(self, state: State, lr: float, weights: torch.Tensor) -> RMSpropScalars:
        cfg = self.config
        state["step"] += 1
        return RMSpropScalars(
            lr, cfg.alpha, cfg.eps, cfg.momentum, cfg.weight_decay, cfg.maximize,
            cfg.weight_decay != 0, cfg.centered, cfg.momentum > 0,
        )  # fmt: skip

    @staticmethod
    def update(weights: torch.Tensor, grad: torch.Tensor, state: State, s: RMSpropScalars) -> None:
        g = ops.gradient(grad, weights, s.maximize, s.decay, s.weight_decay)
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
