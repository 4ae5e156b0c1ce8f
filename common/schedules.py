"""Typed learning-rate schedule configuration (DESIGN section 8): ``{"name": ..., <parameters>}``.

Part of `optserve.common.config`, which re-exports every name here; what each schedule does is
server/engine/schedules.py.
"""

from __future__ import annotations

from typing import Annotated, Literal, TypeAlias

from pydantic import Field, model_validator

from optserve.common.strict import NonNegative, Positive, Strict


class ConstantSchedule(Strict):
    """lr_t = lr."""

    name: Literal["constant"] = "constant"


class StepSchedule(Strict):
    """torch StepLR: lr_t = lr * gamma^floor(t / step_size) (piecewise constant)."""

    name: Literal["step"] = "step"
    step_size: int = Field(ge=1)
    gamma: Positive = 0.1


class MultiStepSchedule(Strict):
    """torch MultiStepLR: lr_t = lr * gamma^(number of milestones <= t) (piecewise constant)."""

    name: Literal["multistep"] = "multistep"
    milestones: tuple[Annotated[int, Field(ge=1)], ...] = Field(min_length=1)
    gamma: Positive = 0.1

    @model_validator(mode="after")
    def _increasing(self) -> MultiStepSchedule:
        if list(self.milestones) != sorted(set(self.milestones)):
            raise ValueError(f"milestones must increase strictly (got {list(self.milestones)})")
        return self


class ExponentialSchedule(Strict):
    """lr_t = lr * gamma^t (torch ExponentialLR), or the survey's lr * 10^(-t / r)."""

    name: Literal["exponential"] = "exponential"
    gamma: Positive | None = None
    r: Positive | None = None

    @model_validator(mode="after")
    def _one_form(self) -> ExponentialSchedule:
        if (self.gamma is None) == (self.r is None):
            raise ValueError(f"give exactly one of gamma or r (got gamma={self.gamma}, r={self.r})")
        return self


class ReciprocalSchedule(Strict):
    """The survey's reciprocal decay: lr_t = lr * (1 + t / r)^(-c)."""

    name: Literal["reciprocal"] = "reciprocal"
    r: Positive
    c: NonNegative = 1.0


class CosineSchedule(Strict):
    """torch CosineAnnealingLR: eta_min + (lr - eta_min)(1 + cos(pi t / T_max)) / 2."""

    name: Literal["cosine"] = "cosine"
    T_max: int = Field(ge=1)
    eta_min: NonNegative = 0.0


class PlateauSchedule(Strict):
    """Lower the lr when a reported metric stops improving.

    ``rule: "newbob"`` (the survey's): keep the lr until the metric fails to improve, then halve
    it at every report from then on. ``rule: "torch"``: torch's ReduceLROnPlateau, which
    multiplies by `factor` only after more than `patience` reports without improvement. Either
    rule reduces each group's lr as torch does: new = max(lr * factor, min_lr), applied only if
    lr - new > eps. Unset fields take each rule's defaults (newbob: factor 0.5, threshold 0;
    torch: torch's).
    """

    name: Literal["plateau"] = "plateau"
    rule: Literal["newbob", "torch"] = "newbob"
    metric: str = Field("val_loss", min_length=1, description="Reported metric to watch.")
    mode: Literal["min", "max"] = "min"
    factor: float | None = Field(None, gt=0.0, lt=1.0)
    patience: int | None = Field(None, ge=0)
    threshold: NonNegative | None = None
    threshold_mode: Literal["rel", "abs"] = "rel"
    cooldown: int = Field(0, ge=0)
    min_lr: NonNegative = 0.0
    eps: NonNegative = 1e-8

    @property
    def resolved_factor(self) -> float:
        return self.factor if self.factor is not None else (0.5 if self.rule == "newbob" else 0.1)

    @property
    def resolved_patience(self) -> int:
        return self.patience if self.patience is not None else (0 if self.rule == "newbob" else 10)

    @property
    def resolved_threshold(self) -> float:
        if self.threshold is not None:
            return self.threshold
        return 0.0 if self.rule == "newbob" else 1e-4


class WarmupSchedule(Strict):
    """Linear warm-up from 0: lr_t = lr * t / warmup_steps for t < warmup_steps, then the
    `then` schedule, counting its own steps from the end of the warm-up (torch SequentialLR)."""

    name: Literal["warmup"] = "warmup"
    warmup_steps: int = Field(ge=1)
    then: ScheduleConfig = Field(default_factory=ConstantSchedule)


ScheduleConfig: TypeAlias = Annotated[
    ConstantSchedule
    | StepSchedule
    | MultiStepSchedule
    | ExponentialSchedule
    | ReciprocalSchedule
    | CosineSchedule
    | PlateauSchedule
    | WarmupSchedule,
    Field(discriminator="name"),
]
WarmupSchedule.model_rebuild()
_SCHEDULE_TYPES = (
    ConstantSchedule, StepSchedule, MultiStepSchedule, ExponentialSchedule, ReciprocalSchedule,
    CosineSchedule, PlateauSchedule, WarmupSchedule,
)  # fmt: skip
SCHEDULE_NAMES = (
    "constant", "step", "multistep", "exponential", "reciprocal", "cosine", "plateau", "warmup",
)  # fmt: skip
