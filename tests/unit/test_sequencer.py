"""The leader's ordering of pushes (server/shard/sequencer.py): one decision for every shard."""

from __future__ import annotations

import threading
import time
from concurrent.futures import ThreadPoolExecutor

import pytest

from optserve.common.config import parse_mode_config
from optserve.common.errors import (
    FailedPrecondition,
    InvalidArgument,
    ModelRestored,
    RoundClosed,
    StalePush,
    Unavailable,
)
from optserve.server.shard.sequencer import GradStats, Sequencer


def submit_all(seq, push_id, based_on, trainer="", shards=None):
    """Every shard submits its slice of the push concurrently; return their decisions."""
    shards = range(seq.num_shards) if shards is None else shards
    with ThreadPoolExecutor(len(shards)) as pool:
        futures = [pool.submit(seq.submit, push_id, s, based_on, trainer, 30) for s in shards]
        return [f.result() for f in futures]


def test_async_push_is_decided_once_every_shard_holds_it():
    seq = Sequencer(3, parse_mode_config(None))
    decisions = submit_all(seq, "a", 0)
    assert len({d for d in decisions}) == 1
    (decision,) = set(decisions)
    assert decision.error is None and decision.version == 1 and decision.members == ("a",)
    assert seq.version == 1
    assert [e["pushes"] for e in seq.log()] == [["a"]]


def test_async_versions_follow_decision_order():
    seq = Sequencer(2, parse_mode_config(None))
    for i in range(5):
        (d, _) = submit_all(seq, f"p{i}", i)
        assert d.version == i + 1 and d.staleness == 0
    d, _ = submit_all(seq, "late", 2)
    assert d.version == 6 and d.staleness == 3
    assert [e["version"] for e in seq.log()] == [1, 2, 3, 4, 5, 6]


def test_stale_push_beyond_the_bound_is_refused_for_every_shard():
    seq = Sequencer(2, parse_mode_config({"mode": "async", "max_staleness": 1}))
    submit_all(seq, "a", 0)
    submit_all(seq, "b", 1)
    decisions = submit_all(seq, "stale", 0)  # 2 updates old, bound 1
    assert all(isinstance(d.error, StalePush) for d in decisions)
    assert "pull" in str(decisions[0].error) and seq.version == 2
    ok, _ = submit_all(seq, "fresh", 1)  # 1 update old: allowed
    assert ok.error is None and ok.version == 3


def test_inverse_staleness_scales_the_lr():
    seq = Sequencer(1, parse_mode_config({"mode": "async", "staleness_lr": "inverse"}))
    for i in range(3):
        submit_all(seq, f"p{i}", i)
    (d,) = submit_all(seq, "stale", 0)
    assert d.staleness == 3 and d.lr_scale == pytest.approx(0.25)


def test_a_push_from_the_future_is_told_to_pull():
    seq = Sequencer(1, parse_mode_config(None))  # e.g. after a restore to an older version
    (d,) = submit_all(seq, "x", 5)
    assert isinstance(d.error, ModelRestored) and "pull" in str(d.error) and seq.version == 0


def test_sync_round_combines_one_push_per_trainer():
    seq = Sequencer(2, parse_mode_config({"mode": "sync", "trainers": 3}))
    with ThreadPoolExecutor(3) as pool:
        futures = [pool.submit(submit_all, seq, f"t{i}", 0, f"trainer{i}") for i in range(3)]
        results = [d for f in futures for d in f.result()]
    assert {d.version for d in results} == {1}
    assert {frozenset(d.members) for d in results} == {frozenset({"t0", "t1", "t2"})}
    assert results[0].weights == pytest.approx((1 / 3,) * 3)
    assert seq.version == 1 and len(seq.log()) == 1


def test_sync_round_closes_after_its_timeout_with_the_pushes_it_has():
    seq = Sequencer(1, parse_mode_config({"mode": "sync", "trainers": 3, "round_timeout_s": 0.3}))
    started = time.monotonic()
    with ThreadPoolExecutor(2) as pool:
        futures = [pool.submit(submit_all, seq, f"t{i}", 0, f"trainer{i}") for i in range(2)]
        results = [d for f in futures for d in f.result()]
    assert time.monotonic() - started >= 0.3
    assert {d.version for d in results} == {1} and set(results[0].members) == {"t0", "t1"}
    assert results[0].weights == pytest.approx((0.5, 0.5))
    # The missing trainer pushes late, on version 0: its round closed without it.
    (late,) = submit_all(seq, "t2", 0, "trainer2")
    assert isinstance(late.error, RoundClosed) and seq.version == 1


