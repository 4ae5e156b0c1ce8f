"""The edge's allowances without a server: per token and per address (never per connection),
the control-call rate, the watch that cuts streams that stop moving, and the shards' keys."""

from __future__ import annotations

import threading

import pytest

from optserve.common.errors import InvalidArgument
from optserve.server.edge.limits import (
    Allowance,
    Client,
    RateLimit,
    Refused,
    StreamWatch,
    peer_host,
)
from optserve.server.edge.tokens import EdgeConfig


@pytest.mark.parametrize(
    "peer, host",
    [
        ("ipv4:10.1.2.3:5000", "10.1.2.3"),
        ("ipv6:[::1]:40000", "::1"),
        ("ipv6:%5B::1%5D:40000", "::1"),
        ("unix:/tmp/sock", "unix:/tmp/sock"),
    ],
)
def test_the_address_is_the_peer_without_its_port(peer, host):
    assert peer_host(peer) == host
    # Another connection from the same host is the same client.
    assert Client.of("t", peer) == Client.of("t", peer.replace("5000", "5001"))


def test_an_allowance_holds_per_token_and_per_address():
    calls = Allowance("calls in flight", 2, 3, "max_streams_per_client")
    a_here, b_here, a_there = Client("a", "h1"), Client("b", "h1"), Client("a", "h2")
    holds = [calls.acquire(a_here), calls.acquire(a_here)]
    with pytest.raises(Refused, match=r"token 'a' already holds 2 of its 2 .*max_streams_per_c"):
        calls.acquire(a_there)  # the token's cap, from any address
    holds.append(calls.acquire(b_here))  # another token, same address: the address's third
    with pytest.raises(Refused, match=r"address h1 already holds 3 .*max_streams_per_address"):
        calls.acquire(b_here)
    assert calls.held(a_here) == (2, 3)
    holds[0].release()
    holds[0].release()  # once only
    assert calls.held(a_here) == (1, 2)
    holds.append(calls.acquire(a_there))
    for hold in holds:
        hold.release()
    assert calls.held(a_here) == (0, 0) and calls.held(a_there) == (0, 0)


def test_without_a_token_only_the_address_counts():
    calls = Allowance("calls in flight", 1, 2, "max_streams_per_client")
    anonymous = Client(None, "h")
    calls.acquire(anonymous)
    calls.acquire(anonymous)
    with pytest.raises(Refused, match="address h"):
        calls.acquire(anonymous)


def test_a_byte_allowance_always_lets_one_request_through():
    staged = Allowance("bytes of staged pushes", 100, 1000, "max_staged_bytes_per_client")
    client = Client("a", "h")
    big = staged.acquire(client, 500)  # bigger than the cap, but nothing held yet
    with pytest.raises(Refused, match="500 of its 100"):
        staged.acquire(client, 1)
    big.release()
    staged.acquire(client, 60)
    with pytest.raises(Refused):
        staged.acquire(client, 60)


def test_the_control_rate_is_a_token_bucket_per_token_and_per_address():
    now = [0.0]
    rate = RateLimit(per_s=2.0, burst=4.0, address_factor=2.0, clock=lambda: now[0])
    a, b = Client("a", "h"), Client("b", "h")
    for _ in range(4):
        rate.check(a)
    with pytest.raises(Refused, match=r"token 'a' .* faster than 2 a second"):
        rate.check(a)
    for _ in range(4):  # the address allows 8 at once: b takes the other four
        rate.check(b)
    with pytest.raises(Refused, match="address h"):
        rate.check(Client("c", "h"))
    now[0] += 1.0  # a second refills 2 for a token, 4 for the address
    rate.check(a)
    rate.check(a)
    with pytest.raises(Refused):
        rate.check(a)


class FakeCall:
    def __init__(self) -> None:
        self.cancelled = threading.Event()

    def cancel(self) -> None:
        self.cancelled.set()


def test_the_watch_cancels_a_call_that_waits_on_its_client_too_long():
    watch = StreamWatch(idle_s=0.2, max_io_s=60.0)
    stuck, busy = FakeCall(), FakeCall()
    waiting = watch.watch(stuck, "/optserve.v1.Shard/Push")
    working = watch.watch(busy, "/optserve.v1.Shard/Push")
    waiting.waiting()  # waits for the next message, which never comes
    working.waiting()
    working.moved()  # then works on its own for as long as it likes: not counted
    assert stuck.cancelled.wait(10)
    assert not busy.cancelled.is_set() and watch.cut == 1
    watch.forget(working)


def test_the_watch_bounds_the_time_a_stream_moves_in_all():
    watch = StreamWatch(idle_s=60.0, max_io_s=0.3)
    slow = FakeCall()
    call = watch.watch(slow, "/optserve.v1.Shard/Pull")
    while not slow.cancelled.is_set():  # each wait short, but they add up
        call.waiting()
        slow.cancelled.wait(0.05)
        call.moved()
    assert watch.cut == 1


def test_edge_limits_must_be_positive():
    with pytest.raises(InvalidArgument, match="max_pulls_per_client must be a positive number"):
        EdgeConfig(max_pulls_per_client=0)
    with pytest.raises(InvalidArgument, match="stream_idle_s"):
        EdgeConfig(stream_idle_s=-1.0)
    config = EdgeConfig()
    # The coordinator serves more calls at once than one address may hold.
    assert config.coordinator_threads > config.max_coordinator_calls_per_address


def test_each_shard_has_its_own_key():
    from optserve.server.shard.service import shard_key

    keys = {shard_key("model-secret", i) for i in range(4)}
    assert len(keys) == 4
    assert shard_key("model-secret", 1) == shard_key("model-secret", 1)
    assert shard_key("other-secret", 1) not in keys


def test_a_sync_shard_lets_one_token_hold_a_whole_round():
    config = EdgeConfig(max_staged_bytes_per_client=100, max_pulls_per_client=2)
    fitted = config.fit_round(trainers=8, slice_bytes=50)
    assert fitted.max_staged_bytes_per_client == 400 and fitted.max_pulls_per_client == 8
    assert fitted.max_staged_bytes_per_address >= 400 and fitted.max_pulls_per_address >= 8
    assert fitted.max_streams_per_client == config.max_streams_per_client  # calls unchanged
    assert config.fit_round(trainers=0, slice_bytes=50) is config  # async: as configured
    assert config.fit_round(trainers=1, slice_bytes=50).max_staged_bytes_per_client == 100
