"""Forks: a copy of a live model under a new name, and promoting a fork to its parent's main line.
Mixed into `Coordinator`. No tensor bytes pass through here.

A fork is a restore under another name. Its parent's consistent checkpoint (taken now, holding
the parent's updates as any checkpoint does, or one it already has) is copied into the store as
the fork's own first checkpoint (hard links where the store is a local disk: no bytes copied),
with a new run id and the fork's lineage; the fork's shards then restore from it like any
model's. So from its first moment a fork checkpoints, restores and recovers like any model: it
IS one, and counts against the server's limits.

Its lineage (`ModelEntry.lineage`: "forked_from", "fork_version", "fork_checkpoint") travels
with its entry (every shard carries it: a coordinator that comes back adopts it) and its
checkpoints' manifests (a restore brings it back). Promoting a fork adds its parent's name to
the fork's "aliases" (persisted the same way), drops the parent's run (or keeps a copy of it
under another name), and from then on the parent's name resolves to the fork for every call.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import os
import posixpath
import threading
import time
import uuid
from collections.abc import Callable
from typing import Any

import ray
from fsspec.implementations.local import LocalFileSystem

from optserve.common.config import RuleConfig
from optserve.common.errors import (
    FailedPrecondition,
    InvalidArgument,
    NotFound,
)
from optserve.common.results import MigrationReport
from optserve.server.coordinator import control
from optserve.server.coordinator.catalogue import ModelRecord, check_model_name
from optserve.server.store.manifest import Checkpoint, Store

log = logging.getLogger(__name__)
CHECKPOINT_PREFIX = "checkpoint:"


@dataclasses.dataclass
class ForkResult:
    record: ModelRecord
    pause_s: float = 0.0
    report: MigrationReport | None = None


def parse_at(at: str) -> str | None:
    """The checkpoint a fork starts from: None for "now" (or empty), the name of
    "checkpoint:<name>"."""
    if at in ("", "now"):
        return None
    if at.startswith(CHECKPOINT_PREFIX) and len(at) > len(CHECKPOINT_PREFIX):
        return at[len(CHECKPOINT_PREFIX) :]
    raise InvalidArgument(f'at must be "now" or "checkpoint:<name>", got {at!r}')


def copy_checkpoint(store: Store, ckpt: Checkpoint, model: str, lineage: dict[str, Any],
                    audit: dict[str, Any]) -> Checkpoint:  # fmt: skip
    """`ckpt` as model `model`'s first checkpoint: its files linked (or copied), its manifest
    with a new run id, `lineage` and `audit` appended; written last, as every manifest is."""
    copy = dataclasses.replace(
        ckpt, model=model, run_id=uuid.uuid4().hex[:12], created=time.time(),
        lineage=dict(lineage), audit=[*ckpt.audit, audit], metrics=list(ckpt.metrics),
    )  # fmt: skip
    directory = store.prepare(model, copy.name)
    try:
        for source in ckpt.sources():
            target = posixpath.join(directory, posixpath.basename(source.path))
            _link_or_copy(store, source.path, target)
        store.write_manifest(copy)
    except BaseException:
        store.remove(model, copy.name)
        raise
    return copy


def _link_or_copy(store: Store, source: str, target: str) -> None:
    src, dst = store.path(source), store.path(target)
    if isinstance(store.fs, LocalFileSystem):
        try:
            os.link(src, dst)  # checkpoint files are never written again: share them
            return
        except OSError:
            pass
    store.fs.copy(src, dst)


def _check_keep(optimizer: RuleConfig | None, policy: str, rule: Any) -> None:
    """Policy `keep` keeps state within one rule: the fork's (`rule`, a name or a config)."""
    name = rule.get("name") if isinstance(rule, dict) else rule
    if optimizer is not None and policy == "keep" and name != optimizer.name:
        raise InvalidArgument(f"policy 'keep' keeps state within one rule; the fork runs "
                              f"{name!r}, not {optimizer.name!r}")  # fmt: skip


