"""`optserve plot`: a PNG of a run's loss, validation metrics, learning rate and version over
steps, with a vertical marker wherever the optimizer or the schedule changed.

`run_series(status)` turns a `ParameterServerClient.status(model, history=...)` answer into the
series (pure, no plotting); `plot_run(status, path)` draws them with matplotlib (the `plot`
extra: `pip install 'optserve[plot]'`) and records what it drew in the PNG's text chunk
`optserve` (JSON), so tools and tests can read it back.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from optserve.common.results import Status

# Metric names drawn in the validation panel; every other metric is a training metric.
VALIDATION_PREFIXES = ("val", "valid", "test", "eval")
# Audit actions that get a marker.
MARKED_ACTIONS = ("set_optimizer", "set_schedule", "restore")


@dataclass
class RunSeries:
    model: str
    x_label: str  # "step" when every metric carried the trainer's step, else "model version"
    training: dict[str, list[tuple[float, float]]] = field(default_factory=dict)
    validation: dict[str, list[tuple[float, float]]] = field(default_factory=dict)
    lr: dict[str, list[tuple[float, float]]] = field(default_factory=dict)
    version: list[tuple[float, float]] = field(default_factory=list)
    markers: list[tuple[float, str]] = field(default_factory=list)

    def summary(self) -> dict[str, Any]:
        return {
            "model": self.model,
            "x": self.x_label,
            "training": {name: len(points) for name, points in self.training.items()},
            "validation": {name: len(points) for name, points in self.validation.items()},
            "lr": {group: len(points) for group, points in self.lr.items()},
            "version": len(self.version),
            "markers": [{"x": x, "label": label} for x, label in self.markers],
        }


def is_validation(metric: str) -> bool:
    lowered = metric.lower()
    return lowered.startswith(VALIDATION_PREFIXES)


def _interp(points: list[tuple[float, float]], version: float) -> float:
    """x at `version` along (version, x) points sorted by version (clamped at the ends)."""
    if not points:
        return version
    if version <= points[0][0]:
        return points[0][1]
    for (v0, x0), (v1, x1) in zip(points, points[1:], strict=False):
        if v0 <= version <= v1:
            return x0 if v1 == v0 else x0 + (x1 - x0) * (version - v0) / (v1 - v0)
    return points[-1][1]


def _marker_label(entry: Mapping[str, Any]) -> str:
    old, new = entry.get("old") or {}, entry.get("new") or {}
    action = entry["action"]
    if action == "restore":
        return "restore"
    if action == "set_schedule":
        return f"schedule: {new.get('name', '?')}"
    before, after = old.get("name", "?"), new.get("name", "?")
    if before != after:
        return f"{before} -> {after}"
    changed = sorted(k for k in new if k not in ("name", "policy") and new.get(k) != old.get(k))
    return f"{after}: {', '.join(changed)}" if changed else after


def run_series(status: Status | Mapping[str, Any]) -> RunSeries:
    metrics = list(status.get("metrics", []))
    by_step = bool(metrics) and all(m.get("step") is not None for m in metrics)
    series = RunSeries(str(status.get("model", "")), "step" if by_step else "model version")

    def x_of(entry: Mapping[str, Any]) -> float:
        return float(entry["step"] if by_step else entry["version"])

    anchors: dict[float, float] = {}  # version -> x (the last one reported at that version)
    for entry in metrics:
        x = x_of(entry)
        panel = series.validation if is_validation(entry["name"]) else series.training
        panel.setdefault(entry["name"], []).append((x, float(entry["value"])))
        for group, lr in (entry.get("lr") or {}).items():
            series.lr.setdefault(group, []).append((x, float(lr)))
        series.version.append((x, float(entry["version"])))
        anchors[float(entry["version"])] = x
    # Trainers report on their own schedules (and a restore moves the version back): each line
    # is drawn in x order.
    for panel in (series.training, series.validation, series.lr):
        for name in panel:
            panel[name].sort(key=lambda p: p[0])
    series.version.sort(key=lambda p: p[0])
    points = sorted(anchors.items())
    for entry in status.get("audit", []):
        if entry.get("action") in MARKED_ACTIONS:
            x = float(entry["version"]) if not by_step else _interp(points, entry["version"])
            series.markers.append((x, _marker_label(entry)))
    return series


def plot_run(
    status: Status | Mapping[str, Any], path: str, title: str | None = None
) -> dict[str, Any]:
    """Write the run's PNG to `path`; return what it drew (also stored in the PNG)."""
    try:
        import matplotlib
    except ImportError as exc:  # pragma: no cover - depends on the install
        raise RuntimeError("optserve plot needs matplotlib: pip install 'optserve[plot]'") from exc
    matplotlib.use("Agg")  # files only; no display needed
    import matplotlib.pyplot as plt

    series = run_series(status)
    panels = [
        ("training metrics", series.training, False),
        ("validation metrics", series.validation, False),
        ("learning rate", series.lr, True),
        ("model version", {"version": series.version} if series.version else {}, False),
    ]
    fig, axes = plt.subplots(len(panels), 1, figsize=(10, 11), sharex=True)
    try:
        for ax, (name, lines, log_scale) in zip(axes, panels, strict=True):
            for label, pts in sorted(lines.items()):
                xs, ys = [p[0] for p in pts], [p[1] for p in pts]
                if name == "learning rate":
                    ax.step(xs, ys, where="post", label=label)
                else:
                    ax.plot(xs, ys, marker="." if len(pts) < 50 else None, label=label)
            ys = [p[1] for pts in lines.values() for p in pts]
            if log_scale and ys and min(ys) > 0 and max(ys) / min(ys) > 10:
                ax.set_yscale("log")
            if not lines:
                ax.text(0.5, 0.5, "no data reported", ha="center", va="center",
                        transform=ax.transAxes, color="grey")  # fmt: skip
            for x, _ in series.markers:
                ax.axvline(x, color="tab:red", linestyle="--", linewidth=1, alpha=0.7)
            ax.set_ylabel(name)
            ax.grid(True, alpha=0.3)
            if lines:
                ax.legend(loc="best", fontsize="small")
        top = axes[0]
        for x, label in series.markers:
            top.annotate(label, xy=(x, 1.0), xycoords=("data", "axes fraction"), rotation=90,
                         va="top", ha="right", fontsize="small", color="tab:red")  # fmt: skip
        axes[-1].set_xlabel(series.x_label)
        fig.suptitle(title or f"optserve: {series.model} (version {status.get('version', '?')})")
        fig.tight_layout()
        summary = series.summary()
        fig.savefig(path, format="png", dpi=100, metadata={"optserve": json.dumps(summary)})
    finally:
        plt.close(fig)
    return summary
