"""safetensors files written as a stream and read back by range, every block checksummed.

A shard writes its slice of a checkpoint here and a restoring shard reads just its own range
back, so neither ever holds more than one block beyond the tensors it owns. No Ray, no gRPC.

The files are plain safetensors (an 8-byte little-endian header length N; N bytes of JSON,
`{name: {"dtype", "shape", "data_offsets": [begin, end]}, "__metadata__": {str: str}}`, padded
with spaces to a multiple of 8; then the data): `safetensors.safe_open` reads them, and the
reader here reads files that `safetensors` wrote. The library itself is not used to write or
read them because it needs the whole file in memory or on a local path: here a file is written
block by block from live tensors (any device) into any fsspec store, hashed as it goes, and
read by byte range straight into the destination buffer.

Every tensor's data is cut into blocks of `block_bytes` from its own start; the writer records
each block's SHA-256 (and the whole file's), and a reader verifies every block it touches
before the bytes count, reading whole blocks even at the edges of the range it wants. Hashing
runs on a second thread, overlapped with the file I/O (both release the GIL).
"""

from __future__ import annotations

import hashlib
import json
import os
import struct
from collections.abc import Callable, Iterator, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, BinaryIO

import torch

from optserve.client.errors import FailedPrecondition

# 16 MiB: a few hundred digests for a shard's gigabytes, and little to read beyond a range.
DEFAULT_BLOCK_BYTES = 16 << 20
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


def open_file(fs: Any, path: str, mode: str) -> BinaryIO:
    """`fs.open`, except that a local file is opened unbuffered (reads land in place)."""
    if _is_local(fs):
        return open(path, mode, buffering=0)  # noqa: SIM115 - the caller closes it
    return fs.open(path, mode)


def _is_local(fs: Any) -> bool:
    from fsspec.implementations.local import LocalFileSystem

    return isinstance(fs, LocalFileSystem)


def _byte_view(tensor: torch.Tensor) -> memoryview:
    """The bytes of a contiguous CPU tensor, without a copy."""
    return memoryview(tensor.reshape(-1).view(torch.uint8).numpy())


def _blocks(nbytes: int, block_bytes: int) -> Iterator[tuple[int, int]]:
    for start in range(0, nbytes, block_bytes):
        yield start, min(start + block_bytes, nbytes)


def _header(tensors: Mapping[str, torch.Tensor], metadata: Mapping[str, str]) -> bytes:
    header: dict[str, Any] = {"__metadata__": dict(metadata)} if metadata else {}
    offset = 0
    for name, tensor in tensors.items():
        nbytes = tensor.numel() * tensor.element_size()
        header[name] = {"dtype": DTYPES[tensor.dtype], "shape": [tensor.numel()],
                        "data_offsets": [offset, offset + nbytes]}  # fmt: skip
        offset += nbytes
    text = json.dumps(header, separators=(",", ":")).encode()
    text += b" " * (-len(text) % 8)
    return struct.pack("<Q", len(text)) + text


def write_tensors(
    out: BinaryIO,
    tensors: Mapping[str, torch.Tensor],
    metadata: Mapping[str, str] | None = None,
    block_bytes: int = DEFAULT_BLOCK_BYTES,
) -> FileEntry:
    """Write `tensors` (1-D, contiguous, on any device) to `out` as one safetensors file, in
    order; return its size, SHA-256 and every block's digest.

    Memory beyond the tensors: one block of staging for a tensor not on the CPU. The tensors
    must not change while this runs (the caller holds the model still)."""
    if block_bytes < 8 or block_bytes % 8:
        raise ValueError(f"block_bytes must be a positive multiple of 8, got {block_bytes}")
    head = _header(tensors, metadata or {})
    file_hash = hashlib.sha256(head)
    out.write(head)
    position, entries = len(head), {}
    staging: torch.Tensor | None = None
    with ThreadPoolExecutor(1, thread_name_prefix="optserve-hash") as hasher:

        def digest(view: memoryview) -> str:
            file_hash.update(view)  # in file order: one hashing thread, one block at a time
            return hashlib.sha256(view).hexdigest()

        for name, tensor in tensors.items():
            flat = tensor.detach().reshape(-1)
            nbytes = flat.numel() * flat.element_size()
            on_cpu = flat.device.type == "cpu"
            data = _byte_view(flat) if on_cpu else None
            if not on_cpu and staging is None:
                staging = torch.empty(block_bytes, dtype=torch.uint8, pin_memory=True)
            digests = []
            for start, end in _blocks(nbytes, block_bytes):
                if data is not None:
                    view = data[start:end]
                else:
                    assert staging is not None
                    raw = flat.view(torch.uint8)[start:end]
                    staging[: end - start].copy_(raw)
                    view = _byte_view(staging)[: end - start]
                pending = hasher.submit(digest, view)
                _write_all(out, view)
                digests.append(pending.result())
            entries[name] = TensorEntry(DTYPES[flat.dtype], flat.numel(), position,
                                        tuple(digests))  # fmt: skip
            position += nbytes
    return FileEntry(position, file_hash.hexdigest(), block_bytes, entries)


