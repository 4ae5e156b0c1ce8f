"""docs/optimizers.md agrees with the code.

Everything the checks compare against is derived from the code: the rule and schedule config
models (their fields and defaults), the state the engine's rules keep, the oracles the engine is
tested against, what the migration code reports for every (source, target) pair, the schedules'
behaviour, and the CLI's and the client's signatures.
"""

from __future__ import annotations

import ast
import contextlib
import inspect
import json
import re
import shlex
import typing
from pathlib import Path
from typing import Any

import pytest
import torch
from pydantic import BaseModel, ValidationError
from pydantic_core import PydanticUndefined

from optserve.client import ParameterServerClient, RemoteOptimizer
from optserve.common.config import (
    RULE_CONFIGS,
    RULE_NAMES,
    SCHEDULE_NAMES,
    PlateauSchedule,
    ScheduleConfig,
    parse_optimizer_config,
    parse_schedule_config,
    with_overrides,
)
from optserve.server.cli import build_parser
from optserve.server.engine import build_rule
from optserve.server.engine.migration import migrate
from optserve.server.engine.schedules import build_schedule
from tests.unit.oracles import PaperLookahead, torch_oracle

DOC_PATH = Path(__file__).resolve().parents[2] / "docs" / "optimizers.md"
DOC = DOC_PATH.read_text(encoding="utf-8")
REQUIRED = object()  # a field without a default
NONE_CELL = "–"  # an empty cell in the migration tables


# ---- the code's side ----------------------------------------------------------------------


def _lookahead_model() -> type[BaseModel]:
    """The model of the `lookahead` field every rule config has."""
    models = set()
    for cls in RULE_CONFIGS.values():
        annotation = cls.model_fields["lookahead"].annotation
        models |= {a for a in typing.get_args(annotation) if isinstance(a, type(BaseModel))}
    assert len(models) == 1, models
    return models.pop()


def _schedule_models() -> dict[str, type[BaseModel]]:
    union = typing.get_args(ScheduleConfig)[0]
    models = {cls.model_fields["name"].default: cls for cls in typing.get_args(union)}
    assert set(models) == set(SCHEDULE_NAMES)
    return models


LOOKAHEAD = "lookahead"
RULE_MODELS: dict[str, type[BaseModel]] = {**RULE_CONFIGS, LOOKAHEAD: _lookahead_model()}
SCHEDULE_MODELS = _schedule_models()
ALL_HYPERPARAMETERS = {f for cls in RULE_CONFIGS.values() for f in cls.model_fields}


def _default(model: type[BaseModel], field: str) -> Any:
    """A field's default as a JSON value, or REQUIRED."""
    info = model.model_fields[field]
    if info.default is not PydanticUndefined:
        value = info.default
    elif info.default_factory is not None:
        value = info.default_factory()  # type: ignore[call-arg]
    else:
        return REQUIRED
    if isinstance(value, BaseModel):
        return value.model_dump(mode="json")
    return json.loads(json.dumps(value))


def _documented_fields(model: type[BaseModel]) -> set[str]:
    return set(model.model_fields) - {"name"}


