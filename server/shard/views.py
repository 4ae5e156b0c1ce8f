"""What a shard shows of its state without changing it: weights for a pull, everything for a
checkpoint (`CheckpointView`; a restore brings `GroupValues` back), a digest, its status.
Mixed into `ShardState`, whose lock and buffers these read. Also what a shard starts a group
from (`GroupInit`)."""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import threading
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, TypeVar

import torch

from optserve.common.config import RuleConfig, optimizer_config_json, schedule_config_json
from optserve.server.engine.base import TensorViews
from optserve.server.engine.group import GroupEngine
from optserve.server.engine.schedules import Schedule
from optserve.server.shard.snapshots import PullSnapshots, Snapshot

log = logging.getLogger(__name__)
T = TypeVar("T")


@dataclass(frozen=True)
class GroupInit:
    """What a shard needs to start one group: its slice of the weights, its config, and the
    (offset, shape) of every parameter tensor wholly inside the slice.

    Without `weights` (then `numel` says the slice's length) the shard starts empty and
    serves nothing until its values arrive: `initialize` (a new model's initial values) or
    `load` (a checkpoint)."""

    weights: torch.Tensor | None
    config: RuleConfig
    views: TensorViews = ()
    numel: int | None = None
    # The whole group's elements across the model's shards (default: this slice's): it picks
    # the group's kernel, so every shard of a model takes the same one.
    group_numel: int | None = None

    @property
    def length(self) -> int:
        if self.weights is not None:
            return self.weights.numel()
        if self.numel is None:
            raise ValueError("a GroupInit needs weights or numel")
        return self.numel


@dataclass
class GroupValues:
    """One group's values as a restore reads them: weights and state tensors on the shard's
    device (taken over, not copied), and the group's config."""

    weights: torch.Tensor
    config: RuleConfig
    state: dict[str, Any]
    kernel: str | None = None  # the kernel that wrote them (engine/kernels.py), if recorded


@dataclass
class CheckpointView:
    """A shard's state at a checkpoint's version: live tensors (valid while the model is
    held at that version) and everything else as plain values."""

    version: int
    tensors: dict[str, torch.Tensor]  # "<group>/weights", "<group>/state/<key>"
    scalars: dict[str, dict[str, Any]]
    configs: dict[str, str]
    schedule: str
    schedule_state: dict[str, Any]
    kernels: dict[str, str]  # each group's kernel (engine/kernels.py): part of its numerics