def test_sync_sum_and_one_push_per_trainer_per_round():
    mode = {"mode": "sync", "trainers": 2, "aggregate": "sum", "round_timeout_s": 5}
    seq = Sequencer(1, parse_mode_config(mode))
    box = {}
    thread = threading.Thread(target=lambda: box.update(a=submit_all(seq, "a", 0, "t")))
    thread.start()
    deadline = time.monotonic() + 5
    while not seq._round and time.monotonic() < deadline:
        time.sleep(0.01)
    (dup,) = submit_all(seq, "a2", 0, "t")  # same trainer, same round
    assert isinstance(dup.error, FailedPrecondition)
    (other,) = submit_all(seq, "b", 0, "u")
    thread.join()
    assert other.version == 1 and other.weights == (1.0, 1.0)


def test_a_push_that_misses_a_shard_is_abandoned_everywhere():
    seq = Sequencer(3, parse_mode_config(None), stage_timeout_s=0.2)
    decisions = submit_all(seq, "partial", 0, shards=[0, 1])  # shard 2 never gets its slice
    assert all(isinstance(d.error, Unavailable) for d in decisions)
    assert "2 of 3" in str(decisions[0].error) and seq.version == 0
    # The slice that arrives late learns the same at once.
    (late,) = submit_all(seq, "partial", 0, shards=[2])
    assert isinstance(late.error, Unavailable)
    ok = submit_all(seq, "next", 0)
    assert ok[0].version == 1


def test_retries_get_the_same_answer_and_mismatched_headers_are_refused():
    seq = Sequencer(2, parse_mode_config(None), stage_timeout_s=5)
    box = {}
    thread = threading.Thread(target=lambda: box.update(first=seq.submit("x", 0, 0, "", 10)))
    thread.start()
    deadline = time.monotonic() + 5
    while "x" not in seq._pending and time.monotonic() < deadline:
        time.sleep(0.01)
    # One push id under two headers: refused on every shard at once, not at the stage timeout.
    mismatched = seq.submit("x", 1, 7, "", 10)
    assert isinstance(mismatched.error, InvalidArgument)
    assert "different headers" in str(mismatched.error)
    thread.join(timeout=2)
    assert box["first"] == mismatched
    retry = threading.Thread(target=lambda: box.update(d=seq.submit("y", 0, 0, "", 10)))
    retry.start()
    seq.submit("y", 1, 0, "", 10)
    retry.join()
    assert box["d"].version == 1
    assert seq.submit("y", 1, 0, "", 10).version == 1  # a late retry gets the same answer
    with pytest.raises(InvalidArgument):
        seq.submit("z", 5, 0, "", 10)


def test_a_refused_slice_refuses_the_push_everywhere_at_once():
    seq = Sequencer(3, parse_mode_config(None), stage_timeout_s=30)
    box = {}
    thread = threading.Thread(target=lambda: box.update(d=seq.submit("x", 0, 0, "", 30)))
    thread.start()
    started = time.monotonic()
    seq.refuse("x", 2, InvalidArgument("gradient has 3 NaN"))
    thread.join()
    assert time.monotonic() - started < 10
    assert isinstance(box["d"].error, InvalidArgument) and "shard 2" in str(box["d"].error)
    assert isinstance(seq.submit("x", 1, 0, "", 1).error, InvalidArgument)
    assert seq.version == 0


def submit_stats(seq, push_id, stats, based_on=0, trainer=""):
    """Every shard submits its slice with its GradStats; return the (shared) decision."""
    with ThreadPoolExecutor(len(stats)) as pool:
        futures = [
            pool.submit(seq.submit, push_id, s, based_on, trainer, 30, st)
            for s, st in enumerate(stats)
        ]
        decisions = {f.result() for f in futures}
    assert len(decisions) == 1
    return decisions.pop()


def test_clip_norm_scales_by_the_global_norm_over_all_shards():
    seq = Sequencer(2, parse_mode_config({"mode": "async", "gradients": {"clip_norm": 1.0}}))
    # Slices of norm 3 and 4: the push's norm is 5, not either shard's own.
    d = submit_stats(seq, "a", [GradStats(9.0), GradStats(16.0)])
    assert d.error is None and d.version == 1
    assert d.weights == pytest.approx((1.0 / (5.0 + 1e-6),))
    small = submit_stats(seq, "b", [GradStats(0.09), GradStats(0.16)], based_on=1)
    assert small.weights == (1.0,)  # clamped at 1, as clip_grad_norm_ does
    assert seq.counters()["clipped"] == 1


