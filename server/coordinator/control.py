"""Control changes of a running model, each landing between the same two versions on every shard.

A change is a plain dict, the same one the leader keeps and every shard applies:
{"op_id", "kind": "set_optimizer" | "set_schedule" | "checkpoint",
"args", "entry": changes to the model's catalogue entry, "history": what it adds to the
model's history}. Configs in it are validated config objects (Ray pickles them); only the
history, which checkpoints store, holds their JSON form.

Running one: the model's leader stops deciding updates, names the boundary v (every update
decided so far is at or below it) and keeps the change as its intent; every shard applies it
once it reaches v (once: a shard remembers what it applied by op id); then the leader records
it in the model's history and resumes. A coordinator that dies in between leaves
the intent on the leader, and the coordinator that adopts the model runs it again (`replay`):
the shards that had applied it answer from memory, the others apply it, all at v.
"""

from __future__ import annotations

import contextlib
import logging
import threading
import time
import uuid
from collections.abc import Callable, Iterator, Mapping
from typing import Any, TypeVar

import ray
from pydantic import BaseModel

from optserve.common.config import RuleConfig, parse_schedule_config, with_overrides
from optserve.common.errors import (
    FailedPrecondition,
    InvalidArgument,
    ResourceExhausted,
    Unavailable,
)
from optserve.common.results import GroupMigration, MigrationReport
from optserve.server.coordinator.catalogue import ModelRecord, group_config

log = logging.getLogger(__name__)
T = TypeVar("T")
PAUSE_TIMEOUT_S = 180.0
APPLY_TIMEOUT_S = 300.0


