"""Checkpoints: a consistent snapshot of one model, every shard at one version, on a local disk or
any fsspec URI. No Ray, no gRPC, and no tensor bytes: each shard writes and reads its own files
(server/shard/checkpoint.py); this module names them, joins what the shards report into the
manifest, and plans what each shard of a restore reads.

Layout of one checkpoint (format "optserve-checkpoint/2")::

    <root>/<model>/<unix ms, 13 digits>-<version, 12 digits>-<run id>/
        shard-00000-of-00002.safetensors   shard 0's slice of every group: "<group>/weights",
        shard-00001-of-00002.safetensors   "<group>/state/<key>" (flat fp32), written by it
        manifest.json   written last, atomically (a temporary name, then a rename), by the
                        coordinator once every shard confirmed its file: format, model,
                        version, time, the layout (parameters and groups), every config,
                        schedule state, update mode, per-group scalars (step counters,
                        AdaBound's base_lr, Lookahead's counter), audit log and metrics, and
                        per shard its element ranges and its file's size, SHA-256 and the
                        SHA-256 of every 16 MiB block of every tensor

A directory without a manifest is an interrupted write: it is not listed, never loaded, and
removed by a later prune once it is an hour old. A restore onto any number of shards has each
new shard read just its own element range from the files that hold it, verifying each block it
touches. Checkpoints of the first format (one whole-model `tensors.safetensors`, its SHA-256 in
the manifest) stay readable: each restoring shard reads that file once, checks its SHA-256 and
keeps its own range.

Checkpoints are ordered by the time they were taken, not by version: after a restore to an
older version, the new run's checkpoints are the newest. The run id names one life of a model
(from its creation, kept through restores), so crash recovery only ever uses the run's own
checkpoints. `<root>/<model>/dropped.json` marks a model dropped at that time.
"""

from __future__ import annotations

import builtins
import json
import posixpath
import re
import shutil
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import fsspec

from optserve.common.errors import FailedPrecondition, InvalidArgument, NotFound
from optserve.server.store.files import open_file, sync, sync_directory
from optserve.server.store.tensorfile import FileEntry

FORMAT = "optserve-checkpoint/2"
FORMAT_1 = "optserve-checkpoint/1"
MANIFEST = "manifest.json"
TENSORS_1 = "tensors.safetensors"
# <unix ms, 13 digits>-<version, 12 digits>-<run id>: names sort by the time they were taken.
_NAME = re.compile(r"(\d{13})-(\d{12})-([0-9a-f]{1,32})")
DROPPED = "dropped.json"
# A checkpoint directory without a manifest this old is an abandoned write.
ABANDONED_AFTER_S = 3600.0


def shard_file_name(index: int, count: int) -> str:
    return f"shard-{index:05d}-of-{count:05d}.safetensors"


@dataclass(frozen=True)
class ShardFile:
    """One shard's file of a checkpoint: the element range of each group it holds."""

    index: int
    ranges: dict[str, tuple[int, int]]
    file: str
    entry: FileEntry

    def as_dict(self) -> dict[str, Any]:
        return {"index": self.index, "ranges": {g: list(r) for g, r in self.ranges.items()},
                "file": self.file, **self.entry.as_dict()}  # fmt: skip

    @classmethod
    def from_dict(cls, value: Mapping[str, Any]) -> ShardFile:
        ranges = {str(g): (int(r[0]), int(r[1])) for g, r in value["ranges"].items()}
        return cls(int(value["index"]), ranges, str(value["file"]), FileEntry.from_dict(value))


@dataclass(frozen=True)
class Source:
    """A file a restoring shard may read: where it is (relative to the store's root), the
    element range of each group its tensors cover, and how to verify it: block digests
    (`entry`), or, for the first format, the whole file's SHA-256."""

    path: str
    ranges: dict[str, tuple[int, int]]
    entry: FileEntry | None = None
    sha256: str = ""


