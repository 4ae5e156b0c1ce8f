"""Who may call what: bearer tokens with roles, model scopes, and what one client may hold.

Every RPC of the coordinator and of every shard passes `EdgeGuard`, a gRPC server interceptor:

* the caller sends ``authorization: Bearer <token>``; a missing or unknown token gets
  UNAUTHENTICATED; a token whose role does not cover the method gets PERMISSION_DENIED;
* a token may be limited to named models (``fnmatch`` patterns): a call on any other model gets
  PERMISSION_DENIED, and `ListModels` shows only the models it covers;
* each client (its token, and its address whatever its tokens: never one connection) may hold
  a bounded number of calls, and of pulls, at once, and send control calls at a bounded rate;
  one more gets RESOURCE_EXHAUSTED (server/edge/limits.py), so that a client cannot starve the
  server's handler threads; a stream that stops moving is cancelled (`StreamWatch`);
* health checks (`grpc.health.v1`) are open, so load balancers and Kubernetes probes work;
  `Shard/Sequence` is for a model's own shards: the leader checks each one's own key instead.

The server keeps only SHA-256 digests of tokens; the token file may hold either. No Ray, no
torch: the coordinator and shard actors each build one guard from an `EdgeConfig`.
"""

from __future__ import annotations

import contextvars
import logging
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import grpc

from optserve.common.errors import InvalidArgument
from optserve.server.edge.limits import (
    Allowance,
    Client,
    Hold,
    RateLimit,
    Refused,
    StreamWatch,
    _Watched,
)
from optserve.server.edge.tokens import (
    CONTROL_METHODS,
    INTERNAL_METHODS,
    OPEN_METHODS,
    PULL_METHODS,
    EdgeConfig,
    Principal,
)

_current: contextvars.ContextVar[tuple[Principal | None, Client | None]] = contextvars.ContextVar(
    "optserve_caller", default=(None, None)
)


def current_principal() -> Principal | None:
    return _current.get()[0]


def current_client() -> Client | None:
    """The token and address of the call this thread serves (for allowances the services
    charge themselves, such as staged push bytes)."""
    return _current.get()[1]


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
class Limits:
    """One endpoint's allowances: calls in flight, pulls in flight, the control-call rate, and
    the watch on its streams."""

    calls: Allowance
    pulls: Allowance
    rate: RateLimit
    watch: StreamWatch

    @classmethod
    def of(cls, config: EdgeConfig, coordinator: bool) -> Limits:
        if coordinator:
            calls = Allowance(
                "calls in flight", config.max_coordinator_calls_per_client,
                config.max_coordinator_calls_per_address, "max_coordinator_calls_per_client",
            )  # fmt: skip
        else:
            calls = Allowance(
                "calls in flight", config.max_streams_per_client,
                config.max_streams_per_address, "max_streams_per_client",
            )  # fmt: skip
        pulls = Allowance(
            "pulls in flight", config.max_pulls_per_client, config.max_pulls_per_address,
            "max_pulls_per_client",
        )  # fmt: skip
        rate = RateLimit(config.control_calls_per_s, 2 * config.control_calls_per_s)
        return cls(calls, pulls, rate, StreamWatch(config.stream_idle_s, config.max_stream_io_s))


def staging_allowance(config: EdgeConfig) -> Allowance:
    """Bytes of pushes one client may have staged on one shard."""
    return Allowance(
        "bytes of staged pushes", config.max_staged_bytes_per_client,
        config.max_staged_bytes_per_address, "max_staged_bytes_per_client",
    )  # fmt: skip


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
        self.limits = Limits.of(config, coordinator=model is None)

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
        limits = None if method in INTERNAL_METHODS else self.limits
        return _guarded(
            handler, method, principal, denial, limits, self.model_of, self.peek, self.on_error
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
    limits: Limits | None,
    model_of: ModelOf | None,
    peek: bool,
    on_error: Callable[[str, grpc.StatusCode], None] | None = None,
) -> grpc.RpcMethodHandler:
    """`handler` with its behavior run only if the call is allowed, with the principal set."""
    gate = _Gate(method, principal, denial, limits, model_of, peek, on_error)
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
    limits: Limits | None
    model_of: ModelOf | None
    peek: bool
    on_error: Callable[[str, grpc.StatusCode], None] | None

    def client(self, context: grpc.ServicerContext) -> Client:
        return Client.of(self.principal.name if self.principal else None, context.peer())

    def admit(self, context: grpc.ServicerContext, first: Any) -> Callable[[], None]:
        """Check the call; return its release (the allowances it holds)."""
        on_error, limits = self.on_error, self.limits
        if on_error is not None:
            context.add_callback(lambda: _report_error(context, self.method, on_error))
        if self.denial is not None:
            context.abort(self.denial.code, self.denial.message)
        holds: list[Hold] = []

        def release() -> None:  # by the handler or by the end-of-call callback, once each
            for hold in holds:
                hold.release()

        if not context.add_callback(release):
            release()
        if limits is not None:
            client = self.client(context)
            try:
                if self.method in CONTROL_METHODS:
                    limits.rate.check(client)
                holds.append(limits.calls.acquire(client))
                if self.method in PULL_METHODS:
                    holds.append(limits.pulls.acquire(client))
            except Refused as refused:
                release()
                context.abort(grpc.StatusCode.RESOURCE_EXHAUSTED, refused.message)
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

    def watched(self, context: grpc.ServicerContext) -> _Watched | None:
        """The call under the endpoint's stream watch, until it ends."""
        if self.limits is None:
            return None
        watch = self.limits.watch
        call = watch.watch(context, self.method)
        if not context.add_callback(lambda: watch.forget(call)):
            watch.forget(call)
        return call

    def run(self, behavior: Callable[..., Any], request: Any, context: grpc.ServicerContext) -> Any:
        token = _current.set((self.principal, self.client(context)))
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
            call = self.watched(context)
            release = self.admit(context, request)
            caller = (self.principal, self.client(context))
            try:
                yield from _with_caller(caller, behavior(request, context), call)
            finally:
                release()

        return wrapped

    def stream_in(self, behavior: Callable[..., Any], streaming_out: bool) -> Callable[..., Any]:
        def wrapped(requests: Iterator[Any], context: grpc.ServicerContext) -> Any:
            call = self.watched(context)
            requests = _timed(requests, call)
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
            caller = (self.principal, self.client(context))
            return _release_after(_with_caller(caller, behavior(replay, context), call), release)

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


def _with_caller(
    caller: tuple[Principal | None, Client | None],
    replies: Iterator[Any],
    call: _Watched | None = None,
) -> Iterator[Any]:
    """Iterate a streaming handler with the caller set while its code runs; between a reply
    and the next, the call waits for its client to take the reply (watched)."""
    while True:
        token = _current.set(caller)
        try:
            reply = next(replies)
        except StopIteration:
            return
        finally:
            _current.reset(token)
        if call is not None:
            call.waiting()
        yield reply
        if call is not None:
            call.moved()


def _timed(requests: Iterator[Any], call: _Watched | None) -> Iterator[Any]:
    """The request stream, with each wait for the client's next message watched."""
    if call is None:
        yield from requests
        return
    while True:
        call.waiting()
        try:
            request = next(requests)
        except StopIteration:
            return
        finally:
            call.moved()
        yield request
