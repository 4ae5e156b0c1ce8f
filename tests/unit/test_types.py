"""mypy over server/, client/ and common/ is part of the test suite, so CI enforces it.

The design card's folders map onto import paths through setuptools' package-dir (DESIGN §2),
which mypy cannot follow through an editable install; the check runs over a tree of links that
lays the folders out as their import paths.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
PACKAGES = {"server": "server", "client": "client", "common": "common", "v1": "protos/optserve/v1"}


def test_mypy_is_clean(tmp_path):
    mypy = Path(sys.executable).with_name("mypy")
    if not mypy.exists():
        pytest.skip("mypy is not installed (pip install -e '.[test]')")
    tree = tmp_path / "src" / "optserve"
    tree.mkdir(parents=True)
    (tree / "__init__.py").symlink_to(ROOT / "protos" / "optserve" / "__init__.py")
    for name, folder in PACKAGES.items():
        (tree / name).symlink_to(ROOT / folder, target_is_directory=True)
    result = subprocess.run(
        [str(mypy), "--config-file", str(ROOT / "pyproject.toml"),
         "--cache-dir", str(tmp_path / "cache"),
         "-p", "optserve.server", "-p", "optserve.client", "-p", "optserve.common"],
        capture_output=True, text=True, cwd=ROOT,
        env={**os.environ, "MYPYPATH": str(tmp_path / "src")},
    )  # fmt: skip
    assert result.returncode == 0, result.stdout[-8000:] + result.stderr[-2000:]
