"""safetensors files written as a stream and read back by range, every block checksummed.

A shard writes its slice of a checkpoint here and a restoring shard reads just its own range
back, so neither ever holds more than a block or two beyond the tensors it owns. No Ray, no
gRPC.

The files are plain safetensors (an 8-byte little-endian header length N; N bytes of JSON,
`{name: {"dtype", "shape", "data_offsets": [begin, end]}, "__metadata__": {str: str}}`, padded
with spaces; then the data): `safetensors.safe_open` reads them, and the reader here reads
files that `safetensors` wrote. The library itself is not used to write or read them because it
needs the whole file in memory or on a local path: here a file is written block by block from
live tensors (any device) into any fsspec store, hashed as it goes, and read by byte range
straight into the destination buffer.

Every tensor's data is cut into blocks of `block_bytes` from its own start; the writer records
each block's SHA-256 (and the whole file's), and a reader verifies every block it touches
before the bytes count, reading whole blocks even at the edges of the range it wants. Hashing
runs on a second thread, overlapped with the file I/O (both release the GIL).

Local files go around the page cache (O_DIRECT) where the filesystem allows it: on the
development machine that halved the kernel's share of a restore, which otherwise allocates a
page-cache page for every page it reads. For that, every tensor's data starts on a 4 KiB
boundary: the header is padded with spaces, and a tensor whose size is not a multiple of 4 KiB
is followed by a filler tensor of bytes named `__pad__/<n>` (safetensors allows no holes
between tensors; readers skip the fillers).
"""

from __future__ import annotations

import hashlib
import json
import struct
from collections.abc import Callable, Iterator, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import torch

from optserve.common.codec import byte_view
from optserve.common.errors import FailedPrecondition
from optserve.server.store.files import (
    ALIGN,
    BinaryFile,
    aligned_empty,
    read_exactly,
    write_all,
)

# 16 MiB: a few hundred digests for a shard's gigabytes, and little to read beyond a range.
DEFAULT_BLOCK_BYTES = 16 << 20
# Fillers that put every tensor's data on an ALIGN boundary (files.py: direct I/O's).
PAD_PREFIX = "__pad__/"
MAX_HEADER_BYTES = 100 << 20  # what safetensors itself accepts
DTYPES: dict[torch.dtype, str] = {
    torch.float32: "F32",
    torch.float16: "F16",
    torch.bfloat16: "BF16",
    torch.float64: "F64",
    torch.int64: "I64",
    torch.int32: "I32",
    torch.uint8: "U8",
}
TORCH_DTYPES = {v: k for k, v in DTYPES.items()}


@dataclass(frozen=True)
class TensorEntry:
    """Where one tensor's data lies in its file, and the digest of each of its blocks."""

    dtype: str
    numel: int
    offset: int  # absolute byte offset of the data in the file
    blocks: tuple[str, ...]

    @property
    def itemsize(self) -> int:
        return torch.empty((), dtype=TORCH_DTYPES[self.dtype]).element_size()

    def as_dict(self) -> dict[str, Any]:
        return {"dtype": self.dtype, "numel": self.numel, "offset": self.offset,
                "blocks": list(self.blocks)}  # fmt: skip

    @classmethod
    def from_dict(cls, value: Mapping[str, Any]) -> TensorEntry:
        return cls(str(value["dtype"]), int(value["numel"]), int(value["offset"]),
                   tuple(str(b) for b in value["blocks"]))  # fmt: skip


@dataclass(frozen=True)
class FileEntry:
    """What a writer reports of one file: size, SHA-256 and its tensors."""

    bytes: int
    sha256: str
    block_bytes: int
    tensors: dict[str, TensorEntry]

    def as_dict(self) -> dict[str, Any]:
        return {
            "bytes": self.bytes,
            "sha256": self.sha256,
            "block_bytes": self.block_bytes,
            "tensors": {name: t.as_dict() for name, t in self.tensors.items()},
        }

    @classmethod
    def from_dict(cls, value: Mapping[str, Any]) -> FileEntry:
        return cls(
            int(value["bytes"]),
            str(value["sha256"]),
            int(value["block_bytes"]),
            {str(n): TensorEntry.from_dict(t) for n, t in value["tensors"].items()},
        )


