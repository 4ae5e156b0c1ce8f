"""ShardState: updates are all-or-nothing and versioned (no Ray, no gRPC)."""

from __future__ import annotations

import pytest
import torch

from optserve.common.config import AdamConfig
from optserve.common.errors import InvalidArgument, ModelRestored
from optserve.server.shard.state import GroupInit, ShardState
from tests.helpers.shard import push


def make_state():
    return ShardState("m", 0, {"default": GroupInit(torch.arange(6.0), AdamConfig(lr=0.1))})


def opt_state(state):
    return state.state_dict()["groups"]["default"]["state"]


def test_push_updates_weights_state_and_version():
    state = make_state()
    version, staleness = push(state, {"default": torch.ones(6)}, based_on=0)
    assert (version, staleness) == (1, 0)
    _, weights = state.snapshot()
    assert torch.allclose(weights["default"], torch.arange(6.0) - 0.1)
    assert opt_state(state)["step"] == 1
    version, staleness = push(state, {"default": torch.ones(6, dtype=torch.bfloat16)}, 0)
    assert (version, staleness) == (2, 1)


@pytest.mark.parametrize(
    "grad, based_on, error, message",
    [
        (torch.tensor([0.0, float("nan"), 0, 0, 0, 0]), 0, InvalidArgument, "NaN"),
        (torch.tensor([0.0, 0, float("inf"), 0, 0, 0]), 0, InvalidArgument, "NaN/Inf"),
        (torch.ones(5), 0, InvalidArgument, "elements"),
        (torch.ones(6), 3, ModelRestored, "version"),  # from the future: a restore went back
    ],
)
def test_refused_push_changes_nothing(grad, based_on, error, message):
    state = make_state()
    push(state, {"default": torch.ones(6)}, 0)
    before_version, before_weights = state.snapshot()
    before_state = opt_state(state)
    with pytest.raises(error, match=message):
        push(state, {"default": grad}, based_on)
    version, weights = state.snapshot()
    after_state = opt_state(state)
    assert version == before_version
    assert torch.equal(weights["default"], before_weights["default"])
    for key in ("exp_avg", "exp_avg_sq"):
        assert torch.equal(after_state[key], before_state[key])
    assert after_state["step"] == before_state["step"]


def test_snapshot_is_a_copy():
    state = make_state()
    _, weights = state.snapshot()
    weights["default"].fill_(42.0)
    assert torch.equal(state.snapshot()[1]["default"], torch.arange(6.0))


def test_state_dict_round_trips_into_a_fresh_shard():
    a = make_state()
    a.set_schedule({"name": "plateau", "rule": "newbob"})
    for value in (1.0, 2.0):
        a.report_metric("val_loss", value)
    push(a, {"default": torch.ones(6)}, 0)
    b = ShardState("m", 0, {"default": GroupInit(torch.zeros(6), AdamConfig(lr=0.5))})
    b.load_state_dict(a.state_dict())
    assert b.version == 1 and b.lr("default") == a.lr("default") == 0.05
    for _ in range(3):
        push(a, {"default": torch.ones(6)}, 1)
        push(b, {"default": torch.ones(6)}, 1)
    assert torch.equal(a.snapshot()[1]["default"], b.snapshot()[1]["default"])


def test_a_failed_update_marks_the_shard_broken_until_a_restore():
    from optserve.common.errors import Unavailable
    from optserve.server.shard.sequencer import Decision

    state = make_state()
    push(state, {"default": torch.ones(6)}, 0)
    saved = state.state_dict()
    state.stage("a", {"default": torch.ones(6)})
    # The leader decided a round of two pushes, but "b" never reached this shard.
    with pytest.raises(Unavailable, match="no longer matches"):
        state.apply(Decision(2, ("a", "b"), (0.5, 0.5), lrs=state.lrs_at(2)))
    assert state.broken and state.info()["broken"]
    for call in (
        lambda: state.stage("c", {"default": torch.ones(6)}),
        lambda: state.read_weights(lambda v, w: v),
        lambda: state.set_schedule(None, at_version=1),
    ):
        with pytest.raises(Unavailable):
            call()
    state.load_state_dict(saved)
    assert state.broken is None and state.version == 1
    assert push(state, {"default": torch.ones(6)}, 1) == (2, 0)


def test_staged_pushes_are_bounded():
    from optserve.common.errors import ResourceExhausted

    state = ShardState("m", 0, {"default": GroupInit(torch.zeros(6), AdamConfig())}, max_staged=2)
    state.stage("a", {"default": torch.ones(6)})
    state.stage("b", {"default": torch.ones(6)})
    with pytest.raises(ResourceExhausted):
        state.stage("c", {"default": torch.ones(6)})
    state.discard("a")
    state.stage("c", {"default": torch.ones(6)})


def test_an_update_decided_before_a_restore_does_not_apply_after_it():
    import threading

    from optserve.common.errors import Aborted
    from optserve.server.shard.sequencer import Decision

    state = make_state()
    saved = state.state_dict()  # version 0
    state.stage("late", {"default": torch.ones(6)})
    box = {}

    def waiter():
        try:
            box["v"] = state.apply(Decision(2, ("late",), (1.0,), lrs=state.lrs_at(2)), timeout=30)
        except Exception as exc:  # noqa: BLE001
            box["error"] = exc

    thread = threading.Thread(target=waiter)
    thread.start()  # waits for version 1
    push(state, {"default": torch.ones(6)}, 0)  # version 1: the waiter goes next
    thread.join()
    assert box.get("v") == 2  # without a restore, it applies in order
    state.load_state_dict(saved)
    epoch, _ = state.stage("stale", {"default": torch.ones(6)})
    state.load_state_dict({**saved, "version": 1})  # a restore after it was staged
    with pytest.raises(Aborted, match="restored"):
        state.apply(Decision(2, ("stale",), (1.0,), lrs=state.lrs_at(2)), timeout=30, epoch=epoch)
    assert state.broken is None
