"""Keeping models alive: the coordinator's background work, and what it does when it comes back.

* `watch`: every second each model's shards report their health. A dead shard (its process is
  gone) or a broken one (it missed or half-applied an update its peers applied) takes the whole
  model back to its run's newest checkpoint, at one version on every shard, on fresh shards;
  a model without one is reported lost. A new model whose initial values never all arrived is
  dropped after `Limits.initial_values_timeout_s`.
* `periodic_checkpoints`: each model's checkpoint policy, applied.
* `adopt`: a coordinator that starts finds the running shards of its service and rebuilds its
  catalogue from the entries they carry. Nothing is rolled back: the shards kept every update
  they acknowledged. A control change a dead coordinator left half done is finished; launches
  it never made current, and models it was dropping, are stopped.
* `restore_from_store`: models that exist only as checkpoints come back from them.
"""

from __future__ import annotations

import contextlib
import logging
import threading
import time
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

import ray

from optserve.common.errors import (
    DeadlineExceeded,
    FailedPrecondition,
    InvalidArgument,
    ResourceExhausted,
    Unavailable,
)
from optserve.common.layout import ShardSlice, split_ranges
from optserve.server.coordinator import checkpoints, control
from optserve.server.coordinator.catalogue import ModelEntry, ModelRecord
from optserve.server.coordinator.launch import (
    GROUP_PREFIX,
    find_group,
    remove_group,
    running_shards,
    stop_shards,
)

if TYPE_CHECKING:
    from optserve.server.coordinator.core import Coordinator

log = logging.getLogger(__name__)
HEALTH_TIMEOUT_S = 30.0
# A recovery that fails for a passing reason is tried again: 6 times, after 5, 10, 20, ... s.
RECOVERY_TRIES = 6
RECOVERY_FIRST_WAIT_S = 5.0
# A periodic checkpoint that fails waits 15 s, 30 s, 60 s, ... up to 600 s before the next
# try: a full disk costs one pause of training per wait, not one every half second.
CHECKPOINT_RETRY_FIRST_S = 15.0
CHECKPOINT_RETRY_MAX_S = 600.0


def checkpoint_retry_wait_s(failures: int) -> float:
    """How long a model's periodic checkpoints wait after `failures` failures in a row."""
    exponent = min(max(failures - 1, 0), 32)
    return min(CHECKPOINT_RETRY_MAX_S, CHECKPOINT_RETRY_FIRST_S * 2.0**exponent)


def watch(coordinator: Coordinator, every_s: float = 1.0) -> None:
    """Background: check every model's shards, and act on what is wrong."""
    while not coordinator._stopping.wait(every_s):
        for record in coordinator.records():
            if coordinator._stopping.is_set():
                return
            if record.lost is None and not record.recovering:
                try:
                    check(coordinator, record)
                except Exception:  # noqa: BLE001 - e.g. Ray shutting down
                    log.warning("could not check the shards of %s", record.name, exc_info=True)


def check(coordinator: Coordinator, record: ModelRecord) -> None:
    refs = [a.health.remote() for a in record.actors]
    ready, _ = ray.wait(refs, num_returns=len(refs), timeout=HEALTH_TIMEOUT_S)
    dead, broken, versions, all_ready = [], {}, [], len(ready) == len(refs)
    for index, ref in enumerate(refs):
        if ref not in ready:
            continue  # busy, not known dead
        try:
            health = ray.get(ref)
        except ray.exceptions.ActorDiedError:  # not ActorUnavailableError: a blip
            dead.append(index)
            continue
        except ray.exceptions.RayError:
            all_ready = False
            continue
        versions.append(health["version"])
        all_ready = all_ready and health["ready"]
        if health["broken"] is not None:
            broken[index] = health["broken"]
    if len(versions) == len(refs):
        record.last_version = min(versions)
    if dead:
        start_recovery(coordinator, record, f"shard(s) {dead} died")
    elif broken:
        index, why = next(iter(broken.items()))
        start_recovery(
            coordinator, record, f"shard(s) {sorted(broken)} broke (shard {index}: {why})"
        )
    elif record.initializing:
        if all_ready:
            record.initializing = False
        elif time.time() - record.entry.created > coordinator.limits.initial_values_timeout_s:
            log.error("model %s never received all its initial values; dropping it", record.name)
            with coordinator._lock:
                if coordinator._models.get(record.name) is record:
                    del coordinator._models[record.name]
                else:
                    return
            stop_shards(record.actors, record.placement_group, 1.0)


