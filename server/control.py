"""Control changes of a running model, each landing between the same two versions on every shard.

A change is a plain dict, the same one the leader keeps and every shard applies:
{"op_id", "kind": "set_optimizer" | "set_schedule" | "report_metric" | "checkpoint",
"args", "entry": changes to the model's catalogue entry, "history": what it adds to the
model's history}. Running one: the model's leader stops deciding updates, names the boundary
v (every update decided so far is at or below it) and keeps the change as its intent; every
shard applies it once it reaches v (once: a shard remembers what it applied by op id); then the
leader records it in the model's history and resumes. A coordinator that dies in between leaves
the intent on the leader, and the coordinator that adopts the model runs it again (`replay`):
the shards that had applied it answer from memory, the others apply it, all at v.
"""

from __future__ import annotations

import logging
import time
import uuid
from collections.abc import Callable
from typing import Any, TypeVar

import ray

from optserve.server.catalogue import ModelRecord

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
    """A control change: `history` is {"audit": entry} or {"metric": entry} (each without its
    version, filled in with the boundary's)."""
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
        results = ray.get([a.control.remote(at) for a in record.actors], timeout=APPLY_TIMEOUT_S)
        history = _history(op, boundary, results)
    finally:
        ray.get(leader.resume_updates.remote(op["op_id"], history), timeout=60)
    record.entry.__dict__.update(op.get("entry", {}))
    return boundary, results


def _history(op: dict[str, Any], version: int, results: list[Any]) -> dict[str, list[dict]]:
    said = op.get("history", {})
    out: dict[str, list[dict]] = {"audit": [], "metrics": []}
    if "audit" in said:
        out["audit"].append({"version": version, **said["audit"]})
    if "metric" in said:
        changed = any(r["changed"] for r in results)
        out["metrics"].append({**said["metric"], "version": version, "lr_changed": changed,
                               "lr": results[0]["lr"]})  # fmt: skip
    return out


def at_boundary(record: ModelRecord, apply: Callable[[int], T], kind: str) -> tuple[int, T]:
    """Hold the model's updates, run `apply(v)` at the boundary version v, let them go.
    A coordinator that dies meanwhile leaves an intent of `kind` that a replay just lifts."""
    op = new_op(kind, {})
    leader = record.actors[0]
    version = ray.get(leader.pause_updates.remote(op["op_id"], op), timeout=PAUSE_TIMEOUT_S)
    try:
        return version, apply(version)
    finally:
        ray.get(leader.resume_updates.remote(op["op_id"], None), timeout=60)


def replay(record: ModelRecord, paused: dict[str, Any]) -> None:
    """Finish the control change a dead coordinator left holding the model's updates."""
    op = paused.get("op")
    if op is None or op.get("kind") not in ("set_optimizer", "set_schedule", "report_metric"):
        log.warning("model %s: lifting a pause a dead coordinator left (%s)", record.name,
                    (op or {}).get("kind"))  # fmt: skip
        ray.get(record.actors[0].resume_updates.remote(paused["op_id"], None), timeout=60)
        return
    log.warning("model %s: finishing the %s a dead coordinator left at version %d",
                record.name, op["kind"], paused["boundary"])  # fmt: skip
    run(record, op, boundary=int(paused["boundary"]))


def audit_entry(caller: str, action: str, old: Any, new: Any) -> dict[str, Any]:
    return {"time": time.time(), "caller": caller, "action": action, "old": old, "new": new}
