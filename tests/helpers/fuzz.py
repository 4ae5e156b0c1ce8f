"""Building blocks of the fuzz suite (tests/integration/test_fuzz.py).

Frames are written by hand here rather than by protobuf, so that a test can send what no
protobuf library writes: negative and 70-bit varints, unpacked or repeated fields, a name that
is not UTF-8. What a shard should make of a push stream is judged with the data plane's own
reader and assembler (common/wire.py, common/codec.py): those rules are pinned down by the unit
tests; the fuzz suite checks that the server, end to end, answers every stream with a proper
status, applies exactly the streams those rules accept and leaves no trace of the others.
"""

from __future__ import annotations

import json
import math
import string
import time
from collections import defaultdict
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import grpc
import ray
import torch
from hypothesis import strategies as st

from optserve.common.codec import (
    GRADIENT_WIRE_DTYPES,
    TensorAssembler,
    count_nonfinite,
    encode_tensor,
    expect_all,
)
from optserve.common.errors import OptserveError
from optserve.common.wire import RawChunk, parse_frame
from optserve.v1 import shard_pb2

TIMEOUT_S = 30.0
REFUSALS = frozenset(
    {
        grpc.StatusCode.INVALID_ARGUMENT,
        grpc.StatusCode.NOT_FOUND,
        grpc.StatusCode.ALREADY_EXISTS,
        grpc.StatusCode.FAILED_PRECONDITION,
        grpc.StatusCode.ABORTED,
        grpc.StatusCode.RESOURCE_EXHAUSTED,
        grpc.StatusCode.UNAUTHENTICATED,
        grpc.StatusCode.PERMISSION_DENIED,
        grpc.StatusCode.OUT_OF_RANGE,
    }
)
# Every answer must be one of these: INTERNAL, UNKNOWN or DEADLINE_EXCEEDED is a server bug.
PROPER = REFUSALS | {grpc.StatusCode.OK}


def raw(message: bytes) -> bytes:
    """The identity (de)serializer: requests and replies travel as the bytes given."""
    return message


# ---- calls ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class Outcome:
    code: grpc.StatusCode
    reply: Any = None
    details: str = ""

    @property
    def ok(self) -> bool:
        return self.code == grpc.StatusCode.OK

    def __str__(self) -> str:
        return f"{self.code.name}: {self.details}" if not self.ok else "OK"


def outcome(call: Callable[[], Any]) -> Outcome:
    """Run a call to its end (a streamed reply is read whole) and keep its status; a call
    through ParameterServerClient raises the status as an OptserveError."""
    try:
        reply = call()
    except grpc.RpcError as exc:
        return Outcome(exc.code(), None, exc.details() or "")
    except OptserveError as exc:
        return Outcome(exc.code, None, exc.message)
    return Outcome(grpc.StatusCode.OK, reply)


def assert_proper(result: Outcome, what: str) -> None:
    assert result.code in PROPER, f"{what} was answered {result}"


def method_kinds(descriptor: Any) -> dict[str, str]:
    """Each RPC of a service descriptor and the channel method that calls it, so that an RPC
    added to the protos is fuzzed too."""
    kinds = {}
    for method in descriptor.methods:
        streams = (method.client_streaming, method.server_streaming)
        kinds[method.name] = {
            (False, False): "unary_unary",
            (False, True): "unary_stream",
            (True, False): "stream_unary",
            (True, True): "stream_stream",
        }[streams]
    return kinds


def raw_call(
    channel: grpc.Channel, service: str, method: str, kind: str, message: bytes | list[bytes]
) -> Callable[..., Any]:
    """A thunk calling `method` with raw request bytes (a list for a client stream)."""
    stub = getattr(channel, kind)(
        f"/{service}/{method}", request_serializer=raw, response_deserializer=raw
    )
    request = iter(message) if kind.startswith("stream") else message

    def call(**kwargs: Any) -> Any:
        reply = stub(request, timeout=TIMEOUT_S, **kwargs)
        return list(reply) if kind.endswith("stream") else reply

    return call


