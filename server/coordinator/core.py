"""The coordinator: the catalogue of models and the control plane. No tensor math, and no tensor
bytes: initial values go from a model's creator straight to its shards, checkpoints from each
shard straight to the store and back.

`Coordinator` is plain Python over Ray handles; `CoordinatorActor` is the named Ray actor that
owns one and serves it on the gRPC front door (the Coordinator service). A model's shard actors
do not depend on the coordinator's life: when it dies they go on serving trainers, and the
coordinator that comes back adopts them (server/coordinator/recovery.py).
"""

from __future__ import annotations

import contextlib
import json
import logging
import threading
import time
import uuid
from collections.abc import Iterator, Mapping, Sequence
from typing import Any

import ray
import torch

from optserve.common.config import (
    RuleConfig,
    optimizer_config_json,
    parse_mode_config,
    parse_schedule_config,
    schedule_config_json,
    with_overrides,
)
from optserve.common.errors import (
    Aborted,
    AlreadyExists,
    FailedPrecondition,
    InvalidArgument,
    NotFound,
    ResourceExhausted,
    Unavailable,
)
from optserve.common.layout import GroupLayout
from optserve.common.results import Status
from optserve.server.coordinator import checkpoints, control, recovery
from optserve.server.coordinator.catalogue import (
    MODEL_NAME,
    GroupSpec,
    Limits,
    ModelEntry,
    ModelRecord,
    check_model_name,
    derive_max_model_bytes,
    entry_layout,
    group_config,
    layouts_of,
    plan_groups,
    validate_params,
)
from optserve.server.coordinator.launch import (
    Placement,
    ShardProcess,
    group_name,
    launch_shards,
    stop_shards,
)
from optserve.server.edge.tokens import EdgeConfig
from optserve.server.metrics import CoordinatorMetrics
from optserve.server.shard.actor import SHARD_THREADS
from optserve.server.store.manifest import Checkpoint, Store

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
# How long a control change waits for the model's previous change or checkpoint to end.
CONTROL_WAIT_S = 60.0