class StateViews:
    """The reads of `ShardState`."""

    # What they read, set by ShardState (declared for the type checker).
    model: str
    index: int
    version: int
    _epoch: int
    device: torch.device
    broken: str | None
    ready: bool
    preparing: bool
    _lock: threading.RLock
    _groups: dict[str, GroupEngine]
    _plans: dict[str, Any]
    _schedule: Schedule
    _schedule_config: Any
    _staged: dict[str, dict[str, torch.Tensor]]
    _settings_cache: tuple[tuple[Any, ...], str] | None

    if TYPE_CHECKING:

        def _at(self, at_version: int | None) -> contextlib.AbstractContextManager[None]: ...

        def _check_sound(self) -> None: ...

        def lr(self, group: str) -> float: ...

        def config(self, group: str) -> RuleConfig: ...

        def lrs_at(self, version: int) -> dict[str, float]: ...

    def settings(self, version: int) -> tuple[dict[str, float], str]:
        """What a pull tells of the model's settings after `version` (from its leader, whose
        schedule has seen every reported metric): each group's lr for the next update, and
        {"groups": {group: config}, "schedule": config} as JSON (kept until a config changes)."""
        lrs = self.lrs_at(version + 1)
        key = (self._schedule_config, *(self.config(name) for name in self._plans))
        cached = self._settings_cache
        if (
            cached is None
            or len(cached[0]) != len(key)
            or any(a is not b for a, b in zip(cached[0], key, strict=True))
        ):
            groups = {name: json.loads(optimizer_config_json(self.config(name)))
                      for name in self._plans}  # fmt: skip
            schedule = json.loads(schedule_config_json(self._schedule_config))
            cached = (key, json.dumps({"groups": groups, "schedule": schedule}))
            self._settings_cache = cached
        return lrs, cached[1]

    def read_weights(self, fn: Callable[[int, dict[str, torch.Tensor]], T]) -> T:
        """Run `fn(version, per-group weights)` while no update can change them.

        `fn` must copy what it keeps and must be quick: pushes wait meanwhile."""
        with self._lock:
            self._check_sound()
            return fn(self.version, {name: g.weights for name, g in self._groups.items()})

    def pull_snapshot(self, snapshots: PullSnapshots, dtype: torch.dtype) -> Snapshot:
        """The weights a pull sends, in `dtype`: the snapshot of this version that pulls
        already read, or one taken now (server/shard/snapshots.py). `snapshots.release` it
        once sent."""
        with self._lock:
            self._check_sound()
            weights = {name: g.weights for name, g in self._groups.items()}
            return snapshots.acquire((self._epoch, self.version, dtype), weights)

    def snapshot(self) -> tuple[int, dict[str, torch.Tensor]]:
        """A consistent copy of (version, per-group weights) on the CPU."""
        with self._lock:
            return self.version, {
                name: g.weights.detach().to("cpu", copy=True) for name, g in self._groups.items()
            }

    def checkpoint_view(self, at_version: int) -> CheckpointView:
        """Everything a checkpoint holds, once this shard is at `at_version`: the live weight
        and state tensors (no copy: the caller keeps the model at that version while it
        reads them) and the scalars, configs and schedule state."""
        with self._at(at_version):
            tensors: dict[str, torch.Tensor] = {}
            scalars: dict[str, dict[str, Any]] = {}
            for name, group in self._groups.items():
                tensors[f"{name}/weights"] = group.weights
                scalars[name] = {}
                for key, value in sorted(group.state.items()):
                    if isinstance(value, torch.Tensor):
                        tensors[f"{name}/state/{key}"] = value
                    else:
                        scalars[name][key] = value
            return CheckpointView(
                version=self.version,
                tensors=tensors,
                scalars=scalars,
                configs={name: optimizer_config_json(g.config) for name, g in self._groups.items()},
                kernels={name: g.kernel_record for name, g in self._groups.items()},
                schedule=schedule_config_json(self._schedule_config),
                schedule_state=self._schedule.state_dict(),
            )

    def health(self) -> dict[str, Any]:
        """What the coordinator's watch needs: version, broken (why, or None), ready."""
        with self._lock:
            return {"version": self.version, "broken": self.broken, "ready": self.ready}

    def state_dict(self, at_version: int | None = None) -> dict[str, Any]:
        """A consistent copy of everything: version, weights, rule state, schedule state
        (at version `at_version`, a checkpoint's boundary, when given)."""
        with self._at(at_version):
            return {
                "version": self.version,
                "schedule": schedule_config_json(self._schedule_config),
                "schedule_state": self._schedule.state_dict(),
                "groups": {
                    name: {"weights": g.weights.detach().to("cpu", copy=True), **g.state_dict()}
                    for name, g in self._groups.items()
                },
            }

    def digest(self) -> str:
        """SHA-256 of the version, weights, every state buffer and scalar, configs and schedule
        state: equal digests mean nothing changed (what a refused request must leave)."""
        digest = hashlib.sha256()

        def feed(key: str, value: Any) -> None:
            if isinstance(value, torch.Tensor):
                flat = value.detach().to("cpu").contiguous().reshape(-1)
                digest.update(f"{key}:{flat.dtype}:".encode())
                digest.update(flat.view(torch.uint8).numpy().tobytes())
            elif isinstance(value, Mapping):
                for k in sorted(value, key=str):
                    feed(f"{key}/{k}", value[k])
            else:
                digest.update(f"{key}={value!r};".encode())

        with self._lock:
            feed("", self.state_dict())  # configs included
        return digest.hexdigest()

    def info(self) -> dict[str, Any]:
        with self._lock:
            return {
                "model": self.model,
                "index": self.index,
                "version": self.version,
                "device": str(self.device),
                "broken": self.broken,
                "staged": len(self._staged),
                "schedule": schedule_config_json(self._schedule_config),
                "schedule_state": self._schedule.state_dict(),
                "ready": self.ready,
                "preparing": self.preparing,
                "groups": {name: self._describe(name) for name in self._plans},
            }

    def _describe(self, group: str) -> dict[str, Any]:
        engine = self._groups.get(group)
        if engine is not None:
            return {**engine.describe(), "lr": self.lr(group)}
        config = self._plans[group].config
        return {"rule": config.name, "config": json.loads(optimizer_config_json(config)),
                "numel": self._plans[group].length, "path": "none", "scalars": {},
                "lr": self.lr(group)}  # fmt: skip
