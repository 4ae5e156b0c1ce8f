"""Pulls read one shared snapshot per version and dtype (server/shard/snapshots.py): concurrent
pulls of a version hold one copy, not one each; the copy is a pooled buffer that comes back when
the last reader is done; updates and restores never show through a snapshot (no Ray, no gRPC)."""

from __future__ import annotations

import torch

from optserve.common.config import SGDConfig
from optserve.common.wire import parse_frame
from optserve.server.shard.sequencer import Decision
from optserve.server.shard.service import ShardService
from optserve.server.shard.snapshots import PullSnapshots
from optserve.server.shard.state import GroupInit, ShardState
from optserve.v1 import shard_pb2

BF16 = torch.bfloat16


def make_state() -> ShardState:
    groups = {
        "a": GroupInit(torch.arange(6, dtype=torch.float32), SGDConfig(lr=0.5)),
        "b": GroupInit(torch.full((3,), 2.0), SGDConfig(lr=0.5)),
    }
    return ShardState("m", 0, groups)


def step(state: ShardState) -> None:
    """One applied update with a gradient of ones: every weight moves by -0.5."""
    buffers = state.buffers.take()
    for g in buffers.values():
        g.fill_(1.0)
    push = f"p{state.version}"
    state.stage(push, buffers, buffers)
    state.apply(Decision(state.version + 1, (push,), (1.0,), lrs=state.lrs_at(state.version + 1)))


def values(snapshot) -> dict[str, list[float]]:
    return {name: t.float().tolist() for name, t in snapshot.tensors.items()}


def test_pulls_of_one_version_share_one_pooled_copy_that_goes_back_after_the_last():
    state = make_state()
    snapshots = PullSnapshots(state.buffers)
    readers = [state.pull_snapshot(snapshots, torch.float32) for _ in range(8)]
    assert all(r is readers[0] for r in readers)
    assert (snapshots.taken, snapshots.shared, snapshots.live()) == (1, 7, 1)
    assert values(readers[0]) == {"a": [0, 1, 2, 3, 4, 5], "b": [2, 2, 2]}
    buffer = readers[0].tensors["a"]
    for reader in readers[:-1]:
        snapshots.release(reader)
    assert snapshots.live() == 1 and not state.buffers._free  # one reader left
    snapshots.release(readers[-1])
    assert snapshots.live() == 0 and state.buffers._free[0]["a"] is buffer
    # A lone puller of the next version reuses that buffer: no fresh memory.
    step(state)  # the push takes the pooled buffer and gives it back
    again = state.pull_snapshot(snapshots, torch.float32)
    assert again.version == 1 and snapshots.taken == 2
    assert again.tensors["a"] is buffer
    snapshots.release(again)


def test_an_update_makes_a_new_snapshot_and_leaves_the_old_one_as_it_was():
    state = make_state()
    snapshots = PullSnapshots(state.buffers)
    old = state.pull_snapshot(snapshots, torch.float32)
    step(state)
    new = state.pull_snapshot(snapshots, torch.float32)
    assert new is not old and (old.version, new.version) == (0, 1)
    assert values(old)["b"] == [2, 2, 2] and values(new)["b"] == [1.5, 1.5, 1.5]
    assert snapshots.taken == 2 and snapshots.live() == 2
    snapshots.release(old)
    snapshots.release(new)
    assert snapshots.live() == 0


def test_each_dtype_has_its_own_snapshot():
    state = make_state()
    snapshots = PullSnapshots(state.buffers)
    f32 = [state.pull_snapshot(snapshots, torch.float32) for _ in range(2)]
    bf16 = [state.pull_snapshot(snapshots, BF16) for _ in range(3)]
    assert f32[0] is f32[1] and bf16[0] is bf16[1] is bf16[2] and f32[0] is not bf16[0]
    assert bf16[0].tensors["a"].dtype == BF16 and not bf16[0].pooled
    assert (snapshots.taken, snapshots.live()) == (2, 2)
    for s in f32 + bf16:
        snapshots.release(s)
    assert snapshots.live() == 0 and len(state.buffers._free) == 1  # only fp32's is pooled


def test_a_restore_to_the_same_version_number_takes_a_new_snapshot():
    state = make_state()
    snapshots = PullSnapshots(state.buffers)
    saved = state.state_dict()
    step(state)
    held = state.pull_snapshot(snapshots, torch.float32)  # a slow reader of version 1
    restored = state.state_dict()
    restored["version"] = 1  # another lineage's version 1: the saved weights
    restored["groups"] = saved["groups"]
    state.load_state_dict(restored)
    fresh = state.pull_snapshot(snapshots, torch.float32)
    assert fresh is not held and fresh.version == held.version == 1
    assert values(fresh)["b"] == [2, 2, 2] and values(held)["b"] == [1.5, 1.5, 1.5]
    snapshots.release(held)
    snapshots.release(fresh)


def test_without_sharing_every_pull_copies():
    state = make_state()
    snapshots = PullSnapshots(state.buffers, share=False)
    readers = [state.pull_snapshot(snapshots, torch.float32) for _ in range(3)]
    assert len({id(r) for r in readers}) == 3 and snapshots.taken == 3
    for r in readers:
        snapshots.release(r)


def test_concurrent_pull_streams_of_the_service_send_one_snapshot():
    """Eight Pull streams of the shard service started at once (each past its header, as a
    client that never reads on would leave them): one snapshot, and each sends the weights."""
    state = make_state()
    service = ShardService(state)
    streams = [service.Pull(shard_pb2.PullRequest(model="m"), None) for _ in range(8)]
    headers = [parse_frame(next(s), shard_pb2.PullHeader) for s in streams]
    assert all(h.version == 0 for h in headers)
    assert (service.snapshots.taken, service.snapshots.live()) == (1, 1)
    step(state)  # updates go on meanwhile; the streams still send version 0
    for stream in streams:
        sent = {c.name: torch.frombuffer(bytearray(c.data), dtype=torch.float32).tolist()
                for c in (parse_frame(f, shard_pb2.PullHeader) for f in stream)}  # fmt: skip
        assert sent == {"a": [0, 1, 2, 3, 4, 5], "b": [2, 2, 2]}
    assert service.snapshots.live() == 0 and service.snapshots.taken == 1
