"""`optserve compare`'s pure parts, on plain status dicts: which series each branch owns, the
slope, the table, the fork markers and the PNG's summary. No server."""

from __future__ import annotations

import json

import pytest
from PIL import Image

from optserve.client.compare import (
    SLOPE_PER,
    Branch,
    branches,
    compare_rows,
    drawn_series,
    fork_markers,
    lineage,
    plot_compare,
    slope,
    table_rows,
    updates_since_fork,
)


def metric(name, value, version, time=0.0):
    return {"name": name, "value": value, "version": version, "step": version, "time": time}


def status(model, version, metrics, optimizer="adam", forked_from=None, fork_version=None):
    answer = {"model": model, "version": version, "optimizer": {"name": optimizer},
              "metrics": metrics}  # fmt: skip
    if forked_from is not None:
        answer |= {"forked_from": forked_from, "fork_version": fork_version}
    return answer


# The main line reported loss at versions 10..60 and val_accuracy twice; the fork copied the
# history up to its fork point (version 30) and then reported its own.
HISTORY = [metric("loss", 1.0 - v / 100, v, time=v) for v in (10, 20, 30)]
MAIN = status(
    "main", 60,
    [*HISTORY, metric("val_accuracy", 0.5, 30, time=31),
     *(metric("loss", 0.7 - (v - 30) / 200, v, time=v) for v in (40, 50, 60)),
     metric("val_accuracy", 0.7, 60, time=61)],
)  # fmt: skip
FORK = status(
    "main-sgd", 55,
    [*HISTORY, *(metric("loss", 0.7 - (v - 30) / 50, v, time=v + 0.5) for v in (35, 45, 55))],
    optimizer="sgd", forked_from="main", fork_version=30,
)  # fmt: skip


def test_lineage_reads_the_fork_fields_and_says_none_for_a_model_that_is_no_fork():
    assert lineage(FORK) == ("main", 30)
    assert lineage(MAIN) == (None, None)
    assert lineage({"forked_from": "", "fork_version": 0}) == (None, None)


def test_a_fork_owns_only_what_it_reported_itself():
    main, fork = branches([MAIN, FORK])
    assert [x for x, _ in main.metrics["loss"]] == [10, 20, 30, 40, 50, 60]
    assert [y for _, y in main.metrics["loss"]] == pytest.approx([0.9, 0.8, 0.7, 0.65, 0.6, 0.55])
    assert list(fork.metrics) == ["loss"]
    assert [x for x, _ in fork.metrics["loss"]] == [35, 45, 55]
    assert [y for _, y in fork.metrics["loss"]] == pytest.approx([0.6, 0.4, 0.2])
    assert (fork.forked_from, fork.fork_version, fork.optimizer) == ("main", 30, "sgd")
    assert fork.label == "main-sgd (sgd)"
    (with_lr,) = branches([{**FORK, "optimizer": {"name": "adam", "lr": 0.005}}])
    assert with_lr.label == "main-sgd (adam, lr 0.005)"
    # Without its parent beside it, the fork's entries before the fork point are still dropped
    # (the one at the fork point is kept: it may be its own) ...
    alone = branches([status("other", 0, []), FORK])[1]
    assert alone.metrics["loss"][0] == (30.0, pytest.approx(0.7))
    assert len(alone.metrics["loss"]) == 4
    # ... but a fork compared as the model (the first: a promoted fork, say) is drawn whole.
    (whole,) = branches([FORK])
    assert len(whole.metrics["loss"]) == 6 and whole.fork_version == 30
    assert fork_markers([whole]) == [(30.0, "fork main-sgd at 30")]


def test_slope_is_the_least_squares_fit_per_hundred_updates_over_the_window():
    # y = 2 - x/50 exactly: slope -1/50 per update, -2 per 100.
    points = [(float(x), 2 - x / 50) for x in range(0, 100, 10)]
    assert slope(points) == pytest.approx(-2.0)
    # Hand-traced: (0, 1), (1, 3), (2, 2): mean x 1, mean y 2; sxy = (-1)(-1) + 0 + (1)(0) = 1,
    # sxx = 2, so 0.5 per update.
    assert slope([(0.0, 1.0), (1.0, 3.0), (2.0, 2.0)]) == pytest.approx(0.5 * SLOPE_PER)
    # Only the window's newest reports count: an old outlier is out of it.
    noisy = [(0.0, 100.0), *points[1:]]
    assert slope(noisy, window=9) == pytest.approx(-2.0)
    assert slope(noisy, window=10) != pytest.approx(-2.0)
    assert slope([(5.0, 1.0)]) is None and slope([(5.0, 1.0), (5.0, 2.0)]) is None
    with pytest.raises(ValueError, match="at least 2"):
        slope(points, window=1)


