"""The coordinator's checkpoints and restores: the store, the manifest a checkpoint ends with,
and bringing a model back from one onto new shards. Mixed into `Coordinator`, whose catalogue,
limits and locks these use; the shards write and read the bytes (server/shard/checkpoint.py)."""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Mapping
from typing import Any

import ray

from optserve.common.config import (
    parse_mode_config,
    parse_optimizer_config,
    parse_schedule_config,
)
from optserve.common.errors import (
    Aborted,
    DeadlineExceeded,
    FailedPrecondition,
    NotFound,
    ResourceExhausted,
    Unavailable,
)
from optserve.server.coordinator import checkpoints, control, recovery
from optserve.server.coordinator.catalogue import (
    ModelEntry,
    ModelRecord,
    check_model_name,
    layouts_of,
)
from optserve.server.coordinator.launch import stop_shards
from optserve.server.metrics import CoordinatorMetrics
from optserve.server.store.manifest import Checkpoint, Store

log = logging.getLogger(__name__)


class Persistence:
    """Checkpoint and restore, for `Coordinator`."""

    # What they use, set by Coordinator (declared for the type checker).
    store: Store | None
    keep_checkpoints: int
    default_policy: dict[str, Any]
    metrics: CoordinatorMetrics
    _lock: threading.Lock
    _models: dict[str, ModelRecord]
    get: Callable[..., ModelRecord]
    reserve: Callable[[str], None]
    resolve: Callable[[str], str]
    release: Callable[[str], None]
    register: Callable[..., bool]
    _check_num_shards: Callable[[int], None]
    _new_entry: Callable[..., ModelEntry]
    _start: Callable[..., ModelRecord]
    _commit: Callable[[ModelRecord], None]

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
        name = record.name  # a promoted fork's checkpoints are its own, under any alias
        policy = checkpoints.effective_policy(record.entry.checkpoint_policy, self.default_policy)
        snapshot = snapshot or policy.get("snapshot", "pause")
        if record.dropping:  # a drop began: no checkpoint starts now
            raise NotFound(f"unknown model {name!r}")
        with record.checkpoint_lock:
            if record.dropping:  # ordered with the drop: nothing starts after it
                raise NotFound(f"unknown model {name!r}")
            try:
                done = checkpoints.take(record, store, self._meta(record), caller, snapshot)
            except Exception as exc:
                told = self._checkpoint_failed(record, store, exc)
                if told is None:
                    raise
                raise told from None
            record.holds(done["name"], done["version"])
            record.checkpoint_failures, record.checkpoint_retry_at = 0, 0.0
        checkpoints.prune_quietly(store, name, self.keep_checkpoints)
        self.metrics.checkpoint_seconds.labels(name).observe(done["seconds"])
        return {**done, "uri": f"{store.root}/{name}"}

    def _checkpoint_failed(
        self, record: ModelRecord, store: Store, exc: Exception
    ) -> Exception | None:
        """Count a failed checkpoint, keep it for status, and clear what failed writes left.
        Returns the error to answer with where the store failed (a shard's OSError would
        otherwise travel as INTERNAL), None to answer with `exc` itself."""
        reason = checkpoints.failure_reason(exc)
        cause = getattr(exc, "cause", None) or exc
        self.metrics.checkpoint_failure(record.name, reason)
        record.last_checkpoint_failure = {"time": time.time(), "reason": reason,
                                          "error": str(cause)[:500]}  # fmt: skip
        log.warning("checkpoint of %s failed (%s): %s", record.name, reason, cause)
        checkpoints.prune_quietly(store, record.name, self.keep_checkpoints)
        what = f"the checkpoint of model {record.name!r} failed, and nothing was written"
        if reason == "disk_full" and not isinstance(exc, ResourceExhausted):
            return ResourceExhausted(f"{what}: the checkpoint store is full ({cause})")
        if reason == "io":
            return Unavailable(f"{what}: the checkpoint store failed ({cause})")
        return None

    @staticmethod
    def _meta(record: ModelRecord) -> dict[str, Any]:
        entry = record.entry.as_dict()
        return {
            "model": entry["model"], "params": entry["params"], "groups": entry["groups"],
            "overrides": entry["overrides"], "optimizer": entry["optimizer"],
            "mode": entry["mode"], "run_id": entry["run_id"],
            "checkpoint_policy": entry["checkpoint_policy"], "num_shards": len(record.actors),
            "service": entry["service"], "lineage": entry["lineage"],
        }  # fmt: skip

    def list_checkpoints(self, name: str) -> list[dict[str, Any]]:
        check_model_name(name)
        return self._store().list(self.resolve(name))

    def restore(
        self,
        name: str,
        checkpoint: str | None = None,
        num_shards: int = 0,
        caller: str = "",
        replace: ModelRecord | None = None,
        unless_current: bool = False,
    ) -> ModelRecord:
        """Bring a model back from a checkpoint, onto `num_shards` shards (default: as many as
        it runs on now, or as it ran on when checkpointed). A running model is replaced only
        once the checkpoint has been read, verified and loaded into new shards; without a
        name, a checkpoint whose files turn out damaged gives way to the next newest.
        `unless_current`: a running model that holds exactly the named checkpoint's state (no
        update since this run wrote it or was restored from it) is left as it is."""
        check_model_name(name)
        name = self.resolve(name)  # a promoted fork's alias: the fork
        store = self._store()
        if unless_current and checkpoint is not None and replace is None:
            with self._lock:
                running = self._models.get(name)
            held = running.same_as.get(checkpoint) if running is not None else None
            if running is not None and held is not None and control.leader_version(running) == held:
                log.info("model %s already holds checkpoint %s: not restored", name, checkpoint)
                return running
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
            failure: Exception | None = None
            passed_over: list[dict[str, str]] = []  # told in the restore's audit entry
            for candidate in candidates:
                try:
                    ckpt = store.read_manifest(name, candidate)
                    store.check_files(ckpt)  # no shards are started for missing files
                    return self._restore(
                        ckpt, old, num_shards, caller, replace, history, passed_over
                    )
                except Exception as exc:  # broken, whatever the error: the next newest
                    if checkpoint is not None or _may_pass(exc):
                        raise  # named, or no fault of the checkpoint's (no room, a timeout)
                    reason = type(getattr(exc, "cause", None) or exc).__name__
                    self.metrics.checkpoint_fallback(name, reason)
                    log.warning("checkpoint %s/%s cannot be restored (%s): %s; trying an "
                                "older one", name, candidate, reason, exc)  # fmt: skip
                    passed_over.append({"checkpoint": candidate, "reason": reason,
                                        "error": str(exc)[:300]})  # fmt: skip
                    failure = failure or exc
            if failure is None:
                raise FailedPrecondition(f"model {name!r} has no checkpoint to restore")
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
        passed_over: list[dict[str, str]] | None = None,
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
            parse_optimizer_config(ckpt.optimizer), parse_schedule_config(ckpt.schedule),
            parse_mode_config(ckpt.mode),
            dict(current.entry.checkpoint_policy if current else ckpt.checkpoint_policy),
            num_shards, run_id=ckpt.run_id,
            replaces=current.entry.launch if current is not None else None,
        )  # fmt: skip
        entry.lineage = dict(current.entry.lineage if current is not None else ckpt.lineage)
        configs = {g: parse_optimizer_config(c) for g, c in ckpt.group_configs.items()}
        record = self._start(entry, entry.layouts(), history, configs)
        store = self._store()
        try:
            plan = checkpoints.restore_plan(store, ckpt)
            read = ray.get([a.restore_checkpoint.remote(plan) for a in record.actors],
                           timeout=checkpoints.WRITE_TIMEOUT_S)  # fmt: skip
            done = {"checkpoint": ckpt.name, "shards": num_shards, "bytes": ckpt.bytes,
                    "allocate_s": round(max(r["allocate_s"] for r in read), 3),
                    "read_s": round(max(r["read_s"] for r in read), 3)}  # fmt: skip
            if passed_over:  # newer checkpoints of the model that were broken
                done["passed_over"] = list(passed_over)
            audit = {**control.audit_entry(caller, "restore", None, done), "version": ckpt.version}
            ray.get(record.actors[0].record_history.remote([audit], []), timeout=60)
        except BaseException:
            stop_shards(record.actors, record.placement_group, 1.0)
            raise
        record.last_checkpoint = (ckpt.version, ckpt.created)
        record.last_checkpoint_bytes = ckpt.bytes
        record.last_version = ckpt.version
        record.holds(ckpt.name, ckpt.version)
        self._commit(record)
        # Only over the model as it was when this began: dropped, created again or restored
        # meanwhile, it stays as it is now.
        with record.checkpoint_lock:  # a drop of the new record waits: its mark comes after
            if not self.register(record, replacing=replace if replace is not None else old):
                stop_shards(record.actors, record.placement_group, 1.0)
                raise Aborted(f"model {name!r} changed while it was being restored")
            try:  # restored after a drop: it runs again, and a restart must bring it back
                store.clear_dropped(name)
            except Exception:  # noqa: BLE001 - it runs; only a restart would miss it
                log.warning("could not clear the drop mark of %s", name, exc_info=True)
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


def _may_pass(exc: BaseException) -> bool:
    """Whether a restore failed for a reason that may pass and is no fault of the checkpoint
    (no room for the shards, a node or shard down, a timeout, the model changed): that is
    told, not answered by restoring an older checkpoint."""
    if isinstance(exc, ResourceExhausted | Unavailable | DeadlineExceeded | Aborted):
        return True
    return isinstance(exc, ray.exceptions.RayError) and not isinstance(
        exc, ray.exceptions.RayTaskError
    )
