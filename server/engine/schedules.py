"""Learning-rate schedules: the lr of step t (the number of updates applied so far), per group.

Every schedule maps a group's base lr (its configured `lr`) and the model's step t to the lr
used for update t + 1, so the first update uses t = 0, as torch's schedulers do when stepped
after each optimizer step. Closed forms (survey and torch.optim.lr_scheduler):

    constant      lr
    step          lr * gamma^floor(t / step_size)                     (StepLR)
    multistep     lr * gamma^(#milestones <= t)                       (MultiStepLR)
    exponential   lr * gamma^t  (ExponentialLR)  or  lr * 10^(-t / r)  (survey)
    reciprocal    lr * (1 + t / r)^(-c)                               (survey; LambdaLR)
    cosine        eta_min + (lr - eta_min) (1 + cos(pi t / T_max)) / 2  (CosineAnnealingLR)
    warmup        lr * t / W for t < W, then `then` at step t - W      (LambdaLR + SequentialLR)
    plateau       lr reduced at the reports of a metric (below)

Plateau, `newbob` (survey): while the watched metric keeps improving the lr is kept; at the
first report that does not improve, and at every report after it, the lr is reduced. `torch`
(ReduceLROnPlateau): the lr is reduced after more than `patience` reports without improvement,
then `cooldown` reports are ignored. A reduction is torch's, for either rule and per group:

    new = max(lr * factor, min_lr);   lr <- new  only if  lr - new > eps

so a reduction smaller than eps is not applied, and since the next one would be the same, the
group's lr stays there. The schedule counts the reductions; a group's lr is its configured lr
taken through that many reductions (cached per configured lr, so each is computed once).
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from bisect import bisect_right
from collections.abc import Sequence
from typing import Any

from optserve.common.config import (
    ConstantSchedule,
    CosineSchedule,
    ExponentialSchedule,
    MultiStepSchedule,
    PlateauSchedule,
    ReciprocalSchedule,
    StepSchedule,
    WarmupSchedule,
)


class Schedule(ABC):
    @abstractmethod
    def lr(self, base_lr: float, step: int) -> float:
        """The lr for the update that follows `step` applied updates."""

    def observe(self, name: str, value: float, base_lrs: Sequence[float] = ()) -> bool:
        """Take a reported metric; True if it changed the lr of a group whose configured lr is
        in `base_lrs` (without them: if it changed the schedule)."""
        return False

    def state_dict(self) -> dict[str, Any]:
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore what `state_dict` returned (stateless schedules take an empty dict)."""
        if state:
            raise ValueError(f"{type(self).__name__} keeps no state, got {sorted(state)}")


class Constant(Schedule):
    def lr(self, base_lr: float, step: int) -> float:
        return base_lr


def _power(base: float, exponent: float) -> float:
    """base ** exponent, saturating at inf instead of raising OverflowError (a growing schedule,
    gamma > 1, overflows a float after enough steps; that must not fail an update)."""
    try:
        return float(base**exponent)
    except OverflowError:
        return math.inf


