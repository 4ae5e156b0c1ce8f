"""The tensor codec: exact round trips and refusal of every malformed stream."""

from __future__ import annotations

import pytest
import torch

from optserve.common.codec import (
    GRADIENT_WIRE_DTYPES,
    TensorAssembler,
    encode_tensor,
    encode_tensors,
    expect_all,
)
from optserve.common.errors import InvalidArgument, ResourceExhausted
from optserve.v1 import tensor_pb2


def assemble(chunks, expected, **kwargs):
    assembler = TensorAssembler(expected, **kwargs)
    for chunk in chunks:
        assembler.add(chunk)
    return assembler.finish()


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16, torch.float64])
@pytest.mark.parametrize("shape", [(), (0,), (1,), (3, 5), (7, 11, 13)])
@pytest.mark.parametrize("chunk_bytes", [1, 7, 64, 1 << 20])
def test_round_trip_is_bit_exact(dtype, shape, chunk_bytes):
    tensor = torch.randn(shape, generator=torch.Generator().manual_seed(1)).to(dtype)
    chunks = list(encode_tensor("t", tensor, chunk_bytes))
    nbytes = tensor.numel() * tensor.element_size()
    assert len(chunks) == max(1, -(-nbytes // chunk_bytes))
    assert all(len(c.data) <= chunk_bytes for c in chunks)
    assert chunks[0].dtype != tensor_pb2.DTYPE_UNSPECIFIED and list(chunks[0].shape) == list(shape)
    assert all(c.dtype == tensor_pb2.DTYPE_UNSPECIFIED for c in chunks[1:])
    out = assemble(chunks, expect_all([("t", shape, (dtype,))]))["t"]
    assert out.dtype == dtype and tuple(out.shape) == shape
    assert torch.equal(
        out.view(torch.uint8) if out.dim() else out,
        tensor.view(torch.uint8) if tensor.dim() else tensor,
    )


def test_bytes_are_little_endian_raw_values():
    chunk = next(encode_tensor("x", torch.tensor([1.0, -2.0], dtype=torch.float32)))
    assert chunk.data == b"\x00\x00\x80\x3f\x00\x00\x00\xc0"


def test_non_contiguous_tensor_is_encoded_in_logical_order():
    base = torch.arange(12, dtype=torch.float32).reshape(3, 4)
    out = assemble(encode_tensor("t", base.t(), 8), expect_all([("t", (4, 3), (torch.float32,))]))
    assert torch.equal(out["t"], base.t())


def test_interleaved_tensors_are_accepted():
    a, b = torch.randn(100), torch.randn(50)
    ca, cb = list(encode_tensor("a", a, 40)), list(encode_tensor("b", b, 40))
    mixed = [x for pair in zip(ca, cb, strict=False) for x in pair] + ca[len(cb) :]
    out = assemble(
        mixed, expect_all([("a", (100,), (torch.float32,)), ("b", (50,), (torch.float32,))])
    )
    assert torch.equal(out["a"], a) and torch.equal(out["b"], b)


EXPECTED = expect_all([("g", (10,), GRADIENT_WIRE_DTYPES)])


def chunks_of(t, name="g", size=16):
    return list(encode_tensor(name, t, size))


@pytest.mark.parametrize(
    "mutate, message",
    [
        (
            lambda cs: [tensor_pb2.TensorChunk(name="h", dtype=1, shape=[10], data=b"")] + cs,
            "unknown",
        ),
        (lambda cs: chunks_of(torch.randn(11)), "shape"),
        (lambda cs: chunks_of(torch.randn(2, 5)), "shape"),
        (lambda cs: chunks_of(torch.randn(10, dtype=torch.float64)), "dtype"),
        (lambda cs: [cs[0], cs[2], cs[1]], "order"),
        (lambda cs: cs[:1] + cs[1:2] * 2 + cs[2:], "order"),
        (lambda cs: cs[1:], "offset"),
        (lambda cs: cs[:-1], "ended inside"),
        (lambda cs: [], "without"),
        (lambda cs: cs + [tensor_pb2.TensorChunk(name="g", offset=40, data=b"\0")], "twice"),
    ],
)
def test_malformed_streams_are_refused(mutate, message):
    chunks = mutate(chunks_of(torch.randn(10)))
    with pytest.raises(InvalidArgument, match=message):
        assemble(chunks, EXPECTED)


def test_overflowing_chunk_is_refused():
    chunks = chunks_of(torch.randn(10), size=40)
    chunks[0].data = chunks[0].data + b"\0\0\0\0"
    with pytest.raises(InvalidArgument, match="overflows"):
        assemble(chunks, EXPECTED)


def test_garbage_wire_dtype_is_refused():
    chunk = tensor_pb2.TensorChunk(name="g", dtype=99, shape=[10], data=b"")
    with pytest.raises(InvalidArgument, match="dtype"):
        assemble([chunk], EXPECTED)


def test_oversized_chunk_is_resource_exhausted():
    with pytest.raises(ResourceExhausted):
        assemble(chunks_of(torch.randn(10), size=40), EXPECTED, max_chunk_bytes=16)


def test_encode_tensors_concatenates_streams():
    chunks = list(encode_tensors([("a", torch.ones(3)), ("b", torch.zeros(2))]))
    assert [c.name for c in chunks] == ["a", "b"]
