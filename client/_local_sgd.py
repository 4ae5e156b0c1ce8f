"""Local SGD for `RemoteOptimizer` (DiLoCo: Douillard et al. 2023, "DiLoCo: Distributed
Low-Communication Training of Language Models", arXiv 2311.08105).

With ``local_steps=H`` a trainer runs an inner optimizer (a real ``torch.optim`` optimizer,
built from an optserve optimizer config) on its own copy of the weights for H steps, then
pushes one pseudo-gradient: the global weights it started the round from minus its local
weights. The server's rule is the outer optimizer: it applies the pseudo-gradient (in sync
mode, the mean of one per trainer) as it would a gradient, and the trainer loads the new global
weights and starts the next round from them. The inner optimizer's state (Adam's moments, ...)
stays on the trainer, across rounds, as DiLoCo keeps it; the server never sees it.
"""

from __future__ import annotations

import inspect
from collections.abc import Mapping, Sequence
from typing import Any

import torch

from optserve.common.config import RuleConfig, parse_optimizer_config
from optserve.common.errors import InvalidArgument

# The rules torch.optim runs with the same hyperparameter names as our configs (common/config.py;
# those names are torch's): config name -> (torch.optim class, arguments the name implies).
LOCAL_RULES: dict[str, tuple[type[torch.optim.Optimizer], dict[str, Any]]] = {
    "sgd": (torch.optim.SGD, {}),
    "adagrad": (torch.optim.Adagrad, {}),
    "rmsprop": (torch.optim.RMSprop, {}),
    "adadelta": (torch.optim.Adadelta, {}),
    "adam": (torch.optim.Adam, {}),
    "adamw": (torch.optim.AdamW, {}),
    "amsgrad": (torch.optim.Adam, {"amsgrad": True}),
    "radam": (torch.optim.RAdam, {}),
}


def inner_config(inner: str | Mapping[str, Any] | RuleConfig) -> RuleConfig:
    """The inner optimizer's config, checked: a rule torch.optim runs here, without Lookahead.

    Raises `InvalidArgument` (a ValueError) for an unknown rule, a bad hyperparameter, or a
    rule that only the server runs (AdaBound, Ranger, anything wrapped in Lookahead)."""
    config = parse_optimizer_config(inner)
    if config.name not in LOCAL_RULES:
        raise InvalidArgument(
            f"inner optimizer {config.name!r} cannot run on the trainer: local steps use "
            f"torch.optim, which has no {config.name!r}; use one of {', '.join(LOCAL_RULES)} "
            "(the outer optimizer, on the server, may be any rule)"
        )
    if getattr(config, "lookahead", None) is not None:
        raise InvalidArgument(
            "the inner optimizer cannot use lookahead (torch.optim has no Lookahead); "
            "local steps with an outer optimizer are already a form of it"
        )
    return config


def build_inner(
    inner: str | Mapping[str, Any] | RuleConfig, params: Sequence[torch.Tensor]
) -> torch.optim.Optimizer:
    """A torch.optim optimizer over `params`, from an optserve optimizer config."""
    config = inner_config(inner)
    cls, implied = LOCAL_RULES[config.name]
    takes = inspect.signature(cls.__init__).parameters
    kwargs = config.model_dump(exclude={"name", "lookahead"})
    # A hyperparameter of ours that torch's class lacks (a server-only extension) may only be
    # left at its default, where the rule is torch's exactly.
    for key in [k for k in kwargs if k not in takes]:
        if kwargs.pop(key) != type(config).model_fields[key].default:
            raise InvalidArgument(
                f"inner optimizer {config.name!r}: {key} is a server-side extension that "
                f"torch.optim.{cls.__name__} does not run; leave it at its default here"
            )
    if "betas" in kwargs:
        kwargs["betas"] = tuple(kwargs["betas"])
    return cls(list(params), **kwargs, **implied)


class LocalSGD:
    """One trainer's local rounds: H inner steps, then a pseudo-gradient to push.

    `step()` takes one inner step (the parameters' `.grad` as torch would) and, on the H-th
    step of the round, returns the pseudo-gradient (start of round minus now, per parameter);
    otherwise None. `begin_round()` marks the weights now in the parameters (the global weights
    just loaded) as the next round's start; the inner optimizer's state is kept.
    """

    def __init__(
        self,
        named: Sequence[tuple[str, torch.Tensor]],
        local_steps: int,
        inner: str | Mapping[str, Any] | RuleConfig,
    ) -> None:
        self.named = list(named)
        self.local_steps = local_steps
        self.optimizer = build_inner(inner, [p for _, p in self.named])
        self.steps = 0  # inner steps taken, over all rounds
        self.in_round = 0  # inner steps taken since the round began
        self._start: dict[str, torch.Tensor] = {}
        self._delta: dict[str, torch.Tensor] = {}
        self.begin_round()  # the weights now (loaded again when the server's differ)

    @torch.no_grad()
    def begin_round(self) -> None:
        """The parameters hold the global weights: the next round starts from them."""
        for name, param in self.named:
            start = self._start.get(name)
            if start is None:
                self._start[name] = param.detach().clone()
            else:
                start.copy_(param)
        self.in_round = 0

    @torch.no_grad()
    def step(self) -> dict[str, torch.Tensor] | None:
        """One inner step; the round's pseudo-gradient when it is the round's last."""
        self.optimizer.step()
        self.steps += 1
        self.in_round += 1
        if self.in_round < self.local_steps:
            return None
        for name, param in self.named:  # into buffers kept from round to round
            delta = self._delta.get(name)
            if delta is None:
                delta = self._delta[name] = torch.empty_like(param)
            torch.sub(self._start[name], param, out=delta)
        return self._delta


def local_sgd(
    named: Sequence[tuple[str, torch.Tensor]],
    local_steps: int,
    inner: str | Mapping[str, Any] | RuleConfig | None,
) -> LocalSGD | None:
    """RemoteOptimizer's `local_steps` and `inner`, checked: None for a trainer that pushes
    every step (local_steps=1 without an inner optimizer, the default)."""
    if isinstance(local_steps, bool) or not isinstance(local_steps, int) or local_steps < 1:
        raise InvalidArgument(f"local_steps must be an integer >= 1, got {local_steps!r}")
    if inner is None:
        if local_steps > 1:
            raise InvalidArgument(
                f"local_steps={local_steps} needs an inner optimizer to take the local steps, "
                'e.g. inner={"name": "adamw", "lr": 1e-3}'
            )
        return None
    return LocalSGD(named, local_steps, inner)
