"""Errors by meaning: the kind of a refused push survives the trip through a gRPC status."""

from __future__ import annotations

import grpc
import pytest

from optserve.common.errors import (
    KIND_METADATA,
    Aborted,
    FailedPrecondition,
    InvalidArgument,
    ModelRestored,
    PushRefused,
    RoundClosed,
    StalePush,
    error_for_status,
    from_rpc_error,
    kind_of,
)


class FakeCall(grpc.RpcError):
    """A failed call as grpc hands it to the client: code, details, trailing metadata."""

    def __init__(self, code, details, trailing=()):
        self._code, self._details, self._trailing = code, details, trailing

    def code(self):
        return self._code

    def details(self):
        return self._details

    def trailing_metadata(self):
        return self._trailing


@pytest.mark.parametrize(
    ("cls", "base"),
    [(StalePush, FailedPrecondition), (RoundClosed, Aborted), (ModelRestored, Aborted)],
)
def test_a_refused_push_keeps_its_code_and_its_meaning(cls, base):
    error = cls("pull and push again")
    assert isinstance(error, PushRefused) and isinstance(error, base) and error.code == base.code
    assert kind_of(error) == cls.__name__
    back = from_rpc_error(FakeCall(error.code, error.message, ((KIND_METADATA, kind_of(error)),)))
    assert type(back) is cls and back.message == "pull and push again"
    assert type(error_for_status(error.code, "m", kind_of(error))) is cls


def test_plain_errors_travel_without_a_kind():
    assert kind_of(Aborted("x")) == "" and kind_of(InvalidArgument("x")) == ""
    back = from_rpc_error(FakeCall(grpc.StatusCode.ABORTED, "lost a race"))
    assert type(back) is Aborted and not isinstance(back, PushRefused)


def test_a_kind_that_does_not_match_the_code_is_ignored():
    # A kind is trusted only with its own status code: a stray header cannot turn an invalid
    # gradient into "pull and go on".
    back = from_rpc_error(
        FakeCall(grpc.StatusCode.INVALID_ARGUMENT, "NaN", ((KIND_METADATA, "StalePush"),))
    )
    assert type(back) is InvalidArgument
    assert type(error_for_status(grpc.StatusCode.ABORTED, "m", "Unknown")) is Aborted
