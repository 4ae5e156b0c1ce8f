"""examples/torchrun_train.py under a real torchrun, as the README runs it: trainers from
WORLD_SIZE, names from RANK, and sync updates equal to one process training on all ranks'
batches."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from tests.helpers.scripts import load_script
from tests.integration.test_readme import ADDRESS, blocks

ROOT = Path(__file__).resolve().parents[2]
EXAMPLE = ROOT / "examples" / "torchrun_train.py"


@pytest.mark.slow
def test_torchrun_ranks_are_the_sync_trainers(service, model_name, client, tmp_path):
    steps, batch, world = 6, 16, 2
    out = tmp_path / "weights.pt"
    # The README's command, on the session's server, with a model, a size and an output of
    # this test's own (torchrun as `python -m torch.distributed.run`: the same program).
    (readme,) = [line for _, code in blocks("With your framework") for line in code.splitlines()
                 if line.startswith("torchrun ")]  # fmt: skip
    words = readme.replace(ADDRESS, service.address).split()
    assert words[words.index("--nproc-per-node") + 1] == str(world)
    command = [
        sys.executable, "-m", "torch.distributed.run", *words[1:],
        "--model", model_name, "--steps", str(steps), "--batch", str(batch), "--out", str(out),
    ]  # fmt: skip
    done = subprocess.run(command, capture_output=True, text=True, timeout=300,
                          env={**os.environ, "OMP_NUM_THREADS": "1"}, cwd=ROOT)  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    said = json.loads(done.stdout.strip().splitlines()[-1])
    assert said["trainer"] == "rank-0" and said["version"] == steps

    status = client.status(model_name)
    assert status.mode["trainers"] == world
    assert set(status.trainers) == {"rank-0", "rank-1"}
    assert all(t.pushes == steps for t in status.trainers.values())

    # One process, one torch optimizer, each step on the whole global batch: the same weights.
    example = load_script("torchrun_train", EXAMPLE.parent)
    net = example.make_net()
    parts = [list(example.batches(steps, batch, r, world)) for r in range(world)]
    local = torch.optim.SGD(net.parameters(), lr=0.2, momentum=0.9)
    for step in range(steps):
        x = torch.cat([parts[r][step][0] for r in range(world)])
        y = torch.cat([parts[r][step][1] for r in range(world)])
        local.zero_grad()
        torch.nn.functional.cross_entropy(net(x), y).backward()
        local.step()
    remote = torch.load(out)
    for name, value in net.state_dict().items():
        torch.testing.assert_close(remote[name], value, rtol=1e-5, atol=1e-6)
