"""The public client API is a promise (DESIGN section 8): guard its names."""

from __future__ import annotations

import inspect
import subprocess
import sys

import optserve.client


def test_exported_members():
    assert sorted(optserve.client.__all__) == sorted(
        name
        for name in dir(optserve.client)
        if not name.startswith("_")
        and name
        not in {
            "allocator",
            "auth",
            "client",
            "codec",
            "config",
            "demo_trainer",
            "errors",
            "layout",
            "plot",
            "remote_optimizer",
            "wire",
        }
    )
    for name in (
        "ParameterServerClient",
        "RemoteOptimizer",
        "OptserveError",
        "InvalidArgument",
        "NotFound",
    ):
        assert name in optserve.client.__all__


def test_client_methods_and_remote_optimizer_signature():
    for method in (
        "create_model", "describe_model", "list_models", "drop_model", "push", "pull",
        "push_and_pull", "set_optimizer", "set_schedule", "report_metric",
    ):  # fmt: skip
        assert callable(getattr(optserve.client.ParameterServerClient, method))
    params = inspect.signature(optserve.client.RemoteOptimizer.__init__).parameters
    assert list(params)[:2] == ["self", "named_parameters"]
    for keyword in ("address", "model", "optimizer", "schedule", "mode", "trainers", "token"):
        assert params[keyword].kind is inspect.Parameter.KEYWORD_ONLY


def test_client_never_imports_server_code():
    code = (
        "import sys, optserve.client, optserve.client.demo_trainer; "
        "bad = [m for m in sys.modules if m.startswith('optserve.server') or m == 'ray']; "
        "print(bad); sys.exit(1 if bad else 0)"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr
