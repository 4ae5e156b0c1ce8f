"""docs/optimizers.md: its generated tables are what scripts/gen_optimizer_docs.py renders from the
code now, and its hand-written examples hold (the JSON configs are valid, the CLI lines parse with
the real parser, the Python calls bind to the client's signatures).

Two claims of the page's prose that no other test makes are checked here too, code against code:
`reset` starts every target key fresh whatever the pair of rules, and the plateau schedule's
newbob rule ignores `patience` while `eps` acts in both rules.
"""

from __future__ import annotations

import ast
import difflib
import inspect
import json
import re
import shlex
from pathlib import Path
from typing import Any

import pytest

from optserve.client import ParameterServerClient, RemoteOptimizer
from optserve.common.config import (
    RULE_CONFIGS,
    RULE_NAMES,
    SCHEDULE_NAMES,
    parse_optimizer_config,
    parse_schedule_config,
    with_overrides,
)
from optserve.server.cli import build_parser
from optserve.server.engine import build_rule
from optserve.server.engine.migration import migrate
from optserve.server.engine.schedules import build_schedule
from tests.helpers.scripts import load_script

ROOT = Path(__file__).resolve().parents[2]
DOC = ROOT / "docs" / "optimizers.md"
REGENERATE = "python scripts/gen_optimizer_docs.py"
ALL_HYPERPARAMETERS = {f for cls in RULE_CONFIGS.values() for f in cls.model_fields}


def load_generator():
    return load_script("gen_optimizer_docs")


GEN = load_generator()


def doc() -> str:
    return DOC.read_text(encoding="utf-8")


def code_blocks(language: str) -> list[str]:
    return re.findall(rf"^```{language}\n(.*?)^```", doc(), re.M | re.S)


# ---- the generated tables -----------------------------------------------------------------


def test_optimizer_docs_are_current():
    current = doc()
    fresh = GEN.render(current)
    if fresh != current:
        diff = difflib.unified_diff(
            current.splitlines(), fresh.splitlines(), "committed", "from the code", lineterm=""
        )
        pytest.fail(
            f"docs/optimizers.md is out of date with the code: regenerate it with `{REGENERATE}`\n"
            + "\n".join(list(diff)[:40])
        )


# ---- the hand-written examples ------------------------------------------------------------


def test_json_examples_are_valid_configs_and_show_every_rule_and_schedule():
    shown = set()
    for text in code_blocks("json"):
        value = json.loads(text)
        if "groups" in value:  # a migration report, not a config
            continue
        if value.get("name") in RULE_NAMES:
            config = parse_optimizer_config(value)
            shown.add(config.name)
            if config.lookahead is not None:
                shown.add(GEN.LOOKAHEAD)
        else:
            shown.add(parse_schedule_config(value).name)
    expected = {*RULE_NAMES, GEN.LOOKAHEAD, *SCHEDULE_NAMES}
    assert shown == expected, f"no example for {sorted(expected - shown)}"


def test_cli_examples_parse():
    parser = build_parser()
    commands = [
        line
        for block in code_blocks("bash")
        for line in block.splitlines()
        if line.startswith("optserve ")
    ]
    assert any(" --policy reset" in c for c in commands)
    assert any(" --set lr=" in c for c in commands)
    for command in commands:
        try:
            args = parser.parse_args(shlex.split(command)[1:])
        except SystemExit:
            pytest.fail(f"the CLI refuses: {command}")
        if args.command == "set-optimizer":
            if args.config is not None:
                parse_optimizer_config(args.config)
            for item in args.set:
                key, _, value = item.partition("=")
                assert key in ALL_HYPERPARAMETERS, command
                json.loads(value)
        elif args.command == "set-schedule":
            parse_schedule_config(args.config)


def _literal(node: ast.AST) -> Any:
    try:
        return ast.literal_eval(node)
    except ValueError:
        return None


