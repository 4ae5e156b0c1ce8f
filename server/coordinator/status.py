"""A model's status, as `optserve status` and `ParameterServerClient.status` show it: assembled
from the coordinator's record, every shard's info and the leader's history. Pure logic."""

from __future__ import annotations

import re
import time
from collections.abc import Mapping, Sequence
from typing import Any

from optserve.common.results import Status
from optserve.server.coordinator.catalogue import ModelRecord
from optserve.server.edge.tokens import Principal

# A gRPC peer address as the audit log's callers carry it: "ipv4:10.0.0.7:51234", "(ipv6:...)".
_PEER = re.compile(r"\s*\(?\b(?:ipv4|ipv6|unix|unix-abstract):[^\s()]*\)?")


def model_status(
    record: ModelRecord,
    shards: Sequence[Mapping[str, Any]],
    history: Mapping[str, Any],
    recent: int,
    policy: Mapping[str, Any],
) -> Status:
    first = shards[0]
    version = min(s["version"] for s in shards)
    return Status.model_validate(
        {
            "model": record.name,
            "version": version,
            "initializing": record.initializing,
            # Why the model is down for good (a shard died or broke, and no checkpoint could bring
            # it back), or None.
            "lost": record.lost,
            # A fork's lineage and the names that resolve to the model (docs/forks.md).
            **{
                k: record.entry.lineage.get(k)
                for k in ("forked_from", "fork_version", "fork_checkpoint")
            },  # fmt: skip
            "aliases": list(record.entry.lineage.get("aliases", [])),
            "mode": record.mode.model_dump(mode="json"),
            "optimizer": record.optimizer.model_dump(mode="json"),
            "schedule": record.schedule.model_dump(mode="json"),
            "schedule_state": first.get("schedule_state", {}),
            # Pushes the gradient policy skipped, zeroed, clipped or refused (since the shards
            # started: a restore starts them again).
            "gradient_counters": first.get("gradient_counters", {}),
            # Who pushed, as the model's leader saw it: pushes, last version, staleness, peer.
            "trainers": first.get("trainers", {}),
            "device": record.device,
            "checkpoint": checkpoint_status(record, version, policy),
            "groups": {
                group: {
                    "overrides": record.overrides.get(group, {}),
                    "optimizer": info["config"],
                    "lr": info["lr"],
                    "numel": sum(s["groups"][group]["numel"] for s in shards),
                    "state": info["scalars"],
                    **_kernel(group, shards),
                }
                for group, info in first["groups"].items()
            },
            "shards": [_shard_status(s) for s in shards],
            "metrics": history["metrics"],
            "audit": history["audit"],
            # How much history the server keeps, and how much of it this answer shows.
            "history": {
                "metrics_kept": history["metrics_kept"],
                "metrics_shown": min(recent, history["metrics_kept"]),
                "audit_kept": history["audit_kept"],
                "audit_shown": min(recent, history["audit_kept"]),
            },
        }
    )


def as_seen_by(status: Status, principal: Principal | None) -> Status:
    """`status` as `principal` may see it: where trainers and callers connect from (their peer
    addresses) is for admin tokens, and for everyone when auth is off (loopback development).
    A trainer token sees every trainer's name and counts, never where the others are: peers
    are blanked, a trainer known only by its address is shown as "anonymous-<n>", and the
    audit log's callers lose their addresses."""
    if principal is None or principal.role == "admin":
        return status
    trainers, anonymous = {}, 0
    for name, trainer in status.trainers.items():
        if name == trainer.peer:
            anonymous += 1
            name = f"anonymous-{anonymous}"
        trainers[name] = trainer.model_copy(update={"peer": ""})
    audit = [
        entry.model_copy(update={"caller": _PEER.sub("", entry.caller) or "?"})
        if entry.caller
        else entry
        for entry in status.audit
    ]
    return status.model_copy(update={"trainers": trainers, "audit": audit})


def _kernel(group: str, shards: Sequence[Mapping[str, Any]]) -> dict[str, str]:
    """A group's kernel on every shard (they differ only where one could not compile)."""
    found = {(s["groups"][group].get("kernel", ""), s["groups"][group].get("kernel_note", ""))
             for s in shards}  # fmt: skip
    if len({kernel for kernel, _ in found}) == 1:
        kernel, note = sorted(found)[-1]
        return {"kernel": kernel, "kernel_note": note}
    notes = "; ".join(f"shard {s['index']}: {s['groups'][group].get('kernel', '')}" for s in shards)
    return {"kernel": "mixed", "kernel_note": f"the shards differ ({notes})"}


def _shard_status(s: Mapping[str, Any]) -> dict[str, Any]:
    """One shard as status shows it."""
    return {
        "index": s["index"],
        "address": s["address"],
        "node_id": s.get("node_id"),
        "device": s["device"],
        "version": s["version"],
        "ready": s.get("ready", True),
        "preparing": s.get("preparing", False),
        # Why the shard no longer matches the others (None: it does); the coordinator
        # restores the model from its newest checkpoint when one breaks.
        "broken": s.get("broken"),
        "groups": {
            g: {
                "rule": i["rule"],
                "path": i["path"],
                "kernel": i.get("kernel", ""),
                "numel": i["numel"],
                "state": i["scalars"],
            }
            for g, i in s["groups"].items()
        },  # fmt: skip
    }


def checkpoint_status(
    record: ModelRecord, version: int, policy: Mapping[str, Any]
) -> dict[str, Any]:
    """The model's checkpoint policy, its newest checkpoint, and what losing a shard would cost
    now: every update since that checkpoint (all of them if it has none)."""
    last = record.last_checkpoint
    periodic = bool(policy.get("enabled", True)) and bool(
        {"every_versions", "every_s"} & set(policy)
    )
    return {
        "policy": dict(policy),
        "periodic": periodic,
        "last_version": last[0] if last else None,
        "last_time": last[1] if last else None,
        "age_s": time.time() - last[1] if last else None,
        "updates_at_risk": version - (last[0] if last else 0),
        # Faults: periodic checkpoints failed in a row (0: the last one worked), when the next
        # is tried, and the newest failure ({"time", "reason", "error"}, or None).
        "failures_in_a_row": record.checkpoint_failures,
        "next_try_in_s": max(0.0, record.checkpoint_retry_at - time.monotonic())
        if record.checkpoint_failures
        else None,
        "last_failure": record.last_checkpoint_failure,
    }