# ---- protobuf wire format, any value -------------------------------------------------------


def varint(value: int) -> bytes:
    """`value` as a varint; a negative one as its 64-bit two's complement, as protobuf writes
    int32 and int64. Values of 2**64 and more make varints longer than protobuf allows."""
    if value < 0:
        value += 1 << 64
    out = bytearray()
    while True:
        byte, value = value & 0x7F, value >> 7
        if not value:
            out.append(byte)
            return bytes(out)
        out.append(byte | 0x80)


def varint_field(field: int, value: int) -> bytes:
    return varint(field << 3) + varint(value)


def bytes_field(field: int, payload: bytes) -> bytes:
    return varint(field << 3 | 2) + varint(len(payload)) + payload


@dataclass(frozen=True)
class Chunk:
    """A TensorChunk with any field values; None leaves a field out."""

    name: str | bytes = ""
    dtype: int | None = None
    shape: tuple[int, ...] = ()
    offset: int | None = None
    data: bytes = b""
    packed: bool = True

    def frame(self, field: int = 2) -> bytes:
        """The chunk as field `field` of a wrapper (PushRequest, CreateModelRequest: 2)."""
        name = self.name.encode() if isinstance(self.name, str) else self.name
        body = bytes_field(1, name)
        if self.dtype is not None:
            body += varint_field(2, self.dtype)
        if self.shape and self.packed:
            body += bytes_field(3, b"".join(varint(d) for d in self.shape))
        elif self.shape:
            body += b"".join(varint_field(3, d) for d in self.shape)
        if self.offset is not None:
            body += varint_field(4, self.offset)
        return bytes_field(field, body + bytes_field(5, self.data))


def tensor_chunks(name: str, tensor: torch.Tensor, chunk_bytes: int) -> list[Chunk]:
    """The chunks a well-behaved sender writes for one tensor (common/codec.py)."""
    return [
        Chunk(c.name, c.dtype or None, tuple(c.shape), c.offset or None, c.data)
        for c in encode_tensor(name, tensor, chunk_bytes)
    ]


# ---- what a shard should do with a push stream ----------------------------------------------


@dataclass(frozen=True)
class Verdict:
    """One push stream as the shard reads it. `header` is set when the stream starts with a
    header the shard takes (its model; a push id where the model has several shards): only then
    does the shard stage the push and tell the model's leader about it, applied or refused."""

    header: shard_pb2.PushHeader | None
    slice_ok: bool


def judge(
    frames: Sequence[bytes], model: str, lengths: Mapping[str, int], need_push_id: bool
) -> Verdict:
    messages: list[Any] = []
    for frame in frames:
        try:
            messages.append(parse_frame(frame, shard_pb2.PushHeader))
        except Exception as exc:  # noqa: BLE001 - the shard refuses any unreadable message
            messages.append(exc)
    first = messages[0] if messages else None
    if (
        not isinstance(first, shard_pb2.PushHeader)
        or first.model != model
        or (need_push_id and not first.push_id)
    ):
        return Verdict(None, False)
    expected = expect_all((g, (n,), GRADIENT_WIRE_DTYPES) for g, n in lengths.items())
    assembler = TensorAssembler(expected, what="gradient")
    try:
        for message in messages[1:]:
            if not isinstance(message, RawChunk):
                return Verdict(first, False)
            assembler.add(message)
        grads = assembler.finish()
    except OptserveError:
        return Verdict(first, False)
    finite = all(count_nonfinite(g.reshape(-1).float()) == 0 for g in grads.values())
    return Verdict(first, finite)


@dataclass(frozen=True)
class PushPlan:
    """Which shards' streams to send, and which must then be applied (all or none)."""

    send: frozenset[int]
    applied: frozenset[int]


