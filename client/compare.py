"""`optserve compare`: a model and its forks side by side, from their status answers.

A fork starts as a copy of its parent at one version (`fork_version`), metrics history
included, and then goes its own way. The pure functions here (no plotting, no server) say what
to draw and what to print:

* `read_branch(client, name)`: a model's status with its lineage, what the others read;
* `branches(statuses)`: each branch's own reports, per metric, over model versions; a fork's
  inherited history (the entries it shares with its parent) is left out, so each line shows
  what that branch itself did;
* `slope(points, window)`: the least-squares slope of a metric over its last `window` reports,
  per `SLOPE_PER` updates (model versions);
* `compare_rows(branches)`: the table (latest value, slope, reports, updates per branch and
  metric); `fork_markers` and `drawn_series`: the vertical lines at the fork points and the
  lines per metric, each fork's line starting from its parent's value at the fork point.

`plot_compare(statuses, path)` draws them with matplotlib (the `plot` extra) and records what
it drew in the PNG's `optserve` text chunk (JSON), as `optserve plot` does. The x axis is the
model version: a fork's versions continue its parent's, so the branches line up.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

# Slopes are given per this many updates (model versions).
SLOPE_PER = 100
# How many of a metric's newest reports on a branch its slope is fitted to.
DEFAULT_WINDOW = 20

# A metric whose positive values span more than this factor is drawn on a log scale.
LOG_SPAN = 20.0

Points = list[tuple[float, float]]


@dataclass
class Branch:
    """One model in a comparison: its lineage, where it stands, and its own reports."""

    name: str
    version: int
    optimizer: str = "?"
    forked_from: str | None = None
    fork_version: int | None = None
    metrics: dict[str, Points] = field(default_factory=dict)  # name -> (version, value)
    lr: float | None = None  # the rule's configured lr (two branches may share a rule)

    @property
    def label(self) -> str:
        lr = "" if self.lr is None else f", lr {self.lr:g}"
        return f"{self.name} ({self.optimizer}{lr})"


@dataclass
class Row:
    """One line of the comparison table."""

    branch: str
    metric: str
    latest: float
    slope: float | None  # per SLOPE_PER updates; None with fewer than two versions to fit
    reports: int
    updates: int  # since the comparison's fork point (see `updates_since_fork`)
    version: int

    def to_dict(self) -> dict[str, Any]:
        return dict(self.__dict__)


def lineage(status: Mapping[str, Any]) -> tuple[str | None, int | None]:
    """(parent model, version it forked at) of a status or describe answer; (None, None) for a
    model that is no fork."""
    parent = status.get("forked_from") or None
    at = status.get("fork_version")
    return (str(parent), int(at) if at is not None else None) if parent else (None, None)


def read_branch(client: Any, name: str, history: int = 10_000) -> dict[str, Any]:
    """`client.status(name, history)` as a dict, with the model's lineage (`forked_from`,
    `fork_version`, from `describe_model`) where the status answer does not carry it."""
    status = client.status(name, history=history).to_dict()
    if "forked_from" not in status:
        info = client.describe_model(name)
        status["forked_from"] = getattr(info, "forked_from", "") or None
        status["fork_version"] = getattr(info, "fork_version", None)
    return status


def _key(entry: Mapping[str, Any]) -> tuple[Any, ...]:
    return (entry["name"], entry["version"], entry.get("step"), entry.get("time"), entry["value"])


def branches(statuses: Sequence[Mapping[str, Any]]) -> list[Branch]:
    """The branches of `status(model, history=...)` answers, in the order given (the model
    first). The first is drawn whole (a fork compared as the model, a promoted one say, keeps
    the history it copied). Each other fork's entries that its parent (when compared too) also
    holds were copied by the fork and are not its own; without the parent, its entries before
    the fork point are."""
    by_name = {str(s["model"]): s for s in statuses}
    out = []
    for index, status in enumerate(statuses):
        parent, at = lineage(status)
        own_only = index > 0 and parent is not None
        inherited: set[tuple[Any, ...]] = set()
        if parent in by_name:
            inherited = {_key(e) for e in by_name[parent].get("metrics", [])}
        rule = status.get("optimizer") or {}
        lr = rule.get("lr")
        branch = Branch(
            str(status["model"]), int(status["version"]), str(rule.get("name", "?")), parent, at,
            lr=float(lr) if isinstance(lr, int | float) else None,
        )  # fmt: skip
        for entry in status.get("metrics", []):
            if own_only and (
                _key(entry) in inherited or (at is not None and entry["version"] < at)
            ):
                continue
            points = branch.metrics.setdefault(str(entry["name"]), [])
            points.append((float(entry["version"]), float(entry["value"])))
        for points in branch.metrics.values():
            points.sort(key=lambda p: p[0])  # stable: reports at one version keep their order
        out.append(branch)
    return out


def slope(points: Points, window: int = DEFAULT_WINDOW) -> float | None:
    """Least-squares slope of value against version over the last `window` points, per
    `SLOPE_PER` versions: sum((x - mx)(y - my)) / sum((x - mx)^2) * SLOPE_PER. None when the
    window holds fewer than two distinct versions."""
    if window < 2:
        raise ValueError(f"the slope window must be at least 2 reports, got {window}")
    last = points[-window:]
    if len({x for x, _ in last}) < 2:
        return None
    mean_x = sum(x for x, _ in last) / len(last)
    mean_y = sum(y for _, y in last) / len(last)
    sxx = sum((x - mean_x) ** 2 for x, _ in last)
    sxy = sum((x - mean_x) * (y - mean_y) for x, y in last)
    return sxy / sxx * SLOPE_PER


def updates_since_fork(branch: Branch, forks: Sequence[Branch]) -> int:
    """Updates a branch made in the comparison: a fork's since its fork point; the model's (or
    any branch that is no fork here) since the earliest fork point among `forks`, or all of
    them when nothing forked."""
    if branch.fork_version is not None:
        return max(0, branch.version - branch.fork_version)
    points = [f.fork_version for f in forks if f.fork_version is not None]
    return max(0, branch.version - min(points)) if points else branch.version


def compare_rows(found: Sequence[Branch], window: int = DEFAULT_WINDOW) -> list[Row]:
    """Per branch and metric: the newest value, its slope, the reports and the updates."""
    forks = [b for b in found if b.fork_version is not None]
    rows = []
    for branch in found:
        for metric in sorted(branch.metrics):
            points = branch.metrics[metric]
            rows.append(Row(
                branch.name, metric, points[-1][1], slope(points, window), len(points),
                updates_since_fork(branch, forks), branch.version,
            ))  # fmt: skip
    return rows


def fork_markers(found: Sequence[Branch]) -> list[tuple[float, str]]:
    """A vertical line at each fork's fork point, labelled with the fork, by version."""
    marks = [
        (float(b.fork_version), f"fork {b.name} at {b.fork_version}")
        for b in found
        if b.fork_version is not None
    ]
    return sorted(marks)