@dataclass
class Checkpoint:
    """One model at one version: the manifest (metadata only; the tensors stay in the files)."""

    model: str
    version: int
    params: list[dict[str, Any]]  # {"name", "shape", "dtype"} in declaration order
    groups: list[dict[str, Any]]  # {"name", "params": [names in flat order]}
    overrides: dict[str, dict[str, Any]]
    optimizer: dict[str, Any]
    group_configs: dict[str, dict[str, Any]]
    schedule: dict[str, Any]
    schedule_state: dict[str, Any]
    mode: dict[str, Any]
    scalars: dict[str, dict[str, Any]]  # group -> non-tensor state (step, counter, base_lr)
    kernels: dict[str, str] = field(default_factory=dict)  # group -> the kernel that stepped it
    audit: list[dict[str, Any]] = field(default_factory=list)
    metrics: list[dict[str, Any]] = field(default_factory=list)
    created: float = field(default_factory=time.time)
    num_shards: int = 1  # how many shards it ran on (what a restart restores it onto)
    run_id: str = "0"
    checkpoint_policy: dict[str, Any] = field(default_factory=dict)
    service: str = ""
    lineage: dict[str, Any] = field(default_factory=dict)  # a fork's (ModelEntry.lineage)
    shards: list[ShardFile] = field(default_factory=list)
    # The first format's single file: {"tensors.safetensors": {"bytes", "sha256"}}.
    files: dict[str, Any] = field(default_factory=dict)
    format: str = FORMAT

    @property
    def name(self) -> str:
        return f"{int(self.created * 1000):013d}-{self.version:012d}-{self.run_id}"

    @property
    def bytes(self) -> int:
        """Bytes of tensor files."""
        if self.shards:
            return sum(s.entry.bytes for s in self.shards)
        return sum(int(f.get("bytes", 0)) for f in self.files.values())

    def group_numel(self) -> dict[str, int]:
        sizes = {p["name"]: _numel(p["shape"]) for p in self.params}
        return {g["name"]: sum(sizes[p] for p in g["params"]) for g in self.groups}

    def manifest(self) -> dict[str, Any]:
        body = {k: v for k, v in self.__dict__.items() if k not in ("shards", "files", "format")}
        out = {"format": self.format, **body}
        if self.format == FORMAT:
            out["shards"] = [s.as_dict() for s in self.shards]
        else:
            out["files"] = self.files
        return out

    def sources(self) -> list[Source]:
        """What a restore's shards read, paths relative to the store's root."""
        directory = posixpath.join(self.model, self.name)
        if self.format == FORMAT_1:
            sha = str(self.files.get(TENSORS_1, {}).get("sha256", ""))
            whole = {g: (0, n) for g, n in self.group_numel().items()}
            return [Source(posixpath.join(directory, TENSORS_1), whole, None, sha)]
        return [Source(posixpath.join(directory, s.file), dict(s.ranges), s.entry)
                for s in self.shards]  # fmt: skip


def assemble(meta: Mapping[str, Any], reports: Sequence[Mapping[str, Any]]) -> Checkpoint:
    """Join the shards' reports of one checkpoint (in shard order) into its manifest.

    `meta` holds the model-level fields of Checkpoint; each report has the shard's `version`,
    `file`, `entry` (FileEntry), `ranges`, `scalars`, `configs`, `schedule`, `schedule_state`.
    Refuses reports that disagree: every shard must be at one version with one config."""
    versions = {int(r["version"]) for r in reports}
    if len(versions) != 1:
        raise FailedPrecondition(f"shards are at different versions {sorted(versions)}")
    first = reports[0]
    for report in reports[1:]:
        for key in ("configs", "schedule", "scalars"):
            mine, theirs = report.get(key), first.get(key)
            if json.dumps(mine, sort_keys=True) != json.dumps(theirs, sort_keys=True):
                raise FailedPrecondition(f"shards disagree on {key}: {theirs} vs {mine}")
    names = [sorted(r["entry"].tensors) for r in reports]
    if any(n != names[0] for n in names):
        # e.g. SGD's momentum_buffer, made at the first step: all shards step together
        raise FailedPrecondition(f"shards hold different state tensors: {names}")
    shards = [
        ShardFile(
            i, {g: tuple(r) for g, r in report["ranges"].items()}, report["file"], report["entry"]
        )  # fmt: skip
        for i, report in enumerate(reports)
    ]
    return Checkpoint(
        version=versions.pop(),
        scalars=dict(first["scalars"]),
        schedule_state=dict(first["schedule_state"]),
        schedule=json.loads(first["schedule"]),
        group_configs={g: json.loads(c) for g, c in first["configs"].items()},
        # Groups every shard stepped alike (else a restore chooses afresh: engine/kernels.py).
        kernels={
            g: k
            for g, k in first.get("kernels", {}).items()
            if all(r.get("kernels", {}).get(g) == k for r in reports)
        },  # fmt: skip
        shards=shards,
        **meta,
    )


