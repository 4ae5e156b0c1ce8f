"""Render the tables of docs/optimizers.md that the code decides.

Usage: python scripts/gen_optimizer_docs.py [--check] [--doc PATH]

docs/optimizers.md is prose written by hand around regions that this script writes, each between

    <!-- generated: NAME (python scripts/gen_optimizer_docs.py) -->
    <!-- end generated -->

It rewrites what lies between the markers and nothing else. The regions, by NAME:

* `rule:R:hyperparameters` and `rule:R:state`, for every rule R and for `lookahead`: each field of
  the rule's config model with its default (in the model's order, `lookahead` last), and the state
  keys the rule holds once it has taken an update, with the switches that add keys;
* `schedule:S:parameters` for every schedule S, and for `plateau` also `rule-defaults` (what a
  null `factor`, `patience` or `threshold` resolves to) and `worked-example` (the lr after each
  report of a fixed series of metric values);
* `migration:configs`, `migration:matrix` and `migration:per-source`: what
  `optserve.server.engine.migration.migrate` reports for each state key, for every pair of the
  configs in MIGRATION_CONFIGS, after the source has taken STEPS seeded updates.

Rows, defaults, state keys and migration actions come from the code: the config models of
optserve.common.config, and the engine's public entry points only (`build_rule`, `Rule.init_state`,
`Rule.apply`, `migrate` and its report's `entries`, `build_schedule`), so a rewrite of the engine's
internals that keeps its behaviour leaves the page unchanged. The words that no code holds, each
parameter's meaning and each state key's symbol in the formulas, are written here (RULE_MEANINGS,
SCHEDULE_MEANINGS, STATE_NOTES); a parameter without a meaning, or a meaning for a parameter the
code does not have, stops the script. The oracle lines of the page are prose: the oracles live in
tests/unit/oracles.py, and scripts do not import tests.

The output is deterministic: fixed seeds, float64, sorted keys. docs/optimizers.md is committed;
tests/unit/test_optimizer_docs.py fails if it differs from a fresh render, and so does --check.
"""

from __future__ import annotations

import argparse
import difflib
import json
import math
import re
import sys
import textwrap
import typing
from collections.abc import Iterator, Mapping
from decimal import Decimal
from functools import cache
from pathlib import Path
from typing import Any

import torch
from pydantic import BaseModel

from optserve.common.config import (
    RULE_CONFIGS,
    RULE_NAMES,
    SCHEDULE_NAMES,
    LookaheadConfig,
    PlateauSchedule,
    RuleConfig,
    ScheduleConfig,
    parse_optimizer_config,
    parse_schedule_config,
)
from optserve.common.errors import InvalidArgument
from optserve.server.engine import Rule, State, build_rule
from optserve.server.engine.migration import migrate
from optserve.server.engine.schedules import build_schedule

ROOT = Path(__file__).resolve().parent.parent
DOC = ROOT / "docs" / "optimizers.md"
SCRIPT = "scripts/gen_optimizer_docs.py"
REGENERATE = f"python {SCRIPT}"
LOOKAHEAD = "lookahead"
NONE_CELL = "–"  # an empty cell of the migration tables
STEPS = 10  # updates the source takes before it migrates
SIZE = 8  # elements of the flat buffer the rules run on
WIDTH = 100  # the page's prose lines

START = re.compile(r"^<!-- generated: (\S+) .*-->$")
END = "<!-- end generated -->"


class DocError(Exception):
    """The page or the tables below do not fit the code; the message says what to change."""


# --- Words the code does not hold ---------------------------------------------------------------

