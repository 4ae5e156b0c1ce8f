"""Hostile clients, each as one function: for bench/hostile.py (in a process of their own, while
a well-behaved trainer measures its step time) and tests/integration/test_hostile.py (bounded).

Every attack runs until `stop` is set or it made `rounds` attempts, and returns what the server
answered: {"attempts": n, "<status code>": count, ...}. They speak raw gRPC where the client
library would refuse to misbehave (never-read pulls, pushes that never end, 4 MiB ids).
"""

from __future__ import annotations

import collections
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import grpc
import torch

from optserve.client import ParameterServerClient
from optserve.client._stubs import CHANNEL_OPTIONS, DataPlane
from optserve.common.wire import chunk_frames, header_frame
from optserve.v1 import shard_pb2


@dataclass
class Target:
    """Where an attacker aims: the coordinator, its token, one model and its one parameter."""

    address: str
    model: str
    param: str = "w"
    token: str | None = None
    trainer: str = ""  # the name the attacker claims (stolen_names: the victim's)
    # Set once the attack is under way (its first attempt made): anything with .set().
    started: Any = None


Tally = collections.Counter


def _metadata(target: Target) -> tuple[tuple[str, str], ...]:
    return (("authorization", f"Bearer {target.token}"),) if target.token else ()


def _shards(target: Target) -> list[tuple[str, str, int]]:
    """(address, group, length of its slice) of each shard of the target model's first group."""
    client = ParameterServerClient(target.address, token=target.token)
    try:
        info = client.describe_model(target.model)
    finally:
        client.close()
    group = info.groups[0].name
    return [(shard.address, group, shard.length(group)) for shard in info.shards]


def _code(exc: grpc.RpcError) -> str:
    code = exc.code() if hasattr(exc, "code") else None
    return code.name if code is not None else type(exc).__name__


def _started(target: Target) -> None:
    if target.started is not None:
        target.started.set()


def _loop(
    target: Target, stop: threading.Event, rounds: int | None, attempt: Callable[[], str]
) -> Tally:
    tally: Tally = collections.Counter()
    while not stop.is_set() and (rounds is None or tally["attempts"] < rounds):
        tally["attempts"] += 1
        tally[attempt()] += 1
        _started(target)
    return tally


def pull_flood(target: Target, stop: threading.Event, rounds: int | None = None) -> Tally:
    """Open Pull streams on fresh connections and never read them (up to `rounds` at once, 256
    by default), reopening those the server ends."""
    address = _shards(target)[0][0]
    held: list[tuple[grpc.Channel, Any]] = []
    limit = rounds or 256

    def attempt() -> str:
        # The oldest stream the server ended (a deadline, a limit) makes room for a new one.
        for i, (channel, call) in enumerate(held):
            if not call.is_active():
                channel.close()
                del held[i]
                break
        if len(held) >= limit:
            time.sleep(0.05)
            return "held"
        channel = grpc.insecure_channel(address, options=CHANNEL_OPTIONS)
        call = DataPlane.open(channel).pull(
            shard_pb2.PullRequest(model=target.model), metadata=_metadata(target)
        )
        held.append((channel, call))
        return "opened"

    try:
        return _loop(target, stop, rounds, attempt)
    finally:
        for channel, call in held:
            call.cancel()
            channel.close()


def slow_loris(target: Target, stop: threading.Event, rounds: int | None = None) -> Tally:
    """Push streams that send their header and one chunk, then nothing, on fresh connections
    (up to `rounds` at once, 64 by default): each holds a handler thread until cut off."""
    address, group, length = _shards(target)[0]
    limit = rounds or 64
    tally: Tally = collections.Counter()
    lock = threading.Lock()

    def one(i: int) -> None:
        def frames():
            header = shard_pb2.PushHeader(model=target.model, push_id=f"loris-{i}-{time.time()}",
                                          version=0, trainer=target.trainer)  # fmt: skip
            yield header_frame(header)
            yield next(iter(chunk_frames(group, torch.zeros(length))))  # its first chunk
            stop.wait()  # ... and never the rest

        with grpc.insecure_channel(address, options=CHANNEL_OPTIONS) as channel:
            try:
                DataPlane.open(channel).push(frames(), metadata=_metadata(target), timeout=3600)
                outcome = "OK"
            except grpc.RpcError as exc:
                outcome = _code(exc)
        with lock:
            tally[outcome] += 1

    threads = [threading.Thread(target=one, args=(i,), daemon=True) for i in range(limit)]
    for t in threads:
        t.start()
    tally["attempts"] = limit
    _started(target)
    stop.wait()
    for t in threads:
        t.join(timeout=10)
    return tally


