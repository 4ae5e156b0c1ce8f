"""`optserve status` and `optserve plot` against the session's server: once as a process, as a
user runs it, and otherwise through the same `main` in this process (a new process imports
torch, about 2 s on a 2-core machine, for each command)."""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys
from contextlib import redirect_stderr, redirect_stdout
from unittest import mock

import torch
from PIL import Image

from optserve.server.cli import main

OPTSERVE = [sys.executable, "-m", "optserve.server.cli"]


def optserve(service, *args: str, process: bool = False) -> subprocess.CompletedProcess:
    env = {**os.environ, "OPTSERVE_ADDRESS": service.address}  # the token: $OPTSERVE_TOKEN
    if process:
        result = subprocess.run(
            [*OPTSERVE, *args], capture_output=True, text=True, timeout=120, env=env
        )
    else:
        out, err = io.StringIO(), io.StringIO()
        with mock.patch.dict(os.environ, env), redirect_stdout(out), redirect_stderr(err):
            code = main(list(args))
        result = subprocess.CompletedProcess(args, code, out.getvalue(), err.getvalue())
    assert result.returncode == 0, result.stdout + result.stderr
    return result


def run_a_little(client, model_name):
    client.create_model(
        model_name, {"w": torch.zeros(8), "b": torch.zeros(2)}, {"name": "adam", "lr": 0.01},
        num_shards=2,
    )  # fmt: skip
    grads = {"w": torch.ones(8), "b": torch.ones(2)}
    for step in range(1, 13):
        version = client.push(model_name, grads, trainer=f"t{step % 2}")
        client.report_metric(model_name, "loss", 2.0 / step, step=10 * step)
        if step % 4 == 0:
            client.report_metric(model_name, "val_accuracy", 0.5 + step / 40, step=10 * step)
        if step == 6:
            client.set_optimizer(model_name, {"name": "sgd", "lr": 0.1, "momentum": 0.9})
        if step == 9:
            client.set_schedule(model_name, {"name": "exponential", "gamma": 0.5})
    return version


def test_status_lists_every_model_as_a_table_and_one_in_detail(service, client, model_name):
    version = run_a_little(client, model_name)
    table = optserve(service, "status", process=True).stdout.splitlines()
    header = table[0].split()
    assert header == ["MODEL", "VERSION", "RULE", "LR", "SCHEDULE", "MODE", "SHARDS", "TRAINERS",
                      "CHECKPOINT", "AT", "RISK"]  # fmt: skip
    row = next(line.split() for line in table[2:] if line.startswith(model_name + " "))
    lr = 0.1 * 0.5**version  # exponential decay, counted in model versions
    assert row[1:4] == [str(version), "sgd", f"{lr:.4g}"]
    assert row[4:6] == ["exponential", "async"]
    assert row[6:9] == ["2", "on", "cpu"] and row[9] == "2/2"
    # No checkpoint yet (the server's default policy takes one every 10 minutes): a lost shard
    # would cost every update so far.
    assert row[10:] == ["never", str(version)]
    client.checkpoint(model_name)
    table = optserve(service, "status").stdout.splitlines()
    row = next(line.split() for line in table[2:] if line.startswith(model_name + " "))
    assert row[11:] == ["ago", "0"] and row[10].endswith("s")

    detail = optserve(service, "status", "--model", model_name).stdout
    for shown in ("GROUP", "SHARD", "TRAINER", "METRIC", "WHEN", "set_optimizer", "t0", "t1"):
        assert shown in detail, shown
    every = json.loads(optserve(service, "status", "--json").stdout)
    assert model_name in [s["model"] for s in every["models"]] and every["errors"] == {}
    one = json.loads(optserve(service, "status", "--model", model_name, "--json").stdout)
    assert one["version"] == version and sorted(one["trainers"]) == ["t0", "t1"]
    assert one["trainers"]["t0"]["applied"] == 6 and one["trainers"]["t0"]["idle_s"] < 120
    assert one["history"]["metrics_kept"] == one["history"]["metrics_shown"] == 15
    checkpoint = one["checkpoint"]
    assert checkpoint["last_version"] == version and checkpoint["updates_at_risk"] == 0
    assert checkpoint["policy"] == {"every_s": 600.0} and checkpoint["periodic"]
    assert f"checkpoint last version {version}" in detail


def test_plot_writes_a_png_with_the_series_and_the_change_markers(
    service, client, model_name, tmp_path
):
    run_a_little(client, model_name)
    out = tmp_path / "run.png"
    said = optserve(service, "plot", "--model", model_name, "--out", str(out)).stdout
    assert str(out) in said and "2 optimizer/schedule change(s) marked" in said
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    image = Image.open(out)
    image.verify()  # a whole, valid PNG
    image = Image.open(out)
    assert image.size == (1000, 1100)
    drawn = json.loads(image.text["optserve"])
    assert drawn["x"] == "step"
    assert drawn["training"] == {"loss": 12}
    assert drawn["validation"] == {"val_accuracy": 3}
    assert drawn["lr"] == {"default": 15} and drawn["version"] == 15
    # The swap happened after the 6th push (reported at step 60) and the schedule after the
    # 9th (step 90): the markers sit at those steps.
    markers = [(m["x"], m["label"]) for m in drawn["markers"]]
    assert markers == [(60.0, "adam -> sgd"), (90.0, "schedule: exponential")]