# A rule's hyperparameter takes its meaning from RULE_MEANINGS[rule], else from here.
COMMON_MEANINGS = {
    "lr": "γ before the schedule; ≥ 0",
    "betas": "[β1, β2], each in [0, 1)",
    "eps": "ε ≥ 0",
    "weight_decay": "λ ≥ 0, L2",
    "maximize": "ascend instead of descend",
    "lookahead": "wrap the rule in Lookahead",
}
RULE_MEANINGS: dict[str, dict[str, str]] = {
    "sgd": {
        "momentum": "μ ≥ 0; 0 keeps no buffer",
        "dampening": "τ ≥ 0; damps the gradient from the second update on",
        "weight_decay": "λ ≥ 0, L2: g ← g + λθ",
        "nesterov": "Nesterov momentum; needs momentum > 0 and dampening 0",
        "delay": "N, integer ≥ 1; > 1: Delayed Nesterov (needs `nesterov`); 1: torch's SGD",
        "lookahead": "wrap the rule in Lookahead (see `lookahead`)",
    },
    "adagrad": {
        "lr_decay": "built-in reciprocal decay of γ (see γ_t); ≥ 0",
        "initial_accumulator_value": "S₀, the starting value of S; ≥ 0",
        "eps": "ε ≥ 0 (torch's default, not the paper's 1e-8)",
    },
    "rmsprop": {
        "alpha": "α in [0, 1), EMA factor of g² (torch's default; Hinton's lecture used 0.9)",
        "eps": "ε ≥ 0, added outside the square root",
        "momentum": "μ ≥ 0; > 0 keeps Bn",
        "centered": "divide by the centred second moment Q − G²",
    },
    "adadelta": {
        "lr": "γ, an output multiplier; ≥ 0",
        "rho": "ρ in [0, 1), EMA factor of g² and Δ²",
        "eps": "ε ≥ 0, inside both square roots",
    },
    "adam": {
        "weight_decay": "λ ≥ 0, L2 (use `adamw` for decoupled decay)",
        "amsgrad": "AMSGrad: the same rule as `amsgrad`",
    },
    "adamw": {
        "weight_decay": "λ ≥ 0, decoupled: θ ← θ(1 − γλ)",
        "amsgrad": "read Vmax in the denominator",
    },
    "amsgrad": {},
    "adabound": {
        "final_lr": "the SGD lr the bounds converge to (at lr = base_lr); ≥ 0",
        "gamma": "convergence speed of the bounds, in (0, 1)",
        "amsbound": "AMSBound: use Vmax in the denominator",
    },
    "radam": {
        "eps": "ε ≥ 0, added to √V",
        "weight_decay": "λ ≥ 0",
        "decoupled_weight_decay": "θ ← θ(1 − γλ) instead of L2",
    },
    "ranger": {
        "alpha": "Lookahead's slow step size α, in [0, 1]",
        "k": "Lookahead's sync period, in RAdam steps; ≥ 1",
        "N_sma_threshold": "ρ_t above which RAdam adapts; ≥ 0",
        "weight_decay": "λ ≥ 0, decoupled: θ ← θ(1 − γλ)",
        "use_gc": "gradient centralization",
        "gc_conv_only": "centralize only tensors with more than 3 dimensions",
        "lookahead": "must stay null: Ranger already is Lookahead; set k and alpha",
    },
    LOOKAHEAD: {
        "k": "inner updates per sync; ≥ 1",
        "alpha": "slow-weight step size α, in [0, 1]",
    },
}
SCHEDULE_MEANINGS: dict[str, dict[str, str]] = {
    "constant": {},
    "step": {
        "step_size": "updates per decay; integer ≥ 1",
        "gamma": "factor per decay; > 0",
    },
    "multistep": {
        "milestones": "strictly increasing integers ≥ 1, at least one",
        "gamma": "factor per milestone; > 0",
    },
    "exponential": {
        "gamma": "factor per update; > 0",
        "r": "updates per factor of 10; > 0",
    },
    "reciprocal": {
        "r": "time scale in updates; > 0",
        "c": "exponent; ≥ 0",
    },
    "cosine": {
        "T_max": "updates from lr down to eta_min; integer ≥ 1",
        "eta_min": "the lowest lr; ≥ 0",
    },
    "plateau": {
        "rule": '`"newbob"` or `"torch"`',
        "metric": "name of the reported metric to watch",
        "mode": '`"min"`: lower is better; `"max"`: higher is better',
        "factor": "scale factor per reduction, in (0, 1); null: the rule's default",
        "patience": "integer ≥ 0 (torch rule); null: the rule's default",
        "threshold": "≥ 0; null: the rule's default",
        "threshold_mode": '`"rel"` or `"abs"`',
        "cooldown": "reports ignored after a reduction (torch rule); integer ≥ 0",
        "min_lr": "floor of the reductions (an lr below it is not raised); ≥ 0",
        "eps": "a reduction that lowers the lr by eps or less is not applied; ≥ 0",
    },
    "warmup": {
        "warmup_steps": "length of the warm-up in updates; integer ≥ 1",
        "then": "the schedule after the warm-up (any schedule config)",
    },
}

