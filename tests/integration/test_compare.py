"""`optserve compare` and `optserve demo --fork` against real Ray and gRPC (issue 19), and the
example of docs/compare.md as written."""

from __future__ import annotations

import io
import json
import os
import re
import subprocess
from contextlib import redirect_stderr, redirect_stdout
from pathlib import Path
from unittest import mock

import pytest
import torch
from PIL import Image

from optserve.server.cli import main
from optserve.server.demo.fork import held_out, settle
from optserve.server.demo.trainer import build_model, load_digits_split
from tests.helpers.models import dropped
from tests.integration.test_plot_and_status import OPTSERVE, optserve

ROOT = Path(__file__).resolve().parents[2]
TARGET = torch.linspace(-1.0, 1.0, 6)


def train(client, model, updates):
    """Pull, report |w - target|^2 at the version pulled, push its gradient."""
    for _ in range(updates):
        weights, version = client.pull(model)
        error = weights["w"] - TARGET
        client.report_metric(model, "loss", float((error**2).sum()), step=version)
        client.push(model, {"w": 2 * error})


def run_cli(service, *args: str) -> tuple[int, str, str]:
    """`optserve ARGS` in this process, whatever its exit status."""
    out, err = io.StringIO(), io.StringIO()
    env = {"OPTSERVE_ADDRESS": service.address}
    with mock.patch.dict(os.environ, env), redirect_stdout(out), redirect_stderr(err):
        code = main(list(args))
    return code, out.getvalue(), err.getvalue()


def test_compare_finds_the_forks_plots_them_and_tables_each_branch(
    service, client, model_name, tmp_path
):
    fork, other = f"{model_name}-sgd", f"{model_name}-plain"
    client.create_model(model_name, {"w": torch.zeros(6)}, {"name": "adam", "lr": 0.05})
    client.create_model(other, {"w": torch.zeros(6)}, {"name": "adam", "lr": 0.05})
    with dropped(client, fork, other):
        train(client, model_name, 8)
        # No fork yet: the model is drawn alone, and the command says so.
        alone = optserve(service, "compare", "--model", model_name, "--out", str(tmp_path / "a"))
        assert "has no forks" in alone.stdout and "no fork point" in alone.stdout
        client.fork(model_name, fork, optimizer={"name": "sgd", "lr": 0.05, "momentum": 0.9})
        train(client, model_name, 6)
        train(client, fork, 4)
        out = tmp_path / "cmp.png"
        said = optserve(service, "compare", model_name, "--out", str(out), "--window", "3")
        lines = said.stdout.splitlines()
        assert lines[0].split()[:4] == ["BRANCH", "METRIC", "LATEST", "SLOPE/100"]
        rows = {tuple(line.split()[:2]): line.split() for line in lines[2:4]}
        # The main line: 14 loss reports, 6 updates since the fork at 8; the fork: its own 4.
        assert rows[model_name, "loss"][4:] == ["14", "6", "14"]
        assert rows[fork, "loss"][4:] == ["4", "4", "12"]
        assert f"fork {fork} at 8" in said.stdout and other not in said.stdout
        drawn = json.loads(Image.open(out).text["optserve"])
        assert drawn["metrics"] == {"loss": {model_name: 14, fork: 5}}  # 4 + the fork point
        assert drawn["markers"] == [{"x": 8.0, "label": f"fork {fork} at 8"}]
        assert [(b["name"], b["optimizer"], b["fork_version"]) for b in drawn["branches"]] == [
            (model_name, "adam", None), (fork, "sgd", 8)]  # fmt: skip
        # The JSON table (each branch once, however often named): the slope is the
        # least-squares fit of the newest 3 reports.
        args = [model_name, fork, fork, model_name, "--window", "3", "--json", "--out", str(out)]
        table = json.loads(optserve(service, "compare", *args).stdout)
        assert [(r["branch"], r["metric"]) for r in table["rows"]] == [
            (model_name, "loss"), (fork, "loss")]  # fmt: skip
        row = next(r for r in table["rows"] if r["branch"] == fork)
        points = [(m.version, m.value) for m in client.status(fork).metrics][-3:]
        mean_x = sum(x for x, _ in points) / 3
        mean_y = sum(y for _, y in points) / 3
        expected = sum((x - mean_x) * (y - mean_y) for x, y in points) / sum(
            (x - mean_x) ** 2 for x, _ in points
        )
        assert row["slope"] == pytest.approx(expected * 100)
        assert row["latest"] == pytest.approx(points[-1][1])
        # Naming a model that is not a fork draws it from its start, with a note.
        code, _, err = run_cli(service, "compare", model_name, other, "--out", str(out))
        assert code == 0 and f"{other} is no fork" in err
    # A model that does not exist: NOT_FOUND, exit status 2, no file.
    code, _, err = run_cli(
        service, "compare", f"{model_name}-nowhere", "--out", str(tmp_path / "x")
    )
    assert code == 2 and "NOT_FOUND" in err and not (tmp_path / "x").exists()


