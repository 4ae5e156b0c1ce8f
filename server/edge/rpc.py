"""Everything the gRPC services share: server construction, health and reflection, error mapping.

Follows the shape of grpc's own examples: `create_server(address) -> (server, port)` is separate
from starting it, port 0 picks a free port (tests), and `stop(grace)` drains in-flight calls.
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Callable, Iterator, Sequence
from concurrent import futures
from dataclasses import dataclass
from typing import Any, TypeVar

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from optserve.common.codec import MAX_MESSAGE_BYTES
from optserve.common.errors import KIND_METADATA, OptserveError, Unavailable, kind_of
from optserve.server.edge.auth import EdgeGuard
from optserve.server.edge.tokens import EdgeConfig

log = logging.getLogger(__name__)

# Options for the channels servers open to each other (shard to leader shard).
CHANNEL_OPTIONS = [
    ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
    ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
]

# Status details travel in HTTP/2 trailers, whose size is limited: keep them readable and small.
MAX_DETAILS_CHARS = 1000

F = TypeVar("F", bound=Callable[..., Any])


@dataclass
class GrpcServer:
    server: grpc.Server
    port: int
    health: health.HealthServicer
    service_names: Sequence[str]
    guard: EdgeGuard | None = None  # its allowances, for tests and metrics

    def start(self) -> None:
        self.server.start()
        for name in ("", *self.service_names):
            self.health.set(name, health_pb2.HealthCheckResponse.SERVING)

    def stop(self, grace_s: float = 5.0) -> None:
        """Report NOT_SERVING, refuse new calls, let in-flight calls finish for `grace_s`."""
        self.health.enter_graceful_shutdown()
        self.server.stop(grace_s).wait()


def create_server(
    address: str,
    services: Sequence[tuple[Callable[[Any, grpc.Server], None], Any, str]],
    max_workers: int = 16,
    max_message_bytes: int = MAX_MESSAGE_BYTES,
    guard: EdgeGuard | None = None,
) -> GrpcServer:
    """Build (not start) a server on `address` ("host:port"; port 0 picks one).

    `services` holds (add_XServicer_to_server, servicer, full service name) triples. Health
    checking (grpc.health.v1) and server reflection are added for all of them. `guard` checks
    every call (tokens, roles, model scopes, what one client may hold) and, when its config has
    a certificate, the port serves TLS only; its config's connection limits apply (defaults
    without one). `max_workers` must exceed what one client may hold here.
    """
    server = grpc.server(
        futures.ThreadPoolExecutor(max_workers=max_workers, thread_name_prefix="optserve-grpc"),
        interceptors=[guard] if guard is not None else None,
        options=[
            ("grpc.max_receive_message_length", max_message_bytes),
            ("grpc.max_send_message_length", max_message_bytes),
            ("grpc.so_reuseport", 0),
            *connection_options(guard.config if guard is not None else EdgeConfig()),
        ],
    )
    names = []
    for add, servicer, name in services:
        add(servicer, server)
        names.append(name)
    health_servicer = health.HealthServicer(experimental_non_blocking=True)
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    reflection.enable_server_reflection(
        [*names, health.SERVICE_NAME, reflection.SERVICE_NAME], server
    )
    try:
        if guard is not None and guard.config.tls:
            port = server.add_secure_port(address, guard.config.server_credentials())
        else:
            port = server.add_insecure_port(address)
    except RuntimeError as exc:  # grpc raises RuntimeError when the bind fails
        raise OSError(f"cannot bind a gRPC server to {address} (is the port in use?)") from exc
    if port == 0:
        raise OSError(f"cannot bind a gRPC server to {address} (is the port in use?)")
    return GrpcServer(server, port, health_servicer, names, guard)


def connection_options(config: EdgeConfig) -> list[tuple[str, int]]:
    """gRPC core's connection limits for a server: it pings a quiet client (and drops one that
    does not answer), closes a connection idle for max_connection_idle_s, and asks a client to
    reconnect after max_connection_age_s (its calls in flight get the grace to end). Clients
    may ping every 10 s without data (more often is a strike; two strikes close the
    connection)."""

    def ms(seconds: float) -> int:
        return min(int(seconds * 1000), 2**31 - 1)

    return [
        ("grpc.keepalive_time_ms", ms(config.keepalive_time_s)),
        ("grpc.keepalive_timeout_ms", ms(config.keepalive_timeout_s)),
        ("grpc.keepalive_permit_without_calls", 1),
        ("grpc.http2.min_recv_ping_interval_without_data_ms", 10_000),
        ("grpc.http2.max_ping_strikes", 2),
        ("grpc.max_connection_idle_ms", ms(config.max_connection_idle_s)),
        ("grpc.max_connection_age_ms", ms(config.max_connection_age_s)),
        ("grpc.max_connection_age_grace_ms", ms(config.max_connection_age_grace_s)),
    ]


def _details(message: str) -> str:
    if len(message) <= MAX_DETAILS_CHARS:
        return message
    return message[: MAX_DETAILS_CHARS - 20] + " ... (truncated)"


# Exceptions that mean "a component is briefly gone, retry" (Ray's dead-actor and timeout
# errors): the rooms that call Ray register them, so that this layer needs no Ray.
_TRANSIENT: list[type[BaseException]] = []


def treat_as_unavailable(*types: type[BaseException]) -> None:
    """Answer these exceptions with UNAVAILABLE (retry later) rather than INTERNAL."""
    _TRANSIENT.extend(t for t in types if t not in _TRANSIENT)


def _abort(context: grpc.ServicerContext, exc: Exception, method: str) -> None:
    if isinstance(exc, tuple(_TRANSIENT)):
        # A shard died or did not answer: the request may be retried once it is back.
        exc = Unavailable(f"a shard actor is unavailable ({type(exc).__name__}); retry later")
    if isinstance(exc, OptserveError):
        kind = kind_of(exc)
        if kind:
            context.set_trailing_metadata(((KIND_METADATA, kind),))
        context.abort(exc.code, _details(exc.message))
    log.exception("unexpected error in %s", method)
    context.abort(
        grpc.StatusCode.INTERNAL, _details(f"internal error in {method}: {type(exc).__name__}")
    )


def unary_errors(method: F) -> F:
    """Turn OptserveError into its status (and anything else into INTERNAL) for unary replies."""

    @functools.wraps(method)
    def wrapper(self: Any, request: Any, context: grpc.ServicerContext) -> Any:
        try:
            return method(self, request, context)
        except Exception as exc:  # noqa: BLE001 - every failure must become a status
            if not context.is_active():
                raise
            _abort(context, exc, method.__qualname__)

    return wrapper  # type: ignore[return-value]


def stream_errors(method: F) -> F:
    """As `unary_errors`, for methods that yield a stream of replies."""

    @functools.wraps(method)
    def wrapper(self: Any, request: Any, context: grpc.ServicerContext) -> Iterator[Any]:
        try:
            yield from method(self, request, context)
        except Exception as exc:  # noqa: BLE001 - every failure must become a status
            if not context.is_active():
                raise
            _abort(context, exc, method.__qualname__)

    return wrapper  # type: ignore[return-value]


WILDCARD_HOSTS = frozenset({"", "0.0.0.0", "::", "[::]"})


def advertised_address(host: str, port: int) -> str:
    """The address clients should dial for a server bound to host:port.

    A wildcard bind is advertised as this Ray node's IP, so trainers elsewhere can reach it.
    """
    if host in WILDCARD_HOSTS:
        import ray

        host = ray.util.get_node_ip_address()
    return format_address(host, port)


def format_address(host: str, port: int) -> str:
    """host:port, with IPv6 literals bracketed."""
    if ":" in host and not host.startswith("["):
        return f"[{host}]:{port}"
    return f"{host}:{port}"
