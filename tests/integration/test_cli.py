"""The `optserve` command line, run as a user would: separate processes, their own Ray."""

from __future__ import annotations

import argparse
import json
import os
import queue
import re
import signal
import subprocess
import sys
import threading
import time

import grpc
import pytest
from PIL import Image

from tests.helpers import auth

OPTSERVE = [sys.executable, "-m", "optserve.server.cli"]


def _commands() -> list[list[str]]:
    from optserve.server.cli import build_parser

    parser = build_parser()
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    return [[], *([name] for name in sub.choices)]


@pytest.mark.parametrize("command", _commands(), ids=lambda c: " ".join(c) or "optserve")
def test_every_command_has_help(command):
    result = subprocess.run(
        [*OPTSERVE, *command, "--help"], capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 0, result.stderr
    assert "usage: optserve" in result.stdout
    if command:
        assert "examples:" in result.stdout


def test_serve_refuses_to_start_without_tokens_unless_told(tmp_path):
    env = {k: v for k, v in os.environ.items() if not k.startswith("OPTSERVE_TOKENS")}
    result = subprocess.run(
        [*OPTSERVE, "serve", "--port", "0"], capture_output=True, text=True, env=env, timeout=120
    )
    assert result.returncode != 0
    assert "--no-auth" in result.stderr and "--tokens-file" in result.stderr
    bad = tmp_path / "tokens.json"
    bad.write_text('{"tokens": [{"name": "x", "role": "admin", "token": "short"}]}')
    result = subprocess.run(
        [*OPTSERVE, "serve", "--port", "0", "--tokens-file", str(bad)],
        capture_output=True, text=True, env=env, timeout=120,
    )  # fmt: skip
    assert result.returncode != 0 and "at least 16 characters" in result.stderr


def _lines(proc) -> queue.Queue:
    """proc's stdout lines, read by a thread of their own (None after the last). Waiting on the
    pipe with select() misses lines that already sit in the file object's buffer, as when one
    write carries two lines."""
    lines = getattr(proc, "_optserve_lines", None)
    if lines is None:
        lines = proc._optserve_lines = queue.Queue()

        def pump() -> None:
            for line in proc.stdout:
                lines.put(line)
            lines.put(None)

        threading.Thread(target=pump, name="read-until", daemon=True).start()
    return lines


def read_until(proc, pattern, timeout_s):
    """Read proc's stdout until a line matches; return the match (fail with what was seen)."""
    seen = []
    lines = _lines(proc)
    deadline = time.monotonic() + timeout_s
    while (left := deadline - time.monotonic()) > 0:
        try:
            line = lines.get(timeout=left)
        except queue.Empty:
            break
        if line is None:  # the output ended; later calls see that too
            lines.put(None)
            break
        seen.append(line)
        match = re.search(pattern, line)
        if match:
            return match
    pytest.fail(f"no line matched {pattern!r} in {timeout_s}s; output:\n{''.join(seen)}")


@pytest.mark.slow
def test_serve_answers_health_checks_and_stops_cleanly_on_sigterm():
    """SIGTERM, as Kubernetes and systemd stop a server; the README's quickstart test stops its
    server with Ctrl-C (SIGINT) and checks the same clean stop."""
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    from optserve.client import ParameterServerClient

    # The token table comes from the environment; the client sends the session's admin token.
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "OPTSERVE_TOKENS": auth.TOKENS_JSON}
    proc = subprocess.Popen(
        [*OPTSERVE, "serve", "--port", "0"],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        env=env,
    )
    try:
        address = read_until(proc, r"serving on (\S+)", 180).group(1)
        with grpc.insecure_channel(address) as channel:
            reply = health_pb2_grpc.HealthStub(channel).Check(
                health_pb2.HealthCheckRequest(service="optserve.v1.Coordinator"), timeout=30
            )
            assert reply.status == health_pb2.HealthCheckResponse.SERVING
        with ParameterServerClient(address) as client:
            import torch

            client.create_model("served", {"w": torch.zeros(3)}, {"name": "sgd", "lr": 1.0})
            client.push("served", {"w": torch.ones(3)})
            weights, version = client.pull("served")
            assert version == 1 and torch.equal(weights["w"], -torch.ones(3))
        proc.send_signal(signal.SIGTERM)
        read_until(proc, r"stopped in", 120)
        assert proc.wait(timeout=60) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


@pytest.mark.slow
def test_demo_short_reaches_the_accuracy_bar(tmp_path):
    report = tmp_path / "report.json"
    result = subprocess.run(
        [*OPTSERVE, "demo", "--short", "--report", str(report), "--out-dir", str(tmp_path / "o")],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert "[trainer 0] epoch" in result.stdout and "[trainer 1] epoch" in result.stdout
    assert "final test accuracy" in result.stdout
    summary = json.loads(report.read_text())
    assert summary["test_accuracy"] >= 0.90, summary
    assert summary["trainers"] == 2
    # Every push of both trainers was applied: 1437 training digits, batches of 32 per trainer.
    assert summary["version"] == summary["epochs"] * (23 + 23)
    # Halfway, the optimizer was swapped (Adam -> SGD, momentum converted from Adam's moment).
    swap = summary["swap"]
    assert swap["to"]["name"] == "sgd" and swap["keys"]["momentum_buffer"]["action"] == "converted"
    assert summary["version"] // 2 <= swap["version"] < summary["version"]
    assert "optimizer swapped adam -> " in result.stdout
    # It leaves a checkpoint and a plot behind, and says where and what to do next.
    checkpoint = tmp_path / "o" / "checkpoints" / "digits-mlp" / summary["checkpoint"]["name"]
    assert (checkpoint / "manifest.json").is_file()
    assert summary["checkpoint"]["version"] == summary["version"]
    plot = tmp_path / "o" / "digits-mlp.png"
    assert summary["plot"] == str(plot)
    drawn = json.loads(Image.open(plot).text["optserve"])
    assert set(drawn["training"]) == {"loss"}
    assert set(drawn["validation"]) == {"val_loss", "val_accuracy"}
    assert [m["label"] for m in drawn["markers"]] == ["adam -> sgd"]
    for shown in (
        str(checkpoint),
        str(plot),
        "optserve status",
        "optserve set-optimizer",
        "--restore",
    ):
        assert shown in result.stdout, shown
