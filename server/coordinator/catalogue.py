"""The catalogue's vocabulary: what a model is, as the coordinator keeps it and as its shards
carry it. Pure logic: no Ray, no gRPC.

Every shard of a model carries the model's `ModelEntry` (its spec, configs, policies, and which
launch of shard actors it belongs to), so a coordinator that died and came back rebuilds its
catalogue from the running shards alone. `ModelRecord` is the coordinator's live view of one
model: the entry, the layout derived from it, and the handles of its shard actors.
"""

from __future__ import annotations

import copy
import dataclasses
import math
import re
import threading
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from optserve.common.config import (
    RULE_CONFIGS,
    ModeConfig,
    RangerConfig,
    RuleConfig,
    ScheduleConfig,
    mode_config_json,
    optimizer_config_json,
    parse_mode_config,
    parse_optimizer_config,
    parse_schedule_config,
    schedule_config_json,
    with_overrides,
)
from optserve.common.errors import InvalidArgument, ResourceExhausted
from optserve.common.layout import DEFAULT_GROUP, GroupLayout, ShardSlice, plan_group

# The entry's config fields and how their stored (JSON) form is read back.
_CONFIGS = {
    "optimizer": parse_optimizer_config,
    "schedule": parse_schedule_config,
    "mode": parse_mode_config,
}
MODEL_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}")
MAX_PARAM_NAME_CHARS = 512
MAX_PARAM_DIMS = 16
DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16,
          "float64": torch.float64}  # fmt: skip


@dataclass(frozen=True)
class Limits:
    """Bounds on what one request may make the server allocate."""

    # fp32 masters of one model, in bytes; None: derived from the cluster's memory when the
    # coordinator starts (`derive_max_model_bytes`).
    max_model_bytes: int | None = None
    max_models: int = 64
    max_params: int = 100_000
    max_shards: int = 256
    # How long a lookup of a model that is being created waits before answering UNAVAILABLE.
    creation_wait_s: float = 30.0
    # How long a new model's shards wait for their initial values (Shard/Load) before the
    # coordinator gives the model up and drops it (its creator went away).
    initial_values_timeout_s: float = 600.0
    max_groups: int = 64
    max_metric_history: int = 10_000
    max_audit_entries: int = 10_000


# Masters plus up to four state buffers of the same length (AdaBound with amsbound under
# Lookahead holds four) plus room for pushes in flight: what a model of N master bytes needs.
MEMORY_PER_MASTER_BYTE = 6