class Store:
    """Checkpoints under a root: a local directory or any fsspec URI (s3://, gs://, ...)."""

    def __init__(self, root: str) -> None:
        self.root = root.rstrip("/")
        self.fs, self._base = fsspec.core.url_to_fs(self.root)

    def path(self, relative: str) -> str:
        """The filesystem path of a path relative to the root (as Sources carry them)."""
        return posixpath.join(self._base, relative)

    def _dir(self, model: str, name: str = "") -> str:
        return self.path(posixpath.join(model, name) if name else model)

    def free_bytes(self) -> int | None:
        """Bytes free where a local store writes (None: not a local store, or unknown)."""
        from fsspec.implementations.local import LocalFileSystem

        if not isinstance(self.fs, LocalFileSystem):
            return None
        try:
            return shutil.disk_usage(self._base).free
        except OSError:
            return None

    def prepare(self, model: str, name: str) -> str:
        """Make a checkpoint's directory; return it relative to the root."""
        self.fs.makedirs(self._dir(model, name), exist_ok=True)
        return posixpath.join(model, name)

    def write_manifest(self, ckpt: Checkpoint) -> str:
        """Make a checkpoint whose files are written complete: its manifest goes last,
        atomically (and durably, on a local disk). Returns its name."""
        directory = self._dir(ckpt.model, ckpt.name)
        self._publish(directory, MANIFEST, json.dumps(ckpt.manifest(), indent=1, default=str))
        return ckpt.name

    def _publish(self, directory: str, name: str, text: str) -> None:
        """Write `name` in `directory` atomically and durably: a temporary file, fsynced; the
        directory fsynced (the shards' files and the temporary one are in it for good); the
        rename; the directory and its parent fsynced again (the rename, and the directory's
        own entry). fsspec stores commit each file whole on close, and have no fsync."""
        tmp = posixpath.join(directory, name + ".tmp")
        f, _ = open_file(self.fs, tmp, "wb")
        with f:
            f.write(text.encode())
            sync(f)
        sync_directory(self.fs, directory)
        self.fs.mv(tmp, posixpath.join(directory, name))
        sync_directory(self.fs, directory)
        sync_directory(self.fs, posixpath.dirname(directory.rstrip("/")))

    def remove(self, model: str, name: str) -> None:
        """Delete a checkpoint (unlisted first: the manifest goes before the files)."""
        directory = self._dir(model, name)
        try:
            if self.fs.exists(posixpath.join(directory, MANIFEST)):
                self.fs.rm(posixpath.join(directory, MANIFEST))
            self.fs.rm(directory, recursive=True)
        except FileNotFoundError:  # another pruner was here too
            pass

    def list(self, model: str) -> list[dict[str, Any]]:
        """Complete checkpoints of a model, oldest first: name, version, time, run."""
        found = []
        for name, complete in self._entries(model):
            if complete:
                millis, version, run = _NAME.fullmatch(name).groups()  # type: ignore[union-attr]
                found.append({"name": name, "version": int(version), "time": int(millis) / 1e3,
                              "run": run})  # fmt: skip
        return sorted(found, key=lambda c: c["name"])

    def _entries(self, model: str) -> builtins.list[tuple[str, bool]]:
        """(name, has a manifest) of every checkpoint directory of a model."""
        try:
            entries = self.fs.ls(self._dir(model), detail=False)
        except FileNotFoundError:
            return []
        out = []
        for entry in entries:
            name = posixpath.basename(entry.rstrip("/"))
            if _NAME.fullmatch(name):
                out.append((name, self.fs.exists(posixpath.join(entry, MANIFEST))))
        return out

    def mark_dropped(self, model: str) -> None:
        """Note that the model was dropped now: a restart does not bring it back."""
        self.fs.makedirs(self._dir(model), exist_ok=True)
        self._publish(self._dir(model), DROPPED, json.dumps({"time": time.time()}))

    def clear_dropped(self, model: str) -> None:
        """Forget a drop: the model was restored since."""
        if self.fs.exists(path := posixpath.join(self._dir(model), DROPPED)):
            self.fs.rm(path)
            sync_directory(self.fs, self._dir(model))

    def dropped_after_last_checkpoint(self, model: str) -> bool:
        """Whether the model was dropped after its newest checkpoint was taken. A drop mark
        that cannot be read counts as a drop: a restart must never bring back a dropped
        model (restoring it by name still can)."""
        path = posixpath.join(self._dir(model), DROPPED)
        if not self.fs.exists(path):
            return False
        try:
            with self.fs.open(path, "r") as f:
                dropped = float(json.loads(f.read())["time"])
        except Exception:  # noqa: BLE001 - damaged: as good as dropped now
            return True
        found = self.list(model)
        return not found or dropped >= found[-1]["time"]

    def models(self) -> builtins.list[str]:
        """Models with at least one complete checkpoint."""
        try:
            entries = self.fs.ls(self._base, detail=False)
        except FileNotFoundError:
            return []
        names = [posixpath.basename(e.rstrip("/")) for e in entries]
        return sorted(n for n in names if self.list(n))

    def candidates(
        self, model: str, name: str | None = None, run: str | None = None
    ) -> builtins.list[str]:
        """Checkpoint names to restore from, in order of preference: `name` alone if given,
        else every complete one (of run `run` if given), newest first."""
        available = [c for c in self.list(model) if run is None or c["run"] == run]
        if not available:
            raise NotFound(f"no checkpoint of model {model!r} under {self.root}")
        if name is not None:
            if name not in {c["name"] for c in available}:
                raise NotFound(f"model {model!r} has no checkpoint {name!r} under {self.root}")
            return [name]
        return [c["name"] for c in reversed(available)]

    def read(self, model: str, name: str | None = None, run: str | None = None) -> Checkpoint:
        """A checkpoint's manifest, checked: format, model, layout, and files that cover every
        group. Without `name`, the newest whose manifest reads sound (of run `run` if given).
        The tensor files are checked by the shards that read them."""
        failure: FailedPrecondition | None = None
        for candidate in self.candidates(model, name, run):
            try:
                return self.read_manifest(model, candidate)
            except FailedPrecondition as exc:
                failure = failure or exc
        assert failure is not None
        raise failure

    def read_manifest(self, model: str, name: str) -> Checkpoint:
        where = f"checkpoint {model}/{name}"
        try:
            with self.fs.open(posixpath.join(self._dir(model, name), MANIFEST), "r") as f:
                manifest = json.loads(f.read())
        except (OSError, ValueError) as exc:
            raise FailedPrecondition(f"{where} cannot be read: {exc}") from None
        if not isinstance(manifest, dict) or manifest.get("format") not in (FORMAT, FORMAT_1):
            found = manifest.get("format") if isinstance(manifest, dict) else None
            raise FailedPrecondition(
                f"{where} has format {found!r}; this server reads {FORMAT} and {FORMAT_1}"
            )
        try:
            body = {k: v for k, v in manifest.items() if k != "shards"}
            ckpt = Checkpoint(**body)
            ckpt.shards = [ShardFile.from_dict(s) for s in manifest.get("shards", [])]
            if ckpt.name != name:
                raise ValueError(f"its contents say it is {ckpt.name}")
            if ckpt.model != model:
                raise FailedPrecondition(f"{where} holds model {ckpt.model!r}")
            _check_coverage(ckpt, where)
        except FailedPrecondition:
            raise
        except Exception as exc:  # noqa: BLE001 - any malformed content is the same refusal
            raise FailedPrecondition(f"{where} is malformed: {exc!r}") from None
        return ckpt

    def check_files(self, ckpt: Checkpoint) -> None:
        """Every file the checkpoint names is there at the size its writer reported: what
        one look at each file shows, before shards are started to read them (their contents
        are verified by the shards that read them)."""
        for source in ckpt.sources():
            where = f"checkpoint {ckpt.model}/{ckpt.name}: {posixpath.basename(source.path)}"
            expected = source.entry.bytes if source.entry is not None else None
            if expected is None:
                expected = ckpt.files.get(TENSORS_1, {}).get("bytes")
            try:
                size = self.fs.size(self.path(source.path))
            except (OSError, ValueError) as exc:
                raise FailedPrecondition(f"{where} cannot be read: {exc}") from None
            if expected is not None and size != int(expected):
                raise FailedPrecondition(f"{where} has {size} bytes; its writer wrote {expected}")

    def prune(self, model: str, keep: int) -> builtins.list[str]:
        """Delete all but the newest `keep` complete checkpoints, and abandoned partial ones;
        return the names deleted."""
        if keep < 1:
            raise InvalidArgument(f"keep must be at least 1, got {keep}")
        doomed = [c["name"] for c in self.list(model)[:-keep]]
        cutoff_ms = (time.time() - ABANDONED_AFTER_S) * 1000
        doomed += [
            name
            for name, complete in self._entries(model)
            if not complete and int(name[:13]) < cutoff_ms
        ]
        for name in doomed:
            self.remove(model, name)
        return doomed


