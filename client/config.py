"""Typed optimizer configuration, shared by the client and the server.

On the wire and in the CLI an optimizer is a JSON object ``{"name": ..., <hyperparameters>}``
(DESIGN section 8). Hyperparameter names and defaults are the oracle's: torch.optim's argument
names and defaults. Anything invalid is refused when the config is parsed, with a message that
quotes the offending value, so a bad config never reaches a shard.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import Annotated, Any, Literal, TypeAlias

from pydantic import BaseModel, ConfigDict, Field, TypeAdapter, ValidationError, model_validator

from optserve.client.errors import InvalidArgument

Probability = Annotated[float, Field(ge=0.0, lt=1.0)]
NonNegative = Annotated[float, Field(ge=0.0)]


class _RuleConfig(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False, strict=True)

    lr: NonNegative = Field(1e-3, description="Learning rate gamma (before any schedule).")
    weight_decay: NonNegative = Field(0.0, description="L2 penalty: g <- g + weight_decay * theta.")
    maximize: bool = Field(False, description="Ascend instead of descend (g <- -g).")


class SGDConfig(_RuleConfig):
    """torch.optim.SGD: plain, heavy-ball momentum and Nesterov (spec 1.1, 1.3)."""

    name: Literal["sgd"] = "sgd"
    momentum: NonNegative = Field(0.0, description="Momentum factor mu; 0 disables the buffer.")
    dampening: NonNegative = Field(0.0, description="Dampening tau of the momentum update.")
    nesterov: bool = Field(
        False, description="Nesterov momentum (needs momentum > 0, dampening 0)."
    )

    @model_validator(mode="after")
    def _nesterov_needs_momentum(self) -> SGDConfig:
        if self.nesterov and (self.momentum <= 0 or self.dampening != 0):
            raise ValueError(
                "nesterov=true requires momentum > 0 and dampening = 0 "
                f"(got momentum={self.momentum}, dampening={self.dampening})"
            )
        return self


class AdamConfig(_RuleConfig):
    """torch.optim.Adam, with AMSGrad as ``amsgrad: true`` (spec 1.7, 1.9)."""

    name: Literal["adam"] = "adam"
    betas: tuple[Probability, Probability] = Field(
        (0.9, 0.999), description="EMA factors (beta1, beta2) of the first and second moments."
    )
    eps: NonNegative = Field(1e-8, description="Added to sqrt(v_hat) in the denominator.")
    amsgrad: bool = Field(False, description="Divide by the running maximum of v (AMSGrad).")


OptimizerConfig: TypeAlias = Annotated[SGDConfig | AdamConfig, Field(discriminator="name")]
_ADAPTER: TypeAdapter[SGDConfig | AdamConfig] = TypeAdapter(OptimizerConfig)

RULE_NAMES: tuple[str, ...] = ("sgd", "adam")


def _short(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 80 else text[:80] + "..."


def _describe(error: ValidationError) -> str:
    parts = []
    for item in error.errors(include_url=False):
        # loc[0] is the rule's tag; the rest is the path inside the config.
        loc = ".".join(str(p) for p in item["loc"][1:])
        message = item["msg"].removeprefix("Value error, ")
        if item["type"] in ("union_tag_invalid", "union_tag_not_found"):
            parts.append(f"{message} (known rules: {', '.join(RULE_NAMES)})")
        elif not loc:  # a whole-config check or malformed JSON: the message says it all
            parts.append(message)
        elif item["type"] != "missing":
            parts.append(f"{loc}: {message} (got {_short(item['input'])})")
        else:
            parts.append(f"{loc}: {message}")
    if len(parts) > 5:
        parts = [*parts[:5], f"and {len(parts) - 5} more"]
    return "; ".join(parts)


def parse_optimizer_config(value: str | Mapping[str, Any] | BaseModel) -> SGDConfig | AdamConfig:
    """Validate an optimizer config given as a JSON string, a mapping or a config object.

    Raises `InvalidArgument` with a message that names each bad field and quotes its value.
    """
    if isinstance(value, SGDConfig | AdamConfig):
        return value
    if isinstance(value, BaseModel):
        value = value.model_dump()
    if isinstance(value, Mapping):
        try:
            text = json.dumps(dict(value), allow_nan=True)
        except (TypeError, ValueError) as exc:
            raise InvalidArgument(f"optimizer config is not JSON-serialisable: {exc}") from None
    elif isinstance(value, str):
        text = value
    else:
        raise InvalidArgument(
            f"optimizer config must be a JSON object, a mapping or a config; got {type(value)}"
        )
    try:
        return _ADAPTER.validate_json(text)
    except ValidationError as exc:
        shown = text if len(text) <= 200 else text[:200] + "..."
        raise InvalidArgument(f"invalid optimizer config {shown}: {_describe(exc)}") from None


def optimizer_config_json(config: SGDConfig | AdamConfig) -> str:
    """The canonical JSON form (every default filled in), as it travels and is stored."""
    return config.model_dump_json()