def plan_push(verdicts: Mapping[int, Verdict], num_shards: int, version: int) -> PushPlan:
    """Leave out the streams the server would rightly hold until its stage timeout (a slice
    whose push never reaches the other shards, as when a trainer dies mid-push): every stream
    sent must be answered at once.

    A stream without a header the shard takes is refused at once. The streams that carry one
    push id are decided together: refused at once when any shard refuses its slice, decided by
    the leader when every shard holds a valid slice under the same header (applied unless the
    header's version is ahead of the model's), and otherwise held.
    """
    send: set[int] = set()
    applied: set[int] = set()
    pushes: dict[str, list[int]] = defaultdict(list)
    for shard, verdict in verdicts.items():
        if verdict.header is None:
            send.add(shard)
        else:
            pushes[verdict.header.push_id or f"#{shard}"].append(shard)
    for members in pushes.values():
        headers = {(verdicts[s].header.version, verdicts[s].header.trainer) for s in members}
        refused = not all(verdicts[s].slice_ok for s in members)
        whole = sorted(members) == list(range(num_shards)) and len(headers) == 1
        if refused or whole:
            send.update(members)
        if whole and not refused and next(iter(headers))[0] <= version:
            applied.update(members)
    return PushPlan(frozenset(send), frozenset(applied))


# ---- server state ----------------------------------------------------------------------------


@dataclass(frozen=True)
class ShardView:
    """One shard as the probe read it; without `full`, only its digest (which covers the
    version, and which a broken shard refuses to give)."""

    digest: str
    version: int | None = None
    staged: int | None = None
    broken: str | None = None


State = dict[str, tuple[ShardView, ...]]


class Probe:
    """Reads the shards of the fuzzed models: state digest, version, staged pushes."""

    def __init__(self, actors: Mapping[str, Sequence[Any]]) -> None:
        self.actors = {model: list(handles) for model, handles in actors.items()}

    def read(self, models: Iterable[str] | None = None, full: bool = True) -> State:
        models = list(self.actors if models is None else models)
        shards = [(m, a) for m in models for a in self.actors[m]]
        refs = [a.digest.remote() for _, a in shards]
        if full:
            refs += [a.info.remote() for _, a in shards]
        values = ray.get(refs, timeout=60)
        state: dict[str, list[ShardView]] = {m: [] for m in models}
        for i, (model, _) in enumerate(shards):
            if full:
                info = values[len(shards) + i]
                view = ShardView(values[i], info["version"], info["staged"], info["broken"])
            else:
                view = ShardView(values[i])
            state[model].append(view)
        return {model: tuple(views) for model, views in state.items()}

    def settled(self, models: Iterable[str] | None = None, wait_s: float = 3.0) -> State:
        """The full state once nothing is staged (a refused push of several shards is dropped
        by each shard as it learns of the refusal), or as it is after `wait_s`."""
        models = list(self.actors if models is None else models)
        deadline = time.monotonic() + wait_s
        while True:
            state = self.read(models)
            staged = any(v.staged for views in state.values() for v in views)
            if not staged or time.monotonic() >= deadline:
                return state
            time.sleep(0.02)


def assert_sound(state: State) -> None:
    for model, views in state.items():
        for index, view in enumerate(views):
            assert view.broken is None, f"shard {index} of {model} is broken: {view.broken}"
            assert not view.staged, f"shard {index} of {model} still holds {view.staged} pushes"


def assert_unchanged(before: State, after: State, what: str) -> None:
    assert_sound(after)
    for model, views in after.items():
        if model in before:
            old = [v.digest for v in before[model]]
            changed = [i for i, (a, b) in enumerate(zip(old, views, strict=True)) if a != b.digest]
            assert not changed, f"{what} changed shard(s) {changed} of {model}"


# ---- strategies (built once: hypothesis validates a strategy the first time it draws from it)

