"""`optserve compare MODEL [FORK ...]`: a model and its forks, plotted on the same axes and
tabled (latest value, slope and updates of each reported metric per branch)."""

from __future__ import annotations

import argparse
import json
import sys

from optserve.server.cli.common import command, connect, positive, table

EXAMPLES = """examples:
  optserve compare my-net                       # my-net and every fork of it
  optserve compare my-net my-net-sgd --out sgd-vs-adam.png
  optserve compare my-net --window 50 --json
"""


def add_parser(sub: argparse._SubParsersAction) -> None:
    compare = command(
        sub,
        "compare",
        "plot and table a model's reported metrics beside its forks'",
        "Draw the metrics trainers reported on a model and on its forks on the same axes (one "
        "panel per metric, one line per branch, over model versions), with a dashed red line "
        "at each fork's fork point, and print a table: per branch and metric, the newest "
        "value, its slope (least squares over the newest --window reports, per 100 updates), "
        "the reports and the updates the branch made since the fork point. Without FORK "
        "names, the forks are every model the token can see whose lineage says it was forked "
        "from MODEL. Needs matplotlib (pip install 'optserve[plot]').",
        EXAMPLES,
        model_required=False,
    )
    compare.add_argument("target", nargs="?", metavar="MODEL", help="the model (or --model)")
    compare.add_argument(
        "forks", nargs="*", metavar="FORK", help="forks to compare (default: all of its forks)"
    )
    compare.add_argument(
        "--out", default=None, help="PNG file to write (default MODEL-compare.png)"
    )
    compare.add_argument(
        "--window", type=_window, default=20,
        help="newest reports of each metric the slope is fitted to (default 20, at least 2)",
    )  # fmt: skip
    compare.add_argument(
        "--history", type=positive, default=10_000,
        help="newest metrics of each branch to read (default 10000: all the server keeps)",
    )  # fmt: skip
    compare.add_argument("--json", action="store_true", help="print the table as JSON")
    for action in compare._actions:
        if action.dest == "model":
            action.help = "the model (instead of MODEL)"
    compare.set_defaults(func=run)


def _window(text: str) -> int:
    value = positive(text)
    if value < 2:
        raise argparse.ArgumentTypeError(f"a slope needs at least 2 reports, got {value}")
    return value


def run(args: argparse.Namespace) -> int:
    from optserve.client import compare as c

    names = [n for n in (args.target, *args.forks) if n]
    model = args.model or (names.pop(0) if names else None)
    if model is None:
        raise SystemExit("optserve compare: name the model (optserve compare MODEL [FORK ...])")
    with connect(args) as client:
        statuses = [c.read_branch(client, model, args.history)]  # NOT_FOUND before a search
        # A promoted fork answers to its parent's name: its own forks name it by its own.
        real = str(statuses[0]["model"])
        named = names or find_forks(client, {model, real})
        forks = [n for n in dict.fromkeys(named) if n not in (model, real)]  # each once
        statuses += [c.read_branch(client, name, args.history) for name in forks]
    for status in statuses[1:]:
        if c.lineage(status)[0] is None:
            note = f"optserve compare: note: {status['model']} is no fork; drawn from its start"
            print(note, file=sys.stderr)
    out = args.out or f"{model}-compare.png"
    summary = c.plot_compare(statuses, out)
    rows = c.compare_rows(c.branches(statuses), args.window)
    if args.json:
        print(json.dumps({"plot": out, "rows": [r.to_dict() for r in rows], **summary}, indent=2))
        return 0
    if len(statuses) == 1:
        print(f"optserve compare: {model} has no forks; drawing it alone")
    print(table(*c.table_rows(rows)) if rows else "no metrics reported yet")
    marks = ", ".join(m["label"] for m in summary["markers"]) or "no fork point"
    print(f"wrote {out}: {len(statuses)} branch(es), {len(summary['metrics'])} metric(s); {marks}")
    return 0


def find_forks(client, parents: set[str]) -> list[str]:
    """Every model the caller can see whose lineage says it was forked from one of `parents`
    (a model's names)."""
    from optserve.common.errors import OptserveError

    found = []
    for name in sorted(client.list_models()):
        if name in parents:
            continue
        try:
            parent = getattr(client.describe_model(name), "forked_from", "")
        except OptserveError:  # dropped meanwhile, not ours to read, or down: not a fork we see
            continue
        if parent in parents:
            found.append(name)
    return found
