"""A model at the sizes people train: 250M parameters of Adam (2.8 GiB of state) created,
updated, checkpointed and restored onto another number of shards on this machine, with no
tensor byte through the coordinator. bench/scale.py measures the same path's speed and memory."""

from __future__ import annotations

import psutil
import pytest
import torch

pytestmark = pytest.mark.slow

NUMEL = 250_000_000
GiB = 1 << 30


@pytest.fixture()
def enough_memory():
    memory = psutil.virtual_memory()
    # The state twice (old and new shards during the restore), and this process's tensors.
    if memory.total < 16 * GiB or memory.available < 14 * GiB:
        pytest.skip(f"250M parameters need 16 GiB of memory with 14 free; this machine has "
                    f"{memory.total / GiB:.1f} with {memory.available / GiB:.1f} free")  # fmt: skip


def test_250m_parameters_checkpoint_and_restore_onto_three_shards(
    enough_memory, service, client, model_name
):
    generator = torch.Generator().manual_seed(0)
    client.create_model(model_name, {"w": torch.randn(NUMEL, generator=generator)},
                        {"name": "adam", "lr": 1e-3}, num_shards=2)  # fmt: skip
    gradient = {"w": torch.randn(NUMEL, generator=generator)}
    assert client.push(model_name, gradient, wire_dtype=torch.bfloat16) == 1
    del gradient
    before, version = client.pull(model_name)
    done = client.checkpoint(model_name)
    assert done["version"] == version == 1
    assert done["bytes"] >= NUMEL * 12  # weights, exp_avg and exp_avg_sq, every shard's file
    info = client.restore(model_name, done["name"], num_shards=3)
    assert info.version == 1 and len(info.shards) == 3
    after, version = client.pull(model_name)
    assert version == 1 and torch.equal(before["w"], after["w"])
    del before, after
    status = client.status(model_name)
    assert status["audit"][-1]["new"]["read_s"] > 0
    assert [s["groups"]["default"]["state"]["step"] for s in status["shards"]] == [1, 1, 1]
    assert client.push(model_name, {"w": torch.ones(NUMEL)}, wire_dtype=torch.bfloat16) == 2
