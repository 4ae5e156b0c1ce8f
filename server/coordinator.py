"""The coordinator: the catalogue of models, their layouts and shard actors. No tensor math.

`Coordinator` is plain Python over Ray handles; `CoordinatorActor` is the named Ray actor that
owns one and serves it on the gRPC front door (the Coordinator service).
"""

from __future__ import annotations

import json
import logging
import math
import re
import secrets
import threading
import time
import uuid
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, TypeVar

import ray
import torch
from ray.util.placement_group import placement_group, remove_placement_group
from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

from optserve.client.config import (
    RULE_CONFIGS,
    AsyncMode,
    RangerConfig,
    RuleConfig,
    mode_config_json,
    optimizer_config_json,
    parse_mode_config,
    parse_optimizer_config,
    parse_schedule_config,
    schedule_config_json,
    with_overrides,
)
from optserve.client.errors import (
    Aborted,
    AlreadyExists,
    FailedPrecondition,
    InvalidArgument,
    NotFound,
    ResourceExhausted,
    Unavailable,
)
from optserve.client.layout import (
    DEFAULT_GROUP,
    GroupLayout,
    ShardSlice,
    flatten_group,
    plan_group,
    split_ranges,
)
from optserve.server.auth import EdgeConfig
from optserve.server.checkpoint import Checkpoint, Store, gather, split
from optserve.server.metrics import CoordinatorMetrics
from optserve.server.shard_actor import SHARD_THREADS, ShardActor

log = logging.getLogger(__name__)
T = TypeVar("T")

MODEL_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}")
MAX_PARAM_NAME_CHARS = 512
MAX_PARAM_DIMS = 16


@dataclass(frozen=True)
class Limits:
    """Bounds on what one request may make the server allocate."""

    # fp32 masters of one model; also bounds the initial values a CreateModel stream may declare.
    # The initial weights pass through Ray's object store on their way to the shards.
    max_model_bytes: int = 1 << 30
    max_models: int = 64
    max_params: int = 100_000
    max_shards: int = 256
    # How long a lookup of a model that is being created waits before answering UNAVAILABLE.
    creation_wait_s: float = 30.0
    max_groups: int = 64
    max_metric_history: int = 10_000
    max_audit_entries: int = 10_000


# Status and metrics scrapes ("observe") answer while a control call holds the shard's thread.
_ShardActor = ray.remote(concurrency_groups={"observe": 2})(ShardActor)


@dataclass(frozen=True)
class GroupSpec:
    """A parameter group as a CreateModel request declares it."""

    name: str
    params: tuple[str, ...]
    overrides: Mapping[str, Any]


@dataclass
class ModelRecord:
    name: str
    groups: list[GroupLayout]
    shards: list[ShardSlice]
    optimizer: RuleConfig
    overrides: dict[str, dict[str, Any]]
    schedule: Any
    actors: list[Any] = field(default_factory=list)
    metrics: list[dict[str, Any]] = field(default_factory=list)
    mode: Any = field(default_factory=AsyncMode)
    placement_group: Any = None
    device: str = "cpu"
    # Every control change: version, time, caller, action, old and new config.
    audit: list[dict[str, Any]] = field(default_factory=list)
    # One control change at a time per model (re-entrant: set_hyperparameters -> set_optimizer).
    control_lock: threading.RLock = field(default_factory=threading.RLock)
    # One life of the model, from its creation, kept through restores (checkpoint names carry it).
    run_id: str = field(default_factory=lambda: uuid.uuid4().hex[:12])
    # Periodic checkpoints: {"every_versions": N, "every_s": T} (either may be absent).
    checkpoint_policy: dict[str, Any] = field(default_factory=dict)
    last_checkpoint: tuple[int, float] = (0, 0.0)  # (version, monotonic time)
    # Set when a shard died and no checkpoint could bring the model back.
    lost: str | None = None

    @property
    def optimizer_json(self) -> str:
        return optimizer_config_json(self.optimizer)

    @property
    def schedule_json(self) -> str:
        return schedule_config_json(self.schedule)

    @property
    def mode_json(self) -> str:
        return mode_config_json(self.mode)


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