def _write_all(out: BinaryIO, view: memoryview) -> None:
    written = 0
    while written < len(view):
        n = out.write(view[written:])
        written += len(view) - written if n is None else n


def sync(out: BinaryIO) -> None:
    """Flush a written file to stable storage where it is a local file (fsspec stores commit
    on close)."""
    out.flush()
    try:
        fileno = out.fileno()
    except (AttributeError, OSError, ValueError):
        return
    os.fsync(fileno)


def _read_exactly(f: BinaryIO, view: memoryview, what: str) -> None:
    got = 0
    while got < len(view):
        n = f.readinto(view[got:])
        if not n:
            raise FailedPrecondition(f"{what} ends early ({got} of {len(view)} bytes)")
        got += n


def read_header(f: BinaryIO, what: str) -> tuple[int, dict[str, Any]]:
    """The data's start offset and the header of a safetensors file."""
    size = bytearray(8)
    _read_exactly(f, memoryview(size), what)
    (length,) = struct.unpack("<Q", size)
    if length > MAX_HEADER_BYTES:
        raise FailedPrecondition(f"{what} has a header of {length} bytes; not a checkpoint file")
    text = bytearray(length)
    _read_exactly(f, memoryview(text), what)
    try:
        header = json.loads(text.decode())
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


def read_ranges(
    f: BinaryIO,
    entries: Mapping[str, TensorEntry],
    block_bytes: int,
    reads: Sequence[RangeRead],
    what: str,
) -> None:
    """Read every range in `reads` from an open file, verifying each block it touches against
    `entries` (the writer's record); raise FailedPrecondition on any mismatch."""
    data_start, header = read_header(f, what)
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
            entry = entries.get(read.name)
            if entry is None:
                raise FailedPrecondition(f"{what} has no tensor {read.name!r}")
            _check_header_entry(header, data_start, read.name, entry, what)
            item = entry.itemsize
            if read.out.numel() != read.end - read.start or read.out.element_size() != item:
                raise ValueError(f"destination of {read.name!r} does not fit its range")
            if not 0 <= read.start <= read.end <= entry.numel:
                raise FailedPrecondition(
                    f"{what}: {read.name!r} has no elements [{read.start}, {read.end})"
                )
            want_a, want_b = read.start * item, read.end * item
            out_bytes = _byte_view(read.out) if read.out.device.type == "cpu" else None
            total = entry.numel * item
            for index in range(want_a // block_bytes, -(-want_b // block_bytes)):
                a, b = index * block_bytes, min((index + 1) * block_bytes, total)
                if index >= len(entry.blocks):
                    raise FailedPrecondition(f"{what}: {read.name!r} lacks block digests")
                finish: Callable[[], None] = _nothing
                if out_bytes is not None and want_a <= a and b <= want_b:
                    view = out_bytes[a - want_a : b - want_a]  # straight into place
                else:  # an edge block, or a device tensor: through a scratch block
                    turn = 1 - turn  # not the one the pending block (if any) still uses
                    if len(scratch) <= turn:
                        scratch.append(torch.empty(block_bytes, dtype=torch.uint8))
                    buffer = scratch[turn]
                    view = _byte_view(buffer)[: b - a]
                    finish = _copier(buffer, a, b, want_a, want_b, read.out)
                f.seek(entry.offset + a)
                _read_exactly(f, view, what)
                settle()  # the previous block's digest, computed while this one was read
                pending = (hasher.submit(_sha256, view), entry.blocks[index], finish)
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
    f: BinaryIO, sha256: str, reads: Sequence[RangeRead], what: str, chunk_bytes: int = 16 << 20
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
