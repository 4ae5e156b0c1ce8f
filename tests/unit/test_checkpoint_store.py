"""The checkpoint store (server/checkpoint.py) on a local directory and on an fsspec URI."""

from __future__ import annotations

import json
import uuid

import pytest
import torch

from optserve.client.errors import FailedPrecondition, NotFound
from optserve.server.checkpoint import Checkpoint, Store, gather, split


def make_checkpoint(version=7, model="m", created=None):
    tensors = {
        "default/weights": torch.arange(10.0),
        "default/state/exp_avg": torch.full((10,), 0.5),
    }
    return Checkpoint(
        model=model, version=version,
        params=[{"name": "w", "shape": [2, 5], "dtype": "float32"}],
        groups=[{"name": "default", "params": ["w"]}], overrides={"default": {}},
        optimizer={"name": "adam"}, group_configs={"default": {"name": "adam"}},
        schedule={"name": "constant"}, schedule_state={}, mode={"mode": "async"},
        scalars={"default": {"step": version}}, tensors=tensors,
        audit=[{"version": 1, "action": "set_optimizer"}], metrics=[], num_shards=2,
        created=1_700_000_000.0 + version if created is None else created, run_id="abc",
    )  # fmt: skip


@pytest.fixture(params=["local", "memory"])
def store(request, tmp_path):
    if request.param == "local":
        return Store(str(tmp_path / "ckpts"))
    return Store(f"memory://optserve-{uuid.uuid4().hex}")


def test_write_list_read_round_trip(store):
    ckpt = make_checkpoint()
    name = store.write(ckpt)
    assert [c["name"] for c in store.list("m")] == [name] and store.models() == ["m"]
    back = store.read("m")
    assert back.version == 7 and back.scalars == {"default": {"step": 7}}
    assert back.num_shards == 2 and back.audit == ckpt.audit
    for key, tensor in ckpt.tensors.items():
        assert torch.equal(back.tensors[key], tensor)


def test_prune_keeps_the_newest(store):
    names = [store.write(make_checkpoint(v)) for v in (1, 2, 3, 4)]
    assert store.prune("m", 2) == names[:2]
    assert [c["version"] for c in store.list("m")] == [3, 4]
    assert store.read("m").version == 4


def test_unfinished_and_corrupt_checkpoints(store):
    good = store.write(make_checkpoint(1))
    bad = store.write(make_checkpoint(2))
    directory = f"{store._base}/m/{bad}"
    # an unfinished write: the manifest never made it
    store.fs.rm(f"{directory}/manifest.json")
    assert [c["name"] for c in store.list("m")] == [good]
    # a corrupt one: the checksum catches it
    bad = store.write(make_checkpoint(3))
    path = f"{store._base}/m/{bad}/tensors.safetensors"
    data = bytearray(store.fs.cat_file(path))
    data[-1] ^= 1
    store.fs.pipe_file(path, bytes(data))
    with pytest.raises(FailedPrecondition, match="checksum"):
        store.read("m", bad)
    assert store.read("m").version == 1  # the newest sound one
    manifest_path = f"{store._base}/m/{bad}/manifest.json"
    manifest = json.loads(store.fs.cat_file(manifest_path))
    manifest["format"] = "someone-else/9"
    store.fs.pipe_file(manifest_path, json.dumps(manifest).encode())
    with pytest.raises(FailedPrecondition, match="format"):
        store.read("m", bad)
    assert store.read("m", good).version == 1
    with pytest.raises(NotFound):
        store.read("nobody")


def test_gather_and_split_reshard():
    meta = {k: v for k, v in make_checkpoint().__dict__.items()
            if k not in ("version", "scalars", "schedule_state", "tensors", "schedule",
                         "group_configs")}  # fmt: skip

    def shard(a, b):
        return {"version": 7, "schedule_state": {}, "schedule": '{"name": "constant"}',
                "groups": {"default": {
            "weights": torch.arange(10.0)[a:b], "config": '{"name": "adam"}',
            "state": {"exp_avg": torch.arange(10.0)[a:b] * 2, "step": 7},
        }}}  # fmt: skip

    ckpt = gather(meta, [shard(0, 4), shard(4, 10)])
    assert torch.equal(ckpt.tensors["default/state/exp_avg"], torch.arange(10.0) * 2)
    parts = split(ckpt, [{"default": (0, 3)}, {"default": (3, 7)}, {"default": (7, 10)}])
    assert [p["groups"]["default"]["weights"].tolist() for p in parts] == [
        [0, 1, 2], [3, 4, 5, 6], [7, 8, 9],
    ]  # fmt: skip
    assert parts[1]["groups"]["default"]["state"]["step"] == 7
    with pytest.raises(FailedPrecondition, match="different versions"):
        gather(meta, [shard(0, 4), {**shard(4, 10), "version": 8}])


def test_order_is_by_time_and_runs_and_drops_are_told_apart(store):
    store.write(make_checkpoint(300, created=1_700_000_001.0))
    store.write(make_checkpoint(100, created=1_700_000_002.0))  # restored to 100, went on
    assert [c["version"] for c in store.list("m")] == [300, 100]
    assert store.read("m").version == 100  # the newest is the new timeline's
    other = make_checkpoint(5, created=1_700_000_003.0)
    other.run_id = "def"
    store.write(other)
    assert store.read("m", run="abc").version == 100 and store.read("m").version == 5
    assert not store.dropped_after_last_checkpoint("m")
    store.mark_dropped("m")
    assert store.dropped_after_last_checkpoint("m")
