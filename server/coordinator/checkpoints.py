"""The coordinator's side of checkpoints: when to take one, and taking it. No tensor bytes.

Taking one: the model's updates are held at a version boundary v while every shard writes its
own file straight into the store (snapshot "pause") or copies its slice out (snapshot "copy",
written once the updates go on); once every shard has confirmed its file with its size and
SHA-256, the coordinator writes the manifest, last and atomically. The coordinator holds only
metadata throughout. Restores are the coordinator's (they start shards): each new shard reads
its own range (`restore_plan`).
"""

from __future__ import annotations

import errno
import logging
import time
from collections.abc import Mapping
from typing import Any

import ray

from optserve.common.errors import (
    Aborted,
    DeadlineExceeded,
    FailedPrecondition,
    InvalidArgument,
    ResourceExhausted,
)
from optserve.server.coordinator import control
from optserve.server.coordinator.catalogue import ModelRecord
from optserve.server.shard.checkpoint import SNAPSHOTS, RestorePlan, WriteTarget
from optserve.server.store.manifest import Checkpoint, Store, assemble, shard_file_name

log = logging.getLogger(__name__)
# A checkpoint every 10 minutes once the model has moved: the default policy of a server with
# a checkpoint directory (optserve serve --checkpoint-every-s).
DEFAULT_EVERY_S = 600.0
WRITE_TIMEOUT_S = 3600.0
POLICY_KEYS = ("every_versions", "every_s", "enabled", "snapshot")


class StoreFull(ResourceExhausted):
    """The checkpoint store has less room than the checkpoint needs: found before training
    is held, so a full disk costs no pause."""


def check_room(record: ModelRecord, store: Store) -> None:
    """Refuse a checkpoint a local store has no room for: as many bytes as the model's last
    checkpoint took (or, before its first, its weights alone)."""
    free = store.free_bytes()
    needed = record.last_checkpoint_bytes or 4 * sum(g.numel for g in record.groups)
    if free is not None and free < needed:
        raise StoreFull(f"the checkpoint store {store.root} has {free:,} bytes free; a "
                        f"checkpoint of model {record.name!r} needs about {needed:,}")  # fmt: skip


def check_policy(policy: Mapping[str, Any] | None) -> dict[str, Any]:
    """A validated periodic-checkpoint policy: {"every_versions": N, "every_s": T, "enabled":
    bool, "snapshot": "pause" | "copy"}, any key left out; None values are dropped."""
    policy = {k: v for k, v in dict(policy or {}).items() if v is not None}
    unknown = set(policy) - set(POLICY_KEYS)
    if unknown:
        raise InvalidArgument(f"unknown checkpoint policy keys {sorted(unknown)}; the keys "
                              f"are {list(POLICY_KEYS)}")  # fmt: skip
    for key in ("every_versions", "every_s"):
        value = policy.get(key)
        if value is not None and (
            isinstance(value, bool) or not isinstance(value, int | float) or not value > 0
        ):
            raise InvalidArgument(f"checkpoint {key} must be a positive number, got {value!r}")
    if "enabled" in policy and not isinstance(policy["enabled"], bool):
        raise InvalidArgument(
            f"checkpoint enabled must be true or false, got {policy['enabled']!r}"
        )
    if "snapshot" in policy and policy["snapshot"] not in SNAPSHOTS:
        raise InvalidArgument(
            f"checkpoint snapshot must be one of {list(SNAPSHOTS)}, got {policy['snapshot']!r}"
        )
    return policy


def effective_policy(own: Mapping[str, Any], default: Mapping[str, Any]) -> dict[str, Any]:
    """A model's policy: its own keys over the server's default (so {"snapshot": "copy"}
    keeps the default's interval, and {"enabled": false} turns periodic checkpoints off)."""
    return {**default, **own}


def is_due(policy: Mapping[str, Any], version: int, last: tuple[int, float]) -> bool:
    """Whether a periodic checkpoint is due at `version`; `last` is the last one's (version,
    unix time), or the model's start."""
    if not policy.get("enabled", True) or not ("every_versions" in policy or "every_s" in policy):
        return False
    last_version, last_time = last
    return version > last_version and (
        version - last_version >= policy.get("every_versions", float("inf"))
        or time.time() - last_time >= policy.get("every_s", float("inf"))
    )


def _begin_files(
    record: ModelRecord, store: Store, name: str, snapshot: str, version: int
) -> dict[str, Any]:
    """Every shard starts writing its file of checkpoint `name` at `version` (held there);
    return the model's history as the leader has it then."""
    directory = store.prepare(record.name, name)
    count = len(record.actors)
    targets = [
        WriteTarget(
            root=store.root, directory=directory, file=shard_file_name(i, count),
            checkpoint=name, snapshot=snapshot,  # type: ignore[arg-type]
            metadata={"model": record.name, "version": str(version), "shard": str(i)},
        )
        for i in range(count)
    ]  # fmt: skip
    calls = [a.begin_checkpoint.remote(t, version) for a, t in zip(record.actors, targets,
                                                                    strict=True)]  # fmt: skip
    ray.get(calls, timeout=WRITE_TIMEOUT_S)
    history: dict[str, Any] = ray.get(record.actors[0].history.remote(), timeout=60)
    return history