def test_the_fork_demo_promotes_the_fork_when_it_is_the_better(
    service, client, model_name, tmp_path
):
    """`optserve demo --fork`'s last step, on a fork that learned and a main line that did not:
    the fork is promoted, the main line's name serves its weights, the old run is kept."""
    net = build_model(0)
    client.create_model(model_name, {n: p.detach() for n, p in net.named_parameters()},
                        {"name": "adam", "lr": 0.005})  # fmt: skip
    fork, kept = f"{model_name}-sgd", f"{model_name}-adam"
    with dropped(client, kept, fork):
        client.fork(model_name, fork, optimizer={"name": "sgd", "lr": 0.5, "momentum": 0.9})
        x, y, _, _ = load_digits_split(0)
        for _ in range(15):  # full-batch steps on the fork only
            net.load_state_dict(client.pull(fork)[0])
            net.zero_grad()
            loss = torch.nn.functional.cross_entropy(net(x), y)
            loss.backward()
            version = client.push(fork, {n: p.grad for n, p in net.named_parameters()})
            client.report_metric(fork, "loss", loss.item(), step=version)
        settled = settle(client, model_name, fork, seed=0)
        scores = settled.scores
        assert scores[fork]["accuracy"] > scores[model_name]["accuracy"] + 0.3, scores
        assert (settled.winner, settled.kept_as) == (fork, kept)
        assert settled.main_line == {k: scores[fork][k] for k in ("accuracy", "loss")}
        assert held_out(client.pull(kept)[0], 0)["accuracy"] == scores[model_name]["accuracy"]
        assert scores[fork]["optimizer"]["name"] == "sgd"
        # Compared under the main line's name, the promoted fork is drawn whole, once.
        said = optserve(service, "compare", model_name, "--out", str(tmp_path / "p.png"))
        assert [line.split()[0] for line in said.stdout.splitlines()[2:-1]] == [fork]
        assert f"fork {fork} at 0" in said.stdout


def docs_blocks() -> list[tuple[str, str]]:
    text = (ROOT / "docs" / "compare.md").read_text()
    start = text.index("\n## From Python")
    section = text[start : text.index("\n## ", start + 1)]
    return re.findall(r"^```(\w*)\n(.*?)^```", section, re.M | re.S)


def test_the_docs_example_runs_as_written(service, client, tmp_path, monkeypatch):
    """docs/compare.md's Python example (in this process: a new one would import torch again),
    then its CLI line."""
    (lang, code), (lang_cli, cli) = docs_blocks()
    assert (lang, lang_cli) == ("python", "bash")
    monkeypatch.chdir(tmp_path)
    out = io.StringIO()
    with dropped(client, "cmp-net", "cmp-net-sgd"):
        with redirect_stdout(out):
            exec(compile(code.replace("127.0.0.1:50051", service.address), "compare.md", "exec"),
                 {"__name__": "__main__"})  # fmt: skip
        printed = out.getvalue()
        assert "forked at version 20" in printed
        said = dict(re.findall(r"^(cmp-net\S*) loss latest (\S+)", printed, re.M))
        assert set(said) == {"cmp-net", "cmp-net-sgd"}
        assert re.search(r"cmp-net-sgd loss .* 20 updates since the fork", printed)
        assert (tmp_path / "cmp-net-compare.png").is_file()
        # The CLI line prints the same latest values.
        shown = optserve(service, *cli.split()[1:], "--out", str(tmp_path / "cli.png")).stdout
        for name, latest in said.items():
            row = next(line.split() for line in shown.splitlines() if line.startswith(name + " "))
            assert float(row[2]) == pytest.approx(float(latest), abs=1e-4)


@pytest.mark.slow
def test_demo_fork_promotes_the_better_branch_and_plots_both(tmp_path):
    """The README's `optserve demo --fork`, with --short (6 epochs: the fork after 3)."""
    readme = (ROOT / "README.md").read_text()
    section = readme[readme.index("\n## Forking a live run") :]
    section = section[: section.index("\n## ", 1)]
    (command,) = [c for c in re.findall(r"^```bash\n(.*?)^```", section, re.M | re.S)
                  if "demo --fork" in c]  # fmt: skip
    assert command.split() == ["optserve", "demo", "--fork"]
    report = tmp_path / "report.json"
    result = subprocess.run(
        [*OPTSERVE, *command.split()[1:], "--short", "--report", str(report),
         "--out-dir", str(tmp_path / "o")],
        capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    summary = json.loads(report.read_text())
    scores, fork = summary["branches"], summary["fork"]["name"]
    assert set(scores) == {"digits-mlp", fork} and fork == "digits-mlp-sgd"
    # Forked at the halfway point: 3 of 6 epochs, both trainers' batches (23 each).
    assert summary["fork"]["version"] == 3 * (23 + 23)
    key = {name: (s["accuracy"], -s["loss"]) for name, s in scores.items()}
    assert summary["winner"] == max(key, key=key.get)
    assert summary["promoted"] == (summary["winner"] == fork)
    # digits-mlp now serves the winner's weights.
    assert summary["main_line"]["accuracy"] == scores[summary["winner"]]["accuracy"]
    assert summary["test_accuracy"] >= 0.9
    plot = tmp_path / "o" / "digits-mlp-compare.png"
    drawn = json.loads(Image.open(plot).text["optserve"])
    assert drawn["markers"] == [{"x": float(3 * 46), "label": f"fork {fork} at {3 * 46}"}]
    assert {"loss", "val_accuracy", "val_loss"} <= set(drawn["metrics"])
    assert set(drawn["metrics"]["val_accuracy"]) == {"digits-mlp", fork}
    assert "[demo] at model version 138: forked digits-mlp -> digits-mlp-sgd" in result.stdout
    assert str(plot) in result.stdout and "BRANCH" in result.stdout
    # The main line (whichever branch it is now) is checkpointed where the demo says.
    saved = summary["checkpoint"]
    assert saved["model"] == summary["winner"] and saved["version"] == 3 * 46 + 3 * 23
    checkpoint = Path(saved["dir"]) / saved["model"] / saved["name"]
    assert (checkpoint / "manifest.json").is_file() and str(checkpoint) in result.stdout
