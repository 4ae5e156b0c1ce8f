"""Who may call what: bearer tokens with roles, model scopes, and a per-client stream limit.

Every RPC of the coordinator and of every shard passes `EdgeGuard`, a gRPC server interceptor:

* the caller sends ``authorization: Bearer <token>``; a missing or unknown token gets
  UNAUTHENTICATED; a token whose role does not cover the method gets PERMISSION_DENIED;
* a token may be limited to named models (``fnmatch`` patterns): a call on any other model gets
  PERMISSION_DENIED, and `ListModels` shows only the models it covers;
* each client connection may hold at most `max_streams_per_client` calls at once; one more gets
  RESOURCE_EXHAUSTED (a client cannot starve the server's handler threads);
* health checks (`grpc.health.v1`) are open, so load balancers and Kubernetes probes work;
  `Shard/Sequence` is for a model's own shards and is checked by their shared secret instead.

The server keeps only SHA-256 digests of tokens; the token file may hold either. No Ray, no
torch: the coordinator and shard actors each build one guard from an `EdgeConfig`.
"""

from __future__ import annotations

import contextvars
import logging
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import grpc

from optserve.common.errors import InvalidArgument
from optserve.server.edge.tokens import INTERNAL_METHODS, OPEN_METHODS, EdgeConfig, Principal

_current: contextvars.ContextVar[Principal | None] = contextvars.ContextVar(
    "optserve_principal", default=None
)


def current_principal() -> Principal | None:
    return _current.get()


class _Denied(Exception):
    def __init__(self, code: grpc.StatusCode, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message


def bearer_token(metadata: Any) -> str | None:
    for key, value in metadata or ():
        if key == "authorization":
            value = value.decode() if isinstance(value, bytes) else str(value)
            scheme, _, token = value.partition(" ")
            return token.strip() if scheme.lower() == "bearer" else ""
    return None


@dataclass
class _StreamCounter:
    limit: int
    _lock: threading.Lock = field(default_factory=threading.Lock)
    _active: dict[str, int] = field(default_factory=dict)

    def acquire(self, client: str) -> bool:
        with self._lock:
            held = self._active.get(client, 0)
            if held >= self.limit:
                return False
            self._active[client] = held + 1
            return True

    def release(self, client: str) -> None:
        with self._lock:
            held = self._active.get(client, 0) - 1
            if held > 0:
                self._active[client] = held
            else:
                self._active.pop(client, None)


ModelOf = Callable[[str, Any], str | None]


class EdgeGuard(grpc.ServerInterceptor):
    """The interceptor. `model_of(method, first_request)` names the model a request is about
    (None: not about one model); a shard passes one that always names its own model."""

    def __init__(
        self,
        config: EdgeConfig,
        model_of: ModelOf | None = None,
        model: str | None = None,
        on_error: Callable[[str, grpc.StatusCode], None] | None = None,
    ) -> None:
        """`on_error(method, code)` hears of every call that ends with an error status."""
        self.config = config
        self.on_error = on_error
        if model is not None:  # a shard: every call is about its one model

            def model_of(method: str, request: Any) -> str | None:
                return model

        self.model_of = model_of
        self.peek = model is None  # the coordinator reads the model from the first message
        self._streams = _StreamCounter(config.max_streams_per_client)

    def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], grpc.RpcMethodHandler | None],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler | None:
        handler = continuation(handler_call_details)
        method = handler_call_details.method
        if handler is None or method in OPEN_METHODS:
            return handler
        principal, denial = None, None
        tokens = self.config.tokens
        if tokens is not None and method not in INTERNAL_METHODS:
            token = bearer_token(handler_call_details.invocation_metadata)
            if not token:
                denial = _Denied(
                    grpc.StatusCode.UNAUTHENTICATED,
                    "this server needs a token: send 'authorization: Bearer <token>' "
                    "(ParameterServerClient(token=...), or $OPTSERVE_TOKEN)",
                )
            else:
                principal = tokens.authenticate(token)
                if principal is None:
                    denial = _Denied(grpc.StatusCode.UNAUTHENTICATED, "the token is not valid")
                elif not principal.may_call(method):
                    denial = _Denied(
                        grpc.StatusCode.PERMISSION_DENIED,
                        f"{method.rsplit('/', 1)[-1]} needs an admin token; token "
                        f"{principal.name!r} has the role {principal.role!r}",
                    )
        # A model's shards call their leader once per push in flight over one connection:
        # bounded by the shards' handler threads, not by a per-client allowance.
        streams = None if method in INTERNAL_METHODS else self._streams
        return _guarded(
            handler, method, principal, denial, streams, self.model_of, self.peek, self.on_error
        )


class _Undecodable:
    """A request message that did not parse; the handler answers INVALID_ARGUMENT for it (an
    exception in gRPC's deserializer would reach the client as INTERNAL)."""

    def __init__(self, error: Exception) -> None:
        self.message = f"malformed request message: {type(error).__name__}: {error}"[:500]


def _safe(deserializer: Callable[[bytes], Any] | None) -> Callable[[bytes], Any] | None:
    if deserializer is None:
        return None

    def parse(data: bytes) -> Any:
        try:
            return deserializer(data)
        except Exception as exc:  # noqa: BLE001 - any parse failure is the client's
            return _Undecodable(exc)

    return parse


def _decoded(requests: Iterator[Any]) -> Iterator[Any]:
    for request in requests:
        if isinstance(request, _Undecodable):
            raise InvalidArgument(request.message)
        yield request