def drawn_series(found: Sequence[Branch]) -> dict[str, dict[str, Points]]:
    """metric -> branch -> the points drawn. A fork's line starts at its parent's last value
    at or before the fork point (when the parent is drawn and had one), so it branches off."""
    by_name = {b.name: b for b in found}
    drawn: dict[str, dict[str, Points]] = {}
    for branch in found:
        parent = by_name.get(branch.forked_from or "")
        for metric, points in branch.metrics.items():
            line = list(points)
            if parent is not None and branch.fork_version is not None:
                before = [p for p in parent.metrics.get(metric, []) if p[0] <= branch.fork_version]
                if before:
                    line.insert(0, before[-1])
            drawn.setdefault(metric, {})[branch.name] = line
    return drawn


def wide(values: Sequence[float]) -> bool:
    """Whether a metric spans more than `LOG_SPAN`x, all positive: drawn on a log scale, so an
    early loss of 2 does not flatten the branches' differences at 0.05 after the fork."""
    return bool(values) and min(values) > 0 and max(values) / min(values) > LOG_SPAN


def format_slope(value: float | None) -> str:
    return "-" if value is None or math.isnan(value) else f"{value:+.4g}"


def table_rows(rows: Sequence[Row]) -> tuple[list[str], list[list[str]]]:
    """The table's header and cells (for `optserve.server.cli.common.table`)."""
    headers = ["BRANCH", "METRIC", "LATEST", f"SLOPE/{SLOPE_PER} UPD", "REPORTS", "UPDATES",
               "VERSION"]  # fmt: skip
    cells = [
        [r.branch, r.metric, f"{r.latest:.6g}", format_slope(r.slope), f"{r.reports:,}",
         f"{r.updates:,}", f"{r.version:,}"]
        for r in rows
    ]  # fmt: skip
    return headers, cells


