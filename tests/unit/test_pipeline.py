"""The push pipeline (stage → decide → apply) of a two-shard model, without gRPC or Ray: shard 0
leads with its own sequencer; shard 1 asks it as over the network."""

from __future__ import annotations

import threading
from concurrent.futures import ThreadPoolExecutor

import pytest
import torch

from optserve.common.config import SGDConfig, parse_mode_config
from optserve.common.errors import InvalidArgument, StalePush, Unavailable
from optserve.server.shard.pipeline import (
    MAX_IDENTITY_CHARS,
    LocalLeader,
    PushCall,
    PushPipeline,
)
from optserve.server.shard.sequencer import Sequencer
from optserve.server.shard.state import GroupInit, ShardState

PLATEAU = {"name": "plateau", "metric": "val_loss"}  # newbob: halve once the metric stalls


class Observer:
    def __init__(self):
        self.decisions: list[tuple[str, bool]] = []

    def arrived(self, trainer, peer, based_on, local_steps=0):
        pass

    def decided(self, trainer, peer, staleness, applied):
        self.decisions.append((trainer, applied))

    def waited(self, seconds):
        pass


class OverTheNetwork:
    """Shard 1's view of the leader: the same sequencer, asked as a remote leader is."""

    remote = True

    def __init__(self, sequencer, fail=0):
        self.sequencer, self.fail, self.asked = sequencer, fail, 0

    def decide(self, shard, push, stats):
        self.asked += 1
        if self.asked <= self.fail:
            raise Unavailable("the leader did not answer")
        return self.sequencer.submit(push.push_id, shard, push.based_on, push.trainer, 30, stats)

    def refuse(self, shard, push, error):
        self.sequencer.refuse(push.push_id, shard, error)


def two_shards(mode=None, schedule=None, fail=0):
    states = [
        ShardState("m", i, {"default": GroupInit(torch.zeros(3), SGDConfig(lr=0.1))}, schedule)
        for i in range(2)
    ]
    sequencer = Sequencer(2, parse_mode_config(mode), lrs=states[0].lrs_at)
    pipes = [PushPipeline(s, Observer(), sleep=lambda _: None) for s in states]
    pipes[0].leader = LocalLeader(sequencer)
    pipes[1].leader = OverTheNetwork(sequencer, fail)
    return states, pipes, sequencer


def gradient(values):
    def receive(buffers):
        buffers["default"].copy_(torch.tensor(values))
        return buffers

    return receive


def push_on_both(pipes, push_id, based_on, grads):
    """Both shards run their part of one push at once, as a trainer's parallel streams do."""
    with ThreadPoolExecutor(2) as pool:
        futures = [
            pool.submit(pipe.push, PushCall(push_id, based_on, "t"), grad)
            for pipe, grad in zip(pipes, grads, strict=True)
        ]
        return [f.result() if f.exception() is None else f.exception() for f in futures]


def weights(state):
    return state.snapshot()[1]["default"]


def test_both_shards_apply_the_leaders_one_decision():
    states, pipes, _ = two_shards()
    results = push_on_both(pipes, "p1", 0, [gradient([1.0, 2, 3]), gradient([4.0, 5, 6])])
    (d0, v0), (d1, v1) = results
    assert d0 == d1 and v0 == v1 == 1 and d0.lrs == {"default": pytest.approx(0.1)}
    assert torch.allclose(weights(states[0]), torch.tensor([-0.1, -0.2, -0.3]))
    assert torch.allclose(weights(states[1]), torch.tensor([-0.4, -0.5, -0.6]))


def test_a_slice_refused_on_one_shard_refuses_the_push_on_every_shard():
    states, pipes, sequencer = two_shards()
    bad = gradient([1.0, float("nan"), 3])
    results = push_on_both(pipes, "p1", 0, [gradient([1.0, 2, 3]), bad])
    assert all(isinstance(r, InvalidArgument) for r in results), results
    assert sequencer.version == 0 and all(s.version == 0 for s in states)
    assert all(torch.equal(weights(s), torch.zeros(3)) for s in states)


