"""A shard's own part of every checkpoint: it writes its slice straight into the store, and a
restoring shard reads just its own range back. No tensor byte goes through the coordinator or
Ray's object store. No Ray, no gRPC: the shard actor calls this.

Writing has two ways to hold the model still (the checkpoint's `snapshot`):

* "pause" (the default): the file is written from the live buffers while the model's leader
  decides no update, so the pushes pause for the write; no memory beyond one I/O block;
* "copy": the slice is copied into host memory (one copy of the shard's state, in an
  anonymous mapping that is handed back to the system after the write), pushes go on, and the
  copy is written in the background; the pause lasts only the copy.
"""

from __future__ import annotations

import logging
import posixpath
import threading
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

import fsspec
import torch

from optserve.common.config import parse_optimizer_config
from optserve.common.errors import FailedPrecondition, NotFound
from optserve.server.shard.memory import mapped_empty
from optserve.server.shard.state import ShardState
from optserve.server.shard.views import GroupValues
from optserve.server.store.files import ALIGN, open_file, sync, sync_directory
from optserve.server.store.manifest import Source
from optserve.server.store.tensorfile import (
    DEFAULT_BLOCK_BYTES,
    RangeRead,
    read_header,
    read_ranges,
    scan_file,
    write_tensors,
)

log = logging.getLogger(__name__)
Snapshot = Literal["pause", "copy"]
SNAPSHOTS = ("pause", "copy")
# How long a finished write's report waits to be collected before it is forgotten.
REPORT_KEPT_S = 3600.0


@dataclass(frozen=True)
class WriteTarget:
    """Where a shard writes its file of one checkpoint."""

    root: str  # the store's root URI
    directory: str  # the checkpoint's directory, relative to the root
    file: str
    checkpoint: str  # the checkpoint's name
    snapshot: Snapshot = "pause"
    block_bytes: int = DEFAULT_BLOCK_BYTES
    metadata: Mapping[str, str] = field(default_factory=dict)


@dataclass(frozen=True)
class RestorePlan:
    """What a restoring shard reads, and the checkpoint's non-tensor values."""

    root: str
    checkpoint: str
    sources: Sequence[Source]
    version: int
    configs: Mapping[str, Mapping[str, Any]]
    scalars: Mapping[str, Mapping[str, Any]]
    schedule: Mapping[str, Any]
    schedule_state: Mapping[str, Any]
    kernels: Mapping[str, str] = field(default_factory=dict)  # as the checkpoint recorded


@dataclass
class _Job:
    done: threading.Event = field(default_factory=threading.Event)
    report: dict[str, Any] | None = None
    error: BaseException | None = None
    finished: float = 0.0