def test_the_table_has_latest_slope_reports_and_updates_since_the_fork():
    rows = compare_rows(branches([MAIN, FORK]), window=3)
    got = {(r.branch, r.metric): r for r in rows}
    assert list(got) == [("main", "loss"), ("main", "val_accuracy"), ("main-sgd", "loss")]
    loss = got["main", "loss"]
    assert (loss.latest, loss.reports, loss.updates, loss.version) == (
        pytest.approx(0.55),
        6,
        30,
        60,
    )
    assert loss.slope == pytest.approx(-0.5)  # 0.05 per 10 updates
    fork = got["main-sgd", "loss"]
    assert (fork.latest, fork.reports, fork.updates, fork.version) == (
        pytest.approx(0.2),
        3,
        25,
        55,
    )
    assert fork.slope == pytest.approx(-2.0)
    val = got["main", "val_accuracy"]
    assert val.slope == pytest.approx(0.2 / 30 * 100)
    headers, cells = table_rows(rows)
    assert headers[:4] == ["BRANCH", "METRIC", "LATEST", "SLOPE/100 UPD"]
    assert cells[2] == ["main-sgd", "loss", "0.2", "-2", "3", "25", "55"]
    one = compare_rows([Branch("x", 7, metrics={"loss": [(7.0, 1.0)]})])[0]
    assert one.slope is None and one.updates == 7 and table_rows([one])[1][0][3] == "-"


def test_updates_count_from_the_earliest_fork_point():
    forks = [Branch("a", 80, forked_from="m", fork_version=50),
             Branch("b", 90, forked_from="m", fork_version=20)]  # fmt: skip
    assert updates_since_fork(Branch("m", 100), forks) == 80
    assert [updates_since_fork(f, forks) for f in forks] == [30, 70]


def test_each_fork_is_marked_at_its_fork_point_and_its_line_starts_there():
    found = branches([MAIN, FORK])
    assert fork_markers(found) == [(30.0, "fork main-sgd at 30")]
    drawn = drawn_series(found)
    assert set(drawn) == {"loss", "val_accuracy"}
    assert drawn["loss"]["main-sgd"][0] == (
        30.0,
        pytest.approx(0.7),
    )  # the parent's value at the fork point
    assert drawn["loss"]["main-sgd"][1:] == found[1].metrics["loss"]
    assert drawn["loss"]["main"] == found[0].metrics["loss"]
    assert set(drawn["val_accuracy"]) == {"main"}


def test_the_png_records_what_it_drew(tmp_path):
    path = tmp_path / "compare.png"
    summary = plot_compare([MAIN, FORK], str(path))
    assert json.loads(Image.open(path).text["optserve"]) == summary
    assert summary["metrics"] == {"loss": {"main": 6, "main-sgd": 4}, "val_accuracy": {"main": 2}}
    assert summary["markers"] == [{"x": 30.0, "label": "fork main-sgd at 30"}]
    assert [b["name"] for b in summary["branches"]] == ["main", "main-sgd"]
    assert summary["log_scale"] == []  # loss spans 0.2 to 0.9: linear
    wide = plot_compare([status("w", 3, [metric("loss", 2.0, 1), metric("loss", 0.01, 2)])],
                        str(tmp_path / "wide.png"))  # fmt: skip
    assert wide["log_scale"] == ["loss"]
    # A model with nothing reported still gets a (mostly empty) plot.
    empty = plot_compare([status("quiet", 0, [])], str(tmp_path / "quiet.png"))
    assert empty["metrics"] == {} and empty["markers"] == []


def test_the_fork_demo_keeps_the_better_branch_and_names_the_old_main_line():
    from optserve.server.demo.fork import better, branch_name

    scores = {"m": {"accuracy": 0.97, "loss": 0.08}, "m-sgd": {"accuracy": 0.98, "loss": 0.09}}
    assert better(scores) == "m-sgd"  # accuracy first
    scores["m"]["accuracy"] = 0.98
    assert better(scores) == "m"  # then the lower loss
    assert branch_name({"name": "sgd"}, "digits-mlp") == "digits-mlp-sgd"
    assert branch_name({"name": "adam"}, "m-sgd", base="m") == "m-adam"
    assert branch_name({"name": "sgd"}, "m-sgd", base="m") == "m-main"  # both on one rule
