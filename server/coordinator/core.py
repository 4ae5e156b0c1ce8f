"""The coordinator: the catalogue of models and the control plane. No tensor math, and no tensor
bytes: initial values go from a model's creator straight to its shards, checkpoints from each
shard straight to the store and back.

`Coordinator` is plain Python over Ray handles; `CoordinatorActor` is the named Ray actor that
owns one and serves it on the gRPC front door (the Coordinator service). A model's shard actors
do not depend on the coordinator's life: when it dies they go on serving trainers, and the
coordinator that comes back adopts them (server/coordinator/recovery.py).
"""

from __future__ import annotations

import logging
import threading
import uuid
from collections.abc import Mapping, Sequence
from typing import Any

import ray
import torch

from optserve.common.config import (
    ModeConfig,
    RuleConfig,
    ScheduleConfig,
    parse_mode_config,
    parse_schedule_config,
    with_overrides,
)
from optserve.common.errors import (
    Aborted,
    AlreadyExists,
    InvalidArgument,
    NotFound,
    ResourceExhausted,
    Unavailable,
)
from optserve.common.layout import GroupLayout
from optserve.common.results import Status
from optserve.server.coordinator import checkpoints, recovery
from optserve.server.coordinator.catalogue import (
    MODEL_NAME,
    GroupSpec,
    Limits,
    ModelEntry,
    ModelRecord,
    derive_max_model_bytes,
    entry_layout,
    group_config,
    plan_groups,
    validate_params,
)
from optserve.server.coordinator.control import ControlChanges
from optserve.server.coordinator.forks import Forks
from optserve.server.coordinator.launch import (
    Placement,
    ShardProcess,
    group_name,
    launch_shards,
    stop_shards,
)
from optserve.server.coordinator.persistence import Persistence
from optserve.server.edge.tokens import EdgeConfig
from optserve.server.metrics import CoordinatorMetrics
from optserve.server.shard.actor import SHARD_THREADS
from optserve.server.store.manifest import Store

__all__ = [
    "MODEL_NAME",
    "SHARD_THREADS",
    "Coordinator",
    "GroupSpec",
    "Limits",
    "ModelRecord",
    "Placement",
    "plan_groups",
    "validate_params",
]

log = logging.getLogger(__name__)
# How long a drop waits for a checkpoint of the model in flight to end.
DROP_WAITS_FOR_CHECKPOINT_S = 30.0


