"""A trainer's identity comes from its token (pipeline.trainer_identity): the name a push says is
only a suffix, no token can produce another token's identities, and status shows where trainers
connect from to admins only (status.as_seen_by). No Ray, no gRPC."""

from __future__ import annotations

import copy
import itertools

import pytest
import torch

from optserve.common.config import SGDConfig
from optserve.common.errors import InvalidArgument
from optserve.common.results import Status
from optserve.server.coordinator.status import as_seen_by
from optserve.server.edge.tokens import Principal
from optserve.server.shard.pipeline import (
    MAX_IDENTITY_CHARS,
    MAX_TRAINER_CHARS,
    PushCall,
    PushPipeline,
    trainer_identity,
)
from optserve.server.shard.state import GroupInit, ShardState
from tests.unit.test_results import STATUS


def test_the_identity_is_the_token_name_with_the_pushs_name_as_suffix():
    assert trainer_identity("", "alice") == "alice"
    assert trainer_identity("rank-3", "alice") == "alice/rank-3"
    assert trainer_identity("bob", "alice") == "alice/bob"
    assert trainer_identity("rank-3", None) == "rank-3"  # no auth (or an admin): as said
    assert trainer_identity("a/b", "x%y/z") == "x%25y%2Fz/a/b"


def test_no_token_can_produce_another_tokens_identity():
    tokens = ["alice", "alice/x", "alice%2Fx", "bob", "a/b/c", "%", "/", "alice~"]
    suffixes = ["", "x", "alice", "x/y", "bob", "%2F", "/", "b/c"]
    seen: dict[str, str] = {}
    for token, said in itertools.product(tokens, suffixes):
        identity = trainer_identity(said, token)
        assert seen.setdefault(identity, token) == token, (identity, token, seen[identity])


def test_long_names_are_bounded_and_stay_apart():
    long_a, long_b = "t" * 300 + "a", "t" * 300 + "b"
    said = "s" * MAX_TRAINER_CHARS
    a, b = trainer_identity(said, long_a), trainer_identity(said, long_b)
    assert a != b and len(a) == len(b) == MAX_IDENTITY_CHARS
    with pytest.raises(InvalidArgument, match="more than 128 characters"):
        trainer_identity(said + "s", "alice")


class Recorder:
    """A pipeline's observer that keeps the trainers of the pushes that arrived."""

    def __init__(self):
        self.seen: list[str] = []

    def arrived(self, trainer, peer, based_on):
        self.seen.append(trainer)

    def decided(self, trainer, peer, staleness, applied):
        pass

    def waited(self, seconds):
        pass


def test_a_push_with_a_name_too_long_is_refused_before_anything_keeps_it():
    state = ShardState("m", 0, {"default": GroupInit(torch.zeros(2), SGDConfig(lr=0.1))})
    observer = Recorder()
    pipeline = PushPipeline(state, observer)
    with pytest.raises(InvalidArgument):
        pipeline.push(PushCall("p", 0, "x" * (MAX_IDENTITY_CHARS + 1)), lambda b: b)
    assert observer.seen == [] and state.buffers._free == []


def status_with_peers() -> Status:
    raw = copy.deepcopy(STATUS)
    t0 = raw["trainers"]["t0"]
    raw["trainers"] = {
        "trainer/rank-0": {**t0, "peer": "ipv4:10.0.0.7:51234"},
        "ipv6:[::1]:4000": {**t0, "peer": "ipv6:[::1]:4000"},  # an admin's anonymous push
    }
    raw["audit"] = [
        {**raw["audit"][0], "caller": "token 'admin': me (ipv4:10.0.0.9:5)"},
        {**raw["audit"][0], "caller": "ipv6:[::1]:4000"},
        {**raw["audit"][0], "caller": None},
    ]
    return Status.model_validate(raw)


def test_a_trainer_token_sees_names_and_counts_but_not_where_trainers_are():
    status = status_with_peers()
    seen = as_seen_by(status, Principal("trainer", "trainer"))
    assert set(seen.trainers) == {"trainer/rank-0", "anonymous-1"}
    assert all(t.peer == "" and t.pushes == 3 for t in seen.trainers.values())
    assert [e.caller for e in seen.audit] == ["token 'admin': me", "?", None]
    assert "10.0.0" not in seen.model_dump_json() and "::1" not in seen.model_dump_json()


def test_admins_and_servers_without_auth_see_the_peers():
    status = status_with_peers()
    assert as_seen_by(status, Principal("ops", "admin")) == status
    assert as_seen_by(status, None) == status
