"""The control plane's typed answers: attributes, dicts for JSON, and 0.1's key access."""

from __future__ import annotations

import json

import pytest
from pydantic import ValidationError

from optserve.common.results import CheckpointInfo, MigrationReport, Status

STATUS = {
    "model": "net", "version": 7, "initializing": False, "lost": None,
    "mode": {"mode": "async"}, "optimizer": {"name": "adam", "lr": 0.001},
    "schedule": {"name": "constant"}, "schedule_state": {}, "gradient_counters": {"skipped": 1},
    "trainers": {"t0": {"pushes": 3, "applied": 2, "refused": 1, "staleness": 0, "version": 6,
                        "idle_s": 1.5, "peer": "ipv4:127.0.0.1:5", "first_seen": 9.0,
                        "last_seen": 10.0, "local_steps": 0}},
    "device": "cpu",
    "checkpoint": {"policy": {"every_s": 600}, "periodic": True, "last_version": 5,
                   "last_time": 1.0, "age_s": 2.0, "updates_at_risk": 2,
                   "failures_in_a_row": 0, "next_try_in_s": None, "last_failure": None},
    "groups": {"default": {"overrides": {}, "optimizer": {"name": "adam"}, "lr": 0.001,
                           "numel": 10, "state": {"step": 7}, "kernel": "fused",
                           "kernel_note": ""}},
    "shards": [{"index": 0, "address": "127.0.0.1:1", "node_id": "n", "device": "cpu",
                "version": 7, "ready": True, "preparing": False, "broken": None,
                "groups": {"default": {"rule": "adam", "path": "fused", "kernel": "fused",
                                       "numel": 10, "state": {"step": 7}}}}],
    "metrics": [{"name": "loss", "value": 0.5, "step": 3, "time": 2.0, "version": 6,
                 "lr_changed": False, "lr": {"default": 0.001}}],
    "audit": [{"time": 1.0, "version": 0, "action": "create", "caller": "me", "old": None,
               "new": {"name": "adam"}}],
    "history": {"metrics_kept": 1, "metrics_shown": 1, "audit_kept": 1, "audit_shown": 1},
    "forked_from": "main", "fork_version": 3, "fork_checkpoint": "0000000000001-000000000003-ab",
    "aliases": [],
}  # fmt: skip


def test_status_has_typed_attributes_and_round_trips_through_json():
    status = Status.model_validate_json(json.dumps(STATUS))
    assert status.version == 7 and status.shards[0].groups["default"].path == "fused"
    assert status.trainers["t0"].refused == 1 and status.checkpoint.updates_at_risk == 2
    assert status.metrics[0].lr == {"default": 0.001} and status.audit[0].action == "create"
    assert status.to_dict() == STATUS
    assert Status.model_validate_json(status.model_dump_json()) == status


def test_answers_still_read_by_key_as_0_1_dicts_did():
    status = Status.model_validate(STATUS)
    assert status["version"] == 7 and status["groups"]["default"]["lr"] == 0.001
    assert status.get("nothing", "default") == "default" and "shards" in status
    with pytest.raises(KeyError):
        status["nothing"]
    assert status == STATUS and status["groups"] == STATUS["groups"]
    assert status.groups["default"] == STATUS["groups"]["default"]
    assert status != {**STATUS, "version": 8}


def test_fields_a_newer_server_adds_are_kept():
    status = Status.model_validate({**STATUS, "fork_of": "other"})
    assert status["fork_of"] == "other" and status.to_dict()["fork_of"] == "other"


def test_a_malformed_answer_is_refused():
    with pytest.raises(ValidationError):
        Status.model_validate({**STATUS, "version": "seven"})
    with pytest.raises(ValidationError):
        Status.model_validate({k: v for k, v in STATUS.items() if k != "shards"})


def test_migration_report_and_checkpoint_info():
    report = MigrationReport.model_validate({
        "version": 4, "optimizer": {"name": "sgd"}, "shards": 2,
        "groups": {"default": {"source": "adam", "target": "sgd", "policy": "migrate",
                               "keys": {"exp_avg": {"action": "converted", "why": "ĝ"}}}},
    })  # fmt: skip
    assert report.groups["default"].keys["exp_avg"].action == "converted"
    assert report["version"] == 4
    done = CheckpointInfo(name="c", version=3, uri="/x", bytes=10, pause_s=0.1, seconds=0.2)
    assert done.to_dict()["bytes"] == 10 and done.time is None
    assert CheckpointInfo.model_validate({"name": "c", "version": 3, "time": 5.0}).time == 5.0


def test_a_groups_kernel_in_status_is_every_shards():
    from optserve.server.coordinator.status import _kernel

    def shard(index, kernel, note=""):
        return {"index": index, "groups": {"g": {"kernel": kernel, "kernel_note": note}}}

    same = _kernel("g", [shard(0, "compiled"), shard(1, "compiled")])
    assert same == {"kernel": "compiled", "kernel_note": ""}
    mixed = _kernel("g", [shard(0, "compiled"), shard(1, "eager", "compiling failed")])
    assert mixed["kernel"] == "mixed" and "shard 1: eager" in mixed["kernel_note"]
