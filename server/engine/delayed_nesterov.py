"""Delayed Nesterov (DN), the outer optimizer of asynchronous local SGD: `sgd` with `delay` N > 1.

Source: Liu, Douillard et al. 2024, "Asynchronous Local-SGD Training for Language Modeling"
(arXiv 2401.09135), Algorithm 3, "Delayed Nesterov update", with its momentum activation c = 0
(the paper's default; checked against the transcription of the algorithm in the HALoS authors'
code, utnslab/halos src/halos/opt.py). In async local SGD every push is one trainer's pseudo-
gradient, computed from weights some updates old; Nesterov momentum applied at every push lets
each stale gradient steer the momentum on its own (the paper's key finding: momentum is what
stale gradients hurt). DN folds N pushes into the momentum at once, as their mean, and in
between moves the weights by the plain gradient, scaled by 1/N:

    g <- -g (maximize);  g <- g + lambda * theta                (L2, as torch's SGD)
    Delta <- Delta + g;  j <- j + 1
    if j = N:   m <- mu * m + Delta / N;  Delta <- 0;  j <- 0
                theta <- theta - gamma * (g / N + mu * m)
    otherwise:  theta <- theta - gamma * g / N

Over a window of N pushes the weights move by -gamma (mean g + mu * m): one Nesterov step on the
mean of the window's gradients (torch's form, B <- mu B + g; d = g + mu B), taken a push at a
time. With N = 1 it is that Nesterov step at every push, torch.optim.SGD(nesterov=True) (the
engine then runs `SGD` itself, bit for bit). N is typically the number of trainers: a window
then holds about one push of each.

State: `momentum_buffer` (m, torch's key and units: zero until the first window closes),
`delay_buffer` (Delta, the sum of the open window's gradients), `delay_counter` (j, the pushes
in the open window, < N). A delay that shrinks below the open window's count (policy `keep`)
closes the window at the next push. torch has no fused kernel for this rule: it steps with its
own `update`, eager or compiled.
"""

from __future__ import annotations

from typing import NamedTuple

import torch

from optserve.server.engine import ops
from optserve.server.engine.base import ElementwiseRule, State
from optserve.server.engine.estimates import Estimates, MigrationReport
from optserve.server.engine.sgd import SGDFamily

DELAY_KEYS = ("delay_buffer", "delay_counter")


class DelayedNesterovScalars(NamedTuple):
    lr: float
    momentum: float
    delay: float  # N, as a float: a divisor the compiled code takes as an input
    weight_decay: float
    maximize: bool
    decay: bool  # weight_decay != 0
    milestone: bool  # this push closes the window: the momentum takes its mean


class DelayedNesterov(SGDFamily[DelayedNesterovScalars]):
    """`sgd` with delay > 1 (nesterov, momentum > 0 and dampening 0 by its config's check).

    Its identity is SGD's: between `sgd` configs the momentum buffer carries (`retune`)."""

    step_flags = ("milestone",)

    def init_state(self, weights: torch.Tensor) -> State:
        return {
            "momentum_buffer": torch.zeros_like(weights),
            "delay_buffer": torch.zeros_like(weights),
            "delay_counter": 0,
        }

    def lazy_keys(self) -> tuple[str, ...]:
        return ()

    def estimates(self, state: State) -> Estimates:
        # m is zero until the first window closes: it says nothing yet.
        if not bool(state["momentum_buffer"].any()):
            return Estimates("sgd")
        return super().estimates(state)

    def seed(self, new: State, est: Estimates, report: MigrationReport) -> None:
        super().seed(new, est, report)
        self._fresh_window(report)

    def retune(
        self, old: ElementwiseRule, state: State, new: State, report: MigrationReport
    ) -> None:
        """m carries as SGD's buffer does (same units); the open window carries between
        delays when it still fits the new one."""
        super().retune(old, state, new, report)
        count = state.get("delay_counter")
        if not isinstance(old, DelayedNesterov) or count is None:
            self._fresh_window(report)
        elif count < self.config.delay:
            new["delay_buffer"] = state["delay_buffer"].clone()
            new["delay_counter"] = count
            why = f"the open window ({count} pushes) closes at the new delay {self.config.delay}"
            for key in DELAY_KEYS:
                report.set(key, "kept", why)
        else:
            why = (
                f"the open window already holds {count} pushes, not fewer than the new delay "
                f"{self.config.delay}: a new window starts (its gradients moved the weights, "
                "not m)"
            )
            for key in DELAY_KEYS:
                report.set(key, "fresh", why)

    @staticmethod
    def _fresh_window(report: MigrationReport) -> None:
        for key in DELAY_KEYS:
            report.set(key, "fresh", "a new delay window starts now (Delta = 0, j = 0)")

    def prepare(self, state: State, lr: float, weights: torch.Tensor) -> DelayedNesterovScalars:
        cfg = self.config
        count = int(state["delay_counter"]) + 1
        milestone = count >= cfg.delay  # > only after `keep` shrank the delay
        state["delay_counter"] = 0 if milestone else count
        return DelayedNesterovScalars(
            lr, cfg.momentum, float(cfg.delay), cfg.weight_decay, cfg.maximize,
            cfg.weight_decay != 0, milestone,
        )  # fmt: skip

    @staticmethod
    def update(
        weights: torch.Tensor, grad: torch.Tensor, state: State, s: DelayedNesterovScalars
    ) -> None:
        g = ops.gradient(grad, weights, s.maximize, s.decay, s.weight_decay)
        window = state["delay_buffer"]
        window.add_(g)
        d = g / s.delay
        if s.milestone:
            buf = state["momentum_buffer"]
            buf.mul_(s.momentum).add_(window / s.delay)
            window.zero_()
            d = ops.add(d, buf, s.momentum)
        ops.add_(weights, d, -s.lr)
