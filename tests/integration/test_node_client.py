"""The Node.js example client (examples/node), written from docs/api.md and the protos alone,
against the session's server: it creates a two-shard model (one shard's range of a group is
empty), loads it, pushes to every shard at once in odd-sized chunks, pulls, and ends exactly
where torch.optim.SGD with momentum does; its error paths get the documented status codes.

Skipped without Node.js 20+, or when `npm ci` cannot reach the registry to install the example's
packages (examples/node/node_modules, installed once and kept)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from pathlib import Path

import pytest
import torch

from optserve.common.auth import TOKEN_ENV, TOKEN_FILE_ENV
from optserve.common.results import Status
from tests.helpers import auth

NODE_DIR = Path(__file__).resolve().parents[2] / "examples" / "node"
CLIENT = NODE_DIR / "client.js"
MIN_NODE = 20
# What npm prints when it cannot reach the registry (no network, no DNS, a proxy in the way).
NETWORK_ERRORS = (
    "ENOTFOUND", "EAI_AGAIN", "ECONNREFUSED", "ECONNRESET", "ETIMEDOUT", "ENETUNREACH",
    "EHOSTUNREACH", "ESOCKETTIMEDOUT", "getaddrinfo", "network", "proxy", "SELF_SIGNED_CERT",
    "UNABLE_TO_GET_ISSUER_CERT", "E403", "E407",
)  # fmt: skip
OPTIMIZER = {"name": "sgd", "lr": 0.1, "momentum": 0.9, "weight_decay": 0.01}
STEPS = 5


def _installed() -> bool:
    # npm writes node_modules/.package-lock.json last: an interrupted install has none.
    modules = NODE_DIR / "node_modules"
    return (modules / ".package-lock.json").is_file() and all(
        (modules / "@grpc" / name / "package.json").is_file()
        for name in ("grpc-js", "proto-loader")
    )


@pytest.fixture(scope="module")
def node() -> str:
    """The `node` executable, with the example's packages installed (`npm ci`, once)."""
    node = shutil.which("node")
    if node is None:
        pytest.skip("node is not on PATH: the Node.js example client needs Node.js 20+")
    version = subprocess.run([node, "--version"], capture_output=True, text=True, timeout=30)
    major = int(version.stdout.strip().lstrip("v").split(".")[0] or 0)
    if major < MIN_NODE:
        pytest.skip(f"node {version.stdout.strip()} is older than {MIN_NODE}")
    if _installed():
        return node
    npm = shutil.which("npm")
    if npm is None:
        pytest.skip("npm is not on PATH: cannot install the Node.js example's packages")
    # Fail fast without a registry (npm's own retries take minutes).
    env = {
        **os.environ,
        "npm_config_fetch_retries": "1",
        "npm_config_fetch_timeout": "30000",
        "npm_config_fetch_retry_maxtimeout": "10000",
        "npm_config_update_notifier": "false",
    }
    try:
        result = subprocess.run(
            [npm, "ci", "--no-audit", "--no-fund"],
            cwd=NODE_DIR, env=env, capture_output=True, text=True, timeout=300,
        )  # fmt: skip
    except subprocess.TimeoutExpired:
        pytest.skip("npm ci did not finish within 300 s (is the npm registry reachable?)")
    output = result.stdout + result.stderr
    if result.returncode != 0:
        if any(marker in output for marker in NETWORK_ERRORS):
            pytest.skip(f"npm ci cannot reach the registry: {output.strip()[-500:]}")
        pytest.fail(f"npm ci failed in {NODE_DIR}:\n{output[-3000:]}")
    assert _installed(), output[-3000:]
    return node


def run_node(node: str, *args: str, env: dict[str, str], timeout: float = 120.0):
    return subprocess.run(
        [node, str(CLIENT), *args], cwd=NODE_DIR, env=env, capture_output=True, text=True,
        timeout=timeout,
    )  # fmt: skip


def node_env(**extra: str) -> dict[str, str]:
    """This process's environment without its token (the session's sets $OPTSERVE_TOKEN)."""
    env = {k: v for k, v in os.environ.items() if k not in (TOKEN_ENV, TOKEN_FILE_ENV)}
    return {**env, **extra}