class Forks:
    """fork and promote, for `Coordinator`."""

    # One promotion at a time: two forks of one model promoted at once must not each drop
    # what the parent's name resolves to (the other fork).
    _promoting = threading.Lock()

    # What they use, set by Coordinator (declared for the type checker).
    store: Store | None
    _lock: threading.Lock
    _resolve: Callable[[str], str]
    _models: dict[str, ModelRecord]
    get: Callable[..., ModelRecord]
    reserve: Callable[[str], None]
    release: Callable[[str], None]
    resolve: Callable[[str], str]
    _store: Callable[[], Store]
    _restore: Callable[..., ModelRecord]
    checkpoint: Callable[..., dict[str, Any]]
    set_optimizer: Callable[..., MigrationReport]
    drop_model: Callable[..., None]

    def fork(
        self,
        model: str,
        new_name: str,
        at: str = "now",
        optimizer: RuleConfig | None = None,
        policy: str = "migrate",
        caller: str = "",
    ) -> ForkResult:
        """Copy `model` at one version as `new_name` (see the module's doc); with `optimizer`,
        swap the copy's rule (`policy` as set_optimizer's) before its first update."""
        check_model_name(model)
        check_model_name(new_name)
        from_checkpoint = parse_at(at)
        if optimizer is not None:
            control._check_policy(policy)
        store = self._store()
        try:
            parent: ModelRecord | None = self.get(model)
        except NotFound:
            if from_checkpoint is None:
                raise
            parent = None  # a model that is only in the store: one of its checkpoints
        source = parent.name if parent is not None else model
        if from_checkpoint is None:  # "now": the parent's rule is the checkpoint's
            assert parent is not None
            _check_keep(optimizer, policy, parent.optimizer.name)
        else:  # known before anything is taken or reserved
            store.candidates(source, from_checkpoint)
            _check_keep(optimizer, policy, store.read_manifest(source, from_checkpoint).optimizer)
        self.reserve(new_name)  # until the fork is whole: swapped too (others' lookups wait)
        pause_s = 0.0
        report: MigrationReport | None = None
        try:
            if from_checkpoint is None:
                assert parent is not None
                done = self.checkpoint(source, caller)
                from_checkpoint, pause_s = done["name"], done["pause_s"]
            ckpt = store.read_manifest(source, from_checkpoint)
            store.check_files(ckpt)
            lineage = {"forked_from": source, "fork_version": ckpt.version,
                       "fork_checkpoint": ckpt.name, "parent_run": ckpt.run_id}  # fmt: skip
            entry = {**control.audit_entry(caller, "fork", None, {"from": source,
                     "checkpoint": ckpt.name}), "version": ckpt.version}  # fmt: skip
            copy = copy_checkpoint(store, ckpt, new_name, lineage, entry)
            num_shards = len(parent.actors) if parent is not None else ckpt.num_shards
            try:
                record = self._restore(copy, None, num_shards, caller, None, None)
            except BaseException:
                store.remove(new_name, copy.name)
                raise
            if optimizer is not None:  # before the fork takes a push: its name is still held
                try:
                    report = self.set_optimizer(new_name, optimizer, policy, caller)
                except BaseException:  # the fork never ran: as if it had not been made
                    self.drop_model(new_name)
                    raise
        finally:
            self.release(new_name)
        if parent is not None:  # the parent's audit log tells of its forks too
            told = {**control.audit_entry(caller, "forked", None, {"fork": new_name,
                    "checkpoint": ckpt.name}), "version": ckpt.version}  # fmt: skip
            try:
                ray.get(parent.actors[0].record_history.remote([told], []), timeout=60)
            except Exception:  # noqa: BLE001 - the fork stands; only the parent's log misses it
                log.warning("could not record the fork in %s's audit log", source)
        result = ForkResult(record, pause_s, report)
        log.info("forked %s at version %d (checkpoint %s) as %s", source, ckpt.version,
                 ckpt.name, new_name)  # fmt: skip
        return result

    def promote(self, name: str, keep_as: str = "", caller: str = "") -> dict[str, Any]:
        """Make fork `name` its parent's main line: the parent's name (and the names that
        resolved to the parent) resolve to the fork from now on. The parent's run is dropped,
        or first copied as `keep_as`. Returns {"record", "main", "dropped", "kept_as"}."""
        with self._promoting:
            return self._promote(name, keep_as, caller)

    def _promote(self, name: str, keep_as: str, caller: str) -> dict[str, Any]:
        record = self.get(name)
        lineage = dict(record.entry.lineage)
        parent = lineage.get("forked_from")
        if not parent:
            raise FailedPrecondition(f"model {record.name!r} is not a fork: only a fork can be "
                                     "promoted")  # fmt: skip
        if parent in lineage.get("aliases", ()):
            raise FailedPrecondition(f"{record.name!r} is already {parent!r}'s main line")
        if keep_as:
            check_model_name(keep_as)
        with self._lock:  # the main line now: the parent, or what its name resolves to
            losing = self._models.get(self._resolve(parent))
        if (
            losing is not None
            and losing.name == parent
            and losing.run_id != lineage.get("parent_run", losing.run_id)
        ):
            raise FailedPrecondition(f"model {parent!r} is not the run {record.name!r} was "
                                     "forked from (it was dropped and created again)")  # fmt: skip
        if keep_as and losing is None:
            raise FailedPrecondition(f"{parent!r} no longer runs: there is nothing to keep")
        kept = ""
        if keep_as and losing is not None:  # ALREADY_EXISTS before anything changes
            self.fork(losing.name, keep_as, caller=caller)
            kept = keep_as
        moved = [parent]
        if losing is not None:
            moved += [losing.name, *losing.entry.lineage.get("aliases", [])]
        aliases = sorted({*lineage.get("aliases", []), *moved})
        self._set_lineage(record, {**lineage, "aliases": aliases})
        entry = {**control.audit_entry(caller, "promote", {"main": parent},
                 {"main": record.name, "aliases": aliases, "kept_as": kept or None}),
                 "version": control.leader_version(record)}  # fmt: skip
        try:  # the aliases and the audit entry reach the store before the parent goes
            ray.get(record.actors[0].record_history.remote([entry], []), timeout=60)
            if self.store is not None:
                self.checkpoint(record.name, caller)
            if losing is not None:
                self.drop_model(losing.name)
        except BaseException as exc:
            self._set_lineage(record, lineage)  # the parent runs on: nothing changed
            undone = {**control.audit_entry(caller, "promote undone", None, {"error": str(exc)}),
                      "version": control.leader_version(record)}  # fmt: skip
            with contextlib.suppress(Exception):
                ray.get(record.actors[0].record_history.remote([undone], []), timeout=60)
            raise
        log.info("promoted %s: %s now resolve to it", record.name, aliases)
        return {"record": record, "main": parent, "dropped": losing is not None,
                "kept_as": kept}  # fmt: skip

    def _set_lineage(self, record: ModelRecord, lineage: dict[str, Any]) -> None:
        """The record's lineage, on its shards first (what a coordinator that comes back
        adopts), then in the catalogue."""
        ray.get([a.update_entry.remote({"lineage": lineage}) for a in record.actors], timeout=60)
        with self._lock:
            record.entry.lineage = lineage
