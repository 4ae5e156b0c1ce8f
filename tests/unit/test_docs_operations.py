"""docs/operations.md keeps up with the code: every `optserve serve` option is in its reference
table (and the table names no option the parser lacks), every CLI command is documented, and
every metric series the server exports is described in the metrics section. No Ray."""

from __future__ import annotations

import argparse
import re
from pathlib import Path

from optserve.server.cli import build_parser
from optserve.server.metrics import SERIES

DOC = Path(__file__).resolve().parents[2] / "docs" / "operations.md"
# Suffixes Prometheus adds to a series' name in the exposition format and in queries.
SERIES_SUFFIXES = ("_bucket", "_count", "_sum", "_created", "_total")


def doc_text() -> str:
    return DOC.read_text(encoding="utf-8")


def section(title_start: str) -> str:
    """The text of the `## ` section whose title starts with `title_start`."""
    text = doc_text()
    match = re.search(rf"^## {re.escape(title_start)}.*?(?=^## |\Z)", text, re.M | re.S)
    assert match, f"docs/operations.md has no section '## {title_start}...'"
    return match.group(0)


def subcommands() -> dict[str, argparse.ArgumentParser]:
    parser = build_parser()
    actions = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
    assert len(actions) == 1
    return dict(actions[0].choices)


def long_options(parser: argparse.ArgumentParser) -> set[str]:
    return {o for a in parser._actions for o in a.option_strings if o.startswith("--")}


def table_options(text: str) -> set[str]:
    """The options named in the first cell of each table row."""
    return set(re.findall(r"^\| `(--[a-z0-9-]+)` \|", text, re.M))


def test_every_serve_option_is_in_the_reference_table():
    options = long_options(subcommands()["serve"])
    assert {"--host", "--port", "--shards", "--checkpoint-dir", "--metrics-port"} <= options
    documented = table_options(section("7. Reference"))
    missing = sorted(options - documented)
    assert not missing, f"serve options missing from the reference table: {missing}"


def test_the_reference_table_names_only_real_serve_options():
    options = long_options(subcommands()["serve"])
    unknown = sorted(table_options(section("7. Reference")) - options)
    assert not unknown, f"the reference table documents options serve does not have: {unknown}"


def test_every_cli_command_is_documented():
    text = doc_text()
    names = set(subcommands())
    assert {"serve", "status", "checkpoint", "restore"} <= names
    missing = sorted(n for n in names if not re.search(rf"`optserve {re.escape(n)}\b", text))
    assert not missing, f"commands not documented as `optserve <name>`: {missing}"


def exported_series() -> tuple[str, ...]:
    assert SERIES and all(isinstance(s, str) and s.startswith("optserve_") for s in SERIES)
    return tuple(SERIES)


def test_every_metric_series_is_documented():
    series = exported_series()
    text = section("5. Metrics")
    missing = sorted(s for s in series if f"`{s}" not in text)
    assert not missing, f"series missing from the metrics section: {missing}"


def test_the_metrics_section_names_only_exported_series():
    series = set(exported_series())

    def exported(name: str) -> bool:
        if name in series:
            return True
        return any(name.endswith(s) and name.removesuffix(s) in series for s in SERIES_SUFFIXES)

    # Plain names, and the ray_-prefixed names of Ray's metrics path.
    named = set(re.findall(r"\b(?:ray_)?(optserve_[a-z0-9_]+)", section("5. Metrics")))
    unknown = sorted(n for n in named if not exported(n))
    assert not unknown, f"the metrics section names series the server does not export: {unknown}"
