"""Pure logic around the scale work: a shard's pooled push buffers come back once, whatever
happens to the push; a checkpoint's hold that outlives itself is noticed; checkpoint policies
merge over the server's default and fall due when they should (no Ray, no gRPC)."""

from __future__ import annotations

import time

import pytest
import torch

from optserve.common.config import AdamConfig, AsyncMode, SGDConfig
from optserve.common.errors import InvalidArgument, Unavailable
from optserve.server.coordinator.checkpoints import check_policy, effective_policy, is_due
from optserve.server.shard.memory import BufferPool
from optserve.server.shard.sequencer import Decision, Sequencer
from optserve.server.shard.state import GroupInit, ShardState


def make_state(config=None, max_staged=64):
    return ShardState("m", 0, {"default": GroupInit(torch.zeros(6), config or SGDConfig(lr=0.01))},
                      max_staged=max_staged)  # fmt: skip


def free(state: ShardState) -> int:
    return len(state.buffers._free)


def test_a_push_lands_in_a_pooled_buffer_that_comes_back_after_its_update():
    state = make_state()
    buffers = state.buffers.take()
    buffers["default"].fill_(1.0)
    state.stage("a", {"default": buffers["default"]}, buffers)
    assert free(state) == 0  # held while staged
    state.apply(Decision(1, ("a",), (1.0,), lrs=state.lrs_at(1)))
    assert free(state) == 1 and state.buffers.take() is not None
    assert torch.equal(state.snapshot()[1]["default"], torch.full((6,), -0.01))


def test_another_dtype_is_converted_into_the_pooled_buffer():
    state = make_state()
    buffers = state.buffers.take()
    state.stage("a", {"default": torch.ones(6, dtype=torch.bfloat16)}, buffers)
    assert torch.equal(state._staged["a"]["default"], torch.ones(6))
    assert state._staged["a"]["default"].data_ptr() == buffers["default"].data_ptr()


@pytest.mark.parametrize("how", ["refused", "discarded", "broken", "replayed"])
def test_buffers_come_back_once_whatever_happens_to_the_push(how):
    state = make_state()
    buffers = state.buffers.take()
    if how == "refused":  # NaN: refused by the policy before it is staged
        with pytest.raises(InvalidArgument):
            state.stage("a", {"default": torch.full((6,), float("nan"))}, buffers)
    else:
        state.stage("a", {"default": torch.ones(6)}, buffers)
        if how == "discarded":
            state.discard("a")
        elif how == "broken":
            state.mark_broken("a test")
        else:  # the update is applied, then the same decision arrives again
            state.apply(Decision(1, ("a",), (1.0,), lrs=state.lrs_at(1)))
            state.apply(Decision(1, ("a",), (1.0,), lrs=state.lrs_at(1)))
    assert free(state) == 1
    state.discard("a")  # nothing more to give back
    assert free(state) == 1


def test_a_sync_round_sums_in_a_pooled_buffer_and_returns_every_one():
    state = make_state()
    for push in ("a", "b"):
        buffers = state.buffers.take()
        state.stage(push, {"default": torch.full((6,), 2.0)}, buffers)
    state.apply(Decision(1, ("a", "b"), (0.5, 0.5), lrs=state.lrs_at(1)))
    assert free(state) == 2  # the pool keeps two; the round's sum went back too
    assert torch.equal(state.snapshot()[1]["default"], torch.full((6,), -0.02))


def test_the_pool_keeps_a_few_buffers_only():
    pool = BufferPool({"g": 4}, keep=2)
    taken = [pool.take() for _ in range(3)]
    for buffers in taken:
        pool.give(buffers)
    pool.give(None)
    assert len(pool._free) == 2


def test_a_hold_that_lifted_itself_is_told_on_resume():
    now = [0.0]
    sequencer = Sequencer(1, AsyncMode(), clock=lambda: now[0])
    sequencer.pause("ckpt", max_hold_s=10.0)
    assert sequencer.resume("ckpt") is True
    sequencer.pause("ckpt-2", max_hold_s=10.0)
    now[0] = 11.0  # the writer was too slow: updates went on meanwhile
    assert sequencer.resume("ckpt-2") is False


def test_policies_merge_over_the_default_and_fall_due():
    default = {"every_s": 600.0}
    assert effective_policy({}, default) == {"every_s": 600.0}
    assert effective_policy({"snapshot": "copy"}, default) == {"every_s": 600.0, "snapshot": "copy"}
    off = effective_policy({"enabled": False}, default)
    now = time.time()
    assert not is_due(off, 100, (0, now - 10_000))
    assert is_due(default, 1, (0, now - 601)) and not is_due(default, 1, (0, now - 10))
    assert not is_due(default, 5, (5, now - 10_000))  # nothing moved since the last one
    assert is_due({"every_versions": 3}, 8, (5, now))
    with pytest.raises(InvalidArgument, match="unknown checkpoint policy keys"):
        check_policy({"every_minutes": 1})
    with pytest.raises(InvalidArgument, match="snapshot"):
        check_policy({"snapshot": "fork"})
    with pytest.raises(InvalidArgument, match="positive"):
        check_policy({"every_s": 0})


def test_a_shard_without_its_values_serves_nothing_until_they_arrive():
    state = ShardState("m", 0, {"default": GroupInit(None, AdamConfig(), numel=6)})
    with pytest.raises(Unavailable, match="still receiving"):
        state.stage("a", {"default": torch.ones(6)})
    with pytest.raises(Unavailable):
        state.read_weights(lambda v, w: v)
    state.initialize({"default": torch.arange(6.0)})
    assert state.ready and state.read_weights(lambda v, w: w["default"].tolist()) == list(
        map(float, range(6))
    )
    with pytest.raises(Exception, match="already has its values"):
        state.initialize({"default": torch.arange(6.0)})
