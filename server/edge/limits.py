"""What one client may hold at once, and how fast it may ask: the edge's allowances.

A client is its token (the principal's name) and its address (the host of `context.peer()`,
without the port): never its connection, so opening more connections buys nothing. Every
allowance caps both keys at once, each with its own limit; with authentication off only the
address counts. Three things are held this way:

* calls in flight on one endpoint (`EdgeGuard`),
* pulls in flight (Pull and PushPull streams: each reads the shard's whole slice),
* bytes of pushes staged on a shard (a full fp32 slice per push, from the moment its
  buffers are filled until the push is decided or discarded).

Control calls (ReportMetric, SetOptimizer, ...) are also rate limited, with a token bucket per
token and per address. And `StreamWatch` cuts a stream that stops moving: one that waits for a
client's next message, or for the client to take a reply, longer than the edge allows.

A refusal is RESOURCE_EXHAUSTED with a message that names the limit. No Ray, no torch.
"""

from __future__ import annotations

import contextlib
import logging
import threading
import time
import urllib.parse
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

log = logging.getLogger(__name__)


def peer_host(peer: str) -> str:
    """The host part of a gRPC peer string: "ipv4:10.0.0.1:5000" -> "10.0.0.1",
    "ipv6:[::1]:5000" (or its %5B-quoted form) -> "::1"; any other kind whole."""
    kind, _, rest = peer.partition(":")
    if kind not in ("ipv4", "ipv6") or not rest:
        return peer
    host = urllib.parse.unquote(rest).rsplit(":", 1)[0]
    return host.strip("[]")


@dataclass(frozen=True)
class Client:
    """Who holds an allowance: a token's name (None with auth off) and an address."""

    token: str | None
    address: str

    @classmethod
    def of(cls, token: str | None, peer: str) -> Client:
        return cls(token, peer_host(peer))

    def describe(self) -> str:
        where = f"address {self.address}"
        return f"token {self.token!r} ({where})" if self.token is not None else where


class Hold:
    """What one call holds of an allowance; `release` gives it back, once."""

    def __init__(self, release: Callable[[], None] | None = None) -> None:
        self._release = release
        self._lock = threading.Lock()

    def release(self) -> None:
        with self._lock:
            release, self._release = self._release, None
        if release is not None:
            release()


class Refused(Exception):
    """An allowance or a rate is used up; `message` says which."""

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message


@dataclass
class Allowance:
    """Units (calls, pulls, bytes) held per token and per address, each under its own cap.

    A client that holds nothing may always take one request's worth, even above the cap (a
    model whose slice is bigger than the byte allowance still takes one push at a time)."""

    what: str  # e.g. "calls in flight", for messages
    per_token: int
    per_address: int
    setting: str  # the EdgeConfig field the per-token cap comes from, for messages
    _lock: threading.Lock = field(default_factory=threading.Lock)
    _held: dict[tuple[str, str], int] = field(default_factory=dict)

    def acquire(self, client: Client, amount: int = 1) -> Hold:
        """Take `amount` units for `client`, or raise `Refused`."""
        keys = [("address", client.address)]
        if client.token is not None:
            keys.insert(0, ("token", client.token))
        with self._lock:
            for key in keys:
                cap = self.per_token if key[0] == "token" else self.per_address
                held = self._held.get(key, 0)
                if held and held + amount > cap:
                    who = f"token {key[1]!r}" if key[0] == "token" else f"address {key[1]}"
                    setting = self.setting if key[0] == "token" else _address_setting(self.setting)
                    raise Refused(
                        f"{who} already holds {held} of its {cap} {self.what} here ({setting}); "
                        "wait for some to finish"
                    )
            for key in keys:
                self._held[key] = self._held.get(key, 0) + amount

        def release() -> None:
            with self._lock:
                for key in keys:
                    left = self._held.get(key, 0) - amount
                    if left > 0:
                        self._held[key] = left
                    else:
                        self._held.pop(key, None)

        return Hold(release)

    def held(self, client: Client) -> tuple[int, int]:
        """(by its token, by its address): for tests and status."""
        with self._lock:
            by_token = self._held.get(("token", client.token or ""), 0) if client.token else 0
            return by_token, self._held.get(("address", client.address), 0)


def _address_setting(setting: str) -> str:
    return setting.replace("_per_client", "_per_address")


