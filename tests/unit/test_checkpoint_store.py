"""Checkpoints without Ray: shards write their own files (server/shard/checkpoint.py), the store
keeps manifests (server/store/manifest.py), and restoring shards read just their own ranges back,
onto any number of shards, from this format or the first one, on a local disk or an fsspec URI."""

from __future__ import annotations

import hashlib
import json
import os
import time
import uuid

import pytest
import torch
from safetensors.torch import save

from optserve.common.config import AdamConfig, SGDConfig, optimizer_config_json
from optserve.common.errors import FailedPrecondition, NotFound, Unavailable
from optserve.common.layout import plan_group, split_ranges
from optserve.server.coordinator.checkpoints import restore_plan
from optserve.server.shard.checkpoint import ShardCheckpoints, WriteTarget, host_copy
from optserve.server.shard.state import GroupInit, ShardState
from optserve.server.store.manifest import (
    FORMAT_1,
    MANIFEST,
    Checkpoint,
    Store,
    assemble,
    shard_file_name,
)

NUMEL = {"default": 37, "head": 11}
PARAMS = [{"name": "w", "shape": [37], "dtype": "float32"},
          {"name": "h", "shape": [11], "dtype": "float32"}]  # fmt: skip
GROUPS = [{"name": "default", "params": ["w"]}, {"name": "head", "params": ["h"]}]


def slices(count: int):
    layouts = [plan_group(g, [(g, (n,), torch.float32)]) for g, n in NUMEL.items()]
    return [s.ranges for s in split_ranges(layouts, count)]


def trained_shards(count: int, steps: int = 3, config=None) -> list[ShardState]:
    """A model's shards after `steps` updates of the same gradients."""
    g = torch.Generator().manual_seed(0)
    weights = {name: torch.randn(n, generator=g) for name, n in NUMEL.items()}
    config = config or AdamConfig(lr=0.01)
    shards = []
    for index, ranges in enumerate(slices(count)):
        inits = {name: GroupInit(weights[name][a:b].clone(), config)
                 for name, (a, b) in ranges.items()}  # fmt: skip
        shards.append(ShardState("m", index, inits, {"name": "exponential", "gamma": 0.9}))
    for step in range(steps):
        g = torch.Generator().manual_seed(100 + step)
        grads = {name: torch.randn(n, generator=g) for name, n in NUMEL.items()}
        for shard, ranges in zip(shards, slices(count), strict=True):
            shard.stage(f"p{step}", {n: grads[n][a:b] for n, (a, b) in ranges.items()})
            from optserve.server.shard.sequencer import Decision

            shard.apply(Decision(step + 1, (f"p{step}",), (1.0,), lrs=shard.lrs_at(step + 1)))
    return shards


def whole(shards: list[ShardState]) -> dict[str, object]:
    """Every shard's state joined: tensors concatenated, scalars from shard 0."""
    states = [s.state_dict() for s in shards]
    out: dict[str, object] = {"version": {s["version"] for s in states}}
    for group in NUMEL:
        parts = [s["groups"][group] for s in states]
        out[f"{group}/weights"] = torch.cat([p["weights"] for p in parts])
        for key, value in parts[0]["state"].items():
            if isinstance(value, torch.Tensor):
                out[f"{group}/{key}"] = torch.cat([p["state"][key] for p in parts])
            else:
                out[f"{group}/{key}"] = value
    out["schedule_state"] = states[0]["schedule_state"]
    return out