def huge_ids(target: Target, stop: threading.Event, rounds: int | None = None) -> Tally:
    """Pushes whose push_id and trainer are 1 MiB each (the server keeps both for a while)."""
    address = _shards(target)[0][0]
    channel = grpc.insecure_channel(address, options=CHANNEL_OPTIONS)
    push = DataPlane.open(channel).push
    big = "x" * (1 << 20)

    def attempt() -> str:
        header = shard_pb2.PushHeader(model=target.model, push_id=big + str(time.time()),
                                      version=0, trainer=big)  # fmt: skip
        try:
            push(iter([header_frame(header)]), metadata=_metadata(target), timeout=60)
            return "OK"
        except grpc.RpcError as exc:
            return _code(exc)

    try:
        return _loop(target, stop, rounds, attempt)
    finally:
        channel.close()


def _client_loop(
    target: Target, stop: threading.Event, rounds: int | None, act: Callable[[Any], object]
) -> Tally:
    from optserve.common.errors import OptserveError

    client = ParameterServerClient(target.address, token=target.token)

    def attempt() -> str:
        try:
            act(client)
            return "OK"
        except OptserveError as exc:
            return exc.code.name

    try:
        return _loop(target, stop, rounds, attempt)
    finally:
        client.close()


def stolen_names(target: Target, stop: threading.Event, rounds: int | None = None) -> Tally:
    """Small valid pushes under another trainer's name (`target.trainer`)."""
    numel = sum(length for _, _, length in _shards(target))  # one parameter: the group
    grad = {target.param: torch.full((numel,), 1e-6)}
    return _client_loop(target, stop, rounds, lambda c: c.push(target.model, grad, version=0,
                                                               trainer=target.trainer))  # fmt: skip


def report_metric_storm(target: Target, stop: threading.Event, rounds: int | None = None) -> Tally:
    """ReportMetric as fast as 8 threads can call it, each with a fresh metric name."""
    tallies: list[Tally] = []
    per = None if rounds is None else max(1, rounds // 8)

    def run(i: int) -> None:
        count = iter(range(1 << 62))
        tallies.append(_client_loop(target, stop, per, lambda c: c.report_metric(
            target.model, f"m{i}-{next(count)}", 1.0)))  # fmt: skip

    threads = [threading.Thread(target=run, args=(i,), daemon=True) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return sum(tallies, collections.Counter())


def overflow_gradient(target: Target, stop: threading.Event, rounds: int | None = None) -> Tally:
    """Pushes of 3e38 in every element: finite, but their squares overflow float32."""
    numel = sum(length for _, _, length in _shards(target))  # one parameter: the group
    grad = {target.param: torch.full((numel,), 3e38)}
    return _client_loop(target, stop, rounds, lambda c: c.push(target.model, grad, version=0))


def honest_trainer(target: Target, stop: threading.Event, rounds: int | None = None) -> Tally:
    """No attack, the control: a second trainer pushing normal gradients as fast as it can,
    under its own name. What any busy tenant of the model costs alice on the same cores."""
    numel = sum(length for _, _, length in _shards(target))  # one parameter: the group
    grad = {target.param: torch.full((numel,), 1e-6)}
    return _client_loop(target, stop, rounds, lambda c: c.push(target.model, grad))


ATTACKS: dict[str, Callable[[Target, threading.Event, int | None], Tally]] = {
    "honest 2nd trainer": honest_trainer,
    "pull flood": pull_flood,
    "slow-loris pushes": slow_loris,
    "huge ids": huge_ids,
    "stolen trainer names": stolen_names,
    "ReportMetric storm": report_metric_storm,
    "finite-overflow gradient": overflow_gradient,
}
