"""The README's commands and examples, run as written (a user's first ten minutes)."""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
from pathlib import Path

import pytest
from PIL import Image

from optserve.client import NotFound
from tests.integration.test_cli import read_until

ROOT = Path(__file__).resolve().parents[2]
README = (ROOT / "README.md").read_text()
BLOCK = re.compile(r"^```(\w*)\n(.*?)^```", re.MULTILINE | re.DOTALL)
ADDRESS = "127.0.0.1:50051"


def blocks(section: str | None = None) -> list[tuple[str, str]]:
    """(language, code) of every fenced block, in order; only under `## <section>` if given."""
    text = README
    if section is not None:
        start = README.index(f"\n## {section}")
        end = README.find("\n## ", start + 1)
        text = README[start : end if end != -1 else None]
    return [(m.group(1), m.group(2)) for m in BLOCK.finditer(text)]


def test_the_two_fresh_machine_commands_come_first_and_ci_runs_the_test_one():
    (lang_demo, demo), (lang_test, tests) = blocks()[:2]
    assert lang_demo == lang_test == "bash"
    assert demo.strip().endswith(".venv/bin/optserve demo")
    assert "pip install -e '.[demo]'" in demo
    assert tests.strip().endswith(".venv/bin/python -m pytest")
    assert "pip install -e '.[test]'" in tests
    for command in (demo, tests):
        assert command.startswith("python3 -m venv .venv && .venv/bin/pip install torch==2.13.0")
    ci = [line for line in (ROOT / ".ci" / "run").read_text().splitlines() if line.strip()]
    assert ci[-1] == tests.strip(), "CI must run the README's test command, exactly"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
def test_the_quickstart_runs_as_written(tmp_path):
    """Every block of the Quickstart, in order, in one working directory: the token lines and
    `optserve serve` (on a free port instead of 50051), the Python examples, the CLI lines."""
    quickstart = blocks("Quickstart")
    assert [lang for lang, _ in quickstart] == ["bash", "python", "bash", "python"]
    port = free_port()
    bin_dir = str(Path(sys.executable).parent)  # `optserve` as the README's virtualenv has it
    env = {k: v for k, v in os.environ.items() if not k.startswith(("OPTSERVE_", "RAY_ADDRESS"))}
    env.update(
        PATH=f"{bin_dir}{os.pathsep}{env.get('PATH', '')}", OPTSERVE_ADDRESS=f"127.0.0.1:{port}"
    )
    assert shutil.which("optserve", path=env["PATH"]), "pip install -e . puts optserve on PATH"

    # The server block: make the token (read back from the shell), then serve in the background.
    server_block = quickstart[0][1]
    serve_lines = [line for line in server_block.splitlines() if line.startswith("optserve serve")]
    assert len(serve_lines) == 1
    setup = server_block.replace(serve_lines[0], "")
    token = subprocess.run(
        ["bash", "-ec", f'{setup}\necho "$OPTSERVE_TOKEN"'],
        cwd=tmp_path, env=env, capture_output=True, text=True, check=True,
    ).stdout.strip()  # fmt: skip
    assert len(token) >= 32 and (tmp_path / "tokens.json").is_file()
    env["OPTSERVE_TOKEN"] = token
    serve = f"exec {serve_lines[0]} --port {port} --metrics-port 0"
    server = subprocess.Popen(
        ["bash", "-ec", serve], cwd=tmp_path, env=env, text=True,
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
    )  # fmt: skip
    try:
        read_until(server, r"serving on 127\.0\.0\.1:\d+", 180)
        for lang, code in quickstart[1:]:
            if lang == "python":
                code = code.replace(ADDRESS, f"127.0.0.1:{port}")
                command = [sys.executable, "-c", code]
            else:
                command = ["bash", "-ec", code]
            result = subprocess.run(
                command, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300
            )
            assert result.returncode == 0, f"{code}\n{result.stdout}\n{result.stderr}"
            if (
                lang == "python" and "RemoteOptimizer(" in code
            ):  # the training example learned something
                loss = float(re.search(r"loss (\S+) at model version 200", result.stdout)[1])
                assert loss < 1.0, result.stdout
            if lang == "bash" and "optserve plot" in code:
                assert "quickstart" in result.stdout and "loss" in result.stdout
                drawn = Image.open(tmp_path / "quickstart.png").text["optserve"]
                assert '"loss": 20' in drawn
            if lang == "python" and "ParameterServerClient(" in code:
                assert "momentum_buffer" in result.stdout
        # The checkpoint the CLI block asked for is on disk, under --checkpoint-dir.
        assert list((tmp_path / "checkpoints" / "quickstart").glob("*/manifest.json"))
        # "Ctrl-C stops it": cleanly (test_cli.py stops a server with SIGTERM).
        server.send_signal(signal.SIGINT)
        read_until(server, r"stopped in", 120)
        assert server.wait(timeout=60) == 0
    finally:
        if server.poll() is None:
            server.send_signal(signal.SIGINT)
        try:
            server.wait(timeout=120)
        except subprocess.TimeoutExpired:
            server.kill()
            server.wait()


@pytest.mark.slow
def test_with_your_framework_runs_as_written(service, client, tmp_path):
    """The README's framework examples, each in a new process against the session's server:
    the HF Trainer and Lightning blocks run as written (the torchrun line is the command
    tests/integration/test_torchrun.py runs)."""
    section = blocks("With your framework")
    assert [lang for lang, _ in section] == ["python", "python", "bash"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    models = ["hf-digits", "lightning-digits"]
    runs = {}
    try:
        for (_, code), model in zip(section[:2], models, strict=True):  # both at once
            assert f'model="{model}"' in code
            code = code.replace(ADDRESS, service.address)
            runs[model] = (code, subprocess.Popen(
                [sys.executable, "-c", code], cwd=tmp_path, env=env, text=True,
                stdout=subprocess.PIPE, stderr=subprocess.PIPE))  # fmt: skip
        for model, (code, run) in runs.items():
            stdout, stderr = run.communicate(timeout=300)
            assert run.returncode == 0, f"{code}\n{stdout}\n{stderr[-4000:]}"
            said = stdout.strip().splitlines()[-1]
            status = client.status(model)
            if model == "hf-digits":
                # the linear schedule's lr for step 30, and every step applied
                assert said == f"{status.groups['default'].lr} 30"
                assert status.groups["default"].lr == pytest.approx(3e-3 / 27)
                assert (tmp_path / "hf-digits" / "checkpoint-15" / "optimizer.pt").is_file()
            else:
                assert float(said) == 0.005
    finally:
        for _, run in runs.values():
            if run.poll() is None:
                run.kill()
                run.wait()
        for model in models:
            with contextlib.suppress(NotFound):
                client.drop_model(model)
