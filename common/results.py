"""What the control plane answers, typed: `Status`, `MigrationReport`, `CheckpointInfo`.

The server builds these and sends them as JSON (the only place they are text); the client
parses them back. Each converts to a plain dict (`to_dict()`) for JSON output, and, for code
written against 0.1's dicts, still reads a field by key (``status["version"]``). Fields a newer
server adds are kept (`extra="allow"`), so an older client reads a newer server's answers.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from pydantic import BaseModel, ConfigDict


class Result(BaseModel):
    """Base of the typed answers: attributes, `to_dict()`, and reading a field by key."""

    model_config = ConfigDict(frozen=True, extra="allow")

    def to_dict(self) -> dict[str, Any]:
        """The answer as plain JSON values."""
        return self.model_dump(mode="json")

    def __getitem__(self, key: str) -> Any:
        if key not in self._keys():
            raise KeyError(key)
        return getattr(self, key)

    def get(self, key: str, default: Any = None) -> Any:
        return getattr(self, key) if key in self._keys() else default

    def __contains__(self, key: object) -> bool:
        return key in self._keys()

    def __eq__(self, other: object) -> bool:
        # Equal to a dict of the same values, as 0.1's answers were dicts.
        if isinstance(other, Mapping):
            return self.to_dict() == {k: _plain(v) for k, v in other.items()}
        return super().__eq__(other)

    __hash__ = BaseModel.__hash__

    def _keys(self) -> set[str]:
        return set(type(self).model_fields) | set(self.model_extra or {})


def _plain(value: Any) -> Any:
    if isinstance(value, Result):
        return value.to_dict()
    if isinstance(value, Mapping):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_plain(v) for v in value]
    return value


# ---- a swap's report -------------------------------------------------------------------------


class KeyMigration(Result):
    """What happened to one state key: "kept", "converted", "fresh" or "dropped", and why."""

    action: str
    why: str


class GroupMigration(Result):
    """One parameter group's migration from `source` to `target` under `policy`."""

    source: str
    target: str
    policy: str
    keys: dict[str, KeyMigration]


class MigrationReport(Result):
    """The answer to `set_optimizer` and `set_hyperparameters`: the version from which the
    change holds (after that update, before the next, on every shard), the optimizer now, and
    per group what became of every state key."""

    # The version after which the change holds (the current one when `unchanged`).
    version: int
    # The model-wide optimizer config now, every hyperparameter filled in.
    optimizer: dict[str, Any]
    # Per parameter group, what became of each state key (empty when `unchanged`).
    groups: dict[str, GroupMigration]
    # How many shards applied the change.
    shards: int
    # Per group, overrides the new rule has no such hyperparameter for (kept, not applied).
    overrides_not_applicable: dict[str, list[str]] = {}
    # True when every value was already as asked: nothing was applied or audited.
    unchanged: bool = False


# ---- checkpoints -----------------------------------------------------------------------------


class CheckpointInfo(Result):
    """A checkpoint: its name and version; when written by this call, also where it is, its
    size, how long the model's updates were held (`pause_s`) and how long it took; when
    listed, when it was written (`time`, seconds since the epoch)."""

    name: str
    version: int
    uri: str = ""
    bytes: int = 0
    pause_s: float = 0.0
    seconds: float = 0.0
    time: float | None = None


# ---- status ----------------------------------------------------------------------------------


class GroupStatus(Result):
    """A parameter group across the model: its rule's config, overrides, lr, size, scalars."""

    overrides: dict[str, Any]
    optimizer: dict[str, Any]
    lr: float
    numel: int
    state: dict[str, Any]
    # What steps the group on every shard (`fused`, `compiled` or `eager`; `+sync`: Lookahead's
    # sync compiled beside it; `mixed`: the shards differ), chosen when its rule was set, never
    # by a race: part of the run's numerics (recorded in checkpoints).
    kernel: str = ""
    # Why the kernel is not the fastest there could be (empty when it is).
    kernel_note: str = ""


