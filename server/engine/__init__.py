"""The update engine: rules and their state on flat buffers. Knows nothing of Ray or gRPC."""

from __future__ import annotations

from optserve.client.config import AdamConfig, SGDConfig
from optserve.server.engine.adam import Adam
from optserve.server.engine.base import Rule, State
from optserve.server.engine.sgd import SGD

_RULES: dict[type, type[Rule]] = {SGDConfig: SGD, AdamConfig: Adam}


def build_rule(config: SGDConfig | AdamConfig) -> Rule:
    """The rule object for a validated optimizer config."""
    return _RULES[type(config)](config)


__all__ = ["Adam", "Rule", "SGD", "State", "build_rule"]
