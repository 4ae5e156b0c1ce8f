"""Checkpoints: a consistent snapshot of one model, all shards at one version, on disk or any
fsspec URI. No Ray, no gRPC: the coordinator gathers shard state and calls this.

Layout of one checkpoint (format "optserve-checkpoint/1")::

    <root>/<model>/<unix ms, 13 digits>-<version, 12 digits>-<run id>/
        tensors.safetensors   every group's flat weights and state buffers, whole-model length:
                              "<group>/weights", "<group>/state/<key>" (fp32)
        manifest.json         written last, atomically (a temporary name, then a rename):
                              format, model, version, time, parameters and groups (the layout),
                              every config, schedule state, update mode, per-group scalars
                              (step counters, AdaBound's base_lr, Lookahead's counter), the
                              audit log and metrics, the shard count, and the tensors file's
                              size and SHA-256

A directory without a manifest is an interrupted write: it is not listed and never loaded.
Tensors are stored for the whole model, not per shard, so a checkpoint restores onto any
number of shards. Checkpoints are ordered by the time they were taken, not by version: after a
restore to an older version, the new run's checkpoints are the newest. The run id names one
life of a model (from its creation, kept through restores), so crash recovery only ever uses
the run's own checkpoints. `<root>/<model>/dropped.json` marks a model dropped at that time.
"""

from __future__ import annotations

import hashlib
import json
import posixpath
import re
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import fsspec
import torch
from safetensors.torch import load as load_tensors
from safetensors.torch import save as save_tensors

from optserve.client.errors import FailedPrecondition, InvalidArgument, NotFound

FORMAT = "optserve-checkpoint/1"
MANIFEST = "manifest.json"
TENSORS = "tensors.safetensors"
# <unix ms, 13 digits>-<version, 12 digits>-<run id>: names sort by the time they were taken.
_NAME = re.compile(r"(\d{13})-(\d{12})-([0-9a-f]{1,32})")
DROPPED = "dropped.json"


@dataclass
class Checkpoint:
    """One model at one version, as the coordinator gathered it (or a store read it back)."""

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
    tensors: dict[str, torch.Tensor] = field(repr=False)
    audit: list[dict[str, Any]] = field(default_factory=list)
    metrics: list[dict[str, Any]] = field(default_factory=list)
    created: float = field(default_factory=time.time)
    num_shards: int = 1  # how many shards it ran on (what a restart restores it onto)
    run_id: str = "0"
    checkpoint_policy: dict[str, Any] = field(default_factory=dict)

    @property
    def name(self) -> str:
        return f"{int(self.created * 1000):013d}-{self.version:012d}-{self.run_id}"

    def manifest(self) -> dict[str, Any]:
        body = {k: v for k, v in self.__dict__.items() if k != "tensors"}
        return {"format": FORMAT, **body}


def gather(meta: Mapping[str, Any], shard_states: Sequence[Mapping[str, Any]]) -> Checkpoint:
    """Join the shards' state dicts (in shard order, all at one version) into one checkpoint.

    `meta` holds the model-level fields of Checkpoint; version, scalars, schedule, group
    configs and tensors come from the shards."""
    versions = {int(s["version"]) for s in shard_states}
    if len(versions) != 1:
        raise FailedPrecondition(f"shards are at different versions {sorted(versions)}")
    tensors: dict[str, torch.Tensor] = {}
    scalars: dict[str, dict[str, Any]] = {}
    configs: dict[str, dict[str, Any]] = {}
    for group in meta["groups"]:
        name = group["name"]
        parts = [s["groups"][name] for s in shard_states]
        configs[name] = json.loads(parts[0]["config"])  # what the shards actually run
        tensors[f"{name}/weights"] = torch.cat([p["weights"].reshape(-1) for p in parts])
        keys = set().union(*(p["state"] for p in parts))
        values: dict[str, Any] = {}
        for key in sorted(keys):
            found = [p["state"].get(key) for p in parts]
            if all(isinstance(v, torch.Tensor) for v in found):
                tensors[f"{name}/state/{key}"] = torch.cat([v.reshape(-1) for v in found])
            elif any(isinstance(v, torch.Tensor) for v in found):
                # e.g. SGD's momentum_buffer, made at the first step: all shards step together
                raise FailedPrecondition(f"state {key!r} of group {name!r} is on some shards only")
            elif len({json.dumps(v) for v in found}) != 1:
                raise FailedPrecondition(f"shards disagree on {name}/{key}: {found}")
            else:
                values[key] = found[0]
        scalars[name] = values
    return Checkpoint(
        version=versions.pop(),
        scalars=scalars,
        schedule_state=dict(shard_states[0].get("schedule_state", {})),
        schedule=json.loads(shard_states[0]["schedule"]),
        group_configs=configs,
        tensors=tensors,
        **meta,
    )


