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
import fnmatch
import hashlib
import hmac
import json
import logging
import os
import re
import threading
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any, Literal

import grpc

from optserve.common.auth import TOKEN_CHARS
from optserve.common.errors import InvalidArgument

Role = Literal["trainer", "admin"]
ROLES: tuple[Role, ...] = ("trainer", "admin")

# The server's token table, as JSON text or as the path of a JSON file (never a command-line
# argument of the long-running server: those are visible to every user of the machine).
TOKENS_ENV = "OPTSERVE_TOKENS"
TOKENS_FILE_ENV = "OPTSERVE_TOKENS_FILE"
MIN_TOKEN_CHARS = 16
DIGEST = re.compile(r"[0-9a-f]{64}")
DEFAULT_MAX_STREAMS_PER_CLIENT = 64

# Methods a trainer token may call; every other guarded method needs an admin token.
TRAINER_METHODS = frozenset(
    {
        "/optserve.v1.Coordinator/DescribeModel",
        "/optserve.v1.Coordinator/ListModels",
        "/optserve.v1.Coordinator/ReportMetric",
        "/optserve.v1.Coordinator/Status",
        "/optserve.v1.Coordinator/ListCheckpoints",
        "/optserve.v1.Shard/Push",
        "/optserve.v1.Shard/Pull",
        "/optserve.v1.Shard/PushPull",
        # Server reflection only describes the API.
        "/grpc.reflection.v1alpha.ServerReflection/ServerReflectionInfo",
        "/grpc.reflection.v1.ServerReflection/ServerReflectionInfo",
    }
)
OPEN_METHODS = frozenset({"/grpc.health.v1.Health/Check", "/grpc.health.v1.Health/Watch"})
# Authenticated by the model's shard secret (shard_service.SECRET_METADATA), not by a token.
INTERNAL_METHODS = frozenset({"/optserve.v1.Shard/Sequence"})