def _check_model_name(name: str) -> None:
    if not MODEL_NAME.fullmatch(name):
        raise InvalidArgument(f"invalid model name {name!r}")


def _group_config(optimizer: RuleConfig, overrides: Mapping[str, Any]) -> tuple[RuleConfig, list]:
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


def _check_gradient_centralization(
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
    name: str, params: Sequence[tuple[str, Sequence[int], torch.dtype]], limits: Limits
) -> None:
    """Refuse a model spec before any bytes are read: name, parameter names, shapes, size."""
    if not MODEL_NAME.fullmatch(name):
        raise InvalidArgument(
            f"invalid model name {name!r}: use 1-128 letters, digits, '.', '_' or '-', "
            "starting with a letter or digit"
        )
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
        if max(master_bytes, declared_bytes) > limits.max_model_bytes:
            raise ResourceExhausted(
                f"model {name!r} exceeds the size limit of {limits.max_model_bytes} bytes"
            )


@dataclass(frozen=True)
class Placement:
    """Where shard actors go: one placement-group bundle per shard.

    `gpus` per shard: None means one GPU per shard when the cluster has GPUs, none otherwise.
    `cpus` is what each shard reserves (a token amount by default: shards mostly wait on I/O
    between updates, and a laptop's embedded Ray should hold many). SPREAD puts shards on
    different nodes where it can; PACK, STRICT_SPREAD and STRICT_PACK are Ray's other choices.
    """

    cpus: float = 0.0
    gpus: float | None = None
    strategy: str = "SPREAD"
    timeout_s: float = 120.0

    def bundle(self) -> tuple[dict[str, float], str]:
        """The bundle for one shard, and the device its buffers live on."""
        gpus = self.gpus
        if gpus is None:
            gpus = 1.0 if ray.cluster_resources().get("GPU", 0) >= 1 else 0.0
        bundle = {"CPU": max(self.cpus, 0.001)}  # Ray refuses an all-zero bundle
        if gpus > 0:
            bundle["GPU"] = gpus
        return bundle, "cuda" if gpus > 0 else "cpu"


