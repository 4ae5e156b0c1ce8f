"""One exception tree for everything optserve reports, on both sides of the wire.

Each class carries the gRPC status code it travels as. The server raises these and its gRPC layer
turns them into a status with the message; the client turns any status back into the matching
class, so `except optserve.client.NotFound` works whichever side found the problem.
"""

from __future__ import annotations

from typing import Any

import grpc


class OptserveError(Exception):
    """Base of every error optserve raises on purpose."""

    code: grpc.StatusCode = grpc.StatusCode.UNKNOWN

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message


class InvalidArgument(OptserveError, ValueError):
    """Bad input: wrong shape or dtype, NaN/Inf gradient, invalid config or name."""

    code = grpc.StatusCode.INVALID_ARGUMENT


class NotFound(OptserveError, LookupError):
    """Unknown model."""

    code = grpc.StatusCode.NOT_FOUND


class AlreadyExists(OptserveError):
    """A model of that name exists already."""

    code = grpc.StatusCode.ALREADY_EXISTS


class FailedPrecondition(OptserveError):
    """The request is valid but the model is not in a state to accept it."""

    code = grpc.StatusCode.FAILED_PRECONDITION


class Aborted(OptserveError):
    """The request lost a race (stale version, closed round): pull and try again."""

    code = grpc.StatusCode.ABORTED


class PushRefused(OptserveError):
    """The push was refused and nothing was applied: pull the current weights and go on.

    One meaning, three causes, each keeping its gRPC status code: `StalePush` (older than the
    model's `max_staleness`), `RoundClosed` (its sync round closed without it) and
    `ModelRestored` (the model went back to a checkpoint, or moved on to another launch)."""


class StalePush(PushRefused, FailedPrecondition):
    """The push was computed on a version older than the model's `max_staleness` allows."""


class RoundClosed(PushRefused, Aborted):
    """The sync round this push belonged to closed without it (it came too late)."""


class ModelRestored(PushRefused, Aborted):
    """The model was restored (or its version moved back) since the push's version."""


class ResourceExhausted(OptserveError):
    """A size or count limit was exceeded."""

    code = grpc.StatusCode.RESOURCE_EXHAUSTED


class Unauthenticated(OptserveError):
    code = grpc.StatusCode.UNAUTHENTICATED


class PermissionDenied(OptserveError):
    code = grpc.StatusCode.PERMISSION_DENIED


class Unavailable(OptserveError):
    """The server or a shard cannot be reached (or is shutting down)."""

    code = grpc.StatusCode.UNAVAILABLE


class DeadlineExceeded(OptserveError):
    code = grpc.StatusCode.DEADLINE_EXCEEDED


class Internal(OptserveError):
    """A server-side bug or failure; the message says what broke."""

    code = grpc.StatusCode.INTERNAL


_BY_CODE: dict[grpc.StatusCode, type[OptserveError]] = {
    cls.code: cls
    for cls in (
        InvalidArgument,
        NotFound,
        AlreadyExists,
        FailedPrecondition,
        Aborted,
        ResourceExhausted,
        Unauthenticated,
        PermissionDenied,
        Unavailable,
        DeadlineExceeded,
        Internal,
    )
}


# The errors that say more than their status code. The subclass's name travels beside the
# status (trailing metadata `KIND_METADATA`, or a field between shards), so a client can catch
# what it acts on.
_BY_KIND: dict[str, type[OptserveError]] = {
    cls.__name__: cls for cls in (StalePush, RoundClosed, ModelRestored)
}
KIND_METADATA = "optserve-error-kind"


def kind_of(error: BaseException) -> str:
    """What travels beside the status code to say which error this is ('' for the plain one)."""
    name = type(error).__name__
    return name if _BY_KIND.get(name) is type(error) else ""


def error_for_status(code: grpc.StatusCode, message: str, kind: str = "") -> OptserveError:
    """The exception that stands for a gRPC status (and the kind that came with it)."""
    special = _BY_KIND.get(kind)
    if special is not None and special.code == code:
        return special(message)
    cls = _BY_CODE.get(code)
    if cls is None:
        err = OptserveError(f"{code.name}: {message}")
        err.code = code
        return err
    return cls(message)


def from_rpc_error(error: grpc.RpcError) -> OptserveError:
    """Translate a failed call (a grpc.RpcError that is also a grpc.Call) into our tree."""
    code = error.code() if hasattr(error, "code") else grpc.StatusCode.UNKNOWN
    details = error.details() if hasattr(error, "details") else str(error)
    kind = ""
    if hasattr(error, "trailing_metadata"):
        metadata: Any = error.trailing_metadata() or ()  # (key, value) pairs
        for key, value in metadata:
            if key == KIND_METADATA:
                kind = value.decode() if isinstance(value, bytes) else str(value)
    return error_for_status(code, details or code.name, kind)