def _check_config_literals(tree: ast.AST) -> None:
    for node in ast.walk(tree):
        if isinstance(node, ast.Dict):
            value = _literal(node)
            if isinstance(value, dict) and value.get("name") in RULE_NAMES:
                parse_optimizer_config(value)
            elif isinstance(value, dict) and value.get("name") in SCHEDULE_NAMES:
                parse_schedule_config(value)


def _check_call(call: ast.Call, function: Any, method: bool) -> None:
    """The call binds to the function's signature (a method's self is a placeholder)."""
    arguments = [object()] * (len(call.args) + method)
    keywords = {k.arg: object() for k in call.keywords if k.arg}
    try:
        inspect.signature(function).bind(*arguments, **keywords)
    except TypeError as exc:
        pytest.fail(f"{ast.unparse(call)}: {exc}")


def test_python_examples_match_the_client():
    classes = {cls.__name__: cls for cls in (ParameterServerClient, RemoteOptimizer)}
    receivers = {"client": ParameterServerClient, "opt": RemoteOptimizer}
    blocks = code_blocks("python")
    assert blocks
    called = set()
    for block in blocks:
        tree = ast.parse(block)
        _check_config_literals(tree)
        for node in ast.walk(tree):
            if not isinstance(node, ast.Call):
                continue
            func = node.func
            if isinstance(func, ast.Name) and func.id in classes:
                _check_call(node, classes[func.id], method=False)
                keywords = {k.arg: _literal(k.value) for k in node.keywords}
                if keywords.get("optimizer") and keywords.get("groups"):
                    model = parse_optimizer_config(keywords["optimizer"])
                    for body in keywords["groups"].values():
                        with_overrides(model, {k: v for k, v in body.items() if k != "params"})
            elif isinstance(func, ast.Attribute) and isinstance(func.value, ast.Name):
                cls = receivers.get(func.value.id)
                if cls is None:
                    continue
                assert hasattr(cls, func.attr), f"{cls.__name__} has no {func.attr}"
                _check_call(node, getattr(cls, func.attr), method=True)
                called.add(func.attr)
                if func.attr == "set_hyperparameters":
                    assert {k.arg for k in node.keywords} <= ALL_HYPERPARAMETERS
    assert {"set_optimizer", "set_hyperparameters"} <= called


# ---- claims of the prose, code against code -----------------------------------------------


def test_reset_starts_every_target_key_fresh():
    configs = [parse_optimizer_config(c) for c in GEN.MIGRATION_CONFIGS.values()]
    for source in configs:
        for target in configs:
            rule, state, weights = GEN.stepped(source)
            _, report = migrate(rule, state, build_rule(target), weights, "reset")
            actions = {key: action for key, (action, _) in report.entries.items()}
            fresh = {key for key, action in actions.items() if action == "fresh"}
            # Every target key fresh, every other source key dropped.
            assert actions.keys() - fresh == set(state) - fresh, (source, target, actions)
            assert all(actions[key] == "dropped" for key in actions.keys() - fresh), actions


def test_newbob_ignores_patience_and_eps_acts_in_both_rules():
    newbob = build_schedule(parse_schedule_config({"name": "plateau", "patience": 3}))
    newbob.observe("val_loss", 1.0)
    assert newbob.observe("val_loss", 2.0)  # the first report that does not improve reduces
    assert newbob.lr(1.0, 0) == 0.5
    for rule in ("newbob", "torch"):
        lrs = []
        for eps in (1e-8, 0.4):
            config = {"name": "plateau", "rule": rule, "factor": 0.5, "patience": 0, "eps": eps}
            schedule = build_schedule(parse_schedule_config(config))
            for value in (1.0, 1.0, 0.9, 1.0):
                schedule.observe("val_loss", value)
            lrs.append(schedule.lr(1.0, 0))
        # 1 -> 0.5 (0.5 > eps 0.4) is applied, 0.5 -> 0.25 is not, nor any after it
        assert lrs == [0.125 if rule == "newbob" else 0.25, 0.5], (rule, lrs)