class ShardGroupStatus(Result):
    """One group's slice on one shard: the rule, the kernel and its path, size and scalars."""

    rule: str
    # fused, compiled, chunked or reference (the last two: the eager kernel).
    path: str
    kernel: str = ""
    numel: int
    state: dict[str, Any]


class ShardStatus(Result):
    """One shard: where it runs, its version, and whether it is loaded and sound (`broken` says
    why it no longer matches the others; the model is then restored from a checkpoint)."""

    index: int
    address: str
    node_id: str | None = None
    device: str
    version: int
    ready: bool = True
    # Choosing and compiling its groups' kernels, before it takes its values (seconds, once
    # per machine: inductor caches what it compiled on disk).
    preparing: bool = False
    broken: str | None = None
    groups: dict[str, ShardGroupStatus]


class TrainerStatus(Result):
    """A trainer as the model's leader saw it: its pushes, applied or refused, the version its
    last push was computed on, its staleness, seconds since its last push, and its peer.
    `local_steps`: under local SGD (DiLoCo), the inner optimizer steps the trainer had taken
    by its last push (0 for a trainer that pushes every step)."""

    pushes: int
    applied: int
    refused: int
    staleness: int
    version: int
    idle_s: float
    peer: str
    first_seen: float | None = None
    last_seen: float | None = None
    local_steps: int = 0


class CheckpointStatus(Result):
    """The model's checkpoint policy, its newest checkpoint, what losing a shard would cost now
    (every update since that checkpoint, all of them if it has none), and its checkpoint faults."""

    policy: dict[str, Any]
    periodic: bool
    last_version: int | None = None
    last_time: float | None = None
    age_s: float | None = None
    updates_at_risk: int
    # Periodic checkpoints that failed in a row (0: the last one worked).
    failures_in_a_row: int = 0
    # Seconds until the next try after a failure (15 s, doubling up to 600 s); null without one.
    next_try_in_s: float | None = None
    # The newest failure: {"time": unix time, "reason": disk_full, io, timeout, ..., "error"}.
    last_failure: dict[str, Any] | None = None


class MetricEntry(Result):
    """A metric a trainer reported, at the version it landed on, and each group's lr after it
    (`lr_changed`: the schedule moved it)."""

    name: str
    value: float
    step: int | None = None
    time: float | None = None
    version: int
    lr_changed: bool = False
    lr: dict[str, float] | None = None


class AuditEntry(Result):
    """A control change: when, at which version, what, by whom, from what to what."""

    time: float
    version: int
    action: str
    caller: str | None = None
    old: Any = None
    new: Any = None


class HistoryCounts(Result):
    """How much history the server keeps, and how much of it this answer shows."""

    metrics_kept: int
    metrics_shown: int
    audit_kept: int
    audit_shown: int


class Status(Result):
    """A model's run as the server sees it (`ParameterServerClient.status`, `optserve status`)."""

    model: str
    version: int
    initializing: bool = False
    # Why the model is down for good (a shard died or broke and no checkpoint brought it back).
    lost: str | None = None
    mode: dict[str, Any]
    optimizer: dict[str, Any]
    schedule: dict[str, Any]
    schedule_state: dict[str, Any]
    # Pushes the gradient policy skipped, zeroed, clipped or refused since the shards started.
    gradient_counters: dict[str, int]
    trainers: dict[str, TrainerStatus]
    device: str
    checkpoint: CheckpointStatus
    groups: dict[str, GroupStatus]
    shards: list[ShardStatus]
    metrics: list[MetricEntry]
    audit: list[AuditEntry]
    history: HistoryCounts
    # A fork's parent: the model it was forked from (None: not a fork; docs/forks.md).
    forked_from: str | None = None
    # The parent's version the fork copied (its first version).
    fork_version: int | None = None
    # The parent's checkpoint the fork started from.
    fork_checkpoint: str | None = None
    # Other names that resolve to this model (a promoted fork answers to its parent's name).
    aliases: list[str] = []