def test_max_push_norm_refuses_on_every_shard_and_spends_no_version():
    seq = Sequencer(2, parse_mode_config({"mode": "async", "gradients": {"max_push_norm": 4.0}}))
    d = submit_stats(seq, "a", [GradStats(9.0), GradStats(16.0)])
    assert isinstance(d.error, InvalidArgument) and "max_push_norm" in str(d.error)
    assert seq.version == 0 and seq.counters()["refused_norm"] == 1
    assert submit_stats(seq, "b", [GradStats(4.0), GradStats(4.0)]).version == 1


def test_skip_takes_a_version_with_weight_zero():
    seq = Sequencer(2, parse_mode_config({"mode": "async", "gradients": {"nonfinite": "skip"}}))
    d = submit_stats(seq, "a", [GradStats(1.0), GradStats(0.0, nonfinite=3)])
    assert d.error is None and d.version == 1 and d.weights == (0.0,)
    assert seq.counters()["skipped_nonfinite"] == 1


def test_sync_round_averages_over_the_pushes_not_skipped():
    mode = {"mode": "sync", "trainers": 3, "gradients": {"nonfinite": "skip", "clip_norm": 2.0}}
    seq = Sequencer(1, parse_mode_config(mode))
    stats = {"t0": GradStats(1.0), "t1": GradStats(0.0, nonfinite=1), "t2": GradStats(16.0)}
    with ThreadPoolExecutor(3) as pool:
        futures = [pool.submit(seq.submit, f"p{t}", 0, 0, t, 30, st) for t, st in stats.items()]
        decisions = {f.result() for f in futures}
    (d,) = decisions
    # Two pushes count for the mean; the third (norm 4) is clipped to norm 2.
    assert d.members == ("pt0", "pt1", "pt2") or sorted(d.members) == ["pt0", "pt1", "pt2"]
    by_member = dict(zip(d.members, d.weights, strict=True))
    assert by_member["pt1"] == 0.0
    assert by_member["pt0"] == pytest.approx(0.5)
    assert by_member["pt2"] == pytest.approx(0.5 * 2.0 / (4.0 + 1e-6))


def test_a_gradient_beyond_training_is_decided_with_verify():
    from optserve.server.shard.sequencer import VERIFY_ABOVE_NORM

    seq = Sequencer(2, parse_mode_config(None))
    normal = submit_stats(seq, "a", [GradStats(9.0), GradStats(16.0)])
    assert normal.error is None and not normal.verify
    huge = VERIFY_ABOVE_NORM**2
    d = submit_stats(seq, "b", [GradStats(huge), GradStats(huge)], based_on=1)
    assert d.error is None and d.verify and seq.counters()["verified"] == 1
    # Squares beyond float64 too (a slice's sum of squares is inf): verified, not trusted.
    assert submit_stats(seq, "c", [GradStats(float("inf")), GradStats(0.0)], based_on=2).verify
    # Clipped to a small norm: nothing to verify.
    clip = Sequencer(1, parse_mode_config({"mode": "async", "gradients": {"clip_norm": 1.0}}))
    assert not submit_stats(clip, "d", [GradStats(huge)]).verify


def test_verdicts_refuse_an_update_everywhere_if_one_shard_finds_it_non_finite():
    seq = Sequencer(3, parse_mode_config(None))
    with ThreadPoolExecutor(3) as pool:
        answers = list(pool.map(lambda s: seq.verdict(1, s, s != 1, 30), range(3)))
    assert all(isinstance(a, InvalidArgument) and "non-finite" in str(a) for a in answers)
    assert seq.counters()["refused_nonfinite_update"] == 1
    assert seq.verdict(1, 0, True, 30) is not None  # asked again: the same answer
    with ThreadPoolExecutor(3) as pool:
        assert list(pool.map(lambda s: seq.verdict(2, s, True, 30), range(3))) == [None] * 3
    # A shard that never reports counts as not finite: nobody has applied anything yet.
    assert isinstance(seq.verdict(3, 0, True, 0.05), InvalidArgument)
    assert seq.counters()["refused_nonfinite_update"] == 2
    with pytest.raises(InvalidArgument):
        seq.verdict(4, 7, True, 1)
