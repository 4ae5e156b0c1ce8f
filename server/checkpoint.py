"""Checkpoints: a consistent snapshot of one model, all shards at one version, on disk or any
fsspec URI. No Ray, no gRPC: the coordinator gathers shard state and calls this.

Layout of one checkpoint (format "optserve-checkpoint/1")::

    <root>/<model>/<version, 12 digits>-<unix ms>/
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
number of shards.
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
_NAME = re.compile(r"\d{12}-\d{13}")


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

    def manifest(self) -> dict[str, Any]:
        body = {k: v for k, v in self.__dict__.items() if k != "tensors"}
        return {"format": FORMAT, **body}


def gather(meta: Mapping[str, Any], shard_states: Sequence[Mapping[str, Any]]) -> Checkpoint:
    """Join the shards' state dicts (in shard order, all at one version) into one checkpoint.

    `meta` holds the model-level fields of Checkpoint (everything but version, scalars,
    schedule state and tensors)."""
    versions = {int(s["version"]) for s in shard_states}
    if len(versions) != 1:
        raise FailedPrecondition(f"shards are at different versions {sorted(versions)}")
    tensors: dict[str, torch.Tensor] = {}
    scalars: dict[str, dict[str, Any]] = {}
    for group in meta["groups"]:
        name = group["name"]
        parts = [s["groups"][name] for s in shard_states]
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
            prefix = f"{name}/state/"
            state: dict[str, Any] = dict(ckpt.scalars.get(name, {}))
            for key, tensor in ckpt.tensors.items():
                if key.startswith(prefix):
                    state[key[len(prefix) :]] = tensor[start:end].clone()
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
        name = f"{ckpt.version:012d}-{int(ckpt.created * 1000):013d}"
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
            if _NAME.fullmatch(name) and self.fs.exists(posixpath.join(entry, MANIFEST)):
                version, millis = name.split("-")
                found.append({"name": name, "version": int(version), "time": int(millis) / 1e3})
        return sorted(found, key=lambda c: c["name"])

    def models(self) -> list[str]:
        """Models with at least one complete checkpoint."""
        try:
            entries = self.fs.ls(self._base, detail=False)
        except FileNotFoundError:
            return []
        names = [posixpath.basename(e.rstrip("/")) for e in entries]
        return sorted(n for n in names if self.list(n))

    def read(self, model: str, name: str | None = None) -> Checkpoint:
        """A checkpoint (the newest if `name` is None), verified: format, checksum, tensors."""
        available = self.list(model)
        if not available:
            raise NotFound(f"no checkpoint of model {model!r} under {self.root}")
        if name is None:
            name = available[-1]["name"]
        elif name not in {c["name"] for c in available}:
            raise NotFound(f"model {model!r} has no checkpoint {name!r} under {self.root}")
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
            self.fs.rm(posixpath.join(directory, MANIFEST))  # unlisted first, then the rest
            self.fs.rm(directory, recursive=True)
        return doomed


def _check_tensors(ckpt: Checkpoint, what: str) -> None:
    sizes = {p["name"]: _numel(p["shape"]) for p in ckpt.params}
    for group in ckpt.groups:
        numel = sum(sizes[p] for p in group["params"])
        for key, tensor in ckpt.tensors.items():
            if key.startswith(group["name"] + "/") and tensor.numel() != numel:
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
