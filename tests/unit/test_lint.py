"""ruff's lint and format rules are part of the test suite, so CI enforces them."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


def test_ruff_check_is_clean():
    # The virtualenv's ruff (the pinned one) first, then whatever is on PATH.
    venv_ruff = Path(sys.executable).with_name("ruff")
    ruff = str(venv_ruff) if venv_ruff.exists() else shutil.which("ruff")
    if ruff is None:
        pytest.skip("ruff is not installed (pip install -e '.[test]')")
    for command in (["check", "--quiet"], ["format", "--check", "--quiet"]):
        result = subprocess.run(
            [ruff, *command, str(ROOT)], capture_output=True, text=True, cwd=ROOT
        )
        assert result.returncode == 0, f"ruff {' '.join(command)}:\n{result.stdout}{result.stderr}"