# What a state key is in the page's formulas: STATE_NOTES[rule], else COMMON_STATE_NOTES.
COMMON_STATE_NOTES = {
    "exp_avg": "M",
    "exp_avg_sq": "V",
    "max_exp_avg_sq": "Vmax",
    "step": "t",
    "sum": "S",
    "square_avg": "Q",
    "acc_delta": "D",
    "grad_avg": "G",
    "slow_buffer": "φ",
    "counter": "c",
}
STATE_NOTES: dict[str, dict[str, str]] = {
    "sgd": {
        "momentum_buffer": "B, made by the first update; with `delay` > 1, m, zero at first",
        "delay_buffer": "Δ, the open window's sum of g",
        "delay_counter": "j, the pushes in the open window",
    },
    "adagrad": {"step": "t; read only by lr_decay"},
    "rmsprop": {"momentum_buffer": "Bn", "step": "t; counted, not used"},
    "adadelta": {"step": "t; counted, not used"},
    "adabound": {"base_lr": "the lr the bounds scale from: the config's lr at build or swap"},
    "radam": {"step": "t; drives both the bias corrections and r_t"},
    "ranger": {"counter": "c = t mod k"},
}

# The rows and columns of the migration matrix: every rule, and Lookahead on one of them.
MIGRATION_CONFIGS: dict[str, dict[str, Any]] = {
    "sgd": {"name": "sgd"},
    "sgd-m": {"name": "sgd", "momentum": 0.9},
    "sgd-dn": {"name": "sgd", "momentum": 0.9, "nesterov": True, "delay": 4},
    "adagrad": {"name": "adagrad"},
    "rmsprop": {"name": "rmsprop"},
    "rmsprop-cm": {"name": "rmsprop", "momentum": 0.9, "centered": True},
    "adadelta": {"name": "adadelta"},
    "adam": {"name": "adam"},
    "adamw": {"name": "adamw"},
    "amsgrad": {"name": "amsgrad"},
    "adabound": {"name": "adabound"},
    "radam": {"name": "radam"},
    "ranger": {"name": "ranger"},
    "adam+la": {"name": "adam", "lookahead": {"k": 5, "alpha": 0.5}},
}
ACTIONS = ("kept", "converted", "fresh", "dropped")

# The plateau schedule's worked example: the reports, and the two configs it compares.
PLATEAU_REPORTS = (1.0, 0.9, 0.95, 0.8, 0.85, 0.7)
PLATEAU_NEWBOB: dict[str, Any] = {"name": "plateau"}
PLATEAU_TORCH: dict[str, Any] = {
    "name": "plateau",
    "rule": "torch",
    "factor": 0.5,
    "patience": 0,
    "threshold": 0.0,
}


# --- Values as the page writes them -------------------------------------------------------------


def number(value: float) -> str:
    """A float as JSON: below 1, the shorter of its plain and scientific forms (`1e-3`, `0.5`)."""
    plain = repr(value)
    if value == 0 or not math.isfinite(value) or abs(value) >= 1:
        return plain
    scientific = format(Decimal(plain), "E").replace("E", "e")
    return scientific if len(scientific) <= len(plain) else plain


def json_value(value: Any) -> str:
    """A JSON value written as in a config: floats keep their point, lists and objects inline."""
    if isinstance(value, bool) or value is None or isinstance(value, str | int):
        return json.dumps(value)
    if isinstance(value, float):
        return number(value)
    if isinstance(value, list | tuple):
        return "[" + ", ".join(json_value(v) for v in value) + "]"
    if isinstance(value, Mapping):
        items = (f"{json.dumps(str(k))}: {json_value(v)}" for k, v in value.items())
        return "{" + ", ".join(items) + "}"
    raise TypeError(f"not a JSON value: {value!r}")


def default_cell(model: type[BaseModel], field: str) -> str:
    info = model.model_fields[field]
    if info.is_required():
        return "required"
    value = info.get_default(call_default_factory=True)
    if isinstance(value, BaseModel):
        value = value.model_dump(mode="json")
    return f"`{json_value(value)}`"


def keys(names: set[str] | list[str]) -> str:
    return ", ".join(f"`{k}`" for k in sorted(names)) or NONE_CELL


def table(header: list[str], rows: list[list[str]]) -> list[str]:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    return lines + ["| " + " | ".join(row) + " |" for row in rows]


# --- Parameter tables ---------------------------------------------------------------------------


