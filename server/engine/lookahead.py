"""Lookahead around any rule, and Ranger (spec 1.12, 1.13; Zhang et al. 2019, Wright 2019).

Lookahead(A), the paper's rule (as michaelrzhang/lookahead):

    at construction: phi <- theta, c <- 0
    each step: A updates theta; c <- c + 1
    if c == k: theta <- phi + alpha (theta - phi); phi <- theta; c <- 0

A's own state is left alone at a sync. State: A's keys + `slow_buffer` (phi) + `counter` (c).

Ranger = Lookahead(RAdam(betas=(0.95, 0.999), eps=1e-5, decoupled decay), k=6, alpha=0.5),
syncing when RAdam's step is a multiple of k (c starts at t mod k), plus optional gradient
centralization: for every tensor with dim > 1 (> 3 with gc_conv_only),
g <- g - mean(g over all dims but the first). That is per tensor, so it runs on the tensor views
of the flat buffer, never on the flat buffer itself (spec section 4).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable

import torch

from optserve.common.config import LookaheadConfig, RangerConfig
from optserve.server.engine.base import ElementwiseRule, Rule, State, TensorViews
from optserve.server.engine.estimates import MigrationReport
from optserve.server.engine.radam import RAdam


class Lookahead(Rule):
    """Lookahead around an element-wise rule. Every path steps the inner rule its own way (fused,
    compiled, chunked, reference) and then calls `after_step`: the one place Lookahead acts."""

    name = "lookahead"

    def __init__(
        self, inner: ElementwiseRule, lookahead: LookaheadConfig, on_inner_step: bool = False
    ) -> None:
        """`on_inner_step`: sync when the inner rule's own step is a multiple of k (Ranger)."""
        super().__init__(inner.config)
        self.inner = inner
        self.k = lookahead.k
        self.alpha = lookahead.alpha
        self.on_inner_step = on_inner_step

    def init_state(self, weights: torch.Tensor) -> State:
        return {**self.inner.init_state(weights), "slow_buffer": weights.clone(), "counter": 0}

    def apply(self, weights: torch.Tensor, grad: torch.Tensor, state: State, lr: float) -> None:
        self.inner.apply(weights, grad, state, lr)
        self.after_step(weights, state)

    def after_step(
        self,
        weights: torch.Tensor,
        state: State,
        parts: Iterable[slice] = (slice(None),),
        sync: Callable[[torch.Tensor, torch.Tensor, float], None] | None = None,
    ) -> None:
        """Count the inner step; every k-th, phi <- phi + alpha (theta - phi) and theta <- phi.

        The sync is element-wise, so it runs on `parts` (slices of the buffer) one by one; or
        `sync` (`sync_slow_weights` compiled: one pass) does it on the whole buffer."""
        state["counter"] += 1
        if state["counter"] < self.k:
            return
        state["counter"] = 0
        slow = state["slow_buffer"]
        if sync is not None:
            sync(weights, slow, self.alpha)
            return
        for part in parts:
            phi = slow[part]
            phi.add_(weights[part] - phi, alpha=self.alpha)
            weights[part].copy_(phi)

    def preprocess(self, grad: torch.Tensor, views: TensorViews) -> None:
        self.inner.preprocess(grad, views)

    def seed(self, source: Rule, state: State, new: State, report: MigrationReport) -> None:
        """Entering or staying in Lookahead (C11): phi and the position in the slow cycle."""
        if isinstance(source, Lookahead):
            new["slow_buffer"] = state["slow_buffer"].clone()
            report.set("slow_buffer", "kept", "Lookahead to Lookahead carries phi (C11)")
        else:  # init_state made phi a copy of the current weights
            report.set("slow_buffer", "converted", "phi := the current weights (C11)")
        if self.on_inner_step:
            new["counter"] = int(new.get("step", 0)) % self.k
            report.set("counter", "converted", "Ranger syncs when RAdam's t is a multiple of k")
        elif isinstance(source, Lookahead):
            new["counter"] = int(state["counter"]) % self.k
            report.set("counter", "kept", "position in the slow cycle (C11)")
        else:
            report.set("counter", "fresh", "a new slow cycle starts now (C11)")


def sync_slow_weights(weights: torch.Tensor, slow: torch.Tensor, alpha: float) -> None:
    """Lookahead's sync as one element-wise function, for compiling (engine/compiled.py): each
    buffer is read once and written once, where the eager ops pass over them four times."""
    synced = slow + (weights - slow) * alpha
    slow.copy_(synced)
    weights.copy_(synced)


class RangerRAdam(RAdam):
    """RAdam with Ranger's gradient centralization in front."""

    config: RangerConfig

    def preprocess(self, grad: torch.Tensor, views: TensorViews) -> None:
        if not self.config.use_gc:
            return
        min_dims = 3 if self.config.gc_conv_only else 1
        for offset, shape in views:
            if len(shape) > min_dims:
                view = grad[offset : offset + math.prod(shape)].view(shape)
                view.sub_(view.mean(dim=tuple(range(1, len(shape))), keepdim=True))


def ranger(config: RangerConfig) -> Lookahead:
    lookahead = LookaheadConfig(k=config.k, alpha=config.alpha)
    return Lookahead(RangerRAdam(config), lookahead, on_inner_step=True)
