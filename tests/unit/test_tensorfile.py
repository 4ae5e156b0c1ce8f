"""Streamed safetensors files read back by range (server/store/tensorfile.py): what the library
reads, block digests that catch damage, and ranges that land exactly where they belong."""

from __future__ import annotations

import hashlib
import io

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from safetensors import safe_open
from safetensors.torch import save_file

from optserve.common.errors import FailedPrecondition
from optserve.server.store import files, tensorfile
from optserve.server.store.tensorfile import RangeRead, read_ranges, scan_file, write_tensors


def tensors(seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {
        "a/weights": torch.randn(1000, generator=g),
        "a/state/exp_avg": torch.randn(777, generator=g),
        "a/state/empty": torch.empty(0),
        "b/weights": torch.randn(33, generator=g).double(),
    }


def write(ts, block_bytes=256, metadata=None) -> tuple[bytes, tensorfile.FileEntry]:
    out = io.BytesIO()
    entry = write_tensors(out, ts, metadata or {"model": "m"}, block_bytes)
    return out.getvalue(), entry


def test_the_library_reads_what_is_written(tmp_path):
    ts = tensors()
    data, entry = write(ts, metadata={"model": "m", "version": "7"})
    path = tmp_path / "x.safetensors"
    path.write_bytes(data)
    assert entry.bytes == len(data) and entry.sha256 == hashlib.sha256(data).hexdigest()
    with safe_open(str(path), "pt") as f:
        assert f.metadata() == {"model": "m", "version": "7"}
        # every tensor starts on a 4 KiB boundary: fillers between them (no holes allowed)
        names = f.keys()
        assert sorted(k for k in names if not k.startswith(tensorfile.PAD_PREFIX)) == sorted(ts)
        for name, tensor in ts.items():
            assert torch.equal(f.get_tensor(name), tensor), name
            assert f.get_slice(name)[5:9].tolist() == tensor[5:9].tolist()
    # every block of every tensor has its digest, in the file's own bytes
    weights = entry.tensors["a/weights"]
    assert len(weights.blocks) == -(-1000 * 4 // 256)
    first = data[weights.offset : weights.offset + 256]
    assert weights.blocks[0] == hashlib.sha256(first).hexdigest()
    assert entry.tensors["a/state/empty"].blocks == ()
    assert all(t.offset % files.ALIGN == 0 for t in entry.tensors.values())
    assert len(data) % files.ALIGN == 0


@settings(max_examples=60, deadline=None)
@given(
    block_bytes=st.sampled_from([8, 24, 256, 4096]),
    ranges=st.lists(
        st.tuples(
            st.sampled_from(["a/weights", "a/state/exp_avg", "b/weights"]),
            st.integers(0, 1000),
            st.integers(0, 1000),
        ),
        min_size=1,
        max_size=6,
    ),  # fmt: skip
)
def test_any_ranges_land_exactly_in_place(block_bytes, ranges):
    ts = tensors(1)
    data, entry = write(ts, block_bytes)
    reads, expected = [], []
    for name, a, b in ranges:
        n = ts[name].numel()
        a, b = sorted((min(a, n), min(b, n)))
        out = torch.full((b - a,), -1.0, dtype=ts[name].dtype)
        reads.append(RangeRead(name, a, b, out))
        expected.append(ts[name][a:b])
    read_ranges(io.BytesIO(data), entry.tensors, block_bytes, reads, "x")
    for read, want in zip(reads, expected, strict=True):
        assert torch.equal(read.out, want), (read.name, read.start, read.end)


def test_a_damaged_block_is_refused_where_it_is_read():
    ts = tensors(2)
    data, entry = write(ts, 256)
    weights = entry.tensors["a/weights"]
    damaged = bytearray(data)
    damaged[weights.offset + 600] ^= 0x01  # in the third block of a/weights
    out = torch.empty(50)
    # a range in another block reads fine ...
    read_ranges(io.BytesIO(bytes(damaged)), entry.tensors, 256,
                [RangeRead("a/weights", 0, 50, out)], "x")  # fmt: skip
    assert torch.equal(out, ts["a/weights"][:50])
    # ... one that touches the damaged block, even at its edge, is refused
    with pytest.raises(FailedPrecondition, match="checksum"):
        read_ranges(io.BytesIO(bytes(damaged)), entry.tensors, 256,
                    [RangeRead("a/weights", 140, 145, torch.empty(5))], "x")  # fmt: skip


def test_a_file_that_is_not_where_the_manifest_says_is_refused():
    data, entry = write(tensors(3), 256)
    other, _ = write({"a/weights": torch.zeros(1000)}, 256)
    with pytest.raises(FailedPrecondition, match="not where"):
        read_ranges(io.BytesIO(other), entry.tensors, 256,
                    [RangeRead("a/state/exp_avg", 0, 5, torch.empty(5))], "x")  # fmt: skip
    with pytest.raises(FailedPrecondition, match="ends early"):
        read_ranges(io.BytesIO(data[: len(data) // 2]), entry.tensors, 256,
                    [RangeRead("b/weights", 0, 33, torch.empty(33, dtype=torch.float64))],
                    "x")  # fmt: skip
    with pytest.raises(FailedPrecondition, match="header"):
        read_ranges(io.BytesIO(b"\xff" * 64), entry.tensors, 256,
                    [RangeRead("b/weights", 0, 1, torch.empty(1, dtype=torch.float64))],
                    "x")  # fmt: skip


def test_scan_reads_a_whole_library_file_and_checks_its_digest(tmp_path):
    path = tmp_path / "lib.safetensors"
    ts = {"g/weights": torch.randn(300), "g/state/sum": torch.randn(300)}
    save_file(ts, str(path))
    data = path.read_bytes()
    sha = hashlib.sha256(data).hexdigest()
    out = [torch.empty(100), torch.empty(300)]
    scan_file(io.BytesIO(data), sha, [RangeRead("g/weights", 50, 150, out[0]),
                                      RangeRead("g/state/sum", 0, 300, out[1])], "lib",
              chunk_bytes=64)  # fmt: skip
    assert torch.equal(out[0], ts["g/weights"][50:150]) and torch.equal(out[1], ts["g/state/sum"])
    damaged = bytearray(data)
    damaged[-3] ^= 0x10
    with pytest.raises(FailedPrecondition, match="checksum"):
        scan_file(io.BytesIO(bytes(damaged)), sha, [RangeRead("g/weights", 0, 1, out[0][:1])],
                  "lib")  # fmt: skip


def test_block_size_must_be_a_multiple_of_eight():
    with pytest.raises(ValueError, match="multiple of 8"):
        write_tensors(io.BytesIO(), {"x": torch.zeros(4)}, {}, block_bytes=12)


@pytest.mark.parametrize("direct", [True, False])
def test_local_files_go_around_the_page_cache_and_read_back_the_same(tmp_path, direct):
    """Written and read with O_DIRECT where the filesystem has it (aligned staging, aligned
    destinations), or buffered: the same bytes, the same digests, any range."""
    import fsspec

    ts = tensors(4)
    ts["c/weights"] = torch.randn(5000)  # several blocks, the last one partial
    fs = fsspec.filesystem("file")
    path = str(tmp_path / "x.safetensors")
    f, used = files.open_file(fs, path, "wb", direct)
    with f:
        entry = write_tensors(f, ts, {"m": "1"}, block_bytes=8192, direct=used)
        files.sync(f)
    data = (tmp_path / "x.safetensors").read_bytes()
    assert entry.sha256 == hashlib.sha256(data).hexdigest()
    assert entry == write(ts, 8192, {"m": "1"})[1]  # the same file as a buffered write
    reads = [
        RangeRead("c/weights", 0, 5000, files.aligned_empty(5000)),  # in place, aligned
        RangeRead("c/weights", 1001, 4321, torch.empty(3320)),  # misaligned: via scratch
        RangeRead("a/weights", 3, 997, torch.empty(994)),
        RangeRead("b/weights", 0, 33, torch.empty(33, dtype=torch.float64)),
    ]
    f, used_read = files.open_file(fs, path, "rb", direct)
    with f:
        read_ranges(f, entry.tensors, 8192, reads, "x", direct=used_read)
    for read in reads:
        assert torch.equal(read.out, ts[read.name][read.start : read.end]), read.name
    if direct:  # /tmp of the development machine and CI is a disk with direct I/O
        assert used and used_read