class Step(Schedule):
    def __init__(self, config: StepSchedule) -> None:
        self.config = config

    def lr(self, base_lr: float, step: int) -> float:
        return base_lr * _power(self.config.gamma, step // self.config.step_size)


class MultiStep(Schedule):
    def __init__(self, config: MultiStepSchedule) -> None:
        self.config = config

    def lr(self, base_lr: float, step: int) -> float:
        return base_lr * _power(self.config.gamma, bisect_right(self.config.milestones, step))


class Exponential(Schedule):
    def __init__(self, config: ExponentialSchedule) -> None:
        self.config = config

    def lr(self, base_lr: float, step: int) -> float:
        if self.config.gamma is not None:
            return base_lr * _power(self.config.gamma, step)
        assert self.config.r is not None  # the config validator guarantees one of them
        return base_lr * _power(10.0, -step / self.config.r)


class Reciprocal(Schedule):
    def __init__(self, config: ReciprocalSchedule) -> None:
        self.config = config

    def lr(self, base_lr: float, step: int) -> float:
        return base_lr * _power(1 + step / self.config.r, -self.config.c)


class Cosine(Schedule):
    def __init__(self, config: CosineSchedule) -> None:
        self.config = config

    def lr(self, base_lr: float, step: int) -> float:
        eta_min, t_max = self.config.eta_min, self.config.T_max
        return eta_min + (base_lr - eta_min) * (1 + math.cos(math.pi * step / t_max)) / 2


class Warmup(Schedule):
    def __init__(self, config: WarmupSchedule) -> None:
        self.steps = config.warmup_steps
        self.then = build_schedule(config.then)

    def lr(self, base_lr: float, step: int) -> float:
        if step < self.steps:
            return base_lr * step / self.steps
        return self.then.lr(base_lr, step - self.steps)

    def observe(self, name: str, value: float, base_lrs: Sequence[float] = ()) -> bool:
        return self.then.observe(name, value, base_lrs)

    def state_dict(self) -> dict[str, Any]:
        return {"then": self.then.state_dict()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.then.load_state_dict(state.get("then", {}))


class Plateau(Schedule):
    # Configured lrs whose reduced lr is cached; more than this many distinct ones (lr changes
    # by hand, many groups) start the cache afresh.
    CACHED_BASES = 256

    def __init__(self, config: PlateauSchedule) -> None:
        self.config = config
        self.factor = config.resolved_factor
        self.patience = config.resolved_patience
        self.threshold = config.resolved_threshold
        self.reductions = 0  # reductions triggered so far; each group applies them (eps)
        self.best: float | None = None
        self.num_bad = 0
        self.cooldown_left = 0
        self.triggered = False
        self.reports = 0
        self._reduced: dict[float, tuple[int, float]] = {}  # base lr -> (reductions seen, lr)

    def _improves(self, value: float) -> bool:
        if self.best is None:
            return True
        sign = 1.0 if self.config.mode == "max" else -1.0  # the direction of improvement
        if self.config.threshold_mode == "rel":
            bound = self.best * (1 + sign * self.threshold)
        else:
            bound = self.best + sign * self.threshold
        return value > bound if sign > 0 else value < bound

    def observe(self, name: str, value: float, base_lrs: Sequence[float] = ()) -> bool:
        if name != self.config.metric:
            return False
        self.reports += 1
        improved = self._improves(value)
        if improved:
            self.best = value
            self.num_bad = 0
        else:
            self.num_bad += 1
        if self.config.rule == "newbob":
            self.triggered = self.triggered or not improved
            reduce = self.triggered
        else:
            if self.cooldown_left > 0:
                self.cooldown_left -= 1
                self.num_bad = 0
            reduce = self.num_bad > self.patience
            if reduce:
                self.cooldown_left = self.config.cooldown
                self.num_bad = 0
        if not reduce:
            return False
        before = [self.lr(base_lr, 0) for base_lr in base_lrs]
        self.reductions += 1
        after = [self.lr(base_lr, 0) for base_lr in base_lrs]
        return not base_lrs or before != after

    def lr(self, base_lr: float, step: int) -> float:
        """`base_lr` taken through the reductions so far, each as torch's `_reduce_lr`."""
        seen, lr = self._reduced.get(base_lr, (0, base_lr))
        factor, min_lr, eps = self.factor, self.config.min_lr, self.config.eps
        while seen < self.reductions:
            new_lr = max(lr * factor, min_lr)
            if not lr - new_lr > eps:
                seen = self.reductions  # every later reduction would be this one: none applies
                break
            lr, seen = new_lr, seen + 1
        if base_lr not in self._reduced and len(self._reduced) >= self.CACHED_BASES:
            self._reduced.clear()
        self._reduced[base_lr] = (seen, lr)
        return lr

    def state_dict(self) -> dict[str, Any]:
        return {
            "reductions": self.reductions,
            "best": self.best,
            "num_bad": self.num_bad,
            "cooldown_left": self.cooldown_left,
            "triggered": self.triggered,
            "reports": self.reports,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        state = dict(state)
        scale = state.pop("scale", None)  # written before the reductions were counted
        keys = set(self.state_dict())
        for key, value in state.items():
            if key in keys:
                setattr(self, key, value)
        if scale is not None and "reductions" not in state:
            # scale was factor^reductions, or 0 once it underflowed (each report reduces once
            # at most, so the reports bound the count)
            self.reductions = (
                round(math.log(scale) / math.log(self.factor)) if scale > 0 else self.reports
            )
        self._reduced.clear()


_SCHEDULES: dict[type, type[Schedule]] = {
    StepSchedule: Step,
    MultiStepSchedule: MultiStep,
    ExponentialSchedule: Exponential,
    ReciprocalSchedule: Reciprocal,
    CosineSchedule: Cosine,
    WarmupSchedule: Warmup,
    PlateauSchedule: Plateau,
}


def build_schedule(config: Any) -> Schedule:
    if isinstance(config, ConstantSchedule):
        return Constant()
    return _SCHEDULES[type(config)](config)  # type: ignore[call-arg]