class RateLimit:
    """A token bucket per token and per address: `per_s` calls a second on average, `burst` at
    once. Full buckets are forgotten once there are many (they say nothing)."""

    MAX_BUCKETS = 10_000

    def __init__(
        self,
        per_s: float,
        burst: float,
        address_factor: float = 4.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.per_s = per_s
        self.burst = burst
        self.address_factor = address_factor
        self._clock = clock
        self._lock = threading.Lock()
        self._buckets: dict[tuple[str, str], tuple[float, float]] = {}  # key -> (level, at)

    def check(self, client: Client) -> None:
        """Spend one call of `client`'s buckets, or raise `Refused` (spending nothing)."""
        keys = [("address", client.address)]
        if client.token is not None:
            keys.insert(0, ("token", client.token))
        now = self._clock()
        with self._lock:
            levels = []
            for key in keys:
                scale = 1.0 if key[0] == "token" else self.address_factor
                rate, burst = self.per_s * scale, self.burst * scale
                level, at = self._buckets.get(key, (burst, now))
                level = min(burst, level + (now - at) * rate)
                if level < 1.0:
                    who = f"token {key[1]!r}" if key[0] == "token" else f"address {key[1]}"
                    raise Refused(
                        f"{who} sends control calls faster than {rate:g} a second "
                        f"(control_calls_per_s, bursts of {burst:g}); slow down and retry"
                    )
                levels.append((key, level - 1.0))
            for key, level in levels:
                self._buckets[key] = (level, now)
            if len(self._buckets) > self.MAX_BUCKETS:
                self._forget_full(now)

    def _forget_full(self, now: float) -> None:
        for key, (level, at) in list(self._buckets.items()):
            scale = 1.0 if key[0] == "token" else self.address_factor
            if level + (now - at) * self.per_s * scale >= self.burst * scale:
                del self._buckets[key]


class StreamWatch:
    """Cancels streams that stop moving. A call is `watch`ed while it runs; it marks when it
    starts waiting on its client (for the next request message, or for the client to take a
    reply) and when that wait ends. A wait longer than `idle_s`, or waits that add up to more
    than `max_io_s` over the call, cancel the call (the client sees CANCELLED) and free its
    thread. Time the handler spends on its own work (a push waiting for its sync round) is
    not counted. One daemon thread per watch, started with the first call."""

    def __init__(self, idle_s: float, max_io_s: float) -> None:
        self.idle_s = idle_s
        self.max_io_s = max_io_s
        self._lock = threading.Lock()
        self._calls: dict[int, _Watched] = {}
        self._thread: threading.Thread | None = None
        self.cut = 0  # calls cancelled so far (tests, metrics)

    def watch(self, context: Any, method: str) -> _Watched:
        watched = _Watched(context, method)
        with self._lock:
            self._calls[id(watched)] = watched
            if self._thread is None:
                self._thread = threading.Thread(
                    target=self._run, name="optserve-stream-watch", daemon=True
                )
                self._thread.start()
        return watched

    def forget(self, watched: _Watched) -> None:
        with self._lock:
            self._calls.pop(id(watched), None)

    def _run(self) -> None:
        while True:
            time.sleep(max(0.05, min(1.0, self.idle_s / 4, self.max_io_s / 4)))
            now = time.monotonic()
            with self._lock:
                calls = list(self._calls.values())
            for call in calls:
                why = call.overdue(now, self.idle_s, self.max_io_s)
                if why is not None:
                    self.forget(call)
                    self.cut += 1
                    log.warning("cancelling a %s call: %s", call.method.rsplit("/", 1)[-1], why)
                    with contextlib.suppress(Exception):  # the call may have ended meanwhile
                        call.context.cancel()


class _Watched:
    """One call's waits on its client."""

    def __init__(self, context: Any, method: str) -> None:
        self.context = context
        self.method = method
        self._since: float | None = None  # when the current wait began
        self._waited = 0.0  # the earlier waits, added up

    def waiting(self) -> None:
        self._since = time.monotonic()

    def moved(self) -> None:
        since, self._since = self._since, None
        if since is not None:
            self._waited += time.monotonic() - since

    def overdue(self, now: float, idle_s: float, max_io_s: float) -> str | None:
        since = self._since
        if since is None:
            return None
        if now - since > idle_s:
            return f"its client sent or took nothing for {idle_s:g} s (stream_idle_s)"
        if self._waited + (now - since) > max_io_s:
            return f"its stream moved for more than {max_io_s:g} s in all (max_stream_io_s)"
        return None
