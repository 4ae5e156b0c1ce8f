"""The Prometheus endpoint's HTTP side, and the cache that makes a scrape cost the same at any rate.

`serve_metrics` serves one `prometheus_client` registry at http://host:port/metrics, bound where
it is told (the CLI's default is 127.0.0.1), optionally behind a bearer token: a request without
`Authorization: Bearer <token>` is answered 401 and collects nothing. The endpoint keeps only the
token's SHA-256 digest and compares digests in constant time.

`ScrapeCache` holds the last fan-out of a scrape to the shards (one Ray call per shard) for about
a second while the set of shards is unchanged: Prometheus, a curl loop or a hostile client
scraping at any rate costs the shards at most one call each per second, and concurrent scrapes
share one fan-out. A model created or dropped changes the set of shards, so its scrape is fresh.
No Ray here: the fan-out is a function the caller passes.
"""

from __future__ import annotations

import hashlib
import hmac
import ipaddress
import socket
import socketserver
import threading
import time
from collections.abc import Callable, Hashable, Sequence
from typing import Any
from wsgiref.simple_server import WSGIRequestHandler, WSGIServer, make_server

from prometheus_client import CollectorRegistry, make_wsgi_app
from prometheus_client.metrics_core import Metric

# How long one fan-out to the shards answers scrapes (seconds).
SCRAPE_CACHE_S = 1.0


def token_sha256(token: str) -> str:
    """The digest the endpoint keeps of its bearer token (surrounding whitespace ignored, as
    a token file's trailing newline)."""
    return hashlib.sha256(token.strip().encode()).hexdigest()


class ScrapeCache:
    """The last `fan_out(handles)`, reused for `ttl_s` while `handles` name the same actors.

    `clock` is injectable so tests count fan-outs without waiting on time."""

    def __init__(
        self,
        fan_out: Callable[[Sequence[Any]], list[Metric]],
        ttl_s: float = SCRAPE_CACHE_S,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._fan_out = fan_out
        self._ttl_s = ttl_s
        self._clock = clock
        # One fan-out at a time: a scrape that arrives during one waits for it and reuses it.
        self._lock = threading.Lock()
        self._key: tuple[Hashable, ...] | None = None
        self._at = 0.0
        self._families: list[Metric] = []

    def get(self, handles: Sequence[Any]) -> list[Metric]:
        key = tuple(_actor_key(handle) for handle in handles)
        with self._lock:
            if key == self._key and self._clock() - self._at < self._ttl_s:
                return self._families
            families = self._fan_out(handles)
            self._key, self._at, self._families = key, self._clock(), families
            return families


def _actor_key(handle: Any) -> Hashable:
    """What identifies a shard actor across handles (a Ray handle's actor id)."""
    actor_id = getattr(handle, "_actor_id", None)
    return actor_id.hex() if actor_id is not None else id(handle)


def serve_metrics(
    registry: CollectorRegistry, host: str, port: int, token_digest: str | None = None
) -> WSGIServer:
    """Serve `registry` at http://host:port/metrics from a daemon thread (port 0: any free one;
    the bound port is `server.server_address[1]`). With `token_digest` (see `token_sha256`),
    only requests that carry that bearer token are answered."""
    app = make_wsgi_app(registry)
    if token_digest is not None:
        app = _bearer_only(app, token_digest.lower())
    host = host.strip("[]")
    server_class = _Server6 if _is_ipv6(host) else _Server
    server = make_server(host, port, app, server_class, handler_class=_QuietHandler)
    threading.Thread(target=server.serve_forever, name="optserve-metrics", daemon=True).start()
    return server


def _bearer_only(app: Callable, digest: str) -> Callable:
    def guarded(environ: dict, start_response: Callable) -> Any:
        header = environ.get("HTTP_AUTHORIZATION", "")
        scheme, _, presented = header.partition(" ")
        if scheme.lower() == "bearer" and hmac.compare_digest(token_sha256(presented), digest):
            return app(environ, start_response)
        start_response(
            "401 Unauthorized",
            [("Content-Type", "text/plain"), ("WWW-Authenticate", 'Bearer realm="optserve"')],
        )
        return [b"a bearer token is needed (Authorization: Bearer <the metrics token>)\n"]

    return guarded


def _is_ipv6(host: str) -> bool:
    try:
        return ipaddress.ip_address(host).version == 6
    except ValueError:
        return False


class _Server(socketserver.ThreadingMixIn, WSGIServer):
    """One thread per request (a slow scraper holds no other); threads die with the process."""

    daemon_threads = True


class _Server6(_Server):
    address_family = socket.AF_INET6


class _QuietHandler(WSGIRequestHandler):
    # A client that sends its request this slowly is dropped, its thread freed.
    timeout = 10.0

    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 - the base's name
        """No line per scrape on stderr."""