class ShardCheckpoints:
    """The checkpoint writes and restores of one shard."""

    def __init__(self, state: ShardState) -> None:
        self._state = state
        self._lock = threading.Lock()
        self._jobs: dict[str, _Job] = {}

    def begin(self, target: WriteTarget, at_version: int) -> dict[str, float]:
        """Write (snapshot "pause") or copy out (snapshot "copy", written in the background)
        this shard's slice at model version `at_version`. The caller keeps the model at that
        version until this returns. Returns how long the shard held it (seconds)."""
        if target.snapshot not in SNAPSHOTS:
            raise ValueError(f"snapshot must be one of {SNAPSHOTS}, got {target.snapshot!r}")
        started = time.perf_counter()
        view = self._state.checkpoint_view(at_version)
        job = _Job()
        with self._lock:
            self._forget_old()
            self._jobs[target.checkpoint] = job
        if target.snapshot == "pause":
            self._write(target, view, view.tensors, job)
            return {"held_s": time.perf_counter() - started}
        copies, release = host_copy(view.tensors)
        held = time.perf_counter() - started
        threading.Thread(
            target=self._write, args=(target, view, copies, job, release),
            name="optserve-checkpoint", daemon=True,
        ).start()  # fmt: skip
        return {"held_s": held}

    def finish(self, checkpoint: str, timeout_s: float = 3600.0) -> dict[str, Any]:
        """The report of this shard's file of `checkpoint`, once it is written."""
        with self._lock:
            job = self._jobs.get(checkpoint)
        if job is None:
            raise NotFound(f"shard {self._state.index} is writing no checkpoint {checkpoint!r}")
        if not job.done.wait(timeout_s):
            raise FailedPrecondition(f"checkpoint {checkpoint} was not written in {timeout_s} s")
        with self._lock:
            self._jobs.pop(checkpoint, None)
        if job.error is not None:
            raise job.error
        assert job.report is not None
        return job.report

    def _forget_old(self) -> None:
        """Drop reports nobody collected (their coordinator died before the manifest)."""
        now = time.monotonic()
        for name, job in list(self._jobs.items()):
            if job.done.is_set() and now - job.finished > REPORT_KEPT_S:
                del self._jobs[name]

    def _write(
        self,
        target: WriteTarget,
        view: Any,
        tensors: Mapping[str, torch.Tensor],
        job: _Job,
        release: Any = None,
    ) -> None:
        started = time.perf_counter()
        try:
            fs, base = fsspec.core.url_to_fs(target.root)
            directory = posixpath.join(base, target.directory)
            fs.makedirs(directory, exist_ok=True)
            direct = target.block_bytes % ALIGN == 0
            f, direct = open_file(fs, posixpath.join(directory, target.file), "wb", direct)
            with f:
                entry = write_tensors(f, tensors, target.metadata, target.block_bytes, direct)
                sync(f)
            sync_directory(fs, directory)  # its entry too, before it is reported written
            job.report = {
                "version": view.version,
                "file": target.file,
                "entry": entry,
                "scalars": view.scalars,
                "configs": view.configs,
                "kernels": view.kernels,
                "schedule": view.schedule,
                "schedule_state": view.schedule_state,
                "write_s": time.perf_counter() - started,
            }
        except BaseException as exc:  # noqa: BLE001 - reported to whoever collects it
            log.warning("shard %d could not write checkpoint %s", self._state.index,
                        target.checkpoint, exc_info=True)  # fmt: skip
            job.error = exc if isinstance(exc, Exception) else RuntimeError(repr(exc))
        finally:
            tensors = {}
            if release is not None:
                release()
            job.finished = time.monotonic()
            job.done.set()

    def restore(self, plan: RestorePlan, ranges: Mapping[str, tuple[int, int]]) -> dict[str, float]:
        """Read this shard's range of every group (`ranges`: element [start, end) per group)
        from the checkpoint's files into fresh buffers, verify it, and take it over. Returns
        how long filling the new buffers' memory took ("allocate_s") and the reading
        ("read_s"): a new process's first memory is costly on some machines."""
        fs, base = fsspec.core.url_to_fs(plan.root)
        keys = _state_keys(fs, base, plan, list(ranges))
        _check_coverage(plan, ranges, self._state.index)
        wanted = [(group, key) for group in ranges for key in ["weights", *keys[group]]]
        started = time.perf_counter()
        buffers = {  # page-aligned (direct reads land in them), populated up front
            (group, key): mapped_empty(
                ranges[group][1] - ranges[group][0], torch.float32, self._state.device
            )
            for group, key in wanted
        }
        allocated = time.perf_counter()
        _read(fs, base, plan, ranges, wanted, buffers)
        read = time.perf_counter()
        values = {
            group: GroupValues(
                weights=buffers[(group, "weights")],
                config=parse_optimizer_config(dict(plan.configs[group])),
                kernel=plan.kernels.get(group),
                state={
                    **dict(plan.scalars.get(group, {})),
                    **{key: buffers[(group, key)] for key in keys[group]},
                },  # fmt: skip
            )
            for group in ranges
        }
        self._state.load(values, plan.version, dict(plan.schedule), plan.schedule_state)
        return {"allocate_s": allocated - started, "read_s": read - allocated}