def _round_up(n: int) -> int:
    return -(-n // ALIGN) * ALIGN


def _blocks(nbytes: int, block_bytes: int) -> Iterator[tuple[int, int]]:
    for start in range(0, nbytes, block_bytes):
        yield start, min(start + block_bytes, nbytes)


def _header(tensors: Mapping[str, torch.Tensor], metadata: Mapping[str, str]) -> bytes:
    """The header, padded so that the data starts on an ALIGN boundary, with a filler after
    every tensor whose size is not a multiple of ALIGN."""
    header: dict[str, Any] = {"__metadata__": dict(metadata)} if metadata else {}
    offset = 0
    for index, (name, tensor) in enumerate(tensors.items()):
        nbytes = tensor.numel() * tensor.element_size()
        header[name] = {"dtype": DTYPES[tensor.dtype], "shape": [tensor.numel()],
                        "data_offsets": [offset, offset + nbytes]}  # fmt: skip
        pad = _round_up(nbytes) - nbytes
        if pad:
            header[f"{PAD_PREFIX}{index}"] = {"dtype": "U8", "shape": [pad],
                                              "data_offsets": [offset + nbytes,
                                                               offset + nbytes + pad]}  # fmt: skip
        offset += nbytes + pad
    text = json.dumps(header, separators=(",", ":")).encode()
    text += b" " * (_round_up(8 + len(text)) - 8 - len(text))
    return struct.pack("<Q", len(text)) + text


class _Staging:
    """One aligned block that bytes pass through on their way to a direct file or off a
    device; allocated on first use."""

    def __init__(self, size: int) -> None:
        self._size = size
        self._block: torch.Tensor | None = None

    def __call__(self, source: memoryview | torch.Tensor, length: int) -> memoryview:
        """`source` copied into the block (zeros after it, up to `length`)."""
        if self._block is None:
            self._block = aligned_empty(_round_up(self._size), torch.uint8)
        target = self._block
        n = source.numel() if isinstance(source, torch.Tensor) else len(source)
        if isinstance(source, torch.Tensor):
            target[:n].copy_(source)
        else:
            byte_view(target)[:n] = source
        target[n:length].zero_()
        return byte_view(target)[:length]


def write_tensors(
    out: BinaryFile,
    tensors: Mapping[str, torch.Tensor],
    metadata: Mapping[str, str] | None = None,
    block_bytes: int = DEFAULT_BLOCK_BYTES,
    direct: bool = False,
) -> FileEntry:
    """Write `tensors` (1-D, contiguous, on any device) to `out` as one safetensors file, in
    order; return its size, SHA-256 and every block's digest. `direct`: `out` takes only
    ALIGN-aligned writes from aligned memory (O_DIRECT), so every block goes through staging.

    Memory beyond the tensors: one block of staging, for a direct file or a tensor not on the
    CPU. The tensors must not change while this runs (the caller holds the model still)."""
    if block_bytes < 8 or block_bytes % 8 or (direct and block_bytes % ALIGN):
        raise ValueError(f"block_bytes must be a positive multiple of 8 (of {ALIGN} for direct "
                         f"I/O), got {block_bytes}")  # fmt: skip
    head = _header(tensors, metadata or {})
    file_hash = hashlib.sha256()
    stage = _Staging(max(block_bytes, len(head)))  # one block: each write is hashed before the next

    with ThreadPoolExecutor(1, thread_name_prefix="optserve-hash") as hasher:

        def write(view: memoryview, tensor_bytes: int | None) -> Any:
            """Write `view`, hashing it into the file's digest (on the hasher, in file order);
            the future's result is the digest of its first `tensor_bytes` (a block's)."""

            def digest() -> str | None:
                file_hash.update(view)
                return None if tensor_bytes is None else _sha256(view[:tensor_bytes])

            pending = hasher.submit(digest)
            write_all(out, view)
            return pending

        write(stage(memoryview(head), len(head)) if direct else memoryview(head), None).result()
        position, entries = len(head), {}
        for name, tensor in tensors.items():
            flat = tensor.detach().reshape(-1)
            nbytes = flat.numel() * flat.element_size()
            raw = flat.view(torch.uint8) if flat.numel() else torch.empty(0, dtype=torch.uint8)
            data = byte_view(flat) if flat.device.type == "cpu" and not direct else None
            digests = []
            for start, end in _blocks(nbytes, block_bytes):
                if data is not None:
                    view = data[start:end]
                else:  # direct I/O pads the tensor's last block to ALIGN with zeros
                    length = _round_up(end - start) if direct else end - start
                    view = stage(raw[start:end], length)
                digests.append(write(view, end - start).result())
            pad = _round_up(nbytes) - nbytes
            if pad and not direct:
                write(memoryview(bytes(pad)), None).result()
            entries[name] = TensorEntry(DTYPES[flat.dtype], flat.numel(), position,
                                        tuple(digests))  # fmt: skip
            position += nbytes + pad
    return FileEntry(position, file_hash.hexdigest(), block_bytes, entries)


def read_header(f: BinaryFile, what: str) -> tuple[int, dict[str, Any]]:
    """The data's start offset and the header of a safetensors file (read in whole ALIGN
    pieces from an aligned buffer, so a direct file reads it too)."""
    f.seek(0)
    first = aligned_empty(ALIGN, torch.uint8)
    got = f.readinto(byte_view(first))
    if got is None or got < 8:
        raise FailedPrecondition(f"{what} ends early (no header)")
    (length,) = struct.unpack("<Q", bytes(byte_view(first)[:8]))
    if length > MAX_HEADER_BYTES:
        raise FailedPrecondition(f"{what} has a header of {length} bytes; not a checkpoint file")
    if 8 + length > got:
        whole = aligned_empty(_round_up(8 + length), torch.uint8)
        f.seek(0)
        got = f.readinto(byte_view(whole)) or 0
        if got < 8 + length:
            raise FailedPrecondition(f"{what} ends early (in its header)")
        first = whole
    try:
        header = json.loads(bytes(byte_view(first)[8 : 8 + length]).decode())
    except (UnicodeDecodeError, ValueError) as exc:
        raise FailedPrecondition(f"{what} has a malformed header: {exc}") from None
    if not isinstance(header, dict):
        raise FailedPrecondition(f"{what} has a malformed header")
    return 8 + length, header


@dataclass(frozen=True)
class RangeRead:
    """Elements [start, end) of a file's tensor, to land in `out` (1-D, same dtype, any
    device, `end - start` elements)."""

    name: str
    start: int
    end: int
    out: torch.Tensor


def _checked_entry(
    entries: Mapping[str, TensorEntry],
    header: Mapping[str, Any],
    data_start: int,
    read: RangeRead,
    what: str,
) -> TensorEntry:
    """The writer's record of the tensor `read` reads, once the file's header, the range and the
    destination all agree with it."""
    entry = entries.get(read.name)
    if entry is None:
        raise FailedPrecondition(f"{what} has no tensor {read.name!r}")
    _check_header_entry(header, data_start, read.name, entry, what)
    if read.out.numel() != read.end - read.start or read.out.element_size() != entry.itemsize:
        raise ValueError(f"destination of {read.name!r} does not fit its range")
    if not 0 <= read.start <= read.end <= entry.numel:
        raise FailedPrecondition(
            f"{what}: {read.name!r} has no elements [{read.start}, {read.end})"
        )
    return entry


def read_ranges(
    f: BinaryFile,
    entries: Mapping[str, TensorEntry],
    block_bytes: int,
    reads: Sequence[RangeRead],
    what: str,
    direct: bool = False,
) -> None:
    """Read every range in `reads` from an open file, verifying each block it touches against
    `entries` (the writer's record); raise FailedPrecondition on any mismatch. `direct`: the
    file takes only aligned reads (O_DIRECT): blocks land in place only where the destination
    is aligned, and the rest go through an aligned scratch block."""
    data_start, header = read_header(f, what)
    if direct and (block_bytes % ALIGN or any(e.offset % ALIGN for e in entries.values())):
        raise FailedPrecondition(f"{what} is not laid out for direct reads; read it buffered")
    scratch: list[torch.Tensor] = []  # two blocks, used in turn: one read while one is hashed
    turn = 1
    with ThreadPoolExecutor(1, thread_name_prefix="optserve-verify") as hasher:
        pending: tuple[Any, str, Callable[[], None]] | None = None

        def settle() -> None:
            nonlocal pending
            if pending is None:
                return
            future, expected, finish = pending
            pending = None
            if future.result() != expected:
                raise FailedPrecondition(f"{what} fails its checksum; it is damaged")
            finish()

        for read in reads:
            entry = _checked_entry(entries, header, data_start, read, what)
            item = entry.itemsize
            want_a, want_b = read.start * item, read.end * item
            on_cpu = read.out.device.type == "cpu"
            out_bytes = byte_view(read.out) if on_cpu else None
            base = read.out.data_ptr() if on_cpu else 0
            total = entry.numel * item
            for index in range(want_a // block_bytes, -(-want_b // block_bytes)):
                a, b = index * block_bytes, min((index + 1) * block_bytes, total)
                if index >= len(entry.blocks):
                    raise FailedPrecondition(f"{what}: {read.name!r} lacks block digests")
                finish: Callable[[], None] = _nothing
                in_place = out_bytes is not None and want_a <= a and b <= want_b
                if direct and in_place:  # the destination must be aligned, whole pages
                    in_place = (base + a - want_a) % ALIGN == 0 and (b - a) % ALIGN == 0
                if in_place:
                    assert out_bytes is not None
                    view = out_bytes[a - want_a : b - want_a]
                else:  # an edge block, a device tensor, or misaligned: through a scratch block
                    turn = 1 - turn  # not the one the pending block (if any) still uses
                    if len(scratch) <= turn:
                        scratch.append(aligned_empty(_round_up(block_bytes), torch.uint8))
                    buffer = scratch[turn]
                    view = byte_view(buffer)[: _round_up(b - a) if direct else b - a]
                    finish = _copier(buffer, a, b, want_a, want_b, read.out)
                f.seek(entry.offset + a)
                read_exactly(f, view, what)
                settle()  # the previous block's digest, computed while this one was read
                pending = (hasher.submit(_sha256, view[: b - a]), entry.blocks[index], finish)
        settle()


def _nothing() -> None:
    return None


def _sha256(view: memoryview) -> str:
    return hashlib.sha256(view).hexdigest()


def _copier(
    buffer: torch.Tensor, a: int, b: int, want_a: int, want_b: int, out: torch.Tensor
) -> Callable[[], None]:
    """Copy the wanted part of a verified block (file bytes [a, b)) into `out`."""
    lo, hi = max(a, want_a), min(b, want_b)

    def finish() -> None:
        target = out.reshape(-1).view(torch.uint8)[lo - want_a : hi - want_a]
        target.copy_(buffer[lo - a : hi - a])

    return finish


def _check_header_entry(
    header: Mapping[str, Any], data_start: int, name: str, entry: TensorEntry, what: str
) -> None:
    found = header.get(name)
    expected = [entry.offset - data_start, entry.offset - data_start + entry.numel * entry.itemsize]
    if (
        not isinstance(found, dict)
        or found.get("dtype") != entry.dtype
        or found.get("data_offsets") != expected
    ):
        raise FailedPrecondition(f"{what}: tensor {name!r} is not where its manifest says")


def scan_file(
    f: BinaryFile, sha256: str, reads: Sequence[RangeRead], what: str, chunk_bytes: int = 16 << 20
) -> None:
    """Read a whole safetensors file once, copying the ranges in `reads` out of it as they
    pass, and check the file's SHA-256 (for files without block digests: the first checkpoint
    format). On a mismatch the destinations hold unverified bytes: the caller discards them."""
    data_start, header = read_header(f, what)
    f.seek(0)
    file_hash = hashlib.sha256()
    wanted = []
    for read in reads:
        found = header.get(read.name)
        if not isinstance(found, dict) or "data_offsets" not in found:
            raise FailedPrecondition(f"{what} has no tensor {read.name!r}")
        dtype = TORCH_DTYPES.get(str(found.get("dtype")), torch.uint8)
        item = torch.empty((), dtype=dtype).element_size()
        begin = data_start + int(found["data_offsets"][0])
        wanted.append((begin + read.start * item, begin + read.end * item, read.out))
    buffer = bytearray(chunk_bytes)
    position = 0
    while True:
        n = f.readinto(memoryview(buffer))
        if not n:
            break
        view = memoryview(buffer)[:n]
        file_hash.update(view)
        for a, b, out in wanted:
            lo, hi = max(a, position), min(b, position + n)
            if lo < hi:
                source = torch.frombuffer(buffer, dtype=torch.uint8, count=n)
                target = out.reshape(-1).view(torch.uint8)[lo - a : hi - a]
                target.copy_(source[lo - position : hi - position])
        position += n
    if file_hash.hexdigest() != sha256:
        raise FailedPrecondition(f"{what} fails its checksum; it is damaged")
