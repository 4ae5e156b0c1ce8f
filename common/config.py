"""Typed optimizer, schedule and mode configuration, shared by the client and the server
(the schedules' models are in common/schedules.py, re-exported here).

On the wire and in the CLI an optimizer is a JSON object ``{"name": ..., <hyperparameters>}``
and a schedule ``{"name": ..., <parameters>}`` (DESIGN section 8). Hyperparameter names and
defaults are the oracle's: torch.optim's, adabound's for AdaBound, Ranger's own for Ranger.
Anything invalid is refused when the config is parsed, with a message that quotes the offending
value, so a bad config never reaches a shard.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import Annotated, Any, Literal, TypeAlias

from pydantic import BaseModel, Field, TypeAdapter, ValidationError, model_validator

from optserve.common.errors import InvalidArgument

# The schedules' models live in common/schedules.py; this module is where everyone imports them.
from optserve.common.schedules import _SCHEDULE_TYPES
from optserve.common.schedules import SCHEDULE_NAMES as SCHEDULE_NAMES
from optserve.common.schedules import ConstantSchedule as ConstantSchedule
from optserve.common.schedules import CosineSchedule as CosineSchedule
from optserve.common.schedules import ExponentialSchedule as ExponentialSchedule
from optserve.common.schedules import MultiStepSchedule as MultiStepSchedule
from optserve.common.schedules import PlateauSchedule as PlateauSchedule
from optserve.common.schedules import ReciprocalSchedule as ReciprocalSchedule
from optserve.common.schedules import ScheduleConfig as ScheduleConfig
from optserve.common.schedules import StepSchedule as StepSchedule
from optserve.common.schedules import WarmupSchedule as WarmupSchedule
from optserve.common.strict import Betas, NonNegative, Probability
from optserve.common.strict import Strict as _Strict


class LookaheadConfig(_Strict):
    """Lookahead (Zhang et al. 2019): every k inner steps, phi <- phi + alpha (theta - phi);
    theta <- phi. The slow weights phi live on the server."""

    k: int = Field(5, ge=1, description="Inner steps per slow-weight update.")
    alpha: float = Field(0.5, ge=0.0, le=1.0, description="Slow-weight step size.")


class _RuleConfig(_Strict):
    lr: NonNegative = Field(1e-3, description="Learning rate gamma (before any schedule).")
    lookahead: LookaheadConfig | None = Field(
        None, description="Wrap the rule in Lookahead; the slow weights live on the server."
    )


class SGDConfig(_RuleConfig):
    """torch.optim.SGD: plain, heavy-ball momentum and Nesterov (spec 1.1, 1.3)."""

    name: Literal["sgd"] = "sgd"
    momentum: NonNegative = Field(0.0, description="Momentum factor mu; 0 disables the buffer.")
    dampening: NonNegative = Field(0.0, description="Dampening tau of the momentum update.")
    weight_decay: NonNegative = Field(0.0, description="L2 penalty: g <- g + weight_decay*theta.")
    nesterov: bool = Field(False, description="Nesterov momentum (momentum > 0, dampening 0).")
    maximize: bool = False
    delay: int = Field(
        1,
        ge=1,
        description="Delayed Nesterov (Liu et al. 2024), the asynchronous local-SGD outer "
        "optimizer: the momentum takes the mean of the gradients once every `delay` updates, "
        "and in between each update moves by lr * g / delay. 1 is torch.optim.SGD exactly; "
        "> 1 needs nesterov=true.",
    )

    @model_validator(mode="after")
    def _nesterov_needs_momentum(self) -> SGDConfig:
        if self.nesterov and (self.momentum <= 0 or self.dampening != 0):
            raise ValueError(
                "nesterov=true requires momentum > 0 and dampening = 0 "
                f"(got momentum={self.momentum}, dampening={self.dampening})"
            )
        if self.delay > 1 and not self.nesterov:
            raise ValueError(
                f"delay={self.delay} is the Delayed Nesterov rule and requires nesterov=true "
                "(with momentum > 0 and dampening = 0); delay=1 is plain torch SGD"
            )
        return self


class AdagradConfig(_RuleConfig):
    """torch.optim.Adagrad (spec 1.4): S <- S + g^2; theta <- theta - gamma_t g/(sqrt(S) + eps)."""

    name: Literal["adagrad"] = "adagrad"
    lr: NonNegative = 1e-2
    lr_decay: NonNegative = Field(0.0, description="gamma_t = gamma / (1 + (t - 1) lr_decay).")
    weight_decay: NonNegative = 0.0
    initial_accumulator_value: NonNegative = 0.0
    eps: NonNegative = 1e-10
    maximize: bool = False


class RMSpropConfig(_RuleConfig):
    """torch.optim.RMSprop (spec 1.5), with optional momentum and centering."""

    name: Literal["rmsprop"] = "rmsprop"
    lr: NonNegative = 1e-2
    alpha: Probability = Field(0.99, description="EMA factor of the squared gradient.")
    eps: NonNegative = 1e-8
    weight_decay: NonNegative = 0.0
    momentum: NonNegative = 0.0
    centered: bool = False
    maximize: bool = False


class AdadeltaConfig(_RuleConfig):
    """torch.optim.Adadelta (spec 1.6); lr is only an output multiplier (1.0 is Zeiler's rule)."""

    name: Literal["adadelta"] = "adadelta"
    lr: NonNegative = 1.0
    rho: Probability = 0.9
    eps: NonNegative = 1e-6
    weight_decay: NonNegative = 0.0
    maximize: bool = False


class _AdamFamily(_RuleConfig):
    betas: Betas = Field((0.9, 0.999), description="EMA factors (beta1, beta2) of the moments.")
    eps: NonNegative = 1e-8
    weight_decay: NonNegative = 0.0


class AdamConfig(_AdamFamily):
    """torch.optim.Adam (spec 1.7); ``amsgrad: true`` is AMSGrad (1.9)."""

    name: Literal["adam"] = "adam"
    amsgrad: bool = False
    maximize: bool = False


class AdamWConfig(_AdamFamily):
    """torch.optim.AdamW (spec 1.8): decoupled decay theta <- theta (1 - gamma lambda)."""

    name: Literal["adamw"] = "adamw"
    weight_decay: NonNegative = 1e-2
    amsgrad: bool = False
    maximize: bool = False


class AMSGradConfig(_AdamFamily):
    """torch.optim.Adam(amsgrad=True) (spec 1.9): the denominator reads max over time of V."""

    name: Literal["amsgrad"] = "amsgrad"
    maximize: bool = False


class AdaBoundConfig(_AdamFamily):
    """adabound 0.0.5's AdaBound / AMSBound (spec 1.10): Adam's step clipped into bounds that
    close in on final_lr * lr / base_lr as 1/(gamma t)."""

    name: Literal["adabound"] = "adabound"
    final_lr: NonNegative = 0.1
    gamma: float = Field(1e-3, gt=0.0, lt=1.0, description="Convergence speed of the bounds.")
    amsbound: bool = False


class RAdamConfig(_AdamFamily):
    """torch.optim.RAdam (spec 1.11): Adam's step times the rectification r_t once rho_t > 5,
    a momentum step before that."""

    name: Literal["radam"] = "radam"
    decoupled_weight_decay: bool = False
    maximize: bool = False


class RangerConfig(_RuleConfig):
    """Ranger (spec 1.13) = Lookahead(RAdam(betas=(0.95, 0.999), eps=1e-5), k=6, alpha=0.5),
    syncing when RAdam's step t is a multiple of k; optional gradient centralization."""

    name: Literal["ranger"] = "ranger"
    alpha: float = Field(0.5, ge=0.0, le=1.0, description="Lookahead slow-weight step size.")
    k: int = Field(6, ge=1, description="Lookahead sync period, in RAdam steps.")
    N_sma_threshold: float = Field(5.0, ge=0.0, description="rho_t above which RAdam adapts.")
    betas: Betas = (0.95, 0.999)
    eps: NonNegative = 1e-5
    weight_decay: NonNegative = Field(0.0, description="Decoupled: theta <- theta(1 - gamma*wd).")
    use_gc: bool = Field(False, description="Gradient centralization on tensors with dim > 1.")
    gc_conv_only: bool = Field(False, description="Centralize only tensors with dim > 3.")

    @model_validator(mode="after")
    def _no_second_lookahead(self) -> RangerConfig:
        if self.lookahead is not None:
            raise ValueError("ranger is already Lookahead(RAdam); set its k and alpha instead")
        return self


RuleConfig: TypeAlias = (
    SGDConfig
    | AdagradConfig
    | RMSpropConfig
    | AdadeltaConfig
    | AdamConfig
    | AdamWConfig
    | AMSGradConfig
    | AdaBoundConfig
    | RAdamConfig
    | RangerConfig
)
OptimizerConfig: TypeAlias = Annotated[RuleConfig, Field(discriminator="name")]
RULE_CONFIGS: dict[str, type[_RuleConfig]] = {
    cls.model_fields["name"].default: cls
    for cls in (
        SGDConfig, AdagradConfig, RMSpropConfig, AdadeltaConfig, AdamConfig, AdamWConfig,
        AMSGradConfig, AdaBoundConfig, RAdamConfig, RangerConfig,
    )
}  # fmt: skip
RULE_NAMES: tuple[str, ...] = tuple(RULE_CONFIGS)


_OPTIMIZER: TypeAdapter[RuleConfig] = TypeAdapter(OptimizerConfig)
_SCHEDULE: TypeAdapter[Any] = TypeAdapter(ScheduleConfig)


# ---- update modes (DESIGN section 4) --------------------------------------------------------


class GradientPolicy(_Strict):
    """What the server does with each push's gradient before it becomes an update.

    * `nonfinite`: a gradient with NaN or Inf elements, or whose sum of squares overflows
      float32 (finite elements near 1e19 or more, which would make the optimizer state
      infinite), is refused (``"reject"``, the default: INVALID_ARGUMENT, nothing changes);
      or ``"skip"``: the push is accepted and takes its version (the version advances by one,
      every shard stays in step) but the weights and all optimizer state, step counters
      included, are left as they were; or ``"zero"``: the non-finite elements are replaced by
      0 and the rest is applied.
    * `clip_norm`: each push's gradient is scaled so that its L2 norm over the whole model (all
      groups, all shards) is at most this, exactly as ``torch.nn.utils.clip_grad_norm_`` would
      on the trainer's full gradient. In sync mode each push is clipped before the round
      combines them.
    * `max_push_norm`: a push whose gradient norm (over the whole model, before clipping)
      exceeds this is refused with INVALID_ARGUMENT and changes nothing.
    """

    nonfinite: Literal["reject", "skip", "zero"] = "reject"
    clip_norm: float | None = Field(None, gt=0.0)
    max_push_norm: float | None = Field(None, gt=0.0)

    @property
    def needs_norm(self) -> bool:
        return self.clip_norm is not None or self.max_push_norm is not None


class AsyncMode(_Strict):
    """Each push is applied on arrival. With `max_staleness`, a push computed on a version more
    than that many updates old is refused (the trainer should pull) and changes nothing.
    `gradients` is the gradient policy (NaN/Inf handling, clipping, a norm limit)."""

    mode: Literal["async"] = "async"
    max_staleness: int | None = Field(None, ge=0, description="Refuse pushes staler than this.")
    staleness_lr: Literal["none", "inverse"] = Field(
        "none", description="'inverse': a push s updates stale uses lr / (1 + s)."
    )
    gradients: GradientPolicy = Field(default_factory=GradientPolicy)


class SyncMode(_Strict):
    """A round waits for one push from each of `trainers` trainers, combines them (mean or sum)
    and applies one update. After `round_timeout_s` a round closes with the pushes it has; a
    push for a closed round is refused with ABORTED (pull and push again)."""

    mode: Literal["sync"] = "sync"
    trainers: int = Field(..., ge=1, le=512, description="Pushes that make a full round.")
    round_timeout_s: float = Field(30.0, gt=0.0, le=86_400.0)
    aggregate: Literal["mean", "sum"] = "mean"
    gradients: GradientPolicy = Field(default_factory=GradientPolicy)


ModeConfig: TypeAlias = Annotated[AsyncMode | SyncMode, Field(discriminator="mode")]
_MODE: TypeAdapter[Any] = TypeAdapter(ModeConfig)
MODE_NAMES = ("async", "sync")


# ---- parsing -------------------------------------------------------------------------------


def _short(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 80 else text[:80] + "..."


def _describe(error: ValidationError, names: tuple[str, ...]) -> str:
    parts = []
    for item in error.errors(include_url=False):
        # loc[0] is the tag of the chosen variant; the rest is the path inside the config.
        loc = ".".join(str(p) for p in item["loc"][1:])
        message = item["msg"].removeprefix("Value error, ")
        if item["type"] in ("union_tag_invalid", "union_tag_not_found"):
            parts.append(f"{message} (known names: {', '.join(names)})")
        elif not loc:  # a whole-config check or malformed JSON: the message says it all
            parts.append(message)
        elif item["type"] != "missing":
            parts.append(f"{loc}: {message} (got {_short(item['input'])})")
        else:
            parts.append(f"{loc}: {message}")
    if len(parts) > 5:
        parts = [*parts[:5], f"and {len(parts) - 5} more"]
    return "; ".join(parts)


def _as_json(value: Any, what: str) -> str:
    if isinstance(value, BaseModel):
        return value.model_dump_json()
    if isinstance(value, Mapping):
        try:
            return json.dumps(dict(value), allow_nan=True)
        except (TypeError, ValueError) as exc:
            raise InvalidArgument(f"{what} config is not JSON-serialisable: {exc}") from None
    if isinstance(value, str):
        return value
    raise InvalidArgument(
        f"{what} config must be a JSON object, a mapping or a config; got {type(value).__name__}"
    )


def _validate(adapter: TypeAdapter[Any], value: Any, what: str, names: tuple[str, ...]) -> Any:
    text = _as_json(value, what)
    try:
        return adapter.validate_json(text)
    except ValidationError as exc:
        shown = text if len(text) <= 200 else text[:200] + "..."
        raise InvalidArgument(f"invalid {what} config {shown}: {_describe(exc, names)}") from None


def parse_optimizer_config(value: str | Mapping[str, Any] | BaseModel) -> RuleConfig:
    """Validate an optimizer config given as a JSON string, a mapping or a config object.

    Raises `InvalidArgument` with a message that names each bad field and quotes its value.
    """
    if isinstance(value, tuple(RULE_CONFIGS.values())):
        return value  # type: ignore[return-value]
    return _validate(_OPTIMIZER, value, "optimizer", RULE_NAMES)


def parse_schedule_config(value: str | Mapping[str, Any] | BaseModel | None) -> Any:
    """Validate a schedule config (None means constant)."""
    if value is None or value == "":
        return ConstantSchedule()
    if isinstance(value, _SCHEDULE_TYPES):
        return value  # validated when it was made (the models are frozen)
    return _validate(_SCHEDULE, value, "schedule", SCHEDULE_NAMES)


def parse_mode_config(value: str | Mapping[str, Any] | BaseModel | None) -> Any:
    """Validate an update-mode config (None means async with no staleness bound)."""
    if value is None or value == "":
        return AsyncMode()
    if isinstance(value, AsyncMode | SyncMode):
        return value
    return _validate(_MODE, value, "mode", MODE_NAMES)


def with_overrides(config: RuleConfig, overrides: Mapping[str, Any]) -> RuleConfig:
    """A parameter group's config: the model's config with some hyperparameters replaced."""
    if "name" in overrides and overrides["name"] != config.name:
        raise InvalidArgument(
            f"a parameter group cannot change the rule ({overrides['name']!r} in a "
            f"{config.name!r} model); override hyperparameters only"
        )
    merged = {**json.loads(config.model_dump_json()), **overrides}
    return parse_optimizer_config(merged)


def optimizer_config_json(config: BaseModel) -> str:
    """The canonical JSON form (every default filled in), as it travels and is stored."""
    return config.model_dump_json()


schedule_config_json = optimizer_config_json
mode_config_json = optimizer_config_json