INT32_EDGES = [0, 1, -1, 2**31 - 1, -(2**31)]
INT64_EDGES = [*INT32_EDGES, 2**32, 2**53 + 1, 2**63 - 1, -(2**63)]
UINT64_EDGES = [0, 1, 2**31, 2**32 - 1, 2**63, 2**64 - 1]
INT32S = st.one_of(st.sampled_from(INT32_EDGES), st.integers(-(2**31), 2**31 - 1))
INT64S = st.one_of(st.sampled_from(INT64_EDGES), st.integers(-(2**63), 2**63 - 1))
UINT64S = st.one_of(st.sampled_from(UINT64_EDGES), st.integers(0, 2**64 - 1))
UINT32S = st.one_of(st.sampled_from([0, 1, 2, 256, 257, 2**32 - 1]), st.integers(0, 2**32 - 1))

METADATA_CHARS = "".join(chr(c) for c in range(0x21, 0x7F))


def metadata_values(min_size: int = 0) -> st.SearchStrategy[str]:
    """What a gRPC client may send as a metadata value: printable ASCII, no outer spaces."""
    return st.text(alphabet=METADATA_CHARS, min_size=min_size, max_size=60)


METADATA_VALUES = metadata_values()
MODEL_NAME_CHARS = string.ascii_letters + string.digits + "._-"
# Valid-looking model names, and the edges of validity.
MODEL_NAMES = st.one_of(
    st.text(alphabet=MODEL_NAME_CHARS, min_size=1, max_size=130),
    st.text(max_size=20),
    st.sampled_from(["", ".", "..", "-a", "_", "a/b", "../etc", "a" * 128, "a" * 129]),
)
# A message of random fields with random wire types: it parses often and means nothing.
PROTOBUF_FIELDS = st.lists(
    st.one_of(
        st.builds(varint_field, st.integers(0, 20), UINT64S),
        st.builds(bytes_field, st.integers(0, 20), st.binary(max_size=24)),
        st.builds(
            lambda f, w, payload: varint(f << 3 | w) + payload,
            st.integers(0, 20),
            st.integers(0, 7),
            st.binary(max_size=9),
        ),
    ),
    max_size=5,
).map(b"".join)
GARBAGE = st.one_of(st.binary(max_size=80), PROTOBUF_FIELDS)

NUMBERS = [0, -0.0, 1, -1, 0.5, 0.9, 0.999, 1.0, 1e-300, 5e-324, 1e300, 1.7976931348623157e308,
           2**53 + 1, 2**63, 2**64, 10**30, -(10**30), math.nan, math.inf, -math.inf]  # fmt: skip
JSON_LEAVES = st.one_of(
    st.sampled_from(NUMBERS),
    st.floats(),
    st.integers(),
    st.booleans(),
    st.none(),
    st.text(max_size=12),
)
JSON_VALUES = st.recursive(
    JSON_LEAVES,
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner),
    max_leaves=8,
)
_CONFIG_VALUES = st.one_of(
    JSON_LEAVES,
    st.lists(st.sampled_from(NUMBERS) | st.floats(0, 1), max_size=3),
    st.dictionaries(st.sampled_from(["k", "alpha", "name", "x"]), JSON_LEAVES, max_size=3),
)


def config_objects(
    names: Sequence[str], keys: Sequence[str], name_key: str = "name"
) -> st.SearchStrategy[dict[str, Any]]:
    """Near-valid configs: a known or unknown name and known keys with edge values."""
    return st.builds(
        lambda name, rest: {name_key: name, **rest} if name is not None else rest,
        st.one_of(st.none(), st.sampled_from([*names, "", "nope", names[0].upper()])),
        st.dictionaries(st.sampled_from(keys), _CONFIG_VALUES, max_size=4),
    )


def json_texts(objects: st.SearchStrategy[Any]) -> st.SearchStrategy[str]:
    """JSON text of `objects` and of anything else, cut short, or no JSON at all."""
    dumped = st.one_of(objects, JSON_VALUES).map(lambda v: json.dumps(v, allow_nan=True))
    return st.one_of(
        dumped,
        st.builds(lambda text, cut: text[:cut], dumped, st.integers(0, 40)),
        st.text(max_size=40),
        st.sampled_from(["", "{", "}", "[]", "null", "0", '"adam"', "{}", '{"name": null}']),
    )
