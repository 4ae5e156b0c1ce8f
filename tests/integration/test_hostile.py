"""The hostile-client suite (issue 17): the attacks of bench/attacks.py, each run with a bounded
number of rounds against a real server on loopback, while a well-behaved trainer goes on.

The attacker, "mallory", and the well-behaved trainer, "alice", hold trainer tokens of their own
in this module's server, whose limits are small enough to reach in a test: 8 pulls in flight
per token, streams cut after 2 s without moving, 40 control calls a second per token. Each case
checks that the server keeps answering (alice's pushes and pulls, an admin's control calls),
that nothing is lost, that what a refusal was due for changed nothing, and that memory stays
bounded (the shard's own counts: pulls and staged bytes held, snapshots taken; and its RSS).

The issue's seventh attack, a full disk under periodic checkpoints, is
tests/integration/test_checkpoint_faults.py (a shard's writes fail with ENOSPC: the retries
back off, no partial directory is left, the fault is counted and training is not held); it is
not repeated here.
"""

from __future__ import annotations

import json
import threading
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import suppress

import pytest
import ray
import torch

from optserve.client import InvalidArgument, NotFound, ParameterServerClient, ResourceExhausted
from optserve.server.edge.tokens import EdgeConfig, TokenTable
from optserve.server.shard.actor import MAX_METRIC_NAMES
from optserve.server.shard.pipeline import MAX_TRAINER_CHARS
from tests.helpers import auth
from tests.helpers.scripts import ROOT, load_script
from tests.integration.test_limits import held, wait_for
from tests.integration.test_security import fingerprint, wait_until_in_round

attacks = load_script("attacks", ROOT / "bench")

ALICE = "hostile-alice-token-0123456789abcdef"
MALLORY = "hostile-mallory-token-0123456789abcd"
MiB = 1 << 20
STREAM_IDLE_S = 2.0
PULLS_PER_TOKEN = 8
BIG_NUMEL = 8 << 20  # 32 MiB of fp32: a copy per pull stream would show in the shard's RSS
SMALL_NUMEL = 1 << 19  # 2 MiB: two chunks, so a push stream that stops after one is unfinished
ADAM = {"name": "adam", "lr": 0.01}
SGD = {"name": "sgd", "lr": 0.1}


@pytest.fixture(scope="module")
def hostile(ray_session):
    """A server with tokens for an admin, alice and mallory, and small limits."""
    from optserve.server.runtime import start_service

    tokens = [("admin", "admin", auth.ADMIN), ("alice", "trainer", ALICE),
              ("mallory", "trainer", MALLORY)]  # fmt: skip
    table = TokenTable.parse(
        json.dumps({"tokens": [{"name": n, "role": r, "token": t} for n, r, t in tokens]})
    )
    edge = EdgeConfig(
        tokens=table, max_pulls_per_client=PULLS_PER_TOKEN, stream_idle_s=STREAM_IDLE_S,
        control_calls_per_s=40.0,
    )  # fmt: skip
    svc = start_service(port=0, name="optserve-hostile-test", edge=edge)
    yield svc
    svc.stop(grace_s=1.0)  # its shard actors too


@pytest.fixture()
def admin(hostile):
    with ParameterServerClient(hostile.address, token=auth.ADMIN, timeout_s=60) as c:
        yield c


@pytest.fixture()
def alice(hostile):
    with ParameterServerClient(hostile.address, token=ALICE, timeout_s=60) as c:
        yield c


def create(service, name, weights, optimizer, **kwargs) -> str:
    with ParameterServerClient(service.address, token=auth.ADMIN) as c:
        c.create_model(name, weights, optimizer, num_shards=1, **kwargs)
    return name


@pytest.fixture(scope="module")
def big_model(hostile):
    """An SGD model of one 32 MiB shard, and its weights (nothing pushes to it)."""
    initial = torch.randn(BIG_NUMEL, generator=torch.Generator().manual_seed(17))
    return create(hostile, "hostile-big", {"w": initial}, SGD), initial


@pytest.fixture(scope="module")
def small_model(hostile):
    """An Adam model of one 2 MiB shard, shared by the attacks that push to it."""
    return create(hostile, "hostile-small", {"w": torch.zeros(SMALL_NUMEL)}, ADAM)


@pytest.fixture()
def fresh_model(hostile, request):
    """A model of this test's own (dropped after it)."""
    name = f"hostile-{request.node.name[5:40].replace('_', '-')}"
    yield name
    with ParameterServerClient(hostile.address, token=auth.ADMIN) as c, suppress(NotFound):
        c.drop_model(name)