def start_recovery(coordinator: Coordinator, record: ModelRecord, why: str) -> None:
    """Recover `record` on a thread of its own (the watch goes on with the other models),
    unless a recovery of it runs already."""
    with coordinator._lock:
        if record.recovering or coordinator._models.get(record.name) is not record:
            return
        record.recovering = True
    threading.Thread(
        target=recover, args=(coordinator, record, why), name="optserve-recover", daemon=True
    ).start()


def recover(coordinator: Coordinator, record: ModelRecord, why: str) -> None:
    """The model cannot go on as it is (a shard died or broke): bring it back from its run's
    newest checkpoint on fresh shards (trainers are told to pull). What may pass (no room for
    the shards yet, a node coming back) is tried again, RECOVERY_TRIES times in all, waiting
    longer each time. Without a checkpoint the model is lost: it answers every call with that."""
    name = record.name
    delay = RECOVERY_FIRST_WAIT_S
    log.error("model %s: %s; restoring its newest checkpoint", name, why)
    try:
        for attempt in range(RECOVERY_TRIES):
            with coordinator._lock:
                if coordinator._models.get(name) is not record:
                    return  # replaced meanwhile (restored or dropped)
            try:
                store = coordinator.store
                if store is None or not checkpoints.newest(store, name, record.run_id):
                    raise FailedPrecondition("it has no checkpoint")
                coordinator.restore(
                    name, num_shards=len(record.actors), caller="recovery", replace=record
                )
                return
            except (
                ResourceExhausted,
                Unavailable,
                DeadlineExceeded,
                ray.exceptions.RayError,
            ) as exc:
                if attempt == RECOVERY_TRIES - 1:
                    raise
                log.warning("model %s: restoring failed (%s); trying again in %.0f s", name,
                            exc, delay)  # fmt: skip
                if coordinator._stopping.wait(delay):
                    return
                delay *= 2
    except Exception as exc:  # noqa: BLE001 - the model stays down, and says why
        record.lost = f"{why}, and the model could not be restored: {exc}"
        log.error("model %s: %s", name, record.lost)
    finally:
        record.recovering = False


def periodic_checkpoints(coordinator: Coordinator) -> None:
    """Background: checkpoint each model whose policy says it is due."""
    while not coordinator._stopping.wait(0.5):
        for record in coordinator.records():
            if record.lost is not None or record.initializing or record.dropping:
                continue
            policy = checkpoints.effective_policy(
                record.entry.checkpoint_policy, coordinator.default_policy
            )
            last = record.last_checkpoint or (0, record.entry.created)
            if time.monotonic() < record.checkpoint_retry_at:
                continue
            try:
                if checkpoints.is_due(policy, coordinator.version(record), last):
                    coordinator.checkpoint(record.name, caller="periodic")
                    record.checkpoint_failures = 0
            except Exception:  # noqa: BLE001 - a failed checkpoint is tried again, later
                record.checkpoint_failures += 1
                wait = checkpoint_retry_wait_s(record.checkpoint_failures)
                record.checkpoint_retry_at = time.monotonic() + wait
                log.warning("periodic checkpoint of %s failed (%d in a row); next try in %.0f s",
                            record.name, record.checkpoint_failures, wait,
                            exc_info=True)  # fmt: skip


def live_history(record: ModelRecord) -> dict[str, list] | None:
    """The history a recovered model keeps: its run's own, from its leader while that still
    answers (None otherwise: the checkpoint's is used)."""
    if not record.actors or record.actors[0] is None:
        return None
    try:
        history = ray.get(record.actors[0].history.remote(), timeout=10)
        return {"audit": list(history["audit"]), "metrics": list(history["metrics"])}
    except Exception:  # noqa: BLE001 - its leader is gone
        log.info("model %s: its leader is gone; its history comes from the checkpoint",
                 record.name)  # fmt: skip
        return None


def adopt(coordinator: Coordinator) -> list[str]:
    """Adopt the running shards of this coordinator's service; return the models adopted."""
    adopted = []
    for model, launches in running_shards(coordinator.service).items():
        try:
            if _adopt_model(coordinator, model, launches):
                adopted.append(model)
        except Exception:  # noqa: BLE001 - one bad model must not keep the others down
            log.exception("could not adopt the shards of model %s", model)
    remove_orphan_groups(coordinator)
    if adopted:
        log.warning("adopted the running shards of %s", adopted)
    return adopted


