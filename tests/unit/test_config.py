"""Optimizer configs: torch's names and defaults, refusals that quote the bad value."""

from __future__ import annotations

import json

import pytest
from pydantic import ValidationError

from optserve.common.config import (
    AdamConfig,
    SGDConfig,
    optimizer_config_json,
    parse_optimizer_config,
)
from optserve.common.errors import InvalidArgument


def test_accepts_json_mapping_and_object_forms_alike():
    text = '{"name": "adam", "lr": 0.01, "betas": [0.8, 0.99]}'
    from_text = parse_optimizer_config(text)
    from_mapping = parse_optimizer_config({"name": "adam", "lr": 0.01, "betas": (0.8, 0.99)})
    assert from_text == from_mapping == AdamConfig(lr=0.01, betas=(0.8, 0.99))
    assert parse_optimizer_config(from_text) is from_text


def test_canonical_json_round_trips_with_defaults_filled_in():
    config = parse_optimizer_config({"name": "sgd", "momentum": 0.9})
    data = json.loads(optimizer_config_json(config))
    assert data == {
        "name": "sgd",
        "lr": 0.001,
        "momentum": 0.9,
        "dampening": 0.0,
        "nesterov": False,
        "lookahead": None,
        "weight_decay": 0.0,
        "maximize": False,
        "delay": 1,
    }
    assert parse_optimizer_config(data) == config


@pytest.mark.parametrize(
    "config, quoted",
    [
        ({"name": "adagrad2"}, "adagrad2"),
        ({"name": "adam", "lr": -0.1}, "-0.1"),
        ({"name": "adam", "betas": [0.9, 1.0]}, "1.0"),
        ({"name": "adam", "betas": [1.5, 0.9]}, "1.5"),
        ({"name": "adam", "eps": -1}, "-1"),
        ({"name": "sgd", "momentum": -0.5}, "-0.5"),
        ({"name": "sgd", "lr": "fast"}, "fast"),
        ({"name": "sgd", "lr": float("nan")}, "nan"),
        ({"name": "sgd", "lr": float("inf")}, "inf"),
        ({"name": "adam", "lrr": 0.1}, "lrr"),
        ({"name": "sgd", "nesterov": True}, "momentum=0.0"),
        ({"name": "sgd", "nesterov": True, "momentum": 0.9, "dampening": 0.1}, "dampening=0.1"),
        ({"lr": 0.1}, "name"),
        ("{not json", "Invalid JSON"),
        ({"name": "adam", "amsgrad": "yes"}, "yes"),
    ],
)
def test_invalid_configs_are_refused_with_the_value_quoted(config, quoted):
    with pytest.raises(InvalidArgument) as info:
        parse_optimizer_config(config)
    assert quoted in str(info.value)


def test_non_json_values_are_refused():
    with pytest.raises(InvalidArgument, match="JSON"):
        parse_optimizer_config({"name": "sgd", "lr": object()})
    with pytest.raises(InvalidArgument):
        parse_optimizer_config(42)  # type: ignore[arg-type]


def test_configs_are_immutable():
    config = SGDConfig()
    with pytest.raises(ValidationError):
        config.lr = 1.0  # type: ignore[misc]