class Coordinator:
    def __init__(
        self,
        host: str = "127.0.0.1",
        default_num_shards: int = 1,
        limits: Limits | None = None,
        placement: Placement | None = None,
        checkpoint_dir: str | None = None,
        keep_checkpoints: int = 3,
        watch: bool = True,
        edge: EdgeConfig | None = None,
        ray_service: str | None = None,
    ) -> None:
        self.host = host
        # Tokens, TLS and stream limits, enforced by every shard's endpoint too.
        self.edge = edge or EdgeConfig()
        self.default_num_shards = default_num_shards
        self.limits = limits or Limits()
        self.placement = placement or Placement()
        self.store = Store(checkpoint_dir) if checkpoint_dir else None
        if keep_checkpoints < 1:
            raise ValueError(f"keep_checkpoints must be at least 1, got {keep_checkpoints}")
        self.keep_checkpoints = keep_checkpoints
        self._stopping = threading.Event()
        self._lock = threading.Lock()
        # Signalled when a creation in progress ends, so lookups of that name can wait for it.
        self._created = threading.Condition(self._lock)
        self._models: dict[str, ModelRecord] = {}
        self._reserved: set[str] = set()
        # Prometheus: the coordinator's own series; a scrape gathers every shard's too.
        # With `ray_service`, the coordinator and every shard record them in Ray's metrics too,
        # tagged with that name.
        self.ray_service = ray_service
        self.metrics = CoordinatorMetrics(
            self._all_shards, lambda: len(self._models), ray_service=ray_service
        )
        if self.store is not None:
            threading.Thread(
                target=self._periodic, name="optserve-checkpoints", daemon=True
            ).start()
        if watch:
            threading.Thread(target=self._watch, name="optserve-watch", daemon=True).start()

    def _all_shards(self) -> list[Any]:
        with self._lock:
            records = list(self._models.values())
        return [actor for record in records if record.lost is None for actor in record.actors]

    def reserve(self, name: str) -> None:
        """Claim a model name for a creation in progress (ALREADY_EXISTS if taken)."""
        with self._lock:
            if name in self._models or name in self._reserved:
                raise AlreadyExists(f"model {name!r} already exists")
            if len(self._models) + len(self._reserved) >= self.limits.max_models:
                raise ResourceExhausted(
                    f"the server holds its limit of {self.limits.max_models} models; drop one first"
                )
            self._reserved.add(name)

    def release(self, name: str) -> None:
        with self._lock:
            self._reserved.discard(name)
            self._created.notify_all()

    def create_model(
        self,
        name: str,
        params: Sequence[tuple[str, Sequence[int], torch.dtype]],
        initial: Mapping[str, torch.Tensor],
        optimizer: RuleConfig,
        num_shards: int = 0,
        groups: Sequence[GroupSpec] = (),
        schedule: Any = None,
        mode: Any = None,
        checkpoint_policy: Mapping[str, Any] | None = None,
    ) -> ModelRecord:
        """Start the shard actors of a new model (its name must be reserved) and register it."""
        policy = self.checkpoint_policy(checkpoint_policy)
        num_shards = num_shards or self.default_num_shards
        if not 1 <= num_shards <= self.limits.max_shards:
            raise InvalidArgument(
                f"num_shards must be between 1 and {self.limits.max_shards}, got {num_shards}"
            )
        layouts, overrides = plan_groups(params, groups, self.limits)
        for g in layouts:  # every group's config is valid before anything starts
            with_overrides(optimizer, overrides[g.name])
        schedule_config = parse_schedule_config(schedule)
        mode_config = parse_mode_config(mode)
        trainers = getattr(mode_config, "trainers", 0)
        if trainers * num_shards > SHARD_THREADS // 2:
            raise InvalidArgument(
                f"a sync round of {trainers} trainers on {num_shards} shards would hold "
                f"{trainers * num_shards} calls on the leader shard; keep trainers x shards "
                f"<= {SHARD_THREADS // 2}"
            )
        flats = {g.name: flatten_group(g, initial, torch.float32) for g in layouts}
        record = self._launch(
            name, layouts, overrides, optimizer, schedule_config, mode_config, flats, num_shards
        )
        record.checkpoint_policy = policy
        with self._lock:
            self._models[name] = record
        return record

    def _launch(
        self,
        name: str,
        layouts: list[GroupLayout],
        overrides: dict[str, dict[str, Any]],
        optimizer: RuleConfig,
        schedule_config: Any,
        mode_config: Any,
        flats: Mapping[str, torch.Tensor],
        num_shards: int,
    ) -> ModelRecord:
        """Start a model's shard actors on `flats` (per-group flat fp32 weights); unregistered."""
        configs = {g.name: _group_config(optimizer, overrides[g.name])[0] for g in layouts}
        slices = split_ranges(layouts, num_shards)
        _check_gradient_centralization(configs, layouts, slices)
        run_id = uuid.uuid4().hex[:8]
        secret = secrets.token_hex(16)  # lets the model's shards, and only them, call Sequence
        bundle, device = self.placement.bundle()
        group = placement_group([bundle] * num_shards, strategy=self.placement.strategy)
        actors = []
        try:
            ready, _ = ray.wait([group.ready()], timeout=self.placement.timeout_s)
            if not ready:
                raise ResourceExhausted(
                    f"the cluster cannot place {num_shards} shard(s) of {bundle} "
                    f"({self.placement.strategy}) within {self.placement.timeout_s:.0f} s; "
                    f"it has {ray.available_resources()} free"
                )
            for s in slices:
                shard_groups = {
                    g.name: {
                        "weights": flats[g.name][a:b].clone(),
                        "optimizer": optimizer_config_json(configs[g.name]),
                        "views": tensor_views(g, a, b),
                    }
                    for g in layouts
                    for a, b in [s.ranges[g.name]]
                }
                actors.append(
                    _ShardActor.options(
                        name=f"optserve:{name}:shard{s.index}:{run_id}",
                        num_cpus=bundle["CPU"],
                        num_gpus=bundle.get("GPU", 0),
                        max_restarts=0,
                        scheduling_strategy=PlacementGroupSchedulingStrategy(
                            group, placement_group_bundle_index=s.index
                        ),
                    ).remote(
                        name,
                        s.index,
                        shard_groups,
                        schedule_config_json(schedule_config),
                        self.host,
                        num_shards,
                        mode_config_json(mode_config),
                        device,
                        secret,
                        self.edge,
                        self.ray_service,
                    )  # fmt: skip
                )
            addresses = ray.get([a.address.remote() for a in actors], timeout=300)
            # Shard 0 orders the model's pushes; the others ask it (server/sequencer.py).
            ray.get([a.set_leader.remote(addresses[0]) for a in actors[1:]], timeout=60)
        except Exception:
            for actor in actors:
                ray.kill(actor)
            remove_placement_group(group)
            raise
        shards = [
            ShardSlice(s.index, s.ranges, addr) for s, addr in zip(slices, addresses, strict=True)
        ]
        record = ModelRecord(
            name, layouts, shards, optimizer, overrides, schedule_config, actors,
            mode=mode_config, placement_group=group, device=device,
        )  # fmt: skip
        log.info("created model %s on %d shard(s): %s", name, num_shards, addresses)
        return record

    def _control(
        self,
        record: ModelRecord,
        action: str,
        caller: str,
        old: Any,
        new: Any,
        apply: Callable[[int], T],
    ) -> tuple[int, T]:
        """Apply a control change on every shard at one version boundary; audit it.

        The leader shard stops deciding updates and names the boundary v (every update
        decided so far is at or below it); each shard applies the change once it reaches v,
        before update v + 1; then the leader resumes. Returns (v, what `apply(v)` returned).
        """
        with record.control_lock:
            version, result = self._at_boundary(record, apply)
            record.audit.append({
                "version": version, "time": time.time(), "caller": caller, "action": action,
                "old": old, "new": new,
            })  # fmt: skip
            del record.audit[: -self.limits.max_audit_entries]
        log.info("%s on model %s at version %d by %s", action, record.name, version, caller)
        return version, result

    @staticmethod
    def _at_boundary(record: ModelRecord, apply: Callable[[int], T]) -> tuple[int, T]:
        """Pause the leader's ordering, run `apply(v)` at the boundary version v, resume.

        Every update decided before the pause is at or below v, and none above it is decided
        until `apply` returns, so what `apply` does on the shards lands between v and v + 1.
        The caller holds `record.control_lock`."""
        op_id = uuid.uuid4().hex
        leader = record.actors[0]
        version = ray.get(leader.pause_updates.remote(op_id), timeout=180)
        try:
            return version, apply(version)
        finally:
            ray.get(leader.resume_updates.remote(op_id), timeout=60)

    def set_optimizer(
        self, name: str, optimizer: RuleConfig, policy: str, caller: str = ""
    ) -> tuple[int, dict[str, Any]]:
        """Swap every group's rule on every shard at one version; return it and the report."""
        if policy not in ("migrate", "reset"):
            raise InvalidArgument(f"policy must be 'migrate' or 'reset', got {policy!r}")
        record = self.get(name)
        with record.control_lock:  # read, apply and record the config as one step
            configs, ignored = {}, {}
            for group, overrides in record.overrides.items():
                config, ignored[group] = _group_config(optimizer, overrides)
                configs[group] = optimizer_config_json(config)

            def apply(version: int) -> list[dict[str, Any]]:
                calls = [a.set_optimizer.remote(configs, policy, version) for a in record.actors]
                return ray.get(calls, timeout=120)

            old = json.loads(record.optimizer_json)
            new = {**json.loads(optimizer_config_json(optimizer)), "policy": policy}
            version, reports = self._control(record, "set_optimizer", caller, old, new, apply)
            record.optimizer = optimizer
        return version, {
            "groups": reports[0],
            "shards": len(reports),
            "overrides_not_applicable": {g: keys for g, keys in ignored.items() if keys},
        }

    def set_hyperparameters(
        self, name: str, changes: Mapping[str, Any], caller: str = ""
    ) -> tuple[int, dict[str, Any]]:
        """Change some hyperparameters of the current rule (state kept: policy migrate)."""
        if not changes:
            raise InvalidArgument("no hyperparameters to change")
        record = self.get(name)
        with record.control_lock:  # no other change between reading the config and applying
            merged = with_overrides(record.optimizer, changes)
            return self.set_optimizer(name, merged, "migrate", caller)

    def set_schedule(self, name: str, schedule: Any, caller: str = "") -> int:
        record = self.get(name)
        config = parse_schedule_config(schedule)
        text = schedule_config_json(config)

        def apply(version: int) -> None:
            ray.get([a.set_schedule.remote(text, version) for a in record.actors], timeout=120)

        with record.control_lock:
            old = json.loads(record.schedule_json)
            version, _ = self._control(record, "set_schedule", caller, old, json.loads(text), apply)
            record.schedule = config
        return version

    def report_metric(
        self, name: str, metric: str, value: float, step: int | None, caller: str = ""
    ) -> tuple[int, bool]:
        """Feed a metric to every shard's schedule at one version; True if the lr changed."""
        if not metric or len(metric) > 128:
            raise InvalidArgument(f"metric name must have 1-128 characters, got {metric[:40]!r}")
        if value != value or value in (float("inf"), float("-inf")):
            raise InvalidArgument(f"metric {metric!r} must be finite, got {value}")
        record = self.get(name)

        def apply(version: int) -> list[dict[str, Any]]:
            calls = [a.report_metric.remote(metric, value, version) for a in record.actors]
            return ray.get(calls, timeout=120)

        with record.control_lock:  # a metric moves the lr: it lands between two versions too
            version, answers = self._at_boundary(record, apply)
        changed, lrs = [a["changed"] for a in answers], answers[0]["lr"]
        # The lr of each group from this version on (what `optserve plot` draws).
        record.metrics.append({
            "name": metric, "value": value, "step": step, "version": version,
            "time": time.time(), "lr_changed": any(changed), "lr": lrs,
        })  # fmt: skip
        del record.metrics[: -self.limits.max_metric_history]
        return version, any(changed)

    def status(self, name: str, recent: int = 50) -> dict[str, Any]:
        """Everything about a model's run: version, rule, lr, schedule, shards, trainers, and
        the `recent` newest metrics and audit entries."""
        recent = max(1, min(recent, max(self.limits.max_metric_history,
                                        self.limits.max_audit_entries)))  # fmt: skip
        record = self.get(name)
        shards = self.shard_info(record)
        first = shards[0]
        return {
            "model": record.name,
            "version": min(s["version"] for s in shards),
            "mode": json.loads(record.mode_json),
            "optimizer": json.loads(record.optimizer_json),
            "schedule": json.loads(record.schedule_json),
            "schedule_state": first.get("schedule_state", {}),
            # Pushes the gradient policy skipped, zeroed, clipped or refused (since the shards
            # started: a restore starts them again).
            "gradient_counters": first.get("gradient_counters", {}),
            # Who pushed, as the model's leader saw it: pushes, last version, staleness, peer.
            "trainers": first.get("trainers", {}),
            "device": record.device,
            "groups": {
                group: {
                    "overrides": record.overrides.get(group, {}),
                    "optimizer": info["config"],
                    "lr": info["lr"],
                    "numel": sum(s["groups"][group]["numel"] for s in shards),
                    "state": info["scalars"],
                }
                for group, info in first["groups"].items()
            },
            "shards": [
                {
                    "index": s["index"],
                    "address": s["address"],
                    "node_id": s.get("node_id"),
                    "device": s["device"],
                    "version": s["version"],
                    "groups": {
                        g: {
                            "rule": i["rule"],
                            "path": i["path"],
                            "numel": i["numel"],
                            "state": i["scalars"],
                        }
                        for g, i in s["groups"].items()
                    },
                }
                for s in shards
            ],  # fmt: skip
            "metrics": record.metrics[-recent:],
            "audit": record.audit[-recent:],
            # How much history the server keeps, and how much of it this answer shows.
            "history": {
                "metrics_kept": len(record.metrics),
                "metrics_shown": min(recent, len(record.metrics)),
                "audit_kept": len(record.audit),
                "audit_shown": min(recent, len(record.audit)),
            },
        }

    # ---- checkpoints ---------------------------------------------------------------------

    def _store(self) -> Store:
        if self.store is None:
            raise FailedPrecondition(
                "this server has no checkpoint directory; start it with --checkpoint-dir"
            )
        return self.store

    def checkpoint(self, name: str, caller: str = "") -> dict[str, Any]:
        """Snapshot every shard at one version, write it, keep the newest `keep_checkpoints`.

        Training pauses only while the shards copy their state out; writing happens after."""
        store = self._store()
        record = self.get(name)
        started = time.perf_counter()

        def copy_out(version: int) -> list[dict[str, Any]]:
            return ray.get([a.state_dict.remote(version) for a in record.actors], timeout=600)

        with record.control_lock:
            version, states = self._at_boundary(record, copy_out)
            entry = {"version": version, "time": time.time(), "caller": caller,
                     "action": "checkpoint", "old": None, "new": None}  # fmt: skip
            ckpt = gather(self._meta(record, [*record.audit, entry]), states)
            entry["new"] = {"checkpoint": ckpt.name}
        checkpoint_name = store.write(ckpt)
        with record.control_lock:
            record.audit.append(entry)
            record.last_checkpoint = (version, time.monotonic())
        store.prune(name, self.keep_checkpoints)
        self.metrics.checkpoint_seconds.labels(name).observe(time.perf_counter() - started)
        log.info("checkpoint %s/%s at version %d", name, checkpoint_name, version)
        return {"name": checkpoint_name, "version": version, "uri": f"{store.root}/{name}"}

    @staticmethod
    def _meta(record: ModelRecord, audit: list[dict[str, Any]]) -> dict[str, Any]:
        return {
            "model": record.name,
            "params": [
                {"name": p.name, "shape": list(p.shape), "dtype": str(p.dtype).split(".")[-1]}
                for g in record.groups for p in g.params
            ],
            "groups": [
                {"name": g.name, "params": [p.name for p in g.params]} for g in record.groups
            ],
            "overrides": record.overrides,
            "optimizer": json.loads(record.optimizer_json),
            "mode": json.loads(record.mode_json),
            "run_id": record.run_id,
            "checkpoint_policy": dict(record.checkpoint_policy),
            "audit": audit[-1000:],
            "metrics": record.metrics[-1000:],
            "num_shards": len(record.actors),
        }  # fmt: skip

    def list_checkpoints(self, name: str) -> list[dict[str, Any]]:
        _check_model_name(name)
        return self._store().list(name)

    def restore(
        self,
        name: str,
        checkpoint: str | None = None,
        num_shards: int = 0,
        caller: str = "",
        replace: ModelRecord | None = None,
    ) -> ModelRecord:
        """Bring a model back from a checkpoint, onto `num_shards` shards (default: as many as
        it runs on now, or as it ran on when checkpointed). A running model is replaced only
        once the checkpoint has been read, verified and loaded into new shards."""
        _check_model_name(name)
        ckpt = self._store().read(name, checkpoint, run=replace.run_id if replace else None)
        with self._lock:
            old = self._models.get(name)
        reserved = False
        if old is None and replace is None:
            self.reserve(name)  # a CreateModel of the same name must not race this restore
            reserved = True
        try:
            return self._restore(name, ckpt, old, num_shards, caller, replace)
        finally:
            if reserved:
                self.release(name)

    def _restore(
        self,
        name: str,
        ckpt: Checkpoint,
        old: ModelRecord | None,
        num_shards: int,
        caller: str,
        replace: ModelRecord | None,
    ) -> ModelRecord:
        num_shards = num_shards or (len(old.actors) if old else ckpt.num_shards)
        if not 1 <= num_shards <= self.limits.max_shards:
            raise InvalidArgument(
                f"num_shards must be between 1 and {self.limits.max_shards}, got {num_shards}"
            )
        dtypes = {"float32": torch.float32, "float16": torch.float16,
                  "bfloat16": torch.bfloat16, "float64": torch.float64}  # fmt: skip
        specs = {p["name"]: (p["name"], tuple(p["shape"]), dtypes[p["dtype"]]) for p in ckpt.params}
        layouts = [plan_group(g["name"], [specs[n] for n in g["params"]]) for g in ckpt.groups]
        optimizer = parse_optimizer_config(ckpt.optimizer)
        flats = {g.name: ckpt.tensors[f"{g.name}/weights"] for g in layouts}
        if replace is not None:
            # The dead run's shards hold resources (a GPU each, maybe) the new ones need.
            self._stop_actors(replace.actors, 1.0)
            self._remove_group(replace)
        record = self._launch(
            name, layouts, dict(ckpt.overrides), optimizer,
            parse_schedule_config(ckpt.schedule), parse_mode_config(ckpt.mode), flats, num_shards,
        )  # fmt: skip
        try:
            states = split(ckpt, [s.ranges for s in record.shards])
            ray.get(
                [a.load_state_dict.remote(st) for a, st in zip(record.actors, states, strict=True)],
                timeout=600,
            )
        except Exception:
            self._stop_actors(record.actors, 1.0)
            self._remove_group(record)
            raise
        record.metrics = list(ckpt.metrics)
        record.audit = [*ckpt.audit, {
            "version": ckpt.version, "time": time.time(), "caller": caller, "action": "restore",
            "old": None, "new": {"checkpoint": ckpt.name, "shards": num_shards},
        }]  # fmt: skip
        if replace is not None:  # a recovery keeps the history of the run it replaces
            record.audit = [*replace.audit[-1000:], record.audit[-1]]
            record.metrics = list(replace.metrics)
        record.checkpoint_policy = dict(old.checkpoint_policy if old else ckpt.checkpoint_policy)
        record.last_checkpoint = (ckpt.version, time.monotonic())
        record.run_id = ckpt.run_id
        with self._lock:
            replaced = self._models.get(name)
            stale = replace is not None and replaced is not replace  # restored/dropped meanwhile
            if not stale:
                self._models[name] = record
        if stale:
            self._stop_actors(record.actors, 1.0)
            self._remove_group(record)
            raise Aborted(f"model {name!r} changed while it was being recovered")
        if replaced is not None and replaced is not replace:
            self._stop_actors(replaced.actors, 1.0)
            self._remove_group(replaced)
        log.info("restored %s at version %d on %d shard(s)", name, ckpt.version, num_shards)
        return record

    def checkpoint_policy(self, policy: Mapping[str, Any] | None) -> dict[str, Any]:
        """A validated periodic-checkpoint policy: {"every_versions": N, "every_s": T}."""
        policy = dict(policy or {})
        unknown = set(policy) - {"every_versions", "every_s"}
        if unknown:
            raise InvalidArgument(f"unknown checkpoint policy keys {sorted(unknown)}")
        for key, value in policy.items():
            if value is not None and (isinstance(value, bool) or not isinstance(value, int | float)
                                      or value <= 0):  # fmt: skip
                raise InvalidArgument(f"checkpoint {key} must be a positive number, got {value!r}")
        if policy:
            self._store()
        return {k: v for k, v in policy.items() if v is not None}

    def _periodic(self) -> None:
        """Background: checkpoint each model whose policy says it is due."""
        while not self._stopping.wait(0.5):
            with self._lock:
                records = [r for r in self._models.values() if r.checkpoint_policy]
            for record in records:
                try:
                    policy = record.checkpoint_policy
                    last_version, last_time = record.last_checkpoint
                    version = self.version(record)
                    due = version > last_version and (
                        version - last_version >= policy.get("every_versions", float("inf"))
                        or time.monotonic() - last_time >= policy.get("every_s", float("inf"))
                    )
                    if due:
                        self.checkpoint(record.name, caller="periodic")
                except Exception:  # noqa: BLE001 - a failed checkpoint is retried next time
                    log.warning("periodic checkpoint of %s failed", record.name, exc_info=True)

    # ---- shard failures ----------------------------------------------------------------

    def _watch(self, every_s: float = 1.0) -> None:
        """Background: find models with a dead shard and bring them back from a checkpoint."""
        while not self._stopping.wait(every_s):
            with self._lock:
                records = [r for r in self._models.values() if r.lost is None]
            for record in records:
                if self._stopping.is_set():
                    return
                try:
                    dead = self._dead_shards(record)
                except Exception:  # noqa: BLE001 - e.g. Ray shutting down
                    log.warning("could not check the shards of %s", record.name, exc_info=True)
                    continue
                if dead:
                    self._recover(record, dead)

    @staticmethod
    def _dead_shards(record: ModelRecord) -> list[int]:
        refs = [a.version.remote() for a in record.actors]
        ready, _ = ray.wait(refs, num_returns=len(refs), timeout=30)
        dead = []
        for index, ref in enumerate(refs):
            if ref not in ready:
                continue  # busy, not known dead
            try:
                ray.get(ref)
            except ray.exceptions.ActorDiedError:  # not ActorUnavailableError: a blip
                dead.append(index)
        return dead

    def _recover(self, record: ModelRecord, dead: list[int]) -> None:
        """A shard died: its slice of the weights and optimizer state is gone, so the whole
        model goes back to its newest checkpoint, on fresh shards (trainers are told to pull).
        Without a checkpoint the model is lost: it answers every call with that."""
        name = record.name
        with self._lock:
            if self._models.get(name) is not record:
                return  # replaced meanwhile (restored or dropped)
        log.error("model %s lost shard(s) %s; restoring its newest checkpoint", name, dead)
        try:
            if self.store is None or not self.store.list(name):
                raise FailedPrecondition("no checkpoint to restore from")
            self.restore(name, num_shards=len(record.actors), caller="recovery", replace=record)
        except Exception as exc:  # noqa: BLE001 - the model stays down, and says why
            record.lost = f"shard(s) {dead} died and the model could not be restored: {exc}"
            log.error("model %s: %s", name, record.lost)

    def shard_info(self, record: ModelRecord) -> list[dict[str, Any]]:
        return ray.get([a.info.remote() for a in record.actors], timeout=60)

    def get(self, name: str) -> ModelRecord:
        """The model's record; a lookup during its creation waits a while for it to end."""
        with self._lock:
            if not self._created.wait_for(
                lambda: name not in self._reserved, timeout=self.limits.creation_wait_s
            ):
                raise Unavailable(f"model {name!r} is still being created; retry shortly")
            record = self._models.get(name)
        if record is None:
            raise NotFound(f"unknown model {name!r}")
        if record.lost is not None:
            raise Unavailable(f"model {name!r} is down: {record.lost}")
        return record

    def version(self, record: ModelRecord) -> int:
        return min(ray.get([a.version.remote() for a in record.actors], timeout=60))

    def list_models(self) -> list[str]:
        with self._lock:
            return sorted(self._models)

    def drop_model(self, name: str, grace_s: float = 1.0) -> None:
        with self._lock:
            record = self._models.pop(name, None)
        if record is None:
            raise NotFound(f"unknown model {name!r}")
        self._stop_actors(record.actors, grace_s)
        self._remove_group(record)
        if self.store is not None:  # a restart must not bring it back
            try:
                self.store.mark_dropped(name)
            except Exception:  # noqa: BLE001
                log.warning("could not mark %s dropped in the checkpoint store", name)

    def shutdown(self, grace_s: float = 5.0) -> None:
        self._stopping.set()
        with self._lock:
            records = list(self._models.values())
            self._models.clear()
        self._stop_actors([a for r in records for a in r.actors], grace_s)
        for record in records:
            self._remove_group(record)
        self.metrics.stop()

    @staticmethod
    def _remove_group(record: ModelRecord) -> None:
        if record.placement_group is not None:
            try:
                remove_placement_group(record.placement_group)
            except Exception:  # noqa: BLE001 - the cluster may be going away
                log.warning("could not remove the placement group of %s", record.name)

    @staticmethod
    def _stop_actors(actors: Sequence[Any], grace_s: float) -> None:
        try:
            ray.get([a.stop.remote(grace_s) for a in actors], timeout=grace_s + 30)
        except Exception:  # noqa: BLE001 - a dead shard needs no graceful stop
            log.warning("some shards did not stop gracefully", exc_info=True)
        for actor in actors:
            ray.kill(actor)