def new_op(
    kind: str,
    args: dict[str, Any],
    entry: dict[str, Any] | None = None,
    history: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """A control change: `history` is {"audit": entry} (without its version, filled in with the
    boundary's)."""
    return {"op_id": uuid.uuid4().hex, "kind": kind, "args": args, "entry": entry or {},
            "history": history or {}}  # fmt: skip


def run(record: ModelRecord, op: dict[str, Any], boundary: int | None = None) -> tuple[int, list]:
    """Apply `op` on every shard at one version boundary; return it and each shard's result.
    With `boundary`, the leader already holds the updates for it (a replay)."""
    leader = record.actors[0]
    if boundary is None:
        boundary = ray.get(leader.pause_updates.remote(op["op_id"], op), timeout=PAUSE_TIMEOUT_S)
    history = None
    try:
        at = {**op, "at_version": boundary}
        results = _on_every_shard(record, [a.control.remote(at) for a in record.actors], op)
        history = _history(op, boundary)
    finally:
        ray.get(leader.resume_updates.remote(op["op_id"], history), timeout=60)
    record.entry = record.entry.with_changes(op.get("entry", {}))
    return boundary, results


def _on_every_shard(record: ModelRecord, refs: list[Any], op: dict[str, Any]) -> list[Any]:
    """Every shard's result; a shard that failed where others applied the change no longer
    matches them: it is marked broken (the watch then restores the model) and the error
    raised."""
    outcomes: list[Any] = []
    for ref in refs:
        try:
            outcomes.append(ray.get(ref, timeout=APPLY_TIMEOUT_S))
        except Exception as exc:  # noqa: BLE001 - sorted out below
            outcomes.append(exc)
    failed = [i for i, o in enumerate(outcomes) if isinstance(o, Exception)]
    if failed and len(failed) < len(outcomes):
        why = f"the {op['kind']} {op['op_id']} failed here and not on its peers"
        for index in failed:
            with contextlib.suppress(Exception):  # a dead shard is found by the watch
                ray.get(record.actors[index].mark_broken.remote(why), timeout=60)
    if failed:
        error = outcomes[failed[0]]
        raise error if isinstance(error, Exception) else RuntimeError(repr(error))
    return outcomes


def _history(op: dict[str, Any], version: int) -> dict[str, list[dict]]:
    said = op.get("history", {})
    out: dict[str, list[dict]] = {"audit": [], "metrics": []}
    if "audit" in said:
        out["audit"].append({"version": version, **said["audit"]})
    return out


def at_boundary(
    record: ModelRecord, apply: Callable[[int], T], kind: str, max_hold_s: float = 900.0
) -> tuple[int, T]:
    """Hold the model's updates, run `apply(v)` at the boundary version v, let them go.
    A coordinator that dies meanwhile leaves an intent of `kind` that a replay just lifts.
    Raises FailedPrecondition if the hold lifted itself (after `max_hold_s`) before `apply`
    was done: updates may have landed during it."""
    op = new_op(kind, {})
    leader = record.actors[0]
    version = ray.get(
        leader.pause_updates.remote(op["op_id"], op, max_hold_s), timeout=PAUSE_TIMEOUT_S
    )
    held = False
    try:
        result = apply(version)
    finally:
        held = ray.get(leader.resume_updates.remote(op["op_id"], None), timeout=60)
    if not held:
        raise FailedPrecondition(
            f"model {record.name!r} did not stay at version {version} for the whole {kind} "
            f"(held for at most {max_hold_s:.0f} s); nothing was kept"
        )
    return version, result


def replay(record: ModelRecord, paused: dict[str, Any]) -> None:
    """Finish the control change a dead coordinator left holding the model's updates."""
    op = paused.get("op")
    if op is None or op.get("kind") not in ("set_optimizer", "set_schedule"):
        log.warning("model %s: lifting a pause a dead coordinator left (%s)", record.name,
                    (op or {}).get("kind"))  # fmt: skip
        ray.get(record.actors[0].resume_updates.remote(paused["op_id"], None), timeout=60)
        return
    log.warning("model %s: finishing the %s a dead coordinator left at version %d",
                record.name, op["kind"], paused["boundary"])  # fmt: skip
    run(record, op, boundary=int(paused["boundary"]))


def _jsonable(config: BaseModel) -> dict[str, Any]:
    """A config as the audit log keeps it (JSON-able: it is stored in checkpoints)."""
    return config.model_dump(mode="json")


def _check_policy(policy: str) -> None:
    if policy not in ("migrate", "reset", "keep"):
        raise InvalidArgument(f"policy must be 'migrate', 'reset' or 'keep', got {policy!r}")


def leader_version(record: ModelRecord) -> int:
    """The last version the model's leader decided."""
    return int(ray.get(record.actors[0].version.remote(), timeout=60))


def _changed_overrides(
    record: ModelRecord, optimizer: RuleConfig, group_changes: Mapping[str, Mapping[str, Any]]
) -> dict[str, dict[str, Any]]:
    """The groups' overrides with `group_changes` merged in, each checked against the rule."""
    unknown = sorted(set(group_changes) - set(record.overrides))
    if unknown:
        raise InvalidArgument(
            f"model {record.name!r} has no parameter group(s) {unknown}; "
            f"its groups are {sorted(record.overrides)}"
        )
    fields = set(type(optimizer).model_fields) - {"name"}
    out = {}
    for group, own in record.overrides.items():
        asked = dict(group_changes.get(group) or {})
        wrong = sorted(set(asked) - fields)
        if wrong:
            raise InvalidArgument(
                f"group {group!r}: {optimizer.name!r} has no hyperparameter(s) {wrong}"
            )
        merged = {**own, **asked}
        group_config(optimizer, merged)  # raises InvalidArgument on a bad value
        out[group] = merged
    return out


def audit_entry(caller: str, action: str, old: Any, new: Any) -> dict[str, Any]:
    return {"time": time.time(), "caller": caller, "action": action, "old": old, "new": new}


# How long a control change waits for the model's previous change or checkpoint to end.
CONTROL_WAIT_S = 60.0


class ControlChanges:
    """The control changes of `Coordinator` (whose catalogue and records these use): swap the
    optimizer, change hyperparameters or the schedule, each at one version on every shard;
    report a metric to the model's leader."""

    # The catalogue's lookup, from Coordinator (declared for the type checker).
    get: Callable[..., ModelRecord]

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
    ) -> MigrationReport:
        """Swap every group's rule on every shard at one version; the report says which version
        and, per group, what became of every state key."""
        _check_policy(policy)
        record = self.get(name)
        with self._controlling(record):  # read, apply and record the config as one step
            if policy == "keep" and optimizer.name != record.optimizer.name:
                raise InvalidArgument(
                    f"policy 'keep' keeps state within one rule; {record.optimizer.name!r} -> "
                    f"{optimizer.name!r} needs 'migrate' or 'reset'"
                )
            old, new = _jsonable(record.optimizer), _jsonable(optimizer)
            audit = audit_entry(caller, "set_optimizer", old, {**new, "policy": policy})
            return self._swap(record, optimizer, record.overrides, policy, audit, caller)

    def _swap(
        self,
        record: ModelRecord,
        optimizer: RuleConfig,
        overrides: Mapping[str, Mapping[str, Any]],
        policy: str,
        audit: dict[str, Any],
        caller: str,
    ) -> MigrationReport:
        """Run one swap to `optimizer` with the groups' `overrides` (the control lock held)."""
        configs, ignored = {}, {}
        for group, own in overrides.items():
            configs[group], ignored[group] = group_config(optimizer, own)
        op = new_op(
            "set_optimizer", {"configs": configs, "policy": policy},
            entry={"optimizer": optimizer, "overrides": {g: dict(o) for g, o in overrides.items()}},
            history={"audit": audit},
        )  # fmt: skip
        version, reports = run(record, op)
        log.info("%s on model %s at version %d by %s", audit["action"], record.name, version,
                 caller)  # fmt: skip
        return MigrationReport(
            version=version, optimizer=_jsonable(optimizer),
            groups={g: GroupMigration.model_validate(r.as_dict()) for g, r in reports[0].items()},
            shards=len(reports),
            overrides_not_applicable={g: keys for g, keys in ignored.items() if keys},
        )  # fmt: skip

    def set_hyperparameters(
        self,
        name: str,
        changes: Mapping[str, Any],
        caller: str = "",
        group_changes: Mapping[str, Mapping[str, Any]] | None = None,
        policy: str = "migrate",
    ) -> MigrationReport:
        """Change some hyperparameters of the current rule, model-wide (`changes`) and in some
        groups' own overrides (`group_changes`), in one control change; the state follows by
        `policy` (migrate: converted as the spec says; keep: as it is, as torch does; reset).
        A request that changes nothing applies nothing and is not audited."""
        _check_policy(policy)
        group_changes = group_changes or {}
        if not changes and not any(group_changes.values()):
            raise InvalidArgument("no hyperparameters to change")
        record = self.get(name)
        with self._controlling(record):  # no other change between reading the config and applying
            merged = with_overrides(record.optimizer, changes) if changes else record.optimizer
            overrides = _changed_overrides(record, merged, group_changes)
            if merged == record.optimizer and overrides == record.overrides:
                return MigrationReport(
                    version=leader_version(record), optimizer=_jsonable(merged), groups={},
                    shards=len(record.actors), unchanged=True,
                )  # fmt: skip
            # Audited as the swap it is (as 0.1 did): the configs before and after, and the
            # groups' overrides when they change.
            old, new = _jsonable(record.optimizer), {**_jsonable(merged), "policy": policy}
            if overrides != record.overrides:
                old, new = {**old, "overrides": record.overrides}, {**new, "overrides": overrides}
            audit = audit_entry(caller, "set_optimizer", old, new)
            return self._swap(record, merged, overrides, policy, audit, caller)

    def set_schedule(self, name: str, schedule: Any, caller: str = "") -> int:
        record = self.get(name)
        config = parse_schedule_config(schedule)
        with self._controlling(record):
            op = new_op(
                "set_schedule", {"schedule": config}, entry={"schedule": config},
                history={"audit": audit_entry(caller, "set_schedule",
                                              _jsonable(record.schedule), _jsonable(config))},
            )  # fmt: skip
            version, _ = run(record, op)
        log.info("set_schedule on model %s at version %d by %s", name, version, caller)
        return version

    def report_metric(
        self, name: str, metric: str, value: float, step: int | None, caller: str = ""
    ) -> tuple[int, bool]:
        """Feed a metric to the model's one schedule, on its leader, without pausing the model;
        return the last version decided and whether the lr changed.

        A storm of reports cannot stall other calls: at most METRIC_CALLS_PER_MODEL wait on
        one model's leader at once (more are RESOURCE_EXHAUSTED at once), each for at most
        METRIC_WAIT_S (then UNAVAILABLE), on a thread of the leader's own."""
        if not metric or len(metric) > MAX_METRIC_NAME_CHARS or not metric.isprintable():
            raise InvalidArgument(
                f"a metric name has 1-{MAX_METRIC_NAME_CHARS} printable characters, got "
                f"{metric[:40]!r}"
            )
        if value != value or value in (float("inf"), float("-inf")):
            raise InvalidArgument(f"metric {metric!r} must be finite, got {value}")
        record = self.get(name)
        if not record.actors:
            raise Unavailable(f"model {name!r} has no shards yet")
        leader = record.actors[0]
        with _metric_calls.hold(name):
            try:
                return ray.get(leader.report_metric.remote(metric, value, step, time.time()),
                               timeout=METRIC_WAIT_S)  # fmt: skip
            except ray.exceptions.RayActorError:
                raise Unavailable(f"model {name!r}: its leader shard is down; retry") from None
            except ray.exceptions.GetTimeoutError:
                raise Unavailable(
                    f"model {name!r}: its leader did not take the metric within "
                    f"{METRIC_WAIT_S:g} s; retry"
                ) from None


# A metric's name is kept in the model's history (and shown by status and plot).
MAX_METRIC_NAME_CHARS = 128
# ReportMetric calls of one model waiting on its leader at once, and how long each may wait.
METRIC_CALLS_PER_MODEL = 32
METRIC_WAIT_S = 20.0


class _InFlight:
    """Calls in flight per model, each model under the same cap; one more is refused."""

    def __init__(self, cap: int) -> None:
        self.cap = cap
        self._lock = threading.Lock()
        self._held: dict[str, int] = {}

    @contextlib.contextmanager
    def hold(self, model: str) -> Iterator[None]:
        with self._lock:
            held = self._held.get(model, 0)
            if held >= self.cap:
                raise ResourceExhausted(
                    f"model {model!r} already has {held} metric reports on their way to its "
                    "leader; report less often, or retry shortly"
                )
            self._held[model] = held + 1
        try:
            yield
        finally:
            with self._lock:
                left = self._held.pop(model) - 1
                if left:
                    self._held[model] = left


_metric_calls = _InFlight(METRIC_CALLS_PER_MODEL)