def schedule_models() -> dict[str, type[BaseModel]]:
    union = typing.get_args(ScheduleConfig)[0]
    models = {cls.model_fields["name"].default: cls for cls in typing.get_args(union)}
    if list(models) != list(SCHEDULE_NAMES):
        raise DocError(f"schedule models {list(models)} differ from SCHEDULE_NAMES")
    return models


def rule_models() -> dict[str, type[BaseModel]]:
    return {**RULE_CONFIGS, LOOKAHEAD: LookaheadConfig}


def parameters(model: type[BaseModel]) -> list[str]:
    """The fields a config takes besides its name, in the model's order, `lookahead` last."""
    fields = [f for f in model.model_fields if f != "name"]
    return [f for f in fields if f != LOOKAHEAD] + [f for f in fields if f == LOOKAHEAD]


def parameter_table(
    where: str,
    model: type[BaseModel],
    meanings: Mapping[str, str],
    common: Mapping[str, str],
    column: str,
) -> list[str]:
    """A config model's parameters with their defaults, and their meanings from `where`."""
    fields = parameters(model)
    stale = set(meanings) - set(fields)
    if stale:
        raise DocError(f"{model.__name__} has no {sorted(stale)}: remove them from {where}")
    missing = [f for f in fields if f not in meanings and f not in common]
    if missing:
        raise DocError(f"{model.__name__}'s {missing}: write what they mean in {where}")
    if not fields:
        return ["No parameters."]
    header = [column, "default", "meaning"]
    rows = [[f"`{f}`", default_cell(model, f), meanings.get(f) or common[f]] for f in fields]
    return table(header, rows)


def rule_parameter_regions() -> Iterator[tuple[str, list[str]]]:
    models = rule_models()
    unknown = set(RULE_MEANINGS) - set(models)
    if unknown:
        raise DocError(f"RULE_MEANINGS of {SCRIPT} names {sorted(unknown)}: no such rules")
    for name, model in models.items():
        meanings = RULE_MEANINGS.get(name, {})
        common = COMMON_MEANINGS if name != LOOKAHEAD else {}
        where = f"RULE_MEANINGS[{name!r}] of {SCRIPT}"
        lines = parameter_table(where, model, meanings, common, "hyperparameter")
        yield f"rule:{name}:hyperparameters", lines


def schedule_parameter_regions() -> Iterator[tuple[str, list[str]]]:
    models = schedule_models()
    unknown = set(SCHEDULE_MEANINGS) - set(models)
    if unknown:
        raise DocError(f"SCHEDULE_MEANINGS of {SCRIPT} names {sorted(unknown)}: no such schedules")
    for name, model in models.items():
        meanings = SCHEDULE_MEANINGS.get(name, {})
        where = f"SCHEDULE_MEANINGS[{name!r}] of {SCRIPT}"
        lines = parameter_table(where, model, meanings, {}, "parameter")
        yield f"schedule:{name}:parameters", lines


def plateau_regions() -> Iterator[tuple[str, list[str]]]:
    rules = typing.get_args(PlateauSchedule.model_fields["rule"].annotation)
    rows = []
    for rule in rules:
        config = PlateauSchedule(rule=rule)
        values = (config.resolved_factor, config.resolved_patience, config.resolved_threshold)
        rows.append([f"`{rule}`", *(f"`{json_value(v)}`" for v in values)])
    yield "schedule:plateau:rule-defaults", table(["rule", "factor", "patience", "threshold"], rows)

    schedules = [build_schedule(parse_schedule_config(c)) for c in (PLATEAU_NEWBOB, PLATEAU_TORCH)]
    rows = []
    for i, value in enumerate(PLATEAU_REPORTS, start=1):
        lrs = []
        for schedule in schedules:
            schedule.observe("val_loss", value)
            lrs.append(number(schedule.lr(1.0, 0)))
        rows.append([str(i), number(value), *lrs])
    intro = (
        f"Worked example with lr 1: the lr after each report, for `{json_value(PLATEAU_NEWBOB)}` "
        f"(newbob) and for\n`{json_value(PLATEAU_TORCH)}`, the\n"
        "closest torch setting, which lowers the lr only on the reports that do not improve:"
    )
    header = ["report", "`val_loss`", "lr, newbob", "lr, torch"]
    yield "schedule:plateau:worked-example", [intro, "", *table(header, rows)]


# --- State keys and migration -------------------------------------------------------------------


