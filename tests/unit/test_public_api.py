"""The public client API is a promise (DESIGN section 8): guard its names."""

from __future__ import annotations

import ast
import inspect
import subprocess
import sys
from pathlib import Path

import optserve.client

ROOT = Path(__file__).resolve().parents[2]


# The public surface of `optserve.client`, pinned: a new export fails this test until someone
# adds it here on purpose (and to DESIGN section 8 or the docs).
PUBLIC = {
    "AMSGradConfig", "Aborted", "AdaBoundConfig", "AdadeltaConfig", "AdagradConfig", "AdamConfig",
    "AdamWConfig", "AlreadyExists", "AsyncMode", "CheckpointInfo", "DeadlineExceeded",
    "FailedPrecondition", "GradientPolicy", "Internal", "InvalidArgument", "LookaheadConfig",
    "MigrationReport", "ModelInfo", "ModelRestored", "NotFound", "OptserveError",
    "ParameterServerClient", "PermissionDenied", "PushRefused", "RAdamConfig", "RMSpropConfig",
    "RangerConfig", "RemoteOptimizer", "ResourceExhausted", "RoundClosed", "SGDConfig",
    "StalePush", "Status", "SyncMode", "Unauthenticated", "Unavailable", "parse_mode_config",
    "parse_optimizer_config", "parse_schedule_config",
}  # fmt: skip
# Public modules of the client package besides its root (the rest are private: `_name`).
PUBLIC_MODULES = {"compare", "plot"}


def test_exported_members_are_pinned():
    assert set(optserve.client.__all__) == PUBLIC
    visible = {name for name in dir(optserve.client) if not name.startswith("_")}
    assert visible - PUBLIC_MODULES == PUBLIC
    client_dir = Path(optserve.client.__file__).parent
    modules = {p.stem for p in client_dir.glob("*.py") if not p.stem.startswith("_")}
    assert modules == PUBLIC_MODULES, "a client module that is not public starts with '_'"


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


def _imports(modules: str) -> list[str]:
    """The optserve and Ray modules a fresh interpreter holds after importing `modules`."""
    code = (
        f"import sys, {modules}; "
        "print('\\n'.join(m for m in sys.modules if m.startswith('optserve') or m == 'ray'))"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    return result.stdout.split()


def test_client_never_imports_server_code():
    loaded = _imports("optserve.client, optserve.client.plot, optserve.client.compare")
    assert not [m for m in loaded if m.startswith("optserve.server") or m == "ray"], loaded


def test_common_imports_neither_side_and_the_edge_no_ray():
    common = ", ".join(
        f"optserve.common.{p.stem}" for p in (ROOT / "common").glob("*.py") if p.stem != "__init__"
    )
    loaded = _imports(common)
    assert not [m for m in loaded if m.startswith(("optserve.server", "optserve.client"))], loaded
    assert "ray" not in loaded
    loaded = _imports("optserve.server.edge.auth, optserve.server.edge.rpc")
    assert "ray" not in loaded, loaded
    assert not [m for m in loaded if m.startswith("optserve.client")], loaded


def test_the_service_never_imports_the_client():
    """Only the CLI's client commands and the demo, which are clients, may use the client."""
    for path in (ROOT / "server").rglob("*.py"):
        room = path.relative_to(ROOT / "server").parts[0]
        if room in ("cli", "demo"):
            continue
        tree = ast.parse(path.read_text())
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom) and node.module:
                assert not node.module.startswith("optserve.client"), f"{path}: {node.module}"
            elif isinstance(node, ast.Import):
                for alias in node.names:
                    assert not alias.name.startswith("optserve.client"), f"{path}: {alias.name}"
