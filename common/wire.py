"""The data plane's messages, written and read as protobuf wire bytes with one copy of the data.

Building a `TensorChunk` message copies its bytes into the message, serialising copies them
again, and on the receiving side parsing copies them once more and every read of `.data` yet
again. For the data plane (push and pull streams, megabytes per message) that is most of the
CPU time of a step. Here a frame is written directly in protobuf's wire format, with the data
copied once (into the frame), and read back as a view into the received bytes, so the tensor
data is copied once more, into its destination tensor.

The bytes are standard protobuf: `PushRequest`, `PullResponse` and `LoadRequest` all
carry their `TensorChunk` as field 2 and their header or spec as field 1, so any protobuf
client or server reads these frames, and these readers accept any valid encoding of those
messages (fields in any order, unknown fields, packed or unpacked `shape`).
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import torch

from optserve.common.codec import DEFAULT_CHUNK_BYTES, wire_dtype, wire_view
from optserve.common.errors import InvalidArgument

CHUNK_FIELD = 2
# No tensor here has more dims (the coordinator refuses deeper parameters); a longer shape is
# refused while it is read, so a hostile chunk cannot make a reader build a huge list.
MAX_DIMS = 16
HEADER_FIELD = 1
_LEN = 2  # wire type of length-delimited fields


def _varint(value: int) -> bytes:
    if value < 0:
        raise ValueError(f"varints here are unsigned, got {value}")
    out = bytearray()
    while True:
        byte = value & 0x7F
        value >>= 7
        if value:
            out.append(byte | 0x80)
        else:
            out.append(byte)
            return bytes(out)


def _key(field: int, wire_type: int) -> bytes:
    return _varint(field << 3 | wire_type)


def _read_varint(buf: memoryview, pos: int) -> tuple[int, int]:
    result = shift = 0
    while True:
        if pos >= len(buf) or shift > 63:
            raise InvalidArgument("malformed message: bad varint")
        byte = buf[pos]
        pos += 1
        result |= (byte & 0x7F) << shift
        if not byte & 0x80:
            return result, pos
        shift += 7


def _skip(buf: memoryview, pos: int, wire_type: int) -> int:
    if wire_type == 0:
        return _read_varint(buf, pos)[1]
    if wire_type == 1:
        return pos + 8
    if wire_type == 2:
        length, pos = _read_varint(buf, pos)
        return pos + length
    if wire_type == 5:
        return pos + 4
    raise InvalidArgument(f"malformed message: wire type {wire_type}")


def chunk_frames(
    name: str, tensor: torch.Tensor, chunk_bytes: int = DEFAULT_CHUNK_BYTES
) -> Iterator[bytes]:
    """The serialized messages {2: TensorChunk} carrying one tensor (as `encode_tensor`)."""
    t, raw = wire_view(tensor, chunk_bytes)
    name_bytes = name.encode()
    name_field = _key(1, _LEN) + _varint(len(name_bytes)) + name_bytes
    shape = b"".join(_varint(int(d)) for d in t.shape)
    first = (
        name_field
        + _key(2, 0) + _varint(wire_dtype(t.dtype))
        + (_key(3, _LEN) + _varint(len(shape)) + shape if t.dim() else b"")
    )  # fmt: skip
    offset = 0
    while True:
        data = raw[offset : offset + chunk_bytes]
        fields = first if offset == 0 else name_field + _key(4, 0) + _varint(offset)
        head = fields + _key(5, _LEN) + _varint(len(data))
        size = len(head) + len(data)
        yield b"".join((_key(CHUNK_FIELD, _LEN), _varint(size), head, data))
        offset += chunk_bytes
        if offset >= len(raw):
            return


def header_frame(message: Any, field: int = HEADER_FIELD) -> bytes:
    """A serialized wrapper message holding `message` as its field `field` (the header)."""
    body = message.SerializeToString()
    return _key(field, _LEN) + _varint(len(body)) + body


@dataclass
class RawChunk:
    """A TensorChunk read without copying: `data` is a view into the received bytes."""

    name: str = ""
    dtype: int = 0
    shape: tuple[int, ...] = ()
    offset: int = 0
    data: memoryview = memoryview(b"")


def _parse_chunk(buf: memoryview) -> RawChunk:
    chunk = RawChunk()
    shape: list[int] = []
    pos = 0
    while pos < len(buf):
        key, pos = _read_varint(buf, pos)
        field, wire_type = key >> 3, key & 7
        if field == 1 and wire_type == _LEN:
            length, pos = _read_varint(buf, pos)
            try:
                chunk.name = bytes(buf[pos : pos + length]).decode()
            except UnicodeDecodeError:
                raise InvalidArgument("malformed chunk: name is not UTF-8") from None
            pos += length
        elif field == 2 and wire_type == 0:
            chunk.dtype, pos = _read_varint(buf, pos)
        elif field == 3 and wire_type == _LEN:  # packed
            length, pos = _read_varint(buf, pos)
            end = pos + length
            if end > len(buf):
                raise InvalidArgument("malformed chunk: shape runs past the message end")
            while pos < end:
                dim, pos = _read_varint(buf[:end], pos)
                shape.append(dim)
                if len(shape) > MAX_DIMS:
                    raise InvalidArgument(f"a chunk's shape has more than {MAX_DIMS} dims")
        elif field == 3 and wire_type == 0:  # unpacked
            dim, pos = _read_varint(buf, pos)
            shape.append(dim)
            if len(shape) > MAX_DIMS:
                raise InvalidArgument(f"a chunk's shape has more than {MAX_DIMS} dims")
        elif field == 4 and wire_type == 0:
            chunk.offset, pos = _read_varint(buf, pos)
        elif field == 5 and wire_type == _LEN:
            length, pos = _read_varint(buf, pos)
            chunk.data = buf[pos : pos + length]
            pos += length
        else:
            pos = _skip(buf, pos, wire_type)
        if pos > len(buf):
            raise InvalidArgument("malformed chunk: a field runs past the message end")
    # int64 dims are two's complement on the wire: a negative one shows up as huge
    chunk.shape = tuple(d - (1 << 64) if d >= 1 << 63 else d for d in shape)
    return chunk


def parse_frame(data: bytes, header_type: Any) -> Any:
    """Read a {1: header, 2: TensorChunk} message: the header (a `header_type` message) or a
    RawChunk. A message with neither is refused."""
    buf = memoryview(data)
    pos, found = 0, None
    while pos < len(buf):
        key, pos = _read_varint(buf, pos)
        field, wire_type = key >> 3, key & 7
        if field in (HEADER_FIELD, CHUNK_FIELD) and wire_type == _LEN:
            length, pos = _read_varint(buf, pos)
            if pos + length > len(buf):
                raise InvalidArgument("malformed message: a field runs past the message end")
            body = buf[pos : pos + length]
            pos += length
            if field == HEADER_FIELD:
                found = header_type.FromString(bytes(body))
            else:
                found = _parse_chunk(body)
        else:
            pos = _skip(buf, pos, wire_type)
    if found is None:
        raise InvalidArgument("a message carries neither a header nor a chunk")
    return found


def passthrough(message: Any) -> bytes:
    """A gRPC serializer for streams that mix ready-made frames and protobuf messages."""
    return message if isinstance(message, bytes) else message.SerializeToString()