def stepped(config: RuleConfig, steps: int = STEPS) -> tuple[Rule, State, torch.Tensor]:
    """A rule, its state after `steps` updates on seeded float64 gradients, and its weights."""
    rule = build_rule(config)
    weights = torch.randn(SIZE, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    state = rule.init_state(weights)
    gradients = torch.Generator().manual_seed(1)
    for _ in range(steps):
        grad = torch.randn(SIZE, dtype=torch.float64, generator=gradients)
        rule.apply(weights, grad, state, config.lr)
    return rule, state, weights


@cache
def state_keys(config_json: str) -> frozenset[str]:
    return frozenset(stepped(parse_optimizer_config(config_json), 1)[1])


def switches(name: str) -> list[tuple[str, dict[str, Any]]]:
    """The changes to a rule's default config that may add state: each boolean, and momentum."""
    out: list[tuple[str, dict[str, Any]]] = []
    for field, info in RULE_CONFIGS[name].model_fields.items():
        if info.annotation is bool:
            out.append((f"`{field}`", {field: True}))
        elif field == "momentum":
            out.append(("`momentum` > 0", {field: 0.9}))
        elif field == "delay":  # Delayed Nesterov, which needs Nesterov momentum
            out.append(("`delay` > 1", {field: 4, "momentum": 0.9, "nesterov": True}))
    return out


def noted(rule: str, names: set[str]) -> str:
    notes = {**COMMON_STATE_NOTES, **STATE_NOTES.get(rule, {})}
    return ", ".join(f"`{k}` ({notes[k]})" if k in notes else f"`{k}`" for k in sorted(names))


def state_line(name: str) -> str:
    if name == LOOKAHEAD:
        inner = json.dumps({"name": "adam"})
        wrapped = json.dumps({"name": "adam", LOOKAHEAD: LookaheadConfig().model_dump()})
        added = set(state_keys(wrapped) - state_keys(inner))
        return f"**State:** the inner rule's keys plus {noted(name, added)}."
    base = set(state_keys(json.dumps({"name": name})))
    extras = []
    held = set(base)
    for condition, change in switches(name):
        try:
            more = set(state_keys(json.dumps({"name": name, **change}))) - base
        except InvalidArgument:  # e.g. nesterov alone, which needs momentum
            continue
        more -= held  # a switch that needs another (delay needs momentum) adds its own keys
        if more:
            extras.append(f"{noted(name, more)} with {condition}")
            held |= more
    stale = set(STATE_NOTES.get(name, {})) - held
    if stale:
        raise DocError(f"{name} holds no {sorted(stale)}: remove them from STATE_NOTES of {SCRIPT}")
    if base:
        return "**State:** " + "; plus ".join([noted(name, base), *extras]) + "."
    if extras:
        return "**State:** " + "; ".join(extras) + "; none otherwise."
    return "**State:** none."


def state_regions() -> Iterator[tuple[str, list[str]]]:
    unknown = set(STATE_NOTES) - set(RULE_NAMES)
    if unknown:
        raise DocError(f"STATE_NOTES of {SCRIPT} names {sorted(unknown)}: no such rules")
    for name in [*RULE_NAMES, LOOKAHEAD]:
        # Wrapped as the page's prose is; no key or code span holds a space, so none is cut.
        line = textwrap.fill(
            state_line(name), WIDTH, break_long_words=False, break_on_hyphens=False
        )
        yield f"rule:{name}:state", line.split("\n")


def migration_actions() -> dict[tuple[str, str], dict[str, str]]:
    """(source, target) label -> {state key: action} of a `migrate` swap."""
    configs = {label: parse_optimizer_config(c) for label, c in MIGRATION_CONFIGS.items()}
    names = {c.name for c in configs.values()}
    if not names >= set(RULE_NAMES) or all(c.lookahead is None for c in configs.values()):
        missing = sorted(set(RULE_NAMES) - names) or [LOOKAHEAD]
        raise DocError(f"MIGRATION_CONFIGS of {SCRIPT} has no config for {missing}")
    out: dict[tuple[str, str], dict[str, str]] = {}
    for source, source_config in configs.items():
        for target, target_config in configs.items():
            rule, state, weights = stepped(source_config)
            _, report = migrate(rule, state, build_rule(target_config), weights, "migrate")
            out[source, target] = {key: action for key, (action, _) in report.entries.items()}
    return out


def symbol(actions: Mapping[str, str]) -> str:
    """The matrix's symbol for one swap (the legend is in the page)."""
    target = [a for a in actions.values() if a != "dropped"]
    if not target:
        return NONE_CELL
    if all(a == "kept" for a in target):
        return "="
    if all(a == "fresh" for a in target):
        return "F"
    return "P" if "fresh" in target else "C"


def migration_regions() -> Iterator[tuple[str, list[str]]]:
    labels = list(MIGRATION_CONFIGS)
    rows = [[f"`{label}`", f"`{json_value(c)}`"] for label, c in MIGRATION_CONFIGS.items()]
    yield "migration:configs", table(["label", "config"], rows)

    actions = migration_actions()
    header = ["from \\ to", *(f"`{label}`" for label in labels)]
    rows = [[f"`{s}`", *(symbol(actions[s, t]) for t in labels)] for s in labels]
    yield "migration:matrix", table(header, rows)

    lines: list[str] = []
    for source in labels:
        rows = []
        for target in labels:
            done = actions[source, target]
            by_action = [keys([k for k, a in done.items() if a == action]) for action in ACTIONS]
            rows.append([f"`{target}`", *by_action])
        lines += [f"#### From `{source}`", "", *table(["to", *ACTIONS], rows), ""]
    yield "migration:per-source", lines[:-1]


# --- The page -----------------------------------------------------------------------------------


def regions() -> dict[str, str]:
    """Every generated region's text, by name."""
    out: dict[str, str] = {}
    for make in (
        rule_parameter_regions,
        state_regions,
        schedule_parameter_regions,
        plateau_regions,
        migration_regions,
    ):
        for name, lines in make():
            out[name] = "\n".join(lines)
    return out


def marker(name: str) -> str:
    return f"<!-- generated: {name} ({REGENERATE}) -->"


def fill(text: str, generated: Mapping[str, str]) -> str:
    """`text` with each region's body replaced by `generated[name]`; the rest kept as it is."""
    out: list[str] = []
    seen: list[str] = []
    current: str | None = None
    for line_number, line in enumerate(text.split("\n"), start=1):
        start = START.match(line)
        if current is None and start:
            current = start.group(1)
            if current not in generated:
                raise DocError(f"line {line_number}: no region is called {current!r}")
            if current in seen:
                raise DocError(f"line {line_number}: a second region {current!r}")
            seen.append(current)
            out += [marker(current), "", generated[current], "", END]
        elif current is None:
            if line == END:
                raise DocError(f"line {line_number}: {END} without a start")
            out.append(line)
        elif start:
            raise DocError(f"line {line_number}: region {start.group(1)!r} inside {current!r}")
        elif line == END:
            current = None
    if current is not None:
        raise DocError(f"region {current!r} has no {END}")
    missing = [name for name in generated if name not in seen]
    if missing:
        raise DocError(
            f"the page has no region for {missing}: put the lines `{marker(missing[0])}` and "
            f"`{END}` where it belongs, then run `{REGENERATE}`"
        )
    return "\n".join(out)


def render(text: str) -> str:
    """The page `text` with every generated region rendered from the code now."""
    return fill(text, regions())


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--check",
        action="store_true",
        help="write nothing; exit 1 if the page differs from what would be written",
    )
    parser.add_argument("--doc", type=Path, default=DOC, help="the page (default: %(default)s)")
    args = parser.parse_args(argv)
    current = args.doc.read_text(encoding="utf-8")
    try:
        text = render(current)
    except DocError as exc:
        print(f"{args.doc}: {exc}", file=sys.stderr)
        return 2
    if not args.check:
        if text != current:
            args.doc.write_text(text, encoding="utf-8", newline="\n")
        print(args.doc)
        return 0
    if text == current:
        print(f"{args.doc} is up to date")
        return 0
    diff = list(
        difflib.unified_diff(
            current.splitlines(),
            text.splitlines(),
            f"{args.doc} (committed)",
            f"{args.doc} (from the code)",
            lineterm="",
        )
    )
    shown = diff[:60] + ([f"... ({len(diff) - 60} more diff lines)"] if diff[60:] else [])
    print("\n".join(shown), file=sys.stderr)
    print(
        f"{args.doc} is out of date with the code; regenerate it with `{REGENERATE}`",
        file=sys.stderr,
    )
    return 1


if __name__ == "__main__":
    sys.exit(main())