class Coordinator(ControlChanges, Persistence, Forks):
    """`service` names this coordinator's shard actors (its actor's name): with `adopt`, the
    running shards of that name are adopted at start. `checkpoint_policy` is the periodic
    policy of models that set none (default with a checkpoint directory: every 10 minutes)."""

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
        service: str = "optserve-coordinator",
        checkpoint_policy: Mapping[str, Any] | None = None,
        adopt: bool = False,
    ) -> None:
        self.host = host
        self.service = service
        # Tokens, TLS and stream limits, enforced by every shard's endpoint too.
        self.edge = edge or EdgeConfig()
        self.default_num_shards = default_num_shards
        self.limits = limits or Limits()
        self.max_model_bytes = self.limits.max_model_bytes or derive_max_model_bytes(
            ray.cluster_resources().get("memory", 0)
        )
        self.placement = placement or Placement()
        self.store = Store(checkpoint_dir) if checkpoint_dir else None
        if keep_checkpoints < 1:
            raise ValueError(f"keep_checkpoints must be at least 1, got {keep_checkpoints}")
        self.keep_checkpoints = keep_checkpoints
        if checkpoint_policy is None:
            checkpoint_policy = {"every_s": checkpoints.DEFAULT_EVERY_S} if self.store else {}
        self.default_policy = checkpoints.check_policy(checkpoint_policy)
        self._process = ShardProcess(host, self.edge, ray_service)
        self._stopping = threading.Event()
        self._lock = threading.Lock()
        # Signalled when a creation in progress ends, so lookups of that name can wait for it.
        self._created = threading.Condition(self._lock)
        self._models: dict[str, ModelRecord] = {}
        # Names being created, each with the thread creating it: that thread may look the model
        # up (a fork swaps its optimizer before anyone else sees it); others wait.
        self._reserved: dict[str, int] = {}
        # Prometheus: the coordinator's own series; a scrape gathers every shard's too.
        # With `ray_service`, the coordinator and every shard record them in Ray's metrics too,
        # tagged with that name.
        self.metrics = CoordinatorMetrics(
            self._all_shards, lambda: len(self._models), ray_service=ray_service,
            checkpoints=self._checkpoint_gauges,
        )  # fmt: skip
        if adopt:
            recovery.adopt(self)
        if self.store is not None:
            threading.Thread(
                target=recovery.periodic_checkpoints, args=(self,), name="optserve-checkpoints",
                daemon=True,
            ).start()  # fmt: skip
        if watch:
            threading.Thread(
                target=recovery.watch, args=(self,), name="optserve-watch", daemon=True
            ).start()

    # ---- the catalogue -----------------------------------------------------------------------

    def records(self) -> list[ModelRecord]:
        with self._lock:
            return list(self._models.values())

    def _all_shards(self) -> list[Any]:
        """Every model's shards (a lost model's too: they tell what broke)."""
        return [a for record in self.records() for a in record.actors if a is not None]

    def reserve(self, name: str) -> None:
        """Claim a model name for a creation in progress (ALREADY_EXISTS if taken)."""
        with self._lock:
            if name in self._models or name in self._reserved:
                raise AlreadyExists(f"model {name!r} already exists")
            if (target := self._resolve(name)) != name:
                raise AlreadyExists(f"{name!r} names model {target!r} (promoted to it)")
            if len(self._models) + len(self._reserved) >= self.limits.max_models:
                raise ResourceExhausted(
                    f"the server holds its limit of {self.limits.max_models} models; drop one first"
                )
            self._reserved[name] = threading.get_ident()

    def release(self, name: str) -> None:
        with self._lock:
            self._reserved.pop(name, None)
            self._created.notify_all()

    def register(self, record: ModelRecord, replacing: ModelRecord | None = None) -> bool:
        """Make `record` the model's current one, if the model is still `replacing` (None:
        absent or reserved); False if it changed meanwhile, or the server is stopping."""
        with self._lock:
            if self._stopping.is_set() or self._models.get(record.name) is not replacing:
                return False
            if replacing is not None and replacing.dropping:  # a drop wins over a restore
                return False
            self._models[record.name] = record
            return True

    def get(self, name: str, lost_too: bool = False) -> ModelRecord:
        """The model's record; a lookup during its creation waits a while for it to end. A lost
        model answers UNAVAILABLE, unless `lost_too` (to look at it)."""
        me = threading.get_ident()
        with self._lock:
            if not self._created.wait_for(
                lambda: self._reserved.get(name, me) == me, timeout=self.limits.creation_wait_s
            ):
                raise Unavailable(f"model {name!r} is still being created; retry shortly")
            record = self._models.get(self._resolve(name))
        if record is None:
            raise NotFound(f"unknown model {name!r}")
        if record.lost is not None and not lost_too:
            raise Unavailable(f"model {name!r} is down: {record.lost}")
        return record

    def resolve(self, name: str) -> str:
        """The model a name stands for: its own, or the promoted fork it now names."""
        with self._lock:
            return self._resolve(name)

    def _resolve(self, name: str) -> str:  # under the lock
        if name in self._models or name in self._reserved:
            return name
        models = self._models.values()
        return next((r.name for r in models if name in r.entry.lineage.get("aliases", [])), name)

    def list_models(self) -> list[str]:
        with self._lock:
            return sorted(self._models)

    def version(self, record: ModelRecord) -> int:
        health = ray.get([a.health.remote() for a in record.actors], timeout=60)
        return min(h["version"] for h in health)

    def shard_info(self, record: ModelRecord) -> list[dict[str, Any]]:
        return ray.get([a.info.remote() for a in record.actors], timeout=60)

    def validate_params(self, name: str, params: Sequence[tuple[str, Sequence[int], Any]]) -> None:
        validate_params(name, params, self.limits, self.max_model_bytes)

    def create_model(
        self,
        name: str,
        params: Sequence[tuple[str, Sequence[int], torch.dtype]],
        optimizer: RuleConfig,
        num_shards: int = 0,
        groups: Sequence[GroupSpec] = (),
        schedule: Any = None,
        mode: Any = None,
        checkpoint_policy: Mapping[str, Any] | None = None,
    ) -> ModelRecord:
        """Start the shards of a new model (its name must be reserved) and register it. The
        shards wait for their initial values, which the creator streams to them (Shard/Load)."""
        self.validate_params(name, params)
        policy = self.checkpoint_policy(checkpoint_policy)
        num_shards = num_shards or self.default_num_shards
        self._check_num_shards(num_shards)
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
        entry = self._new_entry(
            name, layouts, overrides, optimizer, schedule_config, mode_config, policy, num_shards,
            run_id=uuid.uuid4().hex[:12],
        )  # fmt: skip
        record = self._start(entry, layouts, history={"audit": [], "metrics": []})
        record.initializing, record.last_version = True, 0
        self._commit(record)
        if not self.register(record):
            stop_shards(record.actors, record.placement_group, 1.0)
            raise Aborted(f"model {name!r} changed while it was being created")
        return record

    def _check_num_shards(self, num_shards: int) -> None:
        if not 1 <= num_shards <= self.limits.max_shards:
            raise InvalidArgument(
                f"num_shards must be between 1 and {self.limits.max_shards}, got {num_shards}"
            )

    def _new_entry(
        self,
        name: str,
        layouts: list[GroupLayout],
        overrides: dict[str, dict[str, Any]],
        optimizer: RuleConfig,
        schedule: ScheduleConfig,
        mode: ModeConfig,
        policy: dict[str, Any],
        num_shards: int,
        run_id: str,
        replaces: str | None = None,
    ) -> ModelEntry:
        launch = uuid.uuid4().hex[:8]
        _, device = self.placement.bundle()
        params, groups = entry_layout(layouts)
        return ModelEntry(
            model=name, service=self.service, launch=launch, run_id=run_id, params=params,
            groups=groups, overrides=overrides, optimizer=optimizer, schedule=schedule,
            mode=mode, checkpoint_policy=policy, num_shards=num_shards, device=device,
            placement_group=group_name(self.service, name, launch), replaces=replaces,
        )  # fmt: skip

    def _start(
        self,
        entry: ModelEntry,
        layouts: list[GroupLayout],
        history: Mapping[str, list[dict[str, Any]]],
        configs: Mapping[str, RuleConfig] | None = None,
    ) -> ModelRecord:
        """Launch the shards of `entry` (empty); its record, not yet registered."""
        optimizer = ModelRecord(entry, [], [], []).optimizer
        if configs is None:
            configs = {g.name: group_config(optimizer, entry.overrides[g.name])[0] for g in layouts}
        bundle, _ = self.placement.bundle()
        shards = launch_shards(entry, layouts, configs, self.placement, bundle, self._process,
                               history)  # fmt: skip
        log.info("started model %s (launch %s) on %d shard(s): %s", entry.model, entry.launch,
                 entry.num_shards, [s.address for s in shards.slices])  # fmt: skip
        return ModelRecord(entry, list(layouts), shards.slices, shards.actors,
                           placement_group=shards.placement_group)  # fmt: skip

    def _commit(self, record: ModelRecord) -> None:
        """Mark the record's launch as the model's current one on its shards (what a
        coordinator that comes back trusts)."""
        record.entry.committed = True
        changes = {"committed": True, "replaces": record.entry.replaces}
        try:
            ray.get([a.update_entry.remote(changes) for a in record.actors], timeout=60)
        except BaseException:
            stop_shards(record.actors, record.placement_group, 1.0)
            raise

    def drop_model(self, name: str, grace_s: float = 1.0) -> None:
        """Drop a model: ordered with its checkpoints. From here no checkpoint of it starts,
        and one in flight publishes no manifest; the store records the drop (so a restart
        does not bring it back) before the model leaves the catalogue. A store that cannot
        record it refuses the drop (UNAVAILABLE), and the model runs on."""
        with self._lock:
            name = self._resolve(name)  # a promoted fork's alias drops the fork
            record = self._models.get(name)
            if record is None or record.dropping:
                raise NotFound(f"unknown model {name!r}")
            record.dropping = True
        # A checkpoint in flight sees the mark before its manifest; wait a while for it to end
        # (past that, its manifest, if any, still predates the drop: it is not restored).
        waited = record.checkpoint_lock.acquire(timeout=DROP_WAITS_FOR_CHECKPOINT_S)
        try:
            if self.store is not None:
                try:
                    self.store.mark_dropped(name)
                except Exception as exc:  # noqa: BLE001 - refused: nothing has changed
                    record.dropping = False
                    self.metrics.checkpoint_failure(name, "drop_mark")
                    raise Unavailable(
                        f"model {name!r} was not dropped: the checkpoint store cannot record "
                        f"the drop ({exc}), and a restart would bring the model back"
                    ) from None
            with self._lock:
                if self._models.get(name) is record:
                    del self._models[name]
        finally:
            if waited:
                record.checkpoint_lock.release()
        self._drop(record, grace_s)

    def _drop(self, record: ModelRecord, grace_s: float) -> None:
        # The shards are marked (a coordinator that dies before they stop finishes the drop
        # when it is back), then stopped.
        try:
            ray.get([a.update_entry.remote({"dropping": True}) for a in record.actors], timeout=30)
        except Exception:  # noqa: BLE001 - dead shards are dropped all the same
            log.info("some shards of %s did not take the drop mark", record.name)
        stop_shards(record.actors, record.placement_group, grace_s)

    def shutdown(self, grace_s: float = 5.0) -> None:
        """Stop the threads and every model's shards (the checkpoints stay)."""
        self._stopping.set()
        with self._lock:
            records = list(self._models.values())
            self._models.clear()
        for record in records:
            stop_shards(record.actors, record.placement_group, grace_s)
        self.metrics.stop()

    # ---- status ------------------------------------------------------------------------------

    def status(self, name: str, recent: int = 50) -> Status:
        """Everything about a model's run: version, rule, lr, schedule, shards, trainers,
        checkpoints, and the `recent` newest metrics and audit entries."""
        from optserve.server.coordinator.status import model_status

        recent = max(1, min(recent, max(self.limits.max_metric_history,
                                        self.limits.max_audit_entries)))  # fmt: skip
        record = self.get(name, lost_too=True)
        try:
            shards = self.shard_info(record)
            history = ray.get(record.actors[0].history.remote(recent), timeout=60)
        except (ray.exceptions.RayActorError, AttributeError):  # a shard is gone (None: unknown)
            why = record.lost or "a shard is gone"
            raise Unavailable(f"model {name!r} is down: {why}") from None
        policy = checkpoints.effective_policy(record.entry.checkpoint_policy, self.default_policy)
        return model_status(record, shards, history, recent, policy)

    def _checkpoint_gauges(self) -> list[tuple[str, int | None, float | None]]:
        """(model, updates since its newest checkpoint, that checkpoint's unix time) per model,
        for the metrics; None where unknown."""
        out = []
        for record in self.records():
            last = record.last_checkpoint
            version = record.last_version
            since = None if version is None else version - (last[0] if last else 0)
            out.append((record.name, since, last[1] if last else None))
        return out