def leader(service, model):
    """The actor of a one-shard model's shard (its leader)."""
    (actor,) = ray.get(service.actor.shard_actors.remote(model))
    return actor


def on_shard(actor, fn):
    return ray.get(actor.__ray_call__.remote(fn))


def shard_rss(actor) -> int:
    def rss(_):
        import psutil

        return psutil.Process().memory_info().rss

    return on_shard(actor, rss)


def snapshots(actor) -> tuple[int, int, int]:
    """The shard's pull snapshots: (taken, shared, live)."""

    def count(a):
        return a._service.snapshots.taken, a._service.snapshots.shared, a._service.snapshots.live()

    return on_shard(actor, count)


def launch(attack, target, rounds) -> tuple[threading.Event, Future]:
    """Run `attack` in a thread of its own; set the returned event to stop it early."""
    stop = threading.Event()
    pool = ThreadPoolExecutor(1, thread_name_prefix="attack")
    future = pool.submit(attack, target, stop, rounds)
    pool.shutdown(wait=False)
    return stop, future


class HoldAfter:
    """A Target.started that holds the attack still after its `attempts`-th attempt until
    `go_on` is set: what the attack opened stays open while the test looks at the server."""

    def __init__(self, attempts: int) -> None:
        self.attempts = attempts
        self.seen = 0
        self.holding = threading.Event()
        self.go_on = threading.Event()

    def set(self) -> None:  # the attack calls it after each attempt
        self.seen += 1
        if self.seen == self.attempts:
            self.holding.set()
            self.go_on.wait(60)


def test_a_pull_flood_holds_one_snapshot_and_is_refused_past_its_allowance(
    hostile, big_model, alice
):
    """24 Pull streams opened on fresh connections and never read: the shard admits mallory's
    8, which share one snapshot; her ninth is refused; alice's pull goes through with the right
    weights, and the shard's RSS grows by far less than a copy per stream."""
    model, initial = big_model
    shard = leader(hostile, model)
    # The 2 s cut of streams that stop moving is the slow-loris test's subject: here the flood is
    # held open while the test looks at it.
    on_shard(shard, lambda a: setattr(a._server.guard.limits.watch, "idle_s", 600.0))
    weights, version = alice.pull(model)  # warm: the shard's pool holds a snapshot buffer
    assert version == 0 and torch.equal(weights["w"], initial)
    del weights
    rss_before, (taken, shared, _) = shard_rss(shard), snapshots(shard)
    hold = HoldAfter(24)
    stop, flood = launch(attacks.pull_flood, attacks.Target(hostile.address, model, token=MALLORY,
                                                            started=hold), 24)  # fmt: skip
    try:
        assert hold.holding.wait(60)
        wait_for(lambda: held(shard, "pulls", "mallory") == (PULLS_PER_TOKEN, PULLS_PER_TOKEN),
                 "mallory's pulls held")  # fmt: skip
        with (
            ParameterServerClient(hostile.address, token=MALLORY) as mallory,
            pytest.raises(ResourceExhausted, match="max_pulls_per_client"),
        ):
            mallory.pull(model)
        weights, version = alice.pull(model)
        assert version == 0 and torch.equal(weights["w"], initial)
        del weights
        # One copy for the flood's 8 streams and alice's pull (7 + 1 shared it), still read.
        assert snapshots(shard) == (taken + 1, shared + PULLS_PER_TOKEN, 1)
        grown = shard_rss(shard) - rss_before
        assert grown < 2 * BIG_NUMEL * 4, f"the shard grew {grown / MiB:.0f} MiB"
    finally:
        hold.go_on.set()
        stop.set()
        tally = flood.result(timeout=60)
        on_shard(shard, lambda a: setattr(a._server.guard.limits.watch, "idle_s", STREAM_IDLE_S))
    assert tally == {"attempts": 24, "opened": 24}
    wait_for(lambda: held(shard, "pulls", "mallory") == (0, 0), "the flood's pulls given back")
    wait_for(lambda: snapshots(shard)[2] == 0, "the snapshot handed back")
    weights, version = alice.pull(model)
    assert version == 0 and torch.equal(weights["w"], initial)