def plot_compare(
    statuses: Sequence[Mapping[str, Any]], path: str, title: str | None = None
) -> dict[str, Any]:
    """Write the comparison's PNG to `path` (one panel per metric, a line per branch, a dashed
    line at each fork point); return what it drew (also stored in the PNG)."""
    try:
        import matplotlib
    except ImportError as exc:  # pragma: no cover - depends on the install
        raise RuntimeError(
            "optserve compare needs matplotlib: pip install 'optserve[plot]'"
        ) from exc
    matplotlib.use("Agg")  # files only; no display needed
    import matplotlib.pyplot as plt

    found = branches(statuses)
    drawn = drawn_series(found)
    markers = fork_markers(found)
    metrics = sorted(drawn) or ["(no metrics reported)"]
    colours = {b.name: f"C{i % 10}" for i, b in enumerate(found)}
    labels = {b.name: b.label for b in found}
    logged: list[str] = []  # metrics drawn on a log scale
    fig, axes = plt.subplots(len(metrics), 1, figsize=(10, 2.2 + 2.6 * len(metrics)),
                             sharex=True, squeeze=False)  # fmt: skip
    try:
        for ax, metric in zip(axes[:, 0], metrics, strict=True):
            for name, points in drawn.get(metric, {}).items():
                ax.plot([p[0] for p in points], [p[1] for p in points], color=colours[name],
                        label=labels[name], marker="." if len(points) < 50 else None)  # fmt: skip
            values = [y for points in drawn.get(metric, {}).values() for _, y in points]
            if wide(values):
                ax.set_yscale("log")
                logged.append(metric)
            if metric not in drawn:
                ax.text(0.5, 0.5, "no data reported", ha="center", va="center",
                        transform=ax.transAxes, color="grey")  # fmt: skip
            for x, _ in markers:
                ax.axvline(x, color="tab:red", linestyle="--", linewidth=1, alpha=0.7)
            ax.set_ylabel(metric)
            ax.grid(True, alpha=0.3)
            if metric in drawn:
                ax.legend(loc="best", fontsize="small")
        for x, label in markers:
            axes[0, 0].annotate(label, xy=(x, 1.0), xycoords=("data", "axes fraction"),
                                rotation=90, va="top", ha="right", fontsize="small",
                                color="tab:red")  # fmt: skip
        axes[-1, 0].set_xlabel("model version")
        fig.suptitle(title or f"optserve compare: {' vs '.join(b.name for b in found)}")
        fig.tight_layout()
        summary = {
            "branches": [
                {"name": b.name, "optimizer": b.optimizer, "forked_from": b.forked_from,
                 "fork_version": b.fork_version, "version": b.version}
                for b in found
            ],
            "metrics": {m: {n: len(p) for n, p in lines.items()} for m, lines in drawn.items()},
            "markers": [{"x": x, "label": label} for x, label in markers],
            "log_scale": logged,
        }  # fmt: skip
        fig.savefig(path, format="png", dpi=100, metadata={"optserve": json.dumps(summary)})
    finally:
        plt.close(fig)
    return summary
