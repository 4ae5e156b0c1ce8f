"""Opening, writing and reading checkpoint files: local files unbuffered (and around the page
cache where the filesystem allows), fsspec files as they come; buffers aligned for direct I/O."""

from __future__ import annotations

import errno
import os
from typing import Any

import torch

from optserve.common.errors import FailedPrecondition

# Direct I/O's alignment: tensors start, and files end, on this boundary.
ALIGN = 4096


# An open binary file: a local one (unbuffered, maybe direct) or an fsspec one. Both read
# into a buffer (`readinto`), which typing's BinaryIO does not declare.
BinaryFile = Any


def open_file(fs: Any, path: str, mode: str, direct: bool = False) -> tuple[BinaryFile, bool]:
    """`fs.open`; a local file is opened unbuffered (reads land in place), and with `direct`
    around the page cache where its filesystem allows. Returns the file and whether it is
    direct ("rb" or "wb" only)."""
    if not _is_local(fs):
        return fs.open(path, mode), False
    flags = os.O_RDONLY if mode == "rb" else os.O_WRONLY | os.O_CREAT | os.O_TRUNC
    if direct and hasattr(os, "O_DIRECT"):
        try:
            return open(os.open(path, flags | os.O_DIRECT, 0o644), mode, buffering=0), True
        except OSError as exc:  # e.g. tmpfs: no direct I/O
            if exc.errno != errno.EINVAL:
                raise
    return open(os.open(path, flags, 0o644), mode, buffering=0), False


def _is_local(fs: Any) -> bool:
    from fsspec.implementations.local import LocalFileSystem

    return isinstance(fs, LocalFileSystem)


def aligned_empty(
    numel: int, dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu"
) -> torch.Tensor:
    """An uninitialised 1-D tensor whose data starts on an ALIGN boundary (on the CPU), so
    direct reads can land in it."""
    if torch.device(device).type != "cpu":
        return torch.empty(numel, dtype=dtype, device=device)
    item = torch.empty((), dtype=dtype).element_size()
    base = torch.empty(numel + ALIGN // item, dtype=dtype)
    skip = (-base.data_ptr() % ALIGN) // item
    return base[skip : skip + numel]


def write_all(out: BinaryFile, view: memoryview) -> None:
    written = 0
    while written < len(view):
        n = out.write(view[written:])
        written += len(view) - written if n is None else n


def sync(out: BinaryFile) -> None:
    """Flush a written file to stable storage where it is a local file (fsspec stores commit
    on close)."""
    out.flush()
    try:
        fileno = out.fileno()
    except (AttributeError, OSError, ValueError):
        return
    os.fsync(fileno)


def sync_directory(fs: Any, directory: str) -> None:
    """Make the entries of a local directory (files made or renamed in it) durable; fsspec
    stores have no such step."""
    if not _is_local(fs):
        return
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def read_exactly(f: BinaryFile, view: memoryview, what: str) -> None:
    got = 0
    while got < len(view):
        n = f.readinto(view[got:])
        if not n:
            raise FailedPrecondition(f"{what} ends early ({got} of {len(view)} bytes)")
        got += n