def token_digest(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


@dataclass(frozen=True)
class Principal:
    """An authenticated caller: the token's name, its role and the models it may touch."""

    name: str
    role: Role
    models: tuple[str, ...] | None = None  # fnmatch patterns; None: every model

    def may_call(self, method: str) -> bool:
        return self.role == "admin" or method in TRAINER_METHODS

    def covers(self, model: str) -> bool:
        return self.models is None or any(fnmatch.fnmatchcase(model, p) for p in self.models)


@dataclass(frozen=True)
class TokenTable:
    """SHA-256 digest of each token -> who it is."""

    principals: Mapping[str, Principal]

    @classmethod
    def parse(cls, text: str, source: str = "token table") -> TokenTable:
        """Read ``{"tokens": [{"name", "role", "token" | "sha256", "models"?}, ...]}``."""
        try:
            data = json.loads(text)
        except ValueError as exc:
            raise InvalidArgument(f"{source} is not valid JSON: {exc}") from None
        entries = data.get("tokens") if isinstance(data, dict) else None
        if not isinstance(entries, list) or not entries:
            raise InvalidArgument(f'{source} must be {{"tokens": [...]}} with at least one token')
        principals: dict[str, Principal] = {}
        names: set[str] = set()
        for i, entry in enumerate(entries):
            where = f"{source}, token {i}"
            if not isinstance(entry, dict):
                raise InvalidArgument(f"{where}: must be a JSON object")
            unknown = set(entry) - {"name", "role", "token", "sha256", "models"}
            if unknown:
                raise InvalidArgument(f"{where}: unknown keys {sorted(unknown)}")
            name, role = entry.get("name"), entry.get("role")
            if not isinstance(name, str) or not name or name in names:
                raise InvalidArgument(f"{where}: needs a unique non-empty 'name'")
            if role not in ROLES:
                raise InvalidArgument(f"{where} ({name}): 'role' must be one of {list(ROLES)}")
            digest = _entry_digest(entry, f"{where} ({name})")
            models = entry.get("models")
            if models is not None and (
                not isinstance(models, list)
                or not models
                or not all(isinstance(m, str) and m for m in models)
            ):
                raise InvalidArgument(f"{where} ({name}): 'models' must be a non-empty list")
            if digest in principals:
                raise InvalidArgument(f"{where} ({name}): the same token appears twice")
            names.add(name)
            principals[digest] = Principal(name, role, tuple(models) if models else None)
        return cls(principals)

    @classmethod
    def from_environment(cls, path: str | None = None) -> TokenTable | None:
        """The table from `path`, else $OPTSERVE_TOKENS_FILE, else $OPTSERVE_TOKENS; None if
        none is set."""
        path = path or os.environ.get(TOKENS_FILE_ENV)
        if path:
            try:
                with open(path, encoding="utf-8") as f:
                    return cls.parse(f.read(), source=path)
            except OSError as exc:
                raise InvalidArgument(f"cannot read the token file {path}: {exc}") from None
        text = os.environ.get(TOKENS_ENV)
        return cls.parse(text, source=f"${TOKENS_ENV}") if text else None

    @classmethod
    def single(cls, token: str, name: str = "admin", role: Role = "admin") -> TokenTable:
        """A table of one token (the embedded demo makes one up for its run)."""
        return cls({token_digest(token): Principal(name, role)})

    def authenticate(self, token: str) -> Principal | None:
        digest = token_digest(token)
        # Compare against every entry in constant time, so timing says nothing about which.
        found = None
        for known, principal in self.principals.items():
            if hmac.compare_digest(known, digest):
                found = principal
        return found


def _entry_digest(entry: Mapping[str, Any], where: str) -> str:
    token, digest = entry.get("token"), entry.get("sha256")
    if (token is None) == (digest is None):
        raise InvalidArgument(f"{where}: give exactly one of 'token' and 'sha256'")
    if token is not None:
        if not isinstance(token, str) or not TOKEN_CHARS.fullmatch(token):
            raise InvalidArgument(f"{where}: a token is printable ASCII without spaces")
        if len(token) < MIN_TOKEN_CHARS:
            raise InvalidArgument(f"{where}: a token needs at least {MIN_TOKEN_CHARS} characters")
        return token_digest(token)
    if not isinstance(digest, str) or not DIGEST.fullmatch(digest.lower()):
        raise InvalidArgument(f"{where}: 'sha256' must be 64 hex digits")
    return digest.lower()


@dataclass(frozen=True)
class EdgeConfig:
    """What every endpoint of one optserve server enforces; passed to the coordinator actor and
    from it to every shard actor (so it holds token digests, never tokens).

    `tokens` None turns authentication off (only when asked for explicitly). `tls_cert` and
    `tls_key` (PEM) turn TLS on; `tls_ca` (PEM) is what shards trust when they call each other
    (default: the certificate itself, for a self-signed one)."""

    tokens: TokenTable | None = None
    tls_cert: bytes | None = None
    tls_key: bytes | None = None
    tls_ca: bytes | None = None
    max_streams_per_client: int = DEFAULT_MAX_STREAMS_PER_CLIENT

    def __post_init__(self) -> None:
        if (self.tls_cert is None) != (self.tls_key is None):
            raise InvalidArgument("TLS needs both a certificate and its key")
        if self.max_streams_per_client < 1:
            raise InvalidArgument("max_streams_per_client must be at least 1")

    @property
    def tls(self) -> bool:
        return self.tls_cert is not None

    def server_credentials(self) -> grpc.ServerCredentials:
        assert self.tls_cert is not None and self.tls_key is not None
        return grpc.ssl_server_credentials([(self.tls_key, self.tls_cert)])

    def peer_channel(self, address: str, options: list[tuple[str, Any]]) -> grpc.Channel:
        """A channel from one of this server's endpoints to another (shard to leader)."""
        if not self.tls:
            return grpc.insecure_channel(address, options=options)
        roots = self.tls_ca or self.tls_cert
        return grpc.secure_channel(address, grpc.ssl_channel_credentials(roots), options=options)


# The principal of the call a handler thread is serving (None when auth is off).
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

    def admit(context: grpc.ServicerContext, first: Any) -> Callable[[], None]:
        """Check the call; return its release (the stream slot it holds)."""
        if on_error is not None:
            context.add_callback(lambda: _report_error(context, method, on_error))
        if denial is not None:
            context.abort(denial.code, denial.message)
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
        if principal is not None and model_of is not None:
            model = model_of(method, first)
            if model is not None and not principal.covers(model):
                release()
                context.abort(
                    grpc.StatusCode.PERMISSION_DENIED,
                    f"token {principal.name!r} is not allowed to use model {model!r}",
                )
        return release

    def run(behavior: Callable[..., Any], request: Any, context: grpc.ServicerContext) -> Any:
        token = _current.set(principal)
        try:
            return behavior(request, context)
        finally:
            _current.reset(token)

    def unary_in(behavior: Callable[..., Any]) -> Callable[..., Any]:
        def wrapped(request: Any, context: grpc.ServicerContext) -> Any:
            release = admit(context, request)
            try:
                return run(behavior, request, context)
            finally:
                release()

        return wrapped

    def unary_in_stream_out(behavior: Callable[..., Any]) -> Callable[..., Any]:
        def wrapped(request: Any, context: grpc.ServicerContext) -> Iterator[Any]:
            release = admit(context, request)
            try:
                yield from _with_principal(principal, behavior(request, context))
            finally:
                release()

        return wrapped

    def stream_in(behavior: Callable[..., Any], streaming_out: bool) -> Callable[..., Any]:
        def wrapped(requests: Iterator[Any], context: grpc.ServicerContext) -> Any:
            first = None
            if denial is None and principal is not None and model_of is not None and peek:
                first = next(requests, None)  # the header names the model
            release = admit(context, first)
            replay = _decoded(_prepend(first, requests) if first is not None else requests)
            if not streaming_out:
                try:
                    return run(behavior, replay, context)
                finally:
                    release()
            return _release_after(_with_principal(principal, behavior(replay, context)), release)

        return wrapped

    handler = handler._replace(request_deserializer=_safe(handler.request_deserializer))
    if handler.unary_unary is not None:
        return handler._replace(unary_unary=unary_in(handler.unary_unary))
    if handler.unary_stream is not None:
        return handler._replace(unary_stream=unary_in_stream_out(handler.unary_stream))
    if handler.stream_unary is not None:
        return handler._replace(stream_unary=stream_in(handler.stream_unary, False))
    return handler._replace(stream_stream=stream_in(handler.stream_stream, True))


def _report_error(
    context: grpc.ServicerContext, method: str, on_error: Callable[[str, grpc.StatusCode], None]
) -> None:
    """At the end of a call: report its status if it is an error."""
    code = context.code()
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