def _stepped(config: Any, steps: int = 10) -> tuple[Any, dict[str, Any], torch.Tensor]:
    """A rule with the state it has after `steps` updates on seeded gradients."""
    rule = build_rule(config)
    weights = torch.randn(8, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    state = rule.init_state(weights)
    gen = torch.Generator().manual_seed(1)
    for _ in range(steps):
        rule.apply(weights, torch.randn(8, dtype=torch.float64, generator=gen), state, config.lr)
    return rule, state, weights


def _variants(name: str) -> list[Any]:
    """The default config of a rule and, one at a time, each switch that may add state."""
    cls = RULE_CONFIGS[name]
    candidates: list[dict[str, Any]] = [{}]
    candidates += [{f: True} for f, info in cls.model_fields.items() if info.annotation is bool]
    if "momentum" in cls.model_fields:
        candidates.append({"momentum": 0.9})
    configs = []
    for changes in candidates:
        with contextlib.suppress(ValidationError):  # e.g. nesterov without momentum
            configs.append(cls(**changes))
    return configs


def _state_keys(name: str) -> set[str]:
    if name == LOOKAHEAD:
        inner = RULE_CONFIGS["adam"]()
        wrapped = RULE_CONFIGS["adam"](lookahead=RULE_MODELS[LOOKAHEAD]())
        return set(_stepped(wrapped, 1)[1]) - set(_stepped(inner, 1)[1])
    return set().union(*(set(_stepped(config, 1)[1]) for config in _variants(name)))


def _report(source: Any, target: Any, policy: str) -> dict[str, str]:
    rule, state, weights = _stepped(source)
    _, report = migrate(rule, state, build_rule(target), weights, policy)  # type: ignore[arg-type]
    return {key: action for key, (action, _) in report.entries.items()}


def _symbol(actions: dict[str, str]) -> str:
    """The migration matrix's symbol for one report (legend in the doc)."""
    target = [a for a in actions.values() if a != "dropped"]
    if not target:
        return NONE_CELL
    if all(a == "kept" for a in target):
        return "="
    if all(a == "fresh" for a in target):
        return "F"
    return "P" if "fresh" in target else "C"


# ---- the doc's side -----------------------------------------------------------------------


def _sections(text: str, level: int) -> dict[str, str]:
    """Heading title -> body, for the headings of exactly `level`."""
    pattern = re.compile(rf"^{'#' * level} (.+)$", re.M)
    matches = list(pattern.finditer(text))
    out = {}
    for i, match in enumerate(matches):
        end = matches[i + 1].start() if i + 1 < len(matches) else len(text)
        out[match.group(1).strip()] = text[match.end() : end]
    return out


def _h2(title: str) -> str:
    sections = _sections(DOC, 2)
    assert title in sections, f"docs/optimizers.md has no section '## {title}'"
    return sections[title]


def _named(body: str, level: int) -> dict[str, str]:
    """`name` -> body, for headings that start with a name in backticks."""
    out = {}
    for title, text in _sections(body, level).items():
        match = re.match(r"(?:From )?`([^`]+)`", title)
        if match:
            out[match.group(1)] = text
    return out


def _cells(line: str, columns: int) -> list[str]:
    return [c.strip() for c in line.strip().strip("|").split("|", columns - 1)]


def _table(body: str, header: list[str]) -> list[list[str]] | None:
    """The rows of the table whose header cells are `header`, or None if there is none."""
    lines = body.splitlines()
    for i, line in enumerate(lines):
        if line.startswith("|") and _cells(line, len(header)) == header:
            rows = []
            for row in lines[i + 2 :]:
                if not row.startswith("|"):
                    break
                rows.append(_cells(row, len(header)))
            return rows
    return None


def _unquote(cell: str) -> str:
    return cell.strip().strip("`")


def _code_blocks(text: str, language: str) -> list[str]:
    return re.findall(rf"^```{language}\n(.*?)^```", text, re.M | re.S)


def _labelled_line(body: str, label: str) -> str:
    """The paragraph that starts with **label:**."""
    match = re.search(rf"^\*\*{label}:\*\*(.*?)(?:\n\n|\Z)", body, re.M | re.S)
    assert match, f"no **{label}:** paragraph"
    return match.group(1)


def _same(doc: Any, code: Any) -> bool:
    """JSON values equal, with bool, int and float told apart (an int may stand for a float)."""
    if isinstance(code, bool) or isinstance(doc, bool):
        return type(doc) is type(code) and doc == code
    if isinstance(code, float):
        return isinstance(doc, int | float) and doc == code
    if isinstance(code, int):
        return type(doc) is int and doc == code
    if isinstance(code, list):
        return (
            isinstance(doc, list)
            and len(doc) == len(code)
            and all(_same(d, c) for d, c in zip(doc, code, strict=True))
        )
    if isinstance(code, dict):
        return (
            isinstance(doc, dict)
            and doc.keys() == code.keys()
            and all(_same(doc[k], code[k]) for k in code)
        )
    return doc == code


def _check_parameter_table(section: str, model: type[BaseModel], header: list[str]) -> None:
    fields = _documented_fields(model)
    rows = _table(section, header)
    if not fields:
        assert rows is None, f"{model.__name__} has no parameters but the doc has a table"
        return
    assert rows is not None, f"no table {header} for {model.__name__}"
    documented = {_unquote(row[0]): row[1] for row in rows}
    assert len(documented) == len(rows), f"a row appears twice for {model.__name__}"
    assert set(documented) == fields, (
        f"{model.__name__}: the doc lists {sorted(documented)}, the model has {sorted(fields)}"
    )
    for field, cell in documented.items():
        expected = _default(model, field)
        if expected is REQUIRED:
            assert cell == "required", f"{model.__name__}.{field} has no default; doc: {cell}"
            continue
        assert cell.startswith("`") and cell.endswith("`"), f"{field}: default {cell!r}"
        written = json.loads(_unquote(cell))
        assert _same(written, expected), (
            f"{model.__name__}.{field}: the doc says {_unquote(cell)}, the code {expected!r}"
        )


# ---- update rules -------------------------------------------------------------------------

RULES = _named(_h2("Update rules"), 3)


def test_rule_sections_are_exactly_the_rules_and_lookahead():
    assert set(RULES) == set(RULE_MODELS), sorted(set(RULES) ^ set(RULE_MODELS))


@pytest.mark.parametrize("name", sorted(RULE_MODELS))
def test_rule_hyperparameters_and_defaults(name):
    assert name in RULES, f"no section '### `{name}`' under '## Update rules'"
    header = ["hyperparameter", "default", "meaning"]
    _check_parameter_table(RULES[name], RULE_MODELS[name], header)


@pytest.mark.parametrize("name", sorted(RULE_MODELS))
def test_rule_state_keys(name):
    documented = set(re.findall(r"`([^`]+)`", _labelled_line(RULES[name], "State")))
    assert documented == _state_keys(name), (name, sorted(documented), sorted(_state_keys(name)))


def _oracle_names(opt: Any) -> list[str]:
    if isinstance(opt, PaperLookahead):
        return [type(opt).__name__, *_oracle_names(opt.inner)]
    cls = type(opt)
    module = cls.__module__.split(".")
    if module[:2] == ["torch", "optim"]:
        return [f"torch.optim.{cls.__name__}"]
    return [f"{module[0]}.{cls.__name__}"]


def _oracle_arguments(opt: Any) -> list[str]:
    """Arguments the test's oracle sets away from its class's own defaults."""
    inner = opt.inner if isinstance(opt, PaperLookahead) else opt
    signature = inspect.signature(type(inner).__init__).parameters
    return [
        key
        for key, value in inner.defaults.items()
        if key in signature and value != signature[key].default and key != "lr"
    ]


@pytest.mark.parametrize("name", sorted(RULE_MODELS))
def test_rule_oracle(name):
    line = _labelled_line(RULES[name], "Oracle")
    params = [torch.nn.Parameter(torch.zeros(3))]
    if name == LOOKAHEAD:
        lookahead = RULE_MODELS[LOOKAHEAD]().model_dump()
        opt = torch_oracle({"name": "adam", "lookahead": lookahead}, params)
        assert isinstance(opt, PaperLookahead)
        assert type(opt).__name__ in line
        return
    opt = torch_oracle({"name": name}, params)
    for oracle in _oracle_names(opt):
        assert re.search(rf"{re.escape(oracle)}\b", line), (name, oracle, line)
    for argument in _oracle_arguments(opt):
        assert argument in line, f"{name}: the oracle sets {argument}; the doc does not say so"


@pytest.mark.parametrize("name", sorted(RULE_MODELS))
def test_rule_examples_are_valid_configs(name):
    examples = _code_blocks(RULES[name], "json")
    assert examples, f"no JSON example for {name}"
    for text in examples:
        config = parse_optimizer_config(text)
        if name == LOOKAHEAD:
            assert config.lookahead is not None, text
        else:
            assert config.name == name, text


# ---- schedules ----------------------------------------------------------------------------

SCHEDULES = _named(_h2("Learning-rate schedules"), 3)


def test_schedule_sections_are_exactly_the_schedules():
    assert set(SCHEDULES) == set(SCHEDULE_MODELS), sorted(set(SCHEDULES) ^ set(SCHEDULE_MODELS))


@pytest.mark.parametrize("name", sorted(SCHEDULE_MODELS))
def test_schedule_parameters_and_defaults(name):
    assert name in SCHEDULES, f"no section '### `{name}`' under '## Learning-rate schedules'"
    header = ["parameter", "default", "meaning"]
    _check_parameter_table(SCHEDULES[name], SCHEDULE_MODELS[name], header)


@pytest.mark.parametrize("name", sorted(SCHEDULE_MODELS))
def test_schedule_examples_are_valid_configs(name):
    examples = _code_blocks(SCHEDULES[name], "json")
    assert examples, f"no JSON example for {name}"
    for text in examples:
        assert parse_schedule_config(text).name == name, text


def test_plateau_rule_defaults():
    rows = _table(SCHEDULES["plateau"], ["rule", "factor", "patience", "threshold"])
    assert rows is not None
    rules = typing.get_args(PlateauSchedule.model_fields["rule"].annotation)
    assert sorted(_unquote(r[0]) for r in rows) == sorted(rules)
    for row in rows:
        config = PlateauSchedule(rule=_unquote(row[0]))
        expected = [config.resolved_factor, config.resolved_patience, config.resolved_threshold]
        for cell, value in zip(row[1:], expected, strict=True):
            assert _same(json.loads(_unquote(cell)), value), (row, expected)


def test_plateau_worked_example():
    section = SCHEDULES["plateau"]
    rows = _table(section, ["report", "`val_loss`", "lr, newbob", "lr, torch"])
    assert rows
    torch_config = re.search(r'`(\{"name": "plateau", "rule": "torch"[^`]*\})`', section)
    assert torch_config
    schedules = [
        build_schedule(parse_schedule_config({"name": "plateau"})),
        build_schedule(parse_schedule_config(torch_config.group(1))),
    ]
    for row in rows:
        value = float(row[1])
        lrs = []
        for schedule in schedules:
            schedule.observe("val_loss", value)
            lrs.append(schedule.lr(1.0, 0))
        assert [float(row[2]), float(row[3])] == pytest.approx(lrs), row


def test_schedule_claims():
    warmup = build_schedule(parse_schedule_config({"name": "warmup", "warmup_steps": 4}))
    assert warmup.lr(1.0, 0) == 0.0  # the first update has lr 0
    cosine = build_schedule(parse_schedule_config({"name": "cosine", "T_max": 10}))
    assert cosine.lr(1.0, 10) == pytest.approx(0.0) and cosine.lr(1.0, 20) == pytest.approx(1.0)
    plateau = build_schedule(parse_schedule_config({"name": "plateau", "patience": 3}))
    plateau.observe("val_loss", 1.0)
    assert plateau.observe("val_loss", 2.0)  # newbob ignores patience
    # `eps` is documented as unused: the same reports give the same lr whatever it is.
    lrs = []
    for eps in (1e-8, 0.4):
        config = {"name": "plateau", "rule": "torch", "patience": 0, "eps": eps}
        schedule = build_schedule(parse_schedule_config(config))
        for value in (1.0, 1.0, 1.0):
            schedule.observe("val_loss", value)
        lrs.append(schedule.lr(1.0, 0))
    assert lrs[0] == lrs[1]


# ---- migration ----------------------------------------------------------------------------

MIGRATION = _h2("Switching the optimizer mid-run")


def _labels() -> dict[str, Any]:
    rows = _table(MIGRATION, ["label", "config"])
    assert rows, "no '| label | config |' table"
    return {_unquote(label): parse_optimizer_config(_unquote(config)) for label, config in rows}


LABELS = _labels()


def test_matrix_labels_cover_every_rule_and_lookahead():
    names = {config.name for config in LABELS.values()}
    assert names >= set(RULE_NAMES), sorted(set(RULE_NAMES) - names)
    assert any(getattr(c, "lookahead", None) is not None for c in LABELS.values())


def test_migration_matrix():
    lines = [line for line in MIGRATION.splitlines() if line.startswith("| from \\ to |")]
    assert len(lines) == 1, "one '| from \\ to |' table"
    header = _cells(lines[0], len(LABELS) + 1)
    assert [_unquote(c) for c in header[1:]] == list(LABELS), "columns are the labels, in order"
    rows = _table(MIGRATION, header)
    assert rows is not None
    assert [_unquote(r[0]) for r in rows] == list(LABELS), "rows are the labels, in order"
    wrong = []
    for row in rows:
        for target, cell in zip(LABELS, row[1:], strict=True):
            symbol = _symbol(_report(LABELS[_unquote(row[0])], LABELS[target], "migrate"))
            if cell != symbol:
                wrong.append(f"{_unquote(row[0])} -> {target}: doc {cell}, code {symbol}")
    assert not wrong, "\n".join(wrong)


ACTIONS = ["kept", "converted", "fresh", "dropped"]
PER_SOURCE = _named(_sections(MIGRATION, 3).get("Migration per source", ""), 4)


def test_per_source_tables_cover_every_label():
    assert list(PER_SOURCE) == list(LABELS)


@pytest.mark.parametrize("source", list(LABELS))
def test_per_source_migration_table(source):
    rows = _table(PER_SOURCE.get(source, ""), ["to", *ACTIONS])
    assert rows is not None, f"no per-source table for {source}"
    assert [_unquote(r[0]) for r in rows] == list(LABELS), "rows are the labels, in order"
    for row in rows:
        target = _unquote(row[0])
        actions = _report(LABELS[source], LABELS[target], "migrate")
        for action, cell in zip(ACTIONS, row[1:], strict=True):
            documented = set() if cell == NONE_CELL else set(re.findall(r"`([^`]+)`", cell))
            actual = {k for k, a in actions.items() if a == action}
            assert documented == actual, f"{source} -> {target}, {action}: doc {cell}"


def test_reset_starts_every_target_key_fresh():
    for source in LABELS.values():
        for target in LABELS.values():
            actions = _report(source, target, "reset")
            assert set(actions.values()) <= {"fresh", "dropped"}, (source, target, actions)


def test_turning_amsgrad_on_converts_vmax_by_either_spelling():
    adam = RULE_CONFIGS["adam"]()
    same_name = _report(adam, RULE_CONFIGS["adam"](amsgrad=True), "migrate")
    assert same_name["max_exp_avg_sq"] == "converted"
    assert _report(adam, RULE_CONFIGS["amsgrad"](), "migrate")["max_exp_avg_sq"] == "converted"


# ---- CLI and Python examples --------------------------------------------------------------


def test_cli_examples_parse():
    parser = build_parser()
    commands = [
        line
        for block in _code_blocks(DOC, "bash")
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
    blocks = _code_blocks(DOC, "python")
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