def take(store: Store, shards: list[ShardState], snapshot="pause", created=None, run="abc"):
    """A checkpoint of `shards` at their version, as the coordinator takes one."""
    created = created or time.time()
    version = shards[0].version
    name = f"{int(created * 1000):013d}-{version:012d}-{run}"
    directory = store.prepare("m", name)
    reports = []
    for shard, ranges in zip(shards, slices(len(shards)), strict=True):
        writer = ShardCheckpoints(shard)
        target = WriteTarget(store.root, directory, shard_file_name(shard.index, len(shards)),
                             name, snapshot, block_bytes=64)  # fmt: skip
        writer.begin(target, version)
        reports.append({**writer.finish(name), "ranges": ranges})
    meta = {"model": "m", "params": PARAMS, "groups": GROUPS,
            "overrides": {g: {} for g in NUMEL}, "optimizer": {"name": "adam"},
            "mode": {"mode": "async"}, "run_id": run, "num_shards": len(shards),
            "created": created, "service": "svc"}  # fmt: skip
    ckpt = assemble(meta, reports)
    store.write_manifest(ckpt)
    return ckpt


def empty_shards(count: int) -> list[ShardState]:
    return [
        ShardState(
            "m",
            i,
            {name: GroupInit(None, SGDConfig(), numel=b - a) for name, (a, b) in ranges.items()},
        )  # fmt: skip
        for i, ranges in enumerate(slices(count))
    ]


def restore(store: Store, ckpt: Checkpoint, count: int) -> list[ShardState]:
    shards = empty_shards(count)
    plan = restore_plan(store, ckpt)
    for shard, ranges in zip(shards, slices(count), strict=True):
        ShardCheckpoints(shard).restore(plan, ranges)
    return shards


