"""Multi-node: a two-node Ray cluster made with ray.cluster_utils, run in its own process."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

HELPER = Path(__file__).resolve().parents[1] / "helpers" / "multinode_sync.py"


@pytest.mark.slow
def test_three_shards_on_two_nodes_sync_mode_matches_adam_on_the_mean(tmp_path):
    out = tmp_path / "result.json"
    proc = subprocess.run(
        [sys.executable, str(HELPER), "--out", str(out), "--workdir", str(tmp_path)],
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    result = json.loads(out.read_text())
    assert len(result["nodes"]) == 2
    assert set(result["shard_nodes"]) == set(result["nodes"])  # spread over both nodes
    assert result["version"] == 30 and result["trainer_versions"] == [30, 30, 30]
    assert result["max_abs_diff"] <= 1e-6
