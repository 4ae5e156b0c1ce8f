"""`optserve plot`'s series, from a status answer (pure logic; no server)."""

from __future__ import annotations

import json

from PIL import Image

from optserve.client.plot import plot_run, run_series


def metric(name, value, version, step=None, lr=0.1):
    return {"name": name, "value": value, "version": version, "step": step,
            "lr": {"default": lr}, "lr_changed": False, "time": 0.0}  # fmt: skip


def audit(action, version, old=None, new=None):
    return {"action": action, "version": version, "old": old, "new": new, "time": 0.0,
            "caller": "ops"}  # fmt: skip


STATUS = {
    "model": "m",
    "version": 40,
    "metrics": [
        metric("loss", 1.0, 10, step=100),
        metric("val_loss", 1.2, 20, step=200),
        metric("loss", 0.5, 30, step=300, lr=0.05),
    ],
    "audit": [
        audit("set_optimizer", 15, {"name": "adam"}, {"name": "sgd", "policy": "migrate"}),
        audit("set_optimizer", 25, {"name": "sgd", "lr": 0.1}, {"name": "sgd", "lr": 0.05}),
        audit("checkpoint", 26),
        audit("set_schedule", 30, {"name": "constant"}, {"name": "cosine"}),
    ],
}


def test_markers_land_at_the_step_of_their_version_and_say_what_changed():
    series = run_series(STATUS)
    assert series.x_label == "step"
    assert series.training == {"loss": [(100.0, 1.0), (300.0, 0.5)]}
    assert series.validation == {"val_loss": [(200.0, 1.2)]}
    assert series.lr == {"default": [(100.0, 0.1), (200.0, 0.1), (300.0, 0.05)]}
    assert series.markers == [
        (150.0, "adam -> sgd"),  # version 15: halfway between versions 10 and 20
        (250.0, "sgd: lr"),
        (300.0, "schedule: cosine"),
    ]


def test_without_steps_the_x_axis_is_the_model_version():
    status = {**STATUS, "metrics": [metric("loss", 1.0, 10), metric("loss", 0.9, 20, step=7)]}
    series = run_series(status)
    assert series.x_label == "model version"
    assert series.training == {"loss": [(10.0, 1.0), (20.0, 0.9)]}
    assert series.markers[0] == (15.0, "adam -> sgd")


def test_the_png_says_what_it_drew_even_with_no_metrics(tmp_path):
    out = tmp_path / "empty.png"
    summary = plot_run({"model": "m", "version": 0, "metrics": [], "audit": []}, str(out))
    drawn = json.loads(Image.open(out).text["optserve"])
    assert drawn == summary
    assert drawn["training"] == {} and drawn["markers"] == []
