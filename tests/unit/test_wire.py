"""Data-plane frames (common/wire.py) are standard protobuf, both ways."""

from __future__ import annotations

import pytest
import torch

from optserve.common.codec import TensorAssembler, encode_tensor, expect_all
from optserve.common.errors import InvalidArgument
from optserve.common.wire import RawChunk, chunk_frames, header_frame, parse_frame
from optserve.v1 import shard_pb2, tensor_pb2

TENSORS = [
    torch.arange(10, dtype=torch.float32).reshape(2, 5),
    torch.randn(3, 1, 4).to(torch.bfloat16),
    torch.tensor(2.5, dtype=torch.float64),  # 0-dim: no shape field
    torch.empty(0, 3, dtype=torch.float16),
    torch.randn(1000),
]


@pytest.mark.parametrize("tensor", TENSORS, ids=lambda t: f"{t.dtype}-{list(t.shape)}")
@pytest.mark.parametrize("chunk_bytes", [7, 64, 1 << 20])
def test_frames_are_the_messages_protobuf_would_write(tensor, chunk_bytes):
    frames = list(chunk_frames("layer.w", tensor, chunk_bytes))
    expected = list(encode_tensor("layer.w", tensor, chunk_bytes))
    assert len(frames) == len(expected)
    for frame, chunk in zip(frames, expected, strict=True):
        for wrapper in (shard_pb2.PushRequest, shard_pb2.PullResponse):
            assert wrapper.FromString(frame).chunk == chunk
        assert shard_pb2.LoadRequest.FromString(frame).chunk == chunk


@pytest.mark.parametrize("tensor", TENSORS, ids=lambda t: f"{t.dtype}-{list(t.shape)}")
def test_protobuf_messages_read_back_and_assemble(tensor):
    expected = expect_all([("w", tuple(tensor.shape), (tensor.dtype,))])
    assembler = TensorAssembler(expected)
    for chunk in encode_tensor("w", tensor, 16):
        raw = parse_frame(
            shard_pb2.PushRequest(chunk=chunk).SerializeToString(), shard_pb2.PushHeader
        )
        assert isinstance(raw, RawChunk)
        assert (raw.name, raw.dtype, raw.shape, raw.offset, bytes(raw.data)) == (
            chunk.name, chunk.dtype, tuple(chunk.shape), chunk.offset, chunk.data,
        )  # fmt: skip
        assembler.add(raw)
    assert torch.equal(assembler.finish()["w"], tensor)


def test_headers_both_ways():
    header = shard_pb2.PushHeader(model="m", version=7, trainer="t", push_id="p")
    frame = header_frame(header)
    assert shard_pb2.PushRequest.FromString(frame).header == header
    parsed = parse_frame(shard_pb2.PushRequest(header=header).SerializeToString(),
                         shard_pb2.PushHeader)  # fmt: skip
    assert parsed == header


def test_unknown_fields_and_unpacked_shape_are_read():
    chunk = tensor_pb2.TensorChunk(name="w", dtype=1, offset=0, data=b"\0" * 8)
    body = chunk.SerializeToString()
    body += b"\x18\x02\x18\x01"  # shape [2, 1] as unpacked varints (field 3, wire type 0)
    body += b"\xf8\x01\x05"  # an unknown varint field 31
    frame = b"\x12" + bytes([len(body)]) + body + b"\x1d\x00\x00\x00\x00"  # unknown fixed32
    raw = parse_frame(frame, shard_pb2.PushHeader)
    assert raw.shape == (2, 1) and bytes(raw.data) == b"\0" * 8


@pytest.mark.parametrize(
    "frame",
    [
        b"",
        b"\x12\x05ab",
        b"\x12\x80",
        b"\x0f",
        b"\x12\x03\x2a\x10a",
        b"\x12\x02\x0a\xff",
        b"\x12\x14\x1a\x12" + b"\x01" * 18,  # 18 packed dims
        b"\x12\x04\x1a\x01\x81\x01",  # a dim's varint runs past the packed field
    ],
    ids=[
        "empty",
        "short",
        "bad-varint",
        "bad-wire-type",
        "data-overflow",
        "name-overflow",
        "too-many-dims",
        "dim-past-field",
    ],  # fmt: skip
)
def test_malformed_frames_are_refused(frame):
    with pytest.raises(InvalidArgument):
        parse_frame(frame, shard_pb2.PushHeader)