def take(
    record: ModelRecord,
    store: Store,
    meta: Mapping[str, Any],
    caller: str,
    snapshot: str,
) -> dict[str, Any]:
    """Checkpoint a model; return {"name", "version", "bytes", "pause_s", "seconds"}.
    `meta` holds the model-level fields of the manifest (layout, configs, policy)."""
    if snapshot not in SNAPSHOTS:
        raise InvalidArgument(f"snapshot must be one of {list(SNAPSHOTS)}, got {snapshot!r}")
    check_room(record, store)
    started = time.perf_counter()
    created = time.time()
    names: dict[str, str] = {}

    def write(version: int) -> dict[str, Any]:
        names["name"] = f"{int(created * 1000):013d}-{version:012d}-{record.run_id}"
        return _begin_files(record, store, names["name"], snapshot, version)

    paused = time.perf_counter()
    try:
        with record.control_lock:  # no control change lands inside the snapshot
            version, history = control.at_boundary(
                record, write, "checkpoint", max_hold_s=WRITE_TIMEOUT_S + 60
            )
        pause_s = time.perf_counter() - paused
        reports = ray.get(
            [a.finish_checkpoint.remote(names["name"]) for a in record.actors],
            timeout=WRITE_TIMEOUT_S,
        )
        entry = {**control.audit_entry(caller, "checkpoint", None, {"checkpoint": names["name"]}),
                 "version": version}  # fmt: skip
        ckpt = assemble(
            {**meta, "created": created, "audit": [*history["audit"][-1000:], entry],
             "metrics": history["metrics"][-1000:]},
            reports,
        )  # fmt: skip
        if ckpt.name != names["name"]:
            raise FailedPrecondition(f"checkpoint {names['name']} came back as {ckpt.name}")
        if record.dropping:  # the model is being dropped: this checkpoint must not outlive it
            raise Aborted(f"model {record.name!r} was dropped while it was being checkpointed")
        store.write_manifest(ckpt)
    except BaseException:
        if "name" in names:  # no manifest: nothing points at the files; take them away
            try:
                store.remove(record.name, names["name"])
            except Exception:  # noqa: BLE001 - the first failure is the one to tell; a
                # later prune takes what is left
                log.warning("could not remove the partial checkpoint %s/%s", record.name,
                            names["name"], exc_info=True)  # fmt: skip
        raise
    ray.get(record.actors[0].record_history.remote([entry], []), timeout=60)
    record.last_checkpoint = (version, created)
    record.last_checkpoint_bytes = ckpt.bytes
    record.last_version = max(record.last_version or 0, version)
    seconds = time.perf_counter() - started
    log.info("checkpoint %s/%s at version %d: %.1f MB in %.2f s (updates held %.2f s)",
             record.name, ckpt.name, version, ckpt.bytes / 1e6, seconds, pause_s)  # fmt: skip
    return {"name": ckpt.name, "version": version, "bytes": ckpt.bytes, "pause_s": pause_s,
            "seconds": seconds, "snapshot": snapshot}  # fmt: skip


def failure_reason(exc: BaseException) -> str:
    """A checkpoint fault's reason, one of a few (a metric label): disk_full, io, timeout,
    shard_down, dropped, error. A shard's error comes wrapped by Ray; its cause decides."""
    cause = getattr(exc, "cause", None)
    cause = cause if isinstance(cause, BaseException) else exc
    if isinstance(cause, StoreFull) or (
        isinstance(cause, OSError) and cause.errno in (errno.ENOSPC, errno.EDQUOT)
    ):
        return "disk_full"
    if isinstance(cause, Aborted) and "dropped" in str(cause):
        return "dropped"
    if isinstance(exc, ray.exceptions.RayActorError):
        return "shard_down"
    if isinstance(exc, TimeoutError | DeadlineExceeded | ray.exceptions.GetTimeoutError):
        return "timeout"
    if isinstance(cause, OSError):
        return "io"
    return "error"


def prune_quietly(store: Store, model: str, keep: int) -> None:
    """Prune a model's checkpoints (the oldest past `keep`, and abandoned partial writes);
    a store that fails here is logged, not raised: pruning is housekeeping."""
    try:
        store.prune(model, keep)
    except Exception:  # noqa: BLE001
        log.warning("could not prune the checkpoints of %s", model, exc_info=True)


def restore_plan(store: Store, ckpt: Checkpoint) -> RestorePlan:
    """What every shard of a restore reads: the checkpoint's files and non-tensor values."""
    return RestorePlan(
        root=store.root,
        checkpoint=ckpt.name,
        sources=ckpt.sources(),
        version=ckpt.version,
        configs=ckpt.group_configs,
        kernels=ckpt.kernels,
        scalars=ckpt.scalars,
        schedule=ckpt.schedule,
        schedule_state=ckpt.schedule_state,
    )


def newest(store: Store, model: str, run: str) -> tuple[int, float] | None:
    """(version, unix time) of the model run's newest checkpoint, if it has one."""
    found = [c for c in store.list(model) if c["run"] == run]
    return (found[-1]["version"], found[-1]["time"]) if found else None