class Coordinator:
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
        self._reserved: set[str] = set()
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
            if len(self._models) + len(self._reserved) >= self.limits.max_models:
                raise ResourceExhausted(
                    f"the server holds its limit of {self.limits.max_models} models; drop one first"
                )
            self._reserved.add(name)

    def release(self, name: str) -> None:
        with self._lock:
            self._reserved.discard(name)
            self._created.notify_all()

    def register(self, record: ModelRecord, replacing: ModelRecord | None = None) -> bool:
        """Make `record` the model's current one, if the model is still `replacing` (None:
        absent or reserved); False if it changed meanwhile, or the server is stopping."""
        with self._lock:
            if self._stopping.is_set() or self._models.get(record.name) is not replacing:
                return False
            self._models[record.name] = record
            return True

    def get(self, name: str, lost_too: bool = False) -> ModelRecord:
        """The model's record; a lookup during its creation waits a while for it to end. A lost
        model answers UNAVAILABLE, unless `lost_too` (to look at it)."""
        with self._lock:
            if not self._created.wait_for(
                lambda: name not in self._reserved, timeout=self.limits.creation_wait_s
            ):
                raise Unavailable(f"model {name!r} is still being created; retry shortly")
            record = self._models.get(name)
        if record is None:
            raise NotFound(f"unknown model {name!r}")
        if record.lost is not None and not lost_too:
            raise Unavailable(f"model {name!r} is down: {record.lost}")
        return record

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
            name, layouts, overrides, json.loads(optimizer_config_json(optimizer)),
            json.loads(schedule_config_json(schedule_config)),
            json.loads(optimizer_config_json(mode_config)), policy, num_shards,
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
        optimizer: dict[str, Any],
        schedule: dict[str, Any],
        mode: dict[str, Any],
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
        with self._lock:
            record = self._models.pop(name, None)
        if record is None:
            raise NotFound(f"unknown model {name!r}")
        self._drop(record, grace_s)

    def _drop(self, record: ModelRecord, grace_s: float) -> None:
        # First the store (a restart must not restore it), then the shards (a coordinator that
        # dies before they stop finishes the drop when it is back).
        if self.store is not None:
            try:
                self.store.mark_dropped(record.name)
            except Exception:  # noqa: BLE001
                log.warning("could not mark %s dropped in the checkpoint store", record.name)
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

    # ---- control changes ---------------------------------------------------------------------

    @contextlib.contextmanager
    def _controlling(self, record: ModelRecord) -> Iterator[None]:
        """The model's control lock, or UNAVAILABLE after CONTROL_WAIT_S (another change or a
        checkpoint holds it): nothing applied, safe to try again."""
        if not record.control_lock.acquire(timeout=CONTROL_WAIT_S):
            raise Unavailable(
                f"model {record.name!r} is busy with another change or a checkpoint; nothing "
                "was applied; try again"
            )
        try:
            yield
        finally:
            record.control_lock.release()

    def set_optimizer(
        self, name: str, optimizer: RuleConfig, policy: str, caller: str = ""
    ) -> tuple[int, dict[str, Any]]:
        """Swap every group's rule on every shard at one version; return it and the report."""
        if policy not in ("migrate", "reset"):
            raise InvalidArgument(f"policy must be 'migrate' or 'reset', got {policy!r}")
        record = self.get(name)
        with self._controlling(record):  # read, apply and record the config as one step
            configs, ignored = {}, {}
            for group, overrides in record.overrides.items():
                config, ignored[group] = group_config(optimizer, overrides)
                configs[group] = optimizer_config_json(config)
            new = json.loads(optimizer_config_json(optimizer))
            op = control.new_op(
                "set_optimizer", {"configs": configs, "policy": policy}, entry={"optimizer": new},
                history={"audit": control.audit_entry(caller, "set_optimizer",
                                                      record.entry.optimizer,
                                                      {**new, "policy": policy})},
            )  # fmt: skip
            version, reports = control.run(record, op)
        log.info("set_optimizer on model %s at version %d by %s", name, version, caller)
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
        with self._controlling(record):  # no other change between reading the config and applying
            merged = with_overrides(record.optimizer, changes)
            return self.set_optimizer(name, merged, "migrate", caller)

    def set_schedule(self, name: str, schedule: Any, caller: str = "") -> int:
        record = self.get(name)
        config = json.loads(schedule_config_json(parse_schedule_config(schedule)))
        with self._controlling(record):
            op = control.new_op(
                "set_schedule", {"schedule": json.dumps(config)}, entry={"schedule": config},
                history={"audit": control.audit_entry(caller, "set_schedule",
                                                      record.entry.schedule, config)},
            )  # fmt: skip
            version, _ = control.run(record, op)
        log.info("set_schedule on model %s at version %d by %s", name, version, caller)
        return version

    def report_metric(
        self, name: str, metric: str, value: float, step: int | None, caller: str = ""
    ) -> tuple[int, bool]:
        """Feed a metric to the model's one schedule, on its leader, without pausing the model;
        return the last version decided and whether the lr changed."""
        if not metric or len(metric) > 128:
            raise InvalidArgument(f"metric name must have 1-128 characters, got {metric[:40]!r}")
        if value != value or value in (float("inf"), float("-inf")):
            raise InvalidArgument(f"metric {metric!r} must be finite, got {value}")
        record = self.get(name)
        if record.initializing or not record.actors:
            raise Unavailable(f"model {name!r} is not ready yet")
        leader = record.actors[0]
        try:
            return ray.get(leader.report_metric.remote(metric, value, step, time.time()),
                           timeout=60)  # fmt: skip
        except ray.exceptions.RayActorError:
            raise Unavailable(f"model {name!r}: its leader shard is down; retry") from None

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

    # ---- checkpoints ---------------------------------------------------------------------------

    def _store(self) -> Store:
        if self.store is None:
            raise FailedPrecondition(
                "this server has no checkpoint directory; start it with --checkpoint-dir"
            )
        return self.store

    def checkpoint(
        self, name: str, caller: str = "", snapshot: str | None = None
    ) -> dict[str, Any]:
        """Snapshot every shard at one version into the store; keep the newest
        `keep_checkpoints`. Each shard writes its own file; the manifest comes last."""
        store = self._store()
        record = self.get(name)
        policy = checkpoints.effective_policy(record.entry.checkpoint_policy, self.default_policy)
        snapshot = snapshot or policy.get("snapshot", "pause")
        with record.checkpoint_lock:
            done = checkpoints.take(record, store, self._meta(record), caller, snapshot)
        store.prune(name, self.keep_checkpoints)
        self.metrics.checkpoint_seconds.labels(name).observe(done["seconds"])
        return {**done, "uri": f"{store.root}/{name}"}

    @staticmethod
    def _meta(record: ModelRecord) -> dict[str, Any]:
        entry = record.entry
        return {
            "model": entry.model, "params": entry.params, "groups": entry.groups,
            "overrides": entry.overrides, "optimizer": entry.optimizer, "mode": entry.mode,
            "run_id": entry.run_id, "checkpoint_policy": dict(entry.checkpoint_policy),
            "num_shards": len(record.actors), "service": entry.service,
        }  # fmt: skip

    def list_checkpoints(self, name: str) -> list[dict[str, Any]]:
        check_model_name(name)
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
        once the checkpoint has been read, verified and loaded into new shards; without a
        name, a checkpoint whose files turn out damaged gives way to the next newest."""
        check_model_name(name)
        store = self._store()
        candidates = store.candidates(name, checkpoint, replace.run_id if replace else None)
        with self._lock:
            old = self._models.get(name)
        reserved = old is None and replace is None
        if reserved:
            self.reserve(name)  # a CreateModel of the same name must not race this restore
        history = None
        if replace is not None:  # a recovery keeps the live history, while the leader answers
            history = recovery.live_history(replace)
            # The dead run's shards hold resources (a GPU each, maybe) the new ones need.
            stop_shards(replace.actors, replace.placement_group, 1.0)
        try:
            failure: FailedPrecondition | None = None
            for candidate in candidates:
                try:
                    ckpt = store.read_manifest(name, candidate)
                    return self._restore(ckpt, old, num_shards, caller, replace, history)
                except FailedPrecondition as exc:  # damaged: the next newest, unless named
                    if checkpoint is not None:
                        raise
                    log.warning("checkpoint %s/%s cannot be restored: %s", name, candidate, exc)
                    failure = failure or exc
            assert failure is not None
            raise failure
        finally:
            if reserved:
                self.release(name)

    def _restore(
        self,
        ckpt: Checkpoint,
        old: ModelRecord | None,
        num_shards: int,
        caller: str,
        replace: ModelRecord | None,
        live_history: dict[str, list] | None,
    ) -> ModelRecord:
        name = ckpt.model
        num_shards = num_shards or (len(old.actors) if old else ckpt.num_shards)
        self._check_num_shards(num_shards)
        history = {k: list(v) for k, v in (live_history or {}).items()} or {
            "audit": list(ckpt.audit),
            "metrics": list(ckpt.metrics),
        }
        current = old if old is not None else replace
        entry = self._new_entry(
            name, layouts_of(ckpt.params, ckpt.groups), ckpt.overrides,
            ckpt.optimizer, ckpt.schedule, ckpt.mode,
            dict(current.entry.checkpoint_policy if current else ckpt.checkpoint_policy),
            num_shards, run_id=ckpt.run_id,
            replaces=current.entry.launch if current is not None else None,
        )  # fmt: skip
        configs = {g: _parse_config(c) for g, c in ckpt.group_configs.items()}
        record = self._start(entry, entry.layouts(), history, configs)
        store = self._store()
        try:
            plan = checkpoints.restore_plan(store, ckpt)
            read = ray.get([a.restore_checkpoint.remote(plan) for a in record.actors],
                           timeout=checkpoints.WRITE_TIMEOUT_S)  # fmt: skip
            done = {"checkpoint": ckpt.name, "shards": num_shards, "bytes": ckpt.bytes,
                    "allocate_s": round(max(r["allocate_s"] for r in read), 3),
                    "read_s": round(max(r["read_s"] for r in read), 3)}  # fmt: skip
            entry = {**control.audit_entry(caller, "restore", None, done), "version": ckpt.version}
            ray.get(record.actors[0].record_history.remote([entry], []), timeout=60)
        except BaseException:
            stop_shards(record.actors, record.placement_group, 1.0)
            raise
        record.last_checkpoint = (ckpt.version, ckpt.created)
        record.last_version = ckpt.version
        self._commit(record)
        # Only over the model as it was when this began: dropped, created again or restored
        # meanwhile, it stays as it is now.
        if not self.register(record, replacing=replace if replace is not None else old):
            stop_shards(record.actors, record.placement_group, 1.0)
            raise Aborted(f"model {name!r} changed while it was being restored")
        if old is not None and old is not replace:
            stop_shards(old.actors, old.placement_group, 1.0)
        log.info("restored %s at version %d on %d shard(s): %.1f MB read in %.2f s", name,
                 ckpt.version, num_shards, ckpt.bytes / 1e6, done["read_s"])  # fmt: skip
        return record

    def checkpoint_policy(self, policy: Mapping[str, Any] | None) -> dict[str, Any]:
        """A model's own periodic-checkpoint policy, validated ({}: the server's default)."""
        checked = checkpoints.check_policy(policy)
        if checked.get("enabled", True) and ({"every_versions", "every_s"} & set(checked)):
            self._store()
        return checked


def _parse_config(config: Mapping[str, Any]) -> RuleConfig:
    from optserve.common.config import parse_optimizer_config

    return parse_optimizer_config(dict(config))