def _check_coverage(ckpt: Checkpoint, where: str) -> None:
    """Every group's elements lie in exactly one file, with the same tensors in every file."""
    numel = ckpt.group_numel()
    if ckpt.format == FORMAT_1:
        if not ckpt.files.get(TENSORS_1, {}).get("sha256"):
            raise FailedPrecondition(f"{where} names no tensors file")
        return
    if not ckpt.shards:
        raise FailedPrecondition(f"{where} lists no shard files")
    names = None
    for group, total in numel.items():
        spans = sorted(s.ranges.get(group, (-1, -1)) for s in ckpt.shards)
        position = 0
        for start, end in spans:
            if start != position or end < start:
                raise FailedPrecondition(f"{where}: the files do not cover group {group!r}")
            position = end
        if position != total:
            raise FailedPrecondition(f"{where}: the files cover {position} of {total} elements "
                                     f"of group {group!r}")  # fmt: skip
    for shard in ckpt.shards:
        found = sorted(shard.entry.tensors)
        if names is not None and found != names:
            raise FailedPrecondition(f"{where}: its files hold different tensors")
        names = found
        for group, (start, end) in shard.ranges.items():
            weights = shard.entry.tensors.get(f"{group}/weights")
            if weights is None:
                raise FailedPrecondition(f"{where} has no weights for group {group!r}")
            for tensor_name, tensor in shard.entry.tensors.items():
                if tensor_name.startswith(f"{group}/") and tensor.numel != end - start:
                    raise FailedPrecondition(
                        f"{where}: {shard.file} holds {tensor.numel} elements of {tensor_name}, "
                        f"its range has {end - start}"
                    )


def _numel(shape: Sequence[int]) -> int:
    n = 1
    for d in shape:
        n *= int(d)
    return n