def _guarded(
    handler: grpc.RpcMethodHandler,
    method: str,
    principal: Principal | None,
    denial: _Denied | None,
    streams: _StreamCounter | None,
    model_of: ModelOf | None,
    peek: bool,
    on_error: Callable[[str, grpc.StatusCode], None] | None = None,
) -> grpc.RpcMethodHandler:
    """`handler` with its behavior run only if the call is allowed, with the principal set."""
    gate = _Gate(method, principal, denial, streams, model_of, peek, on_error)
    # grpc's handlers are namedtuples (its type stubs describe only the abstract class).
    h: Any = handler
    h = h._replace(request_deserializer=_safe(h.request_deserializer))
    if h.unary_unary is not None:
        return h._replace(unary_unary=gate.unary_in(h.unary_unary))
    if h.unary_stream is not None:
        return h._replace(unary_stream=gate.unary_in_stream_out(h.unary_stream))
    if h.stream_unary is not None:
        return h._replace(stream_unary=gate.stream_in(h.stream_unary, False))
    return h._replace(stream_stream=gate.stream_in(h.stream_stream, True))


@dataclass(frozen=True)
class _Gate:
    """One method's checks for one call's credentials, wrapped around each kind of handler."""

    method: str
    principal: Principal | None
    denial: _Denied | None
    streams: _StreamCounter | None
    model_of: ModelOf | None
    peek: bool
    on_error: Callable[[str, grpc.StatusCode], None] | None

    def admit(self, context: grpc.ServicerContext, first: Any) -> Callable[[], None]:
        """Check the call; return its release (the stream slot it holds)."""
        on_error, streams = self.on_error, self.streams
        if on_error is not None:
            context.add_callback(lambda: _report_error(context, self.method, on_error))
        if self.denial is not None:
            context.abort(self.denial.code, self.denial.message)
        client = context.peer()
        if streams is not None and not streams.acquire(client):
            context.abort(
                grpc.StatusCode.RESOURCE_EXHAUSTED,
                f"this client already has {streams.limit} calls in flight here "
                "(max_streams_per_client); wait for some to finish",
            )
        once = threading.Lock()  # released by the handler or by the end-of-call callback

        def release() -> None:
            if streams is not None and once.acquire(blocking=False):
                streams.release(client)

        if not context.add_callback(release):
            release()
        if isinstance(first, _Undecodable):
            release()
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, first.message)
        self._check_model(context, first, release)
        return release

    def _check_model(
        self, context: grpc.ServicerContext, first: Any, release: Callable[[], None]
    ) -> None:
        if self.principal is None or self.model_of is None:
            return
        model = self.model_of(self.method, first)
        if model is not None and not self.principal.covers(model):
            release()
            context.abort(
                grpc.StatusCode.PERMISSION_DENIED,
                f"token {self.principal.name!r} is not allowed to use model {model!r}",
            )

    def run(self, behavior: Callable[..., Any], request: Any, context: grpc.ServicerContext) -> Any:
        token = _current.set(self.principal)
        try:
            return behavior(request, context)
        finally:
            _current.reset(token)

    def unary_in(self, behavior: Callable[..., Any]) -> Callable[..., Any]:
        def wrapped(request: Any, context: grpc.ServicerContext) -> Any:
            release = self.admit(context, request)
            try:
                return self.run(behavior, request, context)
            finally:
                release()

        return wrapped

    def unary_in_stream_out(self, behavior: Callable[..., Any]) -> Callable[..., Any]:
        def wrapped(request: Any, context: grpc.ServicerContext) -> Iterator[Any]:
            release = self.admit(context, request)
            try:
                yield from _with_principal(self.principal, behavior(request, context))
            finally:
                release()

        return wrapped

    def stream_in(self, behavior: Callable[..., Any], streaming_out: bool) -> Callable[..., Any]:
        def wrapped(requests: Iterator[Any], context: grpc.ServicerContext) -> Any:
            first = None
            if self.peek and self.denial is None and self.principal is not None and self.model_of:
                first = next(requests, None)  # the header names the model
            release = self.admit(context, first)
            replay = _decoded(_prepend(first, requests) if first is not None else requests)
            if not streaming_out:
                try:
                    return self.run(behavior, replay, context)
                finally:
                    release()
            return _release_after(
                _with_principal(self.principal, behavior(replay, context)), release
            )

        return wrapped


def _report_error(
    context: grpc.ServicerContext, method: str, on_error: Callable[[str, grpc.StatusCode], None]
) -> None:
    """At the end of a call: report its status if it is an error."""
    code = context.code()  # type: ignore[attr-defined]  # grpc >= 1.38 has it; the stubs not
    if code is not None and code != grpc.StatusCode.OK:
        try:
            on_error(method, code)
        except Exception:  # noqa: BLE001 - metrics must never break a call
            logging.getLogger(__name__).exception("error metrics hook failed")


def _prepend(first: Any, rest: Iterator[Any]) -> Iterator[Any]:
    yield first
    yield from rest


def _release_after(replies: Iterator[Any], release: Callable[[], None]) -> Iterator[Any]:
    try:
        yield from replies
    finally:
        release()


def _with_principal(principal: Principal | None, replies: Iterator[Any]) -> Iterator[Any]:
    """Iterate a streaming handler with the principal set while its code runs."""
    while True:
        token = _current.set(principal)
        try:
            reply = next(replies)
        except StopIteration:
            return
        finally:
            _current.reset(token)
        yield reply