def make_plan() -> dict:
    generator = torch.Generator().manual_seed(11)
    initial = {
        "weight": torch.randn(2, 3, generator=generator),
        "bias": torch.randn(2, generator=generator),
    }
    grads = [
        {n: torch.randn(t.shape, generator=generator) for n, t in initial.items()}
        for _ in range(STEPS)
    ]
    # float32 values, written as the exact doubles they are
    return {
        "params": [
            {"name": n, "shape": list(t.shape), "init": t.reshape(-1).tolist()}
            for n, t in initial.items()
        ],
        "groups": [{"name": "no_decay", "params": ["bias"], "overrides": {"weight_decay": 0.0}}],
        "optimizer": OPTIMIZER,
        "shards": 2,
        "grads": [{n: g.reshape(-1).tolist() for n, g in step.items()} for step in grads],
    }


def torch_reference(plan: dict) -> dict[str, torch.Tensor]:
    """torch.optim.SGD with momentum over the plan's gradients, bias without weight decay."""
    params = {
        p["name"]: torch.nn.Parameter(torch.tensor(p["init"]).reshape(p["shape"]))
        for p in plan["params"]
    }
    hyper = {k: v for k, v in OPTIMIZER.items() if k != "name"}
    opt = torch.optim.SGD(
        [{"params": [params["weight"]]}, {"params": [params["bias"]], "weight_decay": 0.0}],
        **hyper,
    )
    for step in plan["grads"]:
        for name, param in params.items():
            param.grad = torch.tensor(step[name]).reshape(param.shape)
        opt.step()
    return {n: p.detach() for n, p in params.items()}


def test_node_client_trains_like_torch_sgd(service, client, model_name, node, tmp_path):
    plan = make_plan()
    plan_file = tmp_path / "plan.json"
    plan_file.write_text(json.dumps(plan))
    # 6-byte chunks: a float32 is cut across two chunks (the server must not care).
    result = run_node(
        node, "--address", service.address, "--model", model_name, "--plan", str(plan_file),
        "--chunk-bytes", "6", "--keep", env=node_env(**{TOKEN_ENV: auth.ADMIN}),
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    out = json.loads(result.stdout)

    # The layout the example exercises: a group whose range on shard 1 is empty.
    assert [g["name"] for g in out["groups"]] == ["no_decay", "default"]
    assert [s["ranges"]["no_decay"] for s in out["shards"]] == [[0, 2], [2, 2]]
    assert out["load_versions"] == [0, 0]

    expected = torch_reference(plan)
    for name, value in expected.items():
        got = torch.tensor(out["final"]["weights"][name]).reshape(value.shape)
        torch.testing.assert_close(got, value, rtol=1e-6, atol=1e-7, msg=name)
    # ... and the server's weights, as the Python client pulls them, are the same.
    pulled, version = client.pull(model_name)
    for name, value in pulled.items():
        assert torch.equal(torch.tensor(out["final"]["weights"][name]).reshape(value.shape), value)

    assert [s["version"] for s in out["steps"]] == list(range(1, STEPS + 1))
    assert out["final"]["version"] == version == STEPS
    # The same push_id again: the same decision, not applied twice.
    assert out["replay"] == {
        "push_id": out["steps"][-1]["push_id"], "version": STEPS, "version_after": STEPS,
    }  # fmt: skip
    assert set(out["status"]["keys"]) >= set(Status.model_fields)
    assert out["status"]["version"] == STEPS and out["status"]["shard_versions"] == [STEPS] * 2
    assert out["status"]["groups"]["no_decay"]["weight_decay"] == 0.0
    assert out["errors"] == {
        "empty_push_id": "INVALID_ARGUMENT",
        "unknown_model": "NOT_FOUND",
        "no_token": "UNAUTHENTICATED",
    }


def test_node_client_reads_a_token_file_with_a_trailing_newline(service, node, tmp_path):
    token_file = tmp_path / "token"
    token_file.write_text(auth.ADMIN + "\n")
    result = run_node(
        node, "--list-models", "--address", service.address,
        env=node_env(**{TOKEN_FILE_ENV: str(token_file)}),
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    assert isinstance(json.loads(result.stdout)["models"], list)

    result = run_node(node, "--list-models", "--address", service.address, env=node_env())
    assert result.returncode == 1
    assert "UNAUTHENTICATED" in result.stderr