def test_slow_loris_pushes_are_cut_and_give_back_what_they_held(hostile, small_model, alice):
    """16 push streams that send their header and one chunk of two, then nothing: each is cut
    once it has waited stream_idle_s on its client, its handler thread and staged slice are
    given back, and nothing of it is applied; alice's pushes, during and after, are."""
    model = small_model
    shard = leader(hostile, model)
    cut = on_shard(shard, lambda a: a._server.guard.limits.watch.cut)
    version = alice.pull(model)[1]
    grad = {"w": torch.full((SMALL_NUMEL,), 0.5)}
    started = threading.Event()
    stop, loris = launch(attacks.slow_loris, attacks.Target(hostile.address, model, token=MALLORY,
                                                            started=started), 16)  # fmt: skip
    try:
        assert started.wait(60)
        assert alice.push(model, grad) == version + 1
        wait_for(lambda: on_shard(shard, lambda a: a._server.guard.limits.watch.cut) >= cut + 16,
                 "every stalled stream cut")  # fmt: skip
    finally:
        stop.set()
        tally = loris.result(timeout=60)
    assert tally == {"attempts": 16, "CANCELLED": 16}
    wait_for(lambda: held(shard, "calls", "mallory") == (0, 0), "the streams' calls given back")
    assert held(shard, "staging", "mallory") == (0, 0)
    assert alice.push(model, grad) == version + 2
    assert alice.pull(model)[1] == version + 2
    mallory = alice.status(model).trainers["mallory"]
    assert (mallory.pushes, mallory.applied, mallory.refused) == (16, 0, 16)  # every one counted


def test_huge_ids_are_refused_and_neither_kept_nor_shown(hostile, small_model, alice):
    """Pushes whose push_id and trainer are 1 MiB each: refused (INVALID_ARGUMENT) before
    anything keeps them, so the model, its status and the shard's memory stay as they were."""
    model = small_model
    shard = leader(hostile, model)
    target = attacks.Target(hostile.address, model, token=MALLORY)

    def attack(rounds):
        stop, huge = launch(attacks.huge_ids, target, rounds)
        tally = huge.result(timeout=120)
        stop.set()
        assert tally == {"attempts": rounds, "INVALID_ARGUMENT": rounds}

    before = fingerprint(hostile, model)
    attack(32)  # the shard's first big messages grow its allocator's arenas, once
    rss_before = shard_rss(shard)
    attack(48)
    assert fingerprint(hostile, model) == before
    status = alice.status(model)
    text = status.model_dump_json()
    assert "x" * (MAX_TRAINER_CHARS + 1) not in text and len(text) < 64 << 10
    # Kept, the 48 pushes' ids alone would be 48 MiB (and as much again for their trainers).
    grown = shard_rss(shard) - rss_before
    assert grown < 16 * MiB, f"the shard grew {grown / MiB:.0f} MiB"
    version = status.version
    assert alice.push(model, {"w": torch.ones(SMALL_NUMEL)}) == version + 1


def test_a_stolen_trainer_name_counts_as_the_thiefs_own(hostile, fresh_model, alice):
    """A sync round of three: mallory pushes under the names "alice" and "admin", then alice
    pushes. Identities come from the tokens ("mallory/alice", "mallory/admin", "alice"), so
    alice's push is not refused as a second "alice": the round closes with all three, and
    status shows each under its own token."""
    mode = {"mode": "sync", "trainers": 3, "round_timeout_s": 120.0}
    model = create(hostile, fresh_model, {"w": torch.zeros(8)}, SGD, mode=mode)
    alice.pull(model)
    thefts = [
        launch(
            attacks.stolen_names,
            attacks.Target(hostile.address, model, token=MALLORY, trainer=name),
            1,
        )
        for name in ("alice", "admin")
    ]
    wait_until_in_round(hostile, model, 2)
    assert alice.push(model, {"w": torch.ones(8)}) == 1
    for stop, theft in thefts:
        assert theft.result(timeout=60) == {"attempts": 1, "OK": 1}
        stop.set()
    trainers = alice.status(model).trainers
    assert set(trainers) == {"alice", "mallory/alice", "mallory/admin"}
    assert all(t.pushes == 1 and t.applied == 1 and t.refused == 0 for t in trainers.values())
    # The round's mean of the three gradients (1, 1e-6, 1e-6), one SGD step of lr 0.1.
    weights, version = alice.pull(model)
    expected = torch.full((8,), -0.1 * (1.0 + 2e-6) / 3)
    assert version == 1 and torch.allclose(weights["w"], expected, rtol=1e-6, atol=0)