def assert_same(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for key, value in a.items():
        if isinstance(value, torch.Tensor):
            assert torch.equal(value, b[key]), key
        else:
            assert value == b[key], key


@pytest.fixture(params=["local", "memory"])
def store(request, tmp_path):
    if request.param == "local":
        return Store(str(tmp_path / "ckpts"))
    return Store(f"memory://optserve-{uuid.uuid4().hex}")


@pytest.mark.parametrize("before, after", [(2, 2), (2, 3), (3, 1), (1, 4), (4, 2), (4, 3)])
def test_restore_onto_any_number_of_shards_is_bit_identical(store, before, after):
    shards = trained_shards(before)
    ckpt = take(store, shards)
    back = store.read("m")
    assert back.version == 3 and back.num_shards == before and len(back.shards) == before
    restored = restore(store, back, after)
    assert_same(whole(shards), whole(restored))
    assert all(s.ready for s in restored)
    # and they go on exactly like the originals (the cut does not matter: element-wise rules)
    assert ckpt.bytes == sum(s.entry.bytes for s in back.shards)


def test_pause_and_copy_snapshots_write_the_same_bytes(tmp_path):
    shards = trained_shards(2)
    paused = take(Store(str(tmp_path / "a")), shards, "pause", created=1_700_000_000.0)
    copied = take(Store(str(tmp_path / "b")), shards, "copy", created=1_700_000_000.0)
    assert [s.entry.sha256 for s in paused.shards] == [s.entry.sha256 for s in copied.shards]
    for shard in paused.shards:  # the manifest's digest is the file's own
        data = (tmp_path / "a" / "m" / paused.name / shard.file).read_bytes()
        assert hashlib.sha256(data).hexdigest() == shard.entry.sha256


def test_a_host_copy_is_handed_back():
    original = {"x": torch.arange(10.0), "y": torch.ones(3, dtype=torch.float64)}
    copies, release = host_copy(original)
    assert all(torch.equal(copies[k], v) for k, v in original.items())
    release()
    assert copies == {}


def test_a_damaged_file_fails_the_restore_and_the_shard_serves_nothing(tmp_path):
    store = Store(str(tmp_path))
    ckpt = take(store, trained_shards(2))
    path = tmp_path / "m" / ckpt.name / ckpt.shards[1].file
    data = bytearray(path.read_bytes())
    data[ckpt.shards[1].entry.tensors["head/state/exp_avg"].offset + 5] ^= 0x04
    path.write_bytes(bytes(data))
    shards = empty_shards(2)
    plan = restore_plan(store, store.read("m"))
    ShardCheckpoints(shards[0]).restore(plan, slices(2)[0])  # its own file is sound
    with pytest.raises(FailedPrecondition, match="checksum"):
        ShardCheckpoints(shards[1]).restore(plan, slices(2)[1])
    assert not shards[1].ready
    with pytest.raises(Unavailable, match="still receiving"):
        shards[1].stage("p", {"default": torch.zeros(19), "head": torch.zeros(5)})
    (tmp_path / "m" / ckpt.name / ckpt.shards[0].file).unlink()
    with pytest.raises(FailedPrecondition, match="cannot be read"):
        ShardCheckpoints(empty_shards(2)[0]).restore(plan, slices(2)[0])


def test_first_format_checkpoints_stay_readable(tmp_path):
    """A checkpoint as version 0.1 wrote it: one whole-model tensors file."""
    shards = trained_shards(2)
    joined = whole(shards)
    tensors = {}
    for group in NUMEL:
        tensors[f"{group}/weights"] = joined[f"{group}/weights"]
        for key in ("exp_avg", "exp_avg_sq"):
            tensors[f"{group}/state/{key}"] = joined[f"{group}/{key}"]
    data = save(tensors)
    created = 1_700_000_000.0
    state = shards[0].state_dict()
    manifest = {
        "format": FORMAT_1, "model": "m", "version": 3, "params": PARAMS, "groups": GROUPS,
        "overrides": {g: {} for g in NUMEL}, "optimizer": {"name": "adam"},
        "group_configs": {g: json.loads(state["groups"][g]["config"]) for g in NUMEL},
        "schedule": json.loads(state["schedule"]), "schedule_state": state["schedule_state"],
        "mode": {"mode": "async"},
        "scalars": {g: {k: v for k, v in state["groups"][g]["state"].items()
                        if not isinstance(v, torch.Tensor)} for g in NUMEL},
        "audit": [], "metrics": [], "created": created, "num_shards": 2, "run_id": "abc",
        "checkpoint_policy": {},
        "files": {"tensors.safetensors": {"bytes": len(data),
                                          "sha256": hashlib.sha256(data).hexdigest()}},
    }  # fmt: skip
    directory = tmp_path / "m" / f"{int(created * 1000):013d}-{3:012d}-abc"
    directory.mkdir(parents=True)
    (directory / "tensors.safetensors").write_bytes(data)
    (directory / MANIFEST).write_text(json.dumps(manifest))
    store = Store(str(tmp_path))
    ckpt = store.read("m")
    assert ckpt.format == FORMAT_1
    assert_same(joined, whole(restore(store, ckpt, 3)))
    data = bytearray(data)
    data[-1] ^= 1
    (directory / "tensors.safetensors").write_bytes(bytes(data))
    with pytest.raises(FailedPrecondition, match="checksum"):
        restore(store, store.read("m"), 2)


def test_unfinished_and_malformed_manifests(store):
    good = take(store, trained_shards(2, steps=1), created=1_700_000_001.0)
    bad = take(store, trained_shards(2, steps=2), created=1_700_000_002.0)
    directory = store.path(f"m/{bad.name}")
    manifest = json.loads(store.fs.cat_file(f"{directory}/{MANIFEST}"))
    store.fs.rm(f"{directory}/{MANIFEST}")  # an unfinished write: no manifest
    assert [c["name"] for c in store.list("m")] == [good.name]

    def refused(change, match):
        body = json.loads(json.dumps(manifest))
        change(body)
        store.fs.pipe_file(f"{directory}/{MANIFEST}", json.dumps(body).encode())
        with pytest.raises(FailedPrecondition, match=match):
            store.read("m", bad.name)
        assert store.read("m").version == 1  # the newest sound one

    refused(lambda b: b.update(format="someone-else/9"), "format")
    refused(lambda b: b.update(model="other"), "holds model")
    refused(lambda b: b.update(version=9), "malformed")  # its name says 2
    refused(lambda b: b["shards"][1]["ranges"].update(default=[20, 37]), "cover")
    refused(lambda b: b["shards"][0]["tensors"].pop("head/state/exp_avg"), "different tensors")
    refused(lambda b: b.update(shards=[]), "no shard files")
    with pytest.raises(NotFound):
        store.read("nobody")
    with pytest.raises(NotFound):
        store.read("m", "0000000000000-000000000000-abc")


def test_assemble_refuses_shards_that_disagree(tmp_path):
    store = Store(str(tmp_path))
    shards = trained_shards(2)
    reports = []
    for shard, ranges in zip(shards, slices(2), strict=True):
        writer = ShardCheckpoints(shard)
        writer.begin(WriteTarget(store.root, "m/x", f"{shard.index}.st", "x"), 3)
        reports.append({**writer.finish("x"), "ranges": ranges})
    meta = {"model": "m", "params": PARAMS, "groups": GROUPS, "overrides": {},
            "optimizer": {}, "mode": {}, "created": 1.0}  # fmt: skip
    with pytest.raises(FailedPrecondition, match="different versions"):
        assemble(meta, [reports[0], {**reports[1], "version": 4}])
    other = {**reports[1], "configs": {**reports[1]["configs"],
                                       "head": optimizer_config_json(SGDConfig())}}  # fmt: skip
    with pytest.raises(FailedPrecondition, match="disagree on configs"):
        assemble(meta, [reports[0], other])
    assert assemble(meta, reports).version == 3


def test_prune_keeps_the_newest_and_clears_abandoned_writes(tmp_path):
    store = Store(str(tmp_path))
    shards = trained_shards(1, steps=1)
    names = [take(store, shards, created=1_700_000_000.0 + i).name for i in range(4)]
    old_partial = store.prepare("m", "1600000000000-000000000009-abc")  # long abandoned
    fresh_partial = store.prepare("m", f"{int(time.time() * 1000):013d}-000000000009-abc")
    removed = store.prune("m", 2)
    assert sorted(removed) == sorted([*names[:2], os.path.basename(old_partial)])
    assert [c["name"] for c in store.list("m")] == names[2:]
    assert store.fs.exists(store.path(fresh_partial))  # may be a write in progress


def test_order_is_by_time_and_runs_and_drops_are_told_apart(tmp_path):
    store = Store(str(tmp_path))
    take(store, trained_shards(1, steps=3), created=1_700_000_001.0)
    take(store, trained_shards(1, steps=1), created=1_700_000_002.0)  # restored, went on
    assert [c["version"] for c in store.list("m")] == [3, 1]
    assert store.read("m").version == 1  # the newest is the new timeline's
    take(store, trained_shards(1, steps=2), created=1_700_000_003.0, run="def")
    assert store.read("m", run="abc").version == 1 and store.read("m").version == 2
    assert store.candidates("m", run="abc") == [c["name"] for c in store.list("m")][1::-1]
    assert not store.dropped_after_last_checkpoint("m")
    store.mark_dropped("m")
    assert store.dropped_after_last_checkpoint("m") and store.models() == ["m"]


def test_the_manifest_is_renamed_only_after_files_and_directory_are_fsynced(tmp_path, monkeypatch):
    """Issue 17: a crash at any point leaves either no manifest or one whose files are on disk."""
    store = Store(str(tmp_path / "ckpts"))
    events: list[tuple[str, str]] = []
    real_fsync, real_mv = os.fsync, store.fs.mv

    def fsync(fd):
        events.append(("fsync", os.readlink(f"/proc/self/fd/{fd}")))
        real_fsync(fd)

    def mv(src, dst, **kwargs):
        events.append(("rename", os.path.basename(dst)))
        real_mv(src, dst, **kwargs)

    monkeypatch.setattr(os, "fsync", fsync)
    monkeypatch.setattr(store.fs, "mv", mv)
    ckpt = take(store, trained_shards(2, steps=1))
    directory = store.path(f"m/{ckpt.name}")
    rename = events.index(("rename", MANIFEST))
    before, after = events[:rename], events[rename + 1 :]
    for shard in ckpt.shards:
        assert ("fsync", f"{directory}/{shard.file}") in before
    assert ("fsync", f"{directory}/{MANIFEST}.tmp") in before
    assert before[-1] == ("fsync", directory)  # the files' entries, just before the rename
    assert after == [("fsync", directory), ("fsync", store.path("m"))]


def test_any_malformed_manifest_gives_way_to_an_older_checkpoint(store):
    good = take(store, trained_shards(1, steps=1), created=1_700_000_001.0)
    bad = take(store, trained_shards(1, steps=2), created=1_700_000_002.0)
    path = f"{store.path(f'm/{bad.name}')}/{MANIFEST}"
    manifest = json.loads(store.fs.cat_file(path))
    for change in (
        lambda b: b["groups"][0]["params"].append("nobody"),  # a KeyError inside
        lambda b: b["params"][0].pop("shape"),
        lambda b: b["shards"][0].update(ranges=None),
        lambda b: b.update(groups=7),
    ):
        body = json.loads(json.dumps(manifest))
        change(body)
        store.fs.pipe_file(path, json.dumps(body).encode())
        with pytest.raises(FailedPrecondition, match="malformed|cover"):
            store.read("m", bad.name)
        assert store.read("m").name == good.name


def test_an_unreadable_drop_mark_still_counts_as_a_drop(tmp_path):
    store = Store(str(tmp_path))
    take(store, trained_shards(1, steps=1), created=time.time() - 10)
    store.mark_dropped("m")
    assert store.dropped_after_last_checkpoint("m")
    assert not store.fs.exists(store.path("m/dropped.json.tmp"))
    store.fs.pipe_file(store.path("m/dropped.json"), b"{half")
    assert store.dropped_after_last_checkpoint("m")
    take(store, trained_shards(1, steps=2))  # created again after the drop, and checkpointed
    store.mark_dropped("m")
    store.fs.pipe_file(store.path("m/dropped.json"), json.dumps({"time": 1.0}).encode())
    assert not store.dropped_after_last_checkpoint("m")


def test_periodic_checkpoint_retries_back_off_exponentially():
    from optserve.server.coordinator.recovery import checkpoint_retry_wait_s

    waits = [checkpoint_retry_wait_s(n) for n in range(1, 9)]
    assert waits == [15, 30, 60, 120, 240, 480, 600, 600]
    assert checkpoint_retry_wait_s(10_000) == 600


def test_checkpoint_faults_have_a_reason():
    import errno

    import ray

    from optserve.common.errors import Aborted
    from optserve.server.coordinator.checkpoints import StoreFull, failure_reason

    assert failure_reason(OSError(errno.ENOSPC, "full")) == "disk_full"
    assert failure_reason(StoreFull("no room")) == "disk_full"
    assert failure_reason(OSError(errno.EIO, "I/O")) == "io"
    assert failure_reason(ray.exceptions.GetTimeoutError("late")) == "timeout"
    assert failure_reason(Aborted("model 'm' was dropped while ...")) == "dropped"
    assert failure_reason(ValueError("x")) == "error"
    wrapped = ray.exceptions.RayTaskError("f", "tb", OSError(errno.ENOSPC, "full"))
    assert failure_reason(wrapped.as_instanceof_cause()) == "disk_full"


def test_missing_or_truncated_files_are_seen_before_any_shard_starts(store):
    ckpt = take(store, trained_shards(2, steps=1))
    store.check_files(ckpt)  # sound
    first, second = (store.path(s.path) for s in ckpt.sources())
    store.fs.pipe_file(second, store.fs.cat_file(second)[:-10])
    with pytest.raises(FailedPrecondition, match="its writer wrote"):
        store.check_files(ckpt)
    store.fs.rm(first)
    with pytest.raises(FailedPrecondition, match="cannot be read"):
        store.check_files(ckpt)