def split(ckpt: Checkpoint, ranges: Sequence[Mapping[str, tuple[int, int]]]) -> list[dict]:
    """Shard state dicts (as ShardState.load_state_dict takes) for a layout of any shard count:
    `ranges[i]` maps each group to shard i's [start, end)."""
    states = []
    for shard_ranges in ranges:
        groups = {}
        for group in ckpt.groups:
            name = group["name"]
            start, end = shard_ranges[name]
            state: dict[str, Any] = dict(ckpt.scalars.get(name, {}))
            for key, tensor in ckpt.tensors.items():
                group_name, sep, state_key = key.rpartition("/state/")
                if sep and group_name == name:
                    state[state_key] = tensor[start:end].clone()
            groups[name] = {
                "weights": ckpt.tensors[f"{name}/weights"][start:end].clone(),
                "config": json.dumps(ckpt.group_configs[name]),
                "state": state,
            }
        states.append({
            "version": ckpt.version,
            "schedule": json.dumps(ckpt.schedule),
            "schedule_state": ckpt.schedule_state,
            "groups": groups,
        })  # fmt: skip
    return states


class Store:
    """Checkpoints under a root: a local directory or any fsspec URI (s3://, gs://, ...)."""

    def __init__(self, root: str) -> None:
        self.root = root.rstrip("/")
        self.fs, self._base = fsspec.core.url_to_fs(self.root)

    def _dir(self, model: str, name: str = "") -> str:
        return (
            posixpath.join(self._base, model, name) if name else posixpath.join(self._base, model)
        )

    def write(self, ckpt: Checkpoint) -> str:
        """Write one checkpoint; return its name. The manifest goes last, atomically."""
        name = ckpt.name
        directory = self._dir(ckpt.model, name)
        self.fs.makedirs(directory, exist_ok=True)
        data = save_tensors({k: v.contiguous() for k, v in ckpt.tensors.items()})
        with self.fs.open(posixpath.join(directory, TENSORS), "wb") as f:
            f.write(data)
        manifest = {
            **ckpt.manifest(),
            "files": {TENSORS: {"bytes": len(data), "sha256": hashlib.sha256(data).hexdigest()}},
        }
        tmp = posixpath.join(directory, MANIFEST + ".tmp")
        with self.fs.open(tmp, "w") as f:
            f.write(json.dumps(manifest, indent=1, default=str))
        self.fs.mv(tmp, posixpath.join(directory, MANIFEST))
        return name

    def list(self, model: str) -> list[dict[str, Any]]:
        """Complete checkpoints of a model, oldest first: name, version, time."""
        try:
            entries = self.fs.ls(self._dir(model), detail=False)
        except FileNotFoundError:
            return []
        found = []
        for entry in entries:
            name = posixpath.basename(entry.rstrip("/"))
            match = _NAME.fullmatch(name)
            if match and self.fs.exists(posixpath.join(entry, MANIFEST)):
                millis, version, run = match.groups()
                found.append({"name": name, "version": int(version), "time": int(millis) / 1e3,
                              "run": run})  # fmt: skip
        return sorted(found, key=lambda c: c["name"])

    def mark_dropped(self, model: str) -> None:
        """Note that the model was dropped now: a restart does not bring it back."""
        self.fs.makedirs(self._dir(model), exist_ok=True)
        with self.fs.open(posixpath.join(self._dir(model), DROPPED), "w") as f:
            f.write(json.dumps({"time": time.time()}))

    def dropped_after_last_checkpoint(self, model: str) -> bool:
        path = posixpath.join(self._dir(model), DROPPED)
        if not self.fs.exists(path):
            return False
        with self.fs.open(path, "r") as f:
            dropped = json.loads(f.read()).get("time", 0)
        found = self.list(model)
        return not found or dropped >= found[-1]["time"]

    def models(self) -> list[str]:
        """Models with at least one complete checkpoint."""
        try:
            entries = self.fs.ls(self._base, detail=False)
        except FileNotFoundError:
            return []
        names = [posixpath.basename(e.rstrip("/")) for e in entries]
        return sorted(n for n in names if self.list(n))

    def read(self, model: str, name: str | None = None, run: str | None = None) -> Checkpoint:
        """A checkpoint, verified: format, checksum, tensors. Without `name`, the newest one
        that reads back sound (of run `run` if given): a damaged newest one falls back."""
        available = [c for c in self.list(model) if run is None or c["run"] == run]
        if not available:
            raise NotFound(f"no checkpoint of model {model!r} under {self.root}")
        if name is not None:
            if name not in {c["name"] for c in available}:
                raise NotFound(f"model {model!r} has no checkpoint {name!r} under {self.root}")
            return self._read_one(model, name)
        failure: FailedPrecondition | None = None
        for entry in reversed(available):
            try:
                return self._read_one(model, entry["name"])
            except FailedPrecondition as exc:
                failure = failure or exc
        assert failure is not None
        raise failure

    def _read_one(self, model: str, name: str) -> Checkpoint:
        directory = self._dir(model, name)
        try:
            with self.fs.open(posixpath.join(directory, MANIFEST), "r") as f:
                manifest = json.loads(f.read())
            with self.fs.open(posixpath.join(directory, TENSORS), "rb") as f:
                data = f.read()
        except (OSError, ValueError) as exc:
            raise FailedPrecondition(f"checkpoint {model}/{name} cannot be read: {exc}") from None
        if manifest.get("format") != FORMAT:
            raise FailedPrecondition(
                f"checkpoint {model}/{name} has format {manifest.get('format')!r}, not {FORMAT}"
            )
        expected = manifest.get("files", {}).get(TENSORS, {})
        if hashlib.sha256(data).hexdigest() != expected.get("sha256"):
            raise FailedPrecondition(f"checkpoint {model}/{name}: {TENSORS} fails its checksum")
        try:
            tensors = load_tensors(data)
            body = {k: v for k, v in manifest.items() if k not in ("format", "files")}
            ckpt = Checkpoint(tensors=tensors, **body)
        except Exception as exc:  # noqa: BLE001 - any malformed content is the same refusal
            raise FailedPrecondition(f"checkpoint {model}/{name} is malformed: {exc}") from None
        if ckpt.model != model:
            raise FailedPrecondition(f"checkpoint {model}/{name} holds model {ckpt.model!r}")
        _check_tensors(ckpt, f"{model}/{name}")
        return ckpt

    def prune(self, model: str, keep: int) -> list[str]:
        """Delete all but the newest `keep` complete checkpoints; return what was deleted."""
        if keep < 1:
            raise InvalidArgument(f"keep must be at least 1, got {keep}")
        doomed = [c["name"] for c in self.list(model)[:-keep]]
        for name in doomed:
            directory = self._dir(model, name)
            try:  # unlisted first (no manifest), then the rest; another pruner may be here too
                self.fs.rm(posixpath.join(directory, MANIFEST))
                self.fs.rm(directory, recursive=True)
            except FileNotFoundError:
                pass
        return doomed


def _check_tensors(ckpt: Checkpoint, what: str) -> None:
    sizes = {p["name"]: _numel(p["shape"]) for p in ckpt.params}
    for group in ckpt.groups:
        numel = sum(sizes[p] for p in group["params"])
        for key, tensor in ckpt.tensors.items():
            owner = key.rpartition("/state/")[0] if "/state/" in key else key.rpartition("/")[0]
            if owner == group["name"] and tensor.numel() != numel:
                raise FailedPrecondition(
                    f"checkpoint {what}: {key} has {tensor.numel()} elements, the group has {numel}"
                )
        if f"{group['name']}/weights" not in ckpt.tensors:
            raise FailedPrecondition(f"checkpoint {what} has no weights for group {group['name']}")


def _numel(shape: Sequence[int]) -> int:
    n = 1
    for d in shape:
        n *= int(d)
    return n