def test_a_report_metric_storm_is_rate_limited_and_bounded(
    hostile, small_model, big_model, admin, alice
):
    """800 ReportMetric calls from 8 threads of mallory's, each under a fresh name: past her
    burst (80) she is refused (RESOURCE_EXHAUSTED), past 64 names the model refuses new ones
    (INVALID_ARGUMENT), every report that was accepted is kept, and another model's control
    calls and alice's pushes go through meanwhile."""
    model, (other, _) = small_model, big_model
    names = lambda: {m.name for m in alice.status(model, history=1000).metrics}  # noqa: E731
    known = names()
    started = threading.Event()
    stop, storm = launch(attacks.report_metric_storm,
                         attacks.Target(hostile.address, model, token=MALLORY, started=started),
                         800)  # fmt: skip
    try:
        assert started.wait(60)
        report = admin.set_hyperparameters(other, lr=0.05)
        assert report.optimizer["lr"] == 0.05
        assert admin.status(other).optimizer["lr"] == 0.05
        version = alice.pull(model)[1]
        assert alice.push(model, {"w": torch.ones(SMALL_NUMEL)}) == version + 1
        tally = storm.result(timeout=120)
    finally:
        stop.set()
    assert set(tally) <= {"attempts", "OK", "INVALID_ARGUMENT", "RESOURCE_EXHAUSTED"}
    assert tally["attempts"] == 800 and tally["RESOURCE_EXHAUSTED"] > 0
    # The burst lets at least 80 through: 64 names in all, the rest refused by the model.
    assert tally["OK"] == MAX_METRIC_NAMES - len(known) and tally["INVALID_ARGUMENT"] > 0
    kept = names()
    assert len(kept) == MAX_METRIC_NAMES and len(kept - known) == tally["OK"]
    assert admin.set_hyperparameters(other, lr=0.1).optimizer["lr"] == 0.1


def test_a_finite_overflowing_gradient_is_refused_and_the_model_trains_on(
    hostile, fresh_model, alice
):
    """Pushes of 3e38 in every element (finite, but their squares overflow float32) to an Adam
    model: refused, nothing changes (weights, Adam's state, the version), and alice's next push
    is exactly Adam's first step: the model is not frozen."""
    initial = torch.randn(1024, generator=torch.Generator().manual_seed(6))
    model = create(hostile, fresh_model, {"w": initial}, ADAM)
    before = fingerprint(hostile, model)
    stop, overflow = launch(attacks.overflow_gradient,
                            attacks.Target(hostile.address, model, token=MALLORY), 3)  # fmt: skip
    tally = overflow.result(timeout=60)
    stop.set()
    assert tally == {"attempts": 3, "INVALID_ARGUMENT": 3}
    assert fingerprint(hostile, model) == before
    status = alice.status(model)
    assert status.version == 0
    assert (status.trainers["mallory"].applied, status.trainers["mallory"].refused) == (0, 3)
    grad = torch.linspace(-1.0, 1.0, 1024)
    assert alice.push(model, {"w": grad}) == 1
    oracle = initial.clone().requires_grad_()
    step = torch.optim.Adam([oracle], lr=ADAM["lr"])
    oracle.grad = grad.clone()
    step.step()
    weights, version = alice.pull(model)
    assert version == 1 and torch.allclose(weights["w"], oracle.detach(), rtol=0, atol=1e-6)
    assert not torch.equal(weights["w"], initial)


def test_a_gradient_whose_update_would_overflow_the_state_is_refused_on_copies(
    hostile, fresh_model, alice
):
    """AdaGrad sums squared gradients: one push of 1.5e19 leaves the sum at 2.25e38 (finite,
    applied); a second would make it infinite and freeze the model. Its norm is far beyond
    training, so its update is computed on copies first and refused: weights and state stay as
    they were, the refusal is counted, and a normal push then moves the weights."""
    model = create(hostile, fresh_model, {"w": torch.zeros(4)}, {"name": "adagrad", "lr": 0.1})
    (shard,) = ray.get(hostile.actor.shard_actors.remote(model))
    huge = {"w": torch.tensor([1.5e19, 0.0, 0.0, 0.0])}
    assert alice.push(model, huge) == 1
    before = ray.get(shard.state_dict.remote())["groups"]["default"]
    with pytest.raises(InvalidArgument, match="non-finite values"):
        alice.push(model, huge)
    after = ray.get(shard.state_dict.remote())["groups"]["default"]
    assert torch.equal(after["weights"], before["weights"])
    assert torch.equal(after["state"]["sum"], before["state"]["sum"])
    assert torch.isfinite(after["state"]["sum"]).all()
    counters = alice.status(model).gradient_counters
    assert counters["refused_nonfinite_update"] == 1 and counters["verified"] == 2
    version = alice.pull(model)[1]
    assert alice.push(model, {"w": torch.ones(4)}) == version + 1
    weights = alice.pull(model)[0]["w"]
    assert torch.isfinite(weights).all() and not torch.equal(weights, before["weights"])
