"""The update engine: rules and their state on flat buffers. Knows nothing of Ray or gRPC."""

from __future__ import annotations

from optserve.common.config import RangerConfig, RuleConfig, SGDConfig
from optserve.server.engine.adabound import AdaBound
from optserve.server.engine.adadelta import Adadelta
from optserve.server.engine.adagrad import Adagrad
from optserve.server.engine.adam import Adam
from optserve.server.engine.base import ElementwiseRule, Rule, State, TensorViews
from optserve.server.engine.delayed_nesterov import DelayedNesterov
from optserve.server.engine.lookahead import Lookahead, ranger
from optserve.server.engine.radam import RAdam
from optserve.server.engine.rmsprop import RMSprop
from optserve.server.engine.sgd import SGD

_RULES: dict[str, type[ElementwiseRule]] = {
    "sgd": SGD,
    "adagrad": Adagrad,
    "rmsprop": RMSprop,
    "adadelta": Adadelta,
    "adam": Adam,
    "adamw": Adam,
    "amsgrad": Adam,
    "adabound": AdaBound,
    "radam": RAdam,
}


def build_rule(config: RuleConfig) -> Rule:
    """The rule object for a validated optimizer config (wrapped in Lookahead if asked)."""
    if isinstance(config, RangerConfig):
        return ranger(config)
    if isinstance(config, SGDConfig) and config.delay > 1:
        rule: ElementwiseRule = DelayedNesterov(config)
    else:
        rule = _RULES[config.name](config)
    if config.lookahead is not None:
        return Lookahead(rule, config.lookahead)
    return rule


__all__ = ["ElementwiseRule", "Lookahead", "Rule", "State", "TensorViews", "build_rule"]