def _check_coverage(plan: RestorePlan, ranges: Mapping[str, tuple[int, int]], index: int) -> None:
    """Every element of this shard's ranges lies in one of the checkpoint's files."""
    for group, (start, end) in ranges.items():
        covered = 0
        for source in plan.sources:
            s_start, s_end = source.ranges.get(group, (0, 0))
            covered += max(0, min(end, s_end) - max(start, s_start))
        if covered != end - start:
            raise FailedPrecondition(
                f"checkpoint {plan.checkpoint} covers {covered} of {end - start} elements of "
                f"group {group!r} on shard {index}"
            )


def _read(
    fs: Any,
    base: str,
    plan: RestorePlan,
    ranges: Mapping[str, tuple[int, int]],
    wanted: Sequence[tuple[str, str]],
    buffers: Mapping[tuple[str, str], torch.Tensor],
) -> None:
    """Read the `wanted` (group, key) buffers' ranges from every file that holds a part."""
    for source in plan.sources:
        reads = []
        for group, key in wanted:
            start, end = ranges[group]
            s_start, s_end = source.ranges.get(group, (0, 0))
            lo, hi = max(start, s_start), min(end, s_end)
            if lo < hi:
                name = f"{group}/weights" if key == "weights" else f"{group}/state/{key}"
                out = buffers[(group, key)][lo - start : hi - start]
                reads.append(RangeRead(name, lo - s_start, hi - s_start, out))
        if not reads:
            continue
        what = f"checkpoint {plan.checkpoint}: {posixpath.basename(source.path)}"
        entry = source.entry
        aligned = entry is not None and _direct_layout(entry)
        try:
            f, direct = open_file(fs, posixpath.join(base, source.path), "rb", aligned)
            with f:
                if entry is not None:
                    read_ranges(f, entry.tensors, entry.block_bytes, reads, what, direct)
                else:
                    scan_file(f, source.sha256, reads, what)
        except (OSError, ValueError) as exc:
            raise FailedPrecondition(f"{what} cannot be read: {exc}") from None


def _state_keys(
    fs: Any, base: str, plan: RestorePlan, groups: Sequence[str]
) -> dict[str, list[str]]:
    """The state tensors each group has in the checkpoint (from its first file)."""
    source = plan.sources[0]
    if source.entry is not None:
        names = list(source.entry.tensors)
    else:
        try:
            f, _ = open_file(fs, posixpath.join(base, source.path), "rb")
            with f:
                names = list(read_header(f, f"checkpoint {plan.checkpoint}")[1])
        except OSError as exc:
            what = f"checkpoint {plan.checkpoint}"
            raise FailedPrecondition(f"{what} cannot be read: {exc}") from None
    keys: dict[str, list[str]] = {group: [] for group in groups}
    for name in names:
        group, sep, key = name.rpartition("/state/")
        if sep and group in keys:
            keys[group].append(key)
    return keys


def _direct_layout(entry: Any) -> bool:
    """Whether a file's tensors start on ALIGN boundaries and its blocks are whole pages (what
    direct reads need); files this version writes are laid out so."""
    return entry.block_bytes % ALIGN == 0 and all(
        t.offset % ALIGN == 0 for t in entry.tensors.values()
    )


def host_copy(tensors: Mapping[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], Any]:
    """Copies of `tensors` in host memory of their own (mappings populated up front), and a
    function that hands that memory back to the system once the copies are no longer used."""
    copies = {name: mapped_empty(t.numel(), t.dtype) for name, t in tensors.items()}
    for name, tensor in tensors.items():
        copies[name].copy_(tensor.detach().reshape(-1))

    def release() -> None:
        copies.clear()  # the last references: each mapping is unmapped as its tensor goes

    return copies, release