def derive_max_model_bytes(cluster_memory_bytes: float) -> int:
    """The largest model (fp32 master bytes) the cluster's memory holds with its optimizer state:
    Ray's `memory` resource over all nodes, divided by MEMORY_PER_MASTER_BYTE; at least 1 GiB."""
    return max(1 << 30, int(cluster_memory_bytes // MEMORY_PER_MASTER_BYTE))


@dataclass(frozen=True)
class GroupSpec:
    """A parameter group as a CreateModel request declares it."""

    name: str
    params: tuple[str, ...]
    overrides: Mapping[str, Any]


@dataclass
class ModelEntry:
    """A model's catalogue entry, carried by every one of its shards.

    `launch` names one set of shard actors (a restore starts a new set); `run_id` names the
    model's life, kept through restores (checkpoint names carry it). A launch is `committed`
    once the coordinator has made it the model's current one; `replaces` names the launch it
    took over from (a restart stops that one if it still runs); `dropping` is set before a drop
    stops the shards.

    The configs are validated objects (parsed once, at the edge); `as_dict` is the JSON-able
    form that is stored (checkpoint manifests) and `from_dict` reads it back."""

    model: str
    service: str
    launch: str
    run_id: str
    params: list[dict[str, Any]]  # {"name", "shape", "dtype"} in declaration order
    groups: list[dict[str, Any]]  # {"name", "params": [names in flat order]}
    overrides: dict[str, dict[str, Any]]
    optimizer: RuleConfig
    schedule: ScheduleConfig
    mode: ModeConfig
    # The model's own periodic-checkpoint policy ({}: the server's default).
    checkpoint_policy: dict[str, Any]
    num_shards: int
    device: str
    placement_group: str
    created: float = field(default_factory=time.time)
    committed: bool = False
    replaces: str | None = None
    dropping: bool = False
    # A fork's lineage (server/coordinator/forks.py): "forked_from", "fork_version",
    # "fork_checkpoint", "parent_run" (the parent's run id); and "aliases", the names that
    # resolve to this model once promoted.
    lineage: dict[str, Any] = field(default_factory=dict)

    def as_dict(self) -> dict[str, Any]:
        out = {f: getattr(self, f) for f in self.__dataclass_fields__}
        for key in _CONFIGS:
            out[key] = out[key].model_dump(mode="json")
        return copy.deepcopy(out)

    @classmethod
    def from_dict(cls, value: Mapping[str, Any]) -> ModelEntry:
        known = {f for f in cls.__dataclass_fields__}
        fields = {k: v for k, v in value.items() if k in known}
        for key, parse in _CONFIGS.items():
            fields[key] = parse(fields[key])
        return cls(**fields)

    def with_changes(self, changes: Mapping[str, Any]) -> ModelEntry:
        """This entry with some fields replaced (configs as objects, which pass as they are,
        or in their JSON form)."""
        fields = dict(changes)
        for key in _CONFIGS.keys() & fields.keys():
            fields[key] = _CONFIGS[key](fields[key])
        return dataclasses.replace(self, **fields)

    def layouts(self) -> list[GroupLayout]:
        return layouts_of(self.params, self.groups)


def layouts_of(
    params: Sequence[Mapping[str, Any]], groups: Sequence[Mapping[str, Any]]
) -> list[GroupLayout]:
    """Group layouts from a ModelEntry's (or a checkpoint manifest's) `params` and `groups`."""
    specs = {p["name"]: (p["name"], tuple(p["shape"]), DTYPES[p["dtype"]]) for p in params}
    return [plan_group(g["name"], [specs[n] for n in g["params"]]) for g in groups]


def entry_layout(
    layouts: Sequence[GroupLayout],
) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """The `params` and `groups` of a ModelEntry (or a checkpoint manifest) for `layouts`."""
    params = [
        {"name": p.name, "shape": list(p.shape), "dtype": str(p.dtype).split(".")[-1]}
        for g in layouts
        for p in g.params
    ]
    groups = [{"name": g.name, "params": [p.name for p in g.params]} for g in layouts]
    return params, groups


@dataclass
class ModelRecord:
    """The coordinator's view of one running model."""

    entry: ModelEntry
    groups: list[GroupLayout]
    shards: list[ShardSlice]
    actors: list[Any]
    placement_group: Any = None
    # One control change at a time per model (re-entrant: set_hyperparameters -> set_optimizer).
    control_lock: threading.RLock = field(default_factory=threading.RLock)
    # One checkpoint at a time per model.
    checkpoint_lock: threading.Lock = field(default_factory=threading.Lock)
    # The newest checkpoint of this run: (version, unix time), None if there is none.
    last_checkpoint: tuple[int, float] | None = None
    # Set when the model is down for good (a shard died and no checkpoint could bring it back).
    lost: str | None = None
    # True until every shard holds its initial values (Shard/Load).
    initializing: bool = False
    # The model's version when the watch last saw every shard (for the metrics).
    last_version: int | None = None
    # True while a recovery (a restore onto fresh shards) of this model runs.
    recovering: bool = False
    # Periodic checkpoints that failed in a row, and when the next may be tried (monotonic).
    checkpoint_failures: int = 0
    checkpoint_retry_at: float = 0.0
    # The newest failed checkpoint of this record: {"time", "reason", "error"} (for status).
    last_checkpoint_failure: dict[str, Any] | None = None
    # Bytes of this record's newest checkpoint (what the next one needs free in the store).
    last_checkpoint_bytes: int = 0
    # Set (under the coordinator's lock) when a drop begins: no checkpoint starts after it,
    # and one in flight publishes no manifest (a restart must not bring the model back).
    dropping: bool = False
    # Checkpoints this run wrote or was restored from at its newest such version: the model
    # holds their state as long as its version has not moved past it.
    same_as: dict[str, int] = field(default_factory=dict)

    def holds(self, checkpoint: str, version: int) -> None:
        """The model held `checkpoint`'s state at `version` (it wrote it or was restored)."""
        newest = max(self.same_as.values(), default=-1)
        if version > newest:
            self.same_as = {}
        if version >= newest:
            self.same_as[checkpoint] = version

    @property
    def name(self) -> str:
        return self.entry.model

    @property
    def run_id(self) -> str:
        return self.entry.run_id

    @property
    def device(self) -> str:
        return self.entry.device

    @property
    def overrides(self) -> dict[str, dict[str, Any]]:
        return self.entry.overrides

    @property
    def optimizer(self) -> RuleConfig:
        return self.entry.optimizer

    @property
    def schedule(self) -> ScheduleConfig:
        return self.entry.schedule

    @property
    def mode(self) -> ModeConfig:
        return self.entry.mode

    @property
    def optimizer_json(self) -> str:
        return optimizer_config_json(self.optimizer)

    @property
    def schedule_json(self) -> str:
        return schedule_config_json(self.schedule)

    @property
    def mode_json(self) -> str:
        return mode_config_json(self.mode)


def check_model_name(name: str) -> None:
    if not MODEL_NAME.fullmatch(name):
        raise InvalidArgument(
            f"invalid model name {name!r}: use 1-128 letters, digits, '.', '_' or '-', "
            "starting with a letter or digit"
        )


def plan_groups(
    params: Sequence[tuple[str, Sequence[int], torch.dtype]],
    groups: Sequence[GroupSpec],
    limits: Limits,
) -> tuple[list[GroupLayout], dict[str, dict[str, Any]]]:
    """Group layouts in declaration order; parameters in no group form the group "default"."""
    if len(groups) > limits.max_groups:
        raise ResourceExhausted(f"{len(groups)} parameter groups; the limit is {limits.max_groups}")
    by_name = {p[0]: p for p in params}
    owner: dict[str, str] = {}
    layouts, overrides = [], {}
    for group in groups:
        if "/" in group.name:
            raise InvalidArgument(f"parameter group names cannot contain '/': {group.name!r}")
        if not group.name or group.name in overrides:
            raise InvalidArgument(
                f"parameter group names must be unique and non-empty: {group.name!r}"
            )
        if not group.params:
            raise InvalidArgument(f"parameter group {group.name!r} has no parameters")
        for pname in group.params:
            if pname not in by_name:
                raise InvalidArgument(f"group {group.name!r} names unknown parameter {pname!r}")
            if pname in owner:
                raise InvalidArgument(
                    f"parameter {pname!r} is in groups {owner[pname]!r} and {group.name!r}"
                )
            owner[pname] = group.name
        layouts.append(plan_group(group.name, [by_name[n] for n in group.params]))
        overrides[group.name] = dict(group.overrides)
    rest = [p for p in params if p[0] not in owner]
    if rest:
        if DEFAULT_GROUP in overrides:
            raise InvalidArgument(
                f"parameters {[p[0] for p in rest][:5]} are in no group, and a group is already "
                f"named {DEFAULT_GROUP!r}"
            )
        layouts.append(plan_group(DEFAULT_GROUP, rest))
        overrides[DEFAULT_GROUP] = {}
    return layouts, overrides


def group_config(optimizer: RuleConfig, overrides: Mapping[str, Any]) -> tuple[RuleConfig, list]:
    """A group's config under `optimizer`: its overrides that the rule has, and the others."""
    fields = RULE_CONFIGS[optimizer.name].model_fields
    kept = {k: v for k, v in overrides.items() if k in fields}
    return with_overrides(optimizer, kept), sorted(set(overrides) - set(kept))


def tensor_views(group: GroupLayout, start: int, end: int) -> list[tuple[int, tuple[int, ...]]]:
    """(offset within [start, end), shape) of each parameter lying wholly inside the range."""
    return [
        (p.offset - start, p.shape)
        for p in group.params
        if p.offset >= start and p.offset + p.numel <= end
    ]


def check_gradient_centralization(
    configs: Mapping[str, RuleConfig], groups: Sequence[GroupLayout], slices: Sequence[ShardSlice]
) -> None:
    """Ranger's gradient centralization is per tensor: each such tensor must sit on one shard."""
    for group in groups:
        config = configs[group.name]
        if not (isinstance(config, RangerConfig) and config.use_gc) or len(slices) == 1:
            continue
        for p in group.params:
            if len(p.shape) > 1 and not any(
                s.ranges[group.name][0] <= p.offset
                and p.offset + p.numel <= s.ranges[group.name][1]
                for s in slices
            ):
                raise InvalidArgument(
                    f"use_gc needs every tensor it centralizes on one shard, but {p.name!r} "
                    f"spans shards; use fewer shards or use_gc=false"
                )


def validate_params(
    name: str,
    params: Sequence[tuple[str, Sequence[int], torch.dtype]],
    limits: Limits,
    max_model_bytes: int | None = None,
) -> None:
    """Refuse a model spec before anything starts: name, parameter names, shapes, size
    (`max_model_bytes`: the server's limit, by default the one in `limits` or 1 GiB)."""
    max_model_bytes = max_model_bytes or limits.max_model_bytes or 1 << 30
    check_model_name(name)
    if not params:
        raise InvalidArgument(f"model {name!r} has no parameters")
    if len(params) > limits.max_params:
        raise ResourceExhausted(
            f"model {name!r} has {len(params)} parameters; the limit is {limits.max_params}"
        )
    seen: set[str] = set()
    master_bytes = declared_bytes = 0
    for pname, shape, dtype in params:
        if not pname or len(pname) > MAX_PARAM_NAME_CHARS:
            raise InvalidArgument(
                f"parameter name {pname[:40]!r} must have 1-{MAX_PARAM_NAME_CHARS} characters"
            )
        if pname in seen:
            raise InvalidArgument(f"parameter {pname!r} is declared twice")
        seen.add(pname)
        # Strides are products of the dims (zeros count as 1): keep them within int64.
        if (
            len(shape) > MAX_PARAM_DIMS
            or any(d < 0 for d in shape)
            or math.prod(max(d, 1) for d in shape) >= 1 << 62
        ):
            raise InvalidArgument(f"parameter {pname!r} has invalid shape {list(shape)}")
        numel = math.prod(shape)
        master_bytes += numel * 4
        declared_bytes += numel * dtype.itemsize
        if max(master_bytes, declared_bytes) > max_model_bytes:
            raise ResourceExhausted(
                f"model {name!r} exceeds the size limit of {max_model_bytes} bytes of fp32 "
                "masters (optserve serve --max-model-bytes)"
            )