def _entries(launches: Mapping[str, Mapping[int, Any]]) -> dict[str, tuple[ModelEntry, dict]]:
    """Per launch: its catalogue entry and what each shard that answered said of itself."""
    found = {}
    for launch, shards in launches.items():
        refs = {index: handle.entry.remote() for index, handle in shards.items()}
        said = {}
        for index, ref in refs.items():
            try:
                said[index] = ray.get(ref, timeout=HEALTH_TIMEOUT_S)
            except Exception:  # noqa: BLE001 - dead or stuck: as good as missing
                log.warning("shard %d of launch %s does not answer", index, launch)
        if not said:
            continue
        try:  # the leader's entry where it answers (the others carry the same)
            entry = ModelEntry.from_dict(said.get(0) or next(iter(said.values())))
        except (InvalidArgument, KeyError, TypeError) as exc:  # from a version we cannot read
            log.error("launch %s carries an entry this version cannot read: %s", launch, exc)
            continue
        found[launch] = (entry, said)
    return found


def _adopt_model(
    coordinator: Coordinator, model: str, launches: Mapping[str, Mapping[int, Any]]
) -> bool:
    entries = _entries(launches)
    current = {
        launch: value
        for launch, value in entries.items()
        if value[0].committed and not value[0].dropping
    }
    replaced = {value[0].replaces for value in current.values()}
    keep = sorted((v[0].created, launch) for launch, v in current.items() if launch not in replaced)
    chosen = keep[-1][1] if keep else None
    for launch, shards in launches.items():
        if launch != chosen:  # never made current, replaced, or being dropped
            entry = entries[launch][0] if launch in entries else None
            log.warning("stopping launch %s of model %s (not its current one)", launch, model)
            group = find_group(entry.placement_group) if entry is not None else None
            stop_shards(list(shards.values()), group, 1.0)
            if entry is not None and entry.dropping and coordinator.store is not None:
                with contextlib.suppress(Exception):  # finish the drop: no restore brings it back
                    coordinator.store.mark_dropped(model)
    if chosen is None:
        return False
    entry, said = entries[chosen]
    shards = launches[chosen]
    layouts = entry.layouts()
    slices = [
        ShardSlice(s.index, s.ranges, said.get(s.index, {}).get("address", ""))
        for s in split_ranges(layouts, entry.num_shards)
    ]
    record = ModelRecord(entry, layouts, slices, [shards.get(i) for i in range(entry.num_shards)],
                         placement_group=find_group(entry.placement_group))  # fmt: skip
    if coordinator.store is not None:
        record.last_checkpoint = checkpoints.newest(coordinator.store, model, entry.run_id)
    missing = [i for i in range(entry.num_shards) if i not in said]
    if not missing:
        try:
            paused = ray.get(record.actors[0].paused.remote(), timeout=HEALTH_TIMEOUT_S)
            if paused is not None:
                control.replay(record, paused)
            health = ray.get([a.health.remote() for a in record.actors], timeout=HEALTH_TIMEOUT_S)
            record.initializing = not all(h["ready"] for h in health)
            record.last_version = min(h["version"] for h in health)
        except Exception:  # noqa: BLE001 - adopted all the same: the watch sees what is wrong
            log.exception("model %s: adopted, but its shards did not all answer", model)
    if not coordinator.register(record):
        stop_shards([a for a in record.actors if a is not None], record.placement_group, 1.0)
        return False
    if missing:
        start_recovery(coordinator, record, f"shard(s) {missing} are gone")
    return True


def remove_orphan_groups(coordinator: Coordinator) -> None:
    """Remove this service's placement groups that no model's shards use (a coordinator died
    between making one and starting its shards)."""
    used = {record.entry.placement_group for record in coordinator.records()}
    prefix = f"{GROUP_PREFIX}:{coordinator.service}:"
    for group in ray.util.placement_group_table().values():
        name = group.get("name", "")
        if name.startswith(prefix) and name not in used and group.get("state") != "REMOVED":
            log.warning("removing placement group %s: no model's shards use it", name)
            remove_group(find_group(name))


def restore_from_store(coordinator: Coordinator, this_service_only: bool) -> list[str]:
    """Restore every model in the checkpoint store that is not running (nor dropped after its
    last checkpoint); with `this_service_only`, only those this service checkpointed."""
    store = coordinator.store
    if store is None:
        return []
    restored = []
    for model in store.models():
        if model in coordinator.list_models() or store.dropped_after_last_checkpoint(model):
            continue
        try:
            if this_service_only:
                service = store.read(model).service
                if service and service != coordinator.service:
                    continue
            coordinator.restore(model, caller="startup")
            restored.append(model)
        except Exception:  # noqa: BLE001 - one bad model must not keep the others down
            log.exception("could not restore model %s", model)
    return restored