def test_a_refusal_has_its_meaning_on_every_shard():
    states, pipes, _ = two_shards({"mode": "async", "max_staleness": 0})
    push_on_both(pipes, "p1", 0, [gradient([1.0, 1, 1])] * 2)
    results = push_on_both(pipes, "p2", 0, [gradient([1.0, 1, 1])] * 2)  # 1 update stale
    assert all(isinstance(r, StalePush) for r in results), results
    assert all(s.version == 1 for s in states)


def test_the_lr_comes_from_the_leaders_schedule_alone():
    states, pipes, _ = two_shards(schedule=PLATEAU)
    grads = [gradient([1.0, 1, 1])] * 2
    push_on_both(pipes, "p1", 0, grads)
    # Only the leader's schedule hears the metrics (no pause, no copy on shard 1).
    assert not states[0].report_metric("val_loss", 1.0)
    assert states[0].report_metric("val_loss", 2.0)  # stalled: newbob halves the lr
    (decision, _), _ = push_on_both(pipes, "p2", 1, grads)
    assert decision.lrs == {"default": pytest.approx(0.05)}
    assert states[1].lr("default") == pytest.approx(0.1)  # its own copy was never asked
    expected = torch.full((3,), -0.1 - 0.05)
    assert all(torch.allclose(weights(s), expected) for s in states)


def test_a_shard_asks_again_when_the_leader_is_briefly_away():
    states, pipes, _ = two_shards(fail=2)
    results = push_on_both(pipes, "p1", 0, [gradient([1.0, 1, 1])] * 2)
    assert [v for _, v in results] == [1, 1]


def test_a_shard_that_loses_the_leaders_answer_marks_itself_broken():
    states, pipes, _ = two_shards(fail=100)
    box = {}

    def leader_side():
        try:
            pipes[0].push(PushCall("p1", 0), gradient([1.0, 1, 1]))
        except Unavailable as exc:
            box["error"] = exc

    leader_push = threading.Thread(target=leader_side)
    leader_push.start()
    with pytest.raises(Unavailable, match="lost its leader"):
        pipes[1].push(PushCall("p1", 0), gradient([1.0, 1, 1]))
    assert states[1].broken is not None
    # The leader never got shard 1's slice: its push waits out its stage timeout, unapplied.
    pipes[0].leader.sequencer.stage_timeout_s = 0.0
    leader_push.join(timeout=30)
    assert "nothing was applied" in str(box["error"]) and states[0].version == 0


def test_a_push_without_an_id_is_refused_on_a_model_of_several_shards():
    _, pipes, _ = two_shards()
    with pytest.raises(InvalidArgument, match="push_id"):
        pipes[0].push(PushCall("", 0), gradient([1.0, 1, 1]))


def test_a_finite_gradient_whose_squares_overflow_is_refused_on_every_shard():
    """3e38 in every element is finite, but Adam's V of it is not: under `reject` the push is
    refused, nothing changes, and the next sound push still moves the weights."""
    states, pipes, sequencer = two_shards()
    results = push_on_both(pipes, "p1", 0, [gradient([1.0, 2, 3]), gradient([3e38] * 3)])
    assert all(isinstance(r, InvalidArgument) for r in results), results
    assert "sum of squares" in str(results[1])
    assert sequencer.version == 0 and all(torch.equal(weights(s), torch.zeros(3)) for s in states)
    push_on_both(pipes, "p2", 0, [gradient([1.0, 1, 1])] * 2)
    assert all(s.version == 1 and weights(s).abs().sum() > 0 for s in states)


def test_push_ids_and_trainer_names_are_bounded():
    states, pipes, _ = two_shards()
    with pytest.raises(InvalidArgument, match="push_id"):
        pipes[0].push(PushCall("x" * 65, 0), gradient([1.0, 1, 1]))
    with pytest.raises(InvalidArgument, match="trainer"):  # what a push says: test_identity.py
        pipes[0].push(PushCall("p", 0, "t" * (MAX_IDENTITY_CHARS + 1)), gradient([1.0, 1, 1]))
    assert all(s.version == 0 for s in states)
    results = push_on_both(pipes, "x" * 64, 0, [gradient([1.0, 1, 1])] * 2)  # at the bounds
    assert all(not isinstance(r, Exception) for r in results), results
