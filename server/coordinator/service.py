"""The Coordinator gRPC service (the front door): decodes requests into Coordinator calls."""

from __future__ import annotations

import contextlib
import json
from collections.abc import Iterator
from typing import Any

import grpc

from optserve.common.codec import torch_dtype, wire_dtype
from optserve.common.config import (
    parse_mode_config,
    parse_optimizer_config,
    parse_schedule_config,
)
from optserve.common.errors import (
    InvalidArgument,
    NotFound,
    PermissionDenied,
    ResourceExhausted,
)
from optserve.common.results import MigrationReport
from optserve.server.coordinator.catalogue import GroupSpec, ModelRecord
from optserve.server.coordinator.core import Coordinator
from optserve.server.coordinator.status import as_seen_by
from optserve.server.edge.auth import current_principal
from optserve.server.edge.rpc import unary_errors
from optserve.v1 import coordinator_pb2, coordinator_pb2_grpc

SERVICE_NAME = "optserve.v1.Coordinator"


def _json_object(text: str, what: str) -> dict[str, Any]:
    if not text:
        return {}
    try:
        value = json.loads(text)
    except ValueError as exc:
        raise InvalidArgument(f"{what} is not valid JSON: {exc}") from None
    if not isinstance(value, dict):
        raise InvalidArgument(f"{what} must be a JSON object, got {type(value).__name__}")
    return value


def _migration_response(report: MigrationReport) -> coordinator_pb2.SetOptimizerResponse:
    return coordinator_pb2.SetOptimizerResponse(
        version=report.version, report_json=report.model_dump_json(exclude={"version"})
    )


def model_info(
    record: ModelRecord, shard_infos: list[dict[str, Any]] | None = None
) -> coordinator_pb2.ModelInfo:
    lead = shard_infos[0]["groups"] if shard_infos else {}
    params = [
        coordinator_pb2.ParamSpec(name=p.name, dtype=wire_dtype(p.dtype), shape=list(p.shape))
        for g in record.groups
        for p in g.params
    ]
    groups = [
        coordinator_pb2.GroupInfo(
            name=g.name,
            params=[p.name for p in g.params],
            overrides_json=json.dumps(record.overrides.get(g.name, {})),
            optimizer_json=json.dumps(lead[g.name]["config"]) if g.name in lead else "",
            lr=lead[g.name]["lr"] if g.name in lead else 0.0,
        )
        for g in record.groups
    ]
    shards = [
        coordinator_pb2.ShardInfo(
            index=s.index,
            address=s.address,
            ranges=[
                coordinator_pb2.GroupRange(group=g, start=a, end=b)
                for g, (a, b) in s.ranges.items()
            ],
        )
        for s in record.shards
    ]
    return coordinator_pb2.ModelInfo(
        name=record.name,
        params=params,
        groups=groups,
        shards=shards,
        version=min(i["version"] for i in shard_infos) if shard_infos else 0,
        optimizer_json=record.optimizer_json,
        schedule_json=record.schedule_json,
        mode_json=record.mode_json,
        initializing=record.initializing,
        forked_from=record.entry.lineage.get("forked_from") or "",
        fork_version=record.entry.lineage.get("fork_version") or 0,
        fork_checkpoint=record.entry.lineage.get("fork_checkpoint") or "",
        aliases=list(record.entry.lineage.get("aliases", [])),
    )


# A status reply stays well under gRPC's 4 MiB message limit.
MAX_STATUS_CHARS = 3 << 20


class CoordinatorService(coordinator_pb2_grpc.CoordinatorServicer):
    def __init__(self, coordinator: Coordinator) -> None:
        self._coordinator = coordinator

    @unary_errors
    def CreateModel(
        self,
        request_iterator: Iterator[coordinator_pb2.CreateModelRequest],
        context: grpc.ServicerContext,
    ) -> coordinator_pb2.ModelInfo:
        first = next(request_iterator, None)
        if first is None or first.WhichOneof("payload") != "spec":
            raise InvalidArgument("a CreateModel stream must start with a ModelSpec")
        if next(request_iterator, None) is not None:
            raise InvalidArgument(
                "a CreateModel stream carries one ModelSpec and nothing else: each shard takes "
                "its slice of the initial values itself (Shard/Load, after CreateModel answers)"
            )
        spec = first.spec
        params = [(p.name, tuple(p.shape), torch_dtype(p.dtype)) for p in spec.params]
        self._coordinator.validate_params(spec.name, params)
        optimizer = parse_optimizer_config(spec.optimizer_json)
        mode = parse_mode_config(spec.mode_json or None)
        policy = self._coordinator.checkpoint_policy(
            _json_object(spec.checkpoint_json, "checkpoint policy") if spec.checkpoint_json else {}
        )
        groups = [
            GroupSpec(g.name, tuple(g.params), _json_object(g.overrides_json, "group overrides"))
            for g in spec.groups
        ]
        self._coordinator.reserve(spec.name)
        try:
            record = self._coordinator.create_model(
                spec.name, params, optimizer, spec.num_shards, groups,
                parse_schedule_config(spec.schedule_json or None), mode, policy,
            )  # fmt: skip
        finally:
            self._coordinator.release(spec.name)
        return model_info(record, self._coordinator.shard_info(record))

    @unary_errors
    def DescribeModel(
        self, request: coordinator_pb2.DescribeModelRequest, context: grpc.ServicerContext
    ) -> coordinator_pb2.ModelInfo:
        record = self._coordinator.get(request.model)
        return model_info(record, self._coordinator.shard_info(record))

    @unary_errors
    def ListModels(
        self, request: coordinator_pb2.ListModelsRequest, context: grpc.ServicerContext
    ) -> coordinator_pb2.ListModelsResponse:
        principal = current_principal()  # a token limited to some models sees only those
        models = [
            m for m in self._coordinator.list_models() if principal is None or principal.covers(m)
        ]
        return coordinator_pb2.ListModelsResponse(models=models)

    @unary_errors
    def DropModel(
        self, request: coordinator_pb2.DropModelRequest, context: grpc.ServicerContext
    ) -> coordinator_pb2.DropModelResponse:
        self._coordinator.drop_model(request.model)
        return coordinator_pb2.DropModelResponse()

    @unary_errors
    def SetOptimizer(
        self, request: coordinator_pb2.SetOptimizerRequest, context: grpc.ServicerContext
    ) -> coordinator_pb2.SetOptimizerResponse:
        optimizer = parse_optimizer_config(request.optimizer_json)
        report = self._coordinator.set_optimizer(
            request.model, optimizer, request.policy or "migrate", caller_of(context)
        )
        return _migration_response(report)

    @unary_errors
    def SetHyperparameters(
        self, request: coordinator_pb2.SetHyperparametersRequest, context: grpc.ServicerContext
    ) -> coordinator_pb2.SetOptimizerResponse:
        changes = _json_object(request.changes_json, "hyperparameter changes")
        groups = _json_object(request.group_changes_json, "group hyperparameter changes")
        for group, body in groups.items():
            if not isinstance(body, dict):
                raise InvalidArgument(f"the changes for group {group!r} must be a JSON object")
        report = self._coordinator.set_hyperparameters(
            request.model, changes, caller_of(context), groups, request.policy or "migrate"
        )
        return _migration_response(report)

    @unary_errors
    def SetSchedule(
        self, request: coordinator_pb2.SetScheduleRequest, context: grpc.ServicerContext
    ) -> coordinator_pb2.SetScheduleResponse:
        version = self._coordinator.set_schedule(
            request.model, parse_schedule_config(request.schedule_json or None), caller_of(context)
        )
        return coordinator_pb2.SetScheduleResponse(version=version)

    @unary_errors
    def ReportMetric(
        self, request: coordinator_pb2.ReportMetricRequest, context: grpc.ServicerContext
    ) -> coordinator_pb2.ReportMetricResponse:
        step = request.step if request.HasField("step") else None
        version, changed = self._coordinator.report_metric(
            request.model, request.name, request.value, step, caller_of(context)
        )
        return coordinator_pb2.ReportMetricResponse(version=version, lr_changed=changed)

    @unary_errors
    def Status(
        self, request: coordinator_pb2.StatusRequest, context: grpc.ServicerContext
    ) -> coordinator_pb2.StatusResponse:
        status = self._coordinator.status(request.model, recent=request.history or 50)
        status = as_seen_by(status, current_principal())  # peers' addresses: admins only
        text = status.model_dump_json()
        while len(text) > MAX_STATUS_CHARS and (status.metrics or status.audit):
            # The most recent history that fits in one message (status.history says).
            metrics = status.metrics[len(status.metrics) // 2 :]
            audit = status.audit[len(status.audit) // 2 :]
            history = status.history.model_copy(
                update={"metrics_shown": len(metrics), "audit_shown": len(audit)}
            )
            status = status.model_copy(
                update={"metrics": metrics, "audit": audit, "history": history}
            )
            text = status.model_dump_json()
        if len(text) > MAX_STATUS_CHARS:
            raise ResourceExhausted(
                f"the status of model {request.model!r} does not fit in one message"
            )
        return coordinator_pb2.StatusResponse(status_json=text)

    @unary_errors
    def Checkpoint(
        self, request: coordinator_pb2.CheckpointRequest, context: grpc.ServicerContext
    ) -> coordinator_pb2.CheckpointResponse:
        done = self._coordinator.checkpoint(
            request.model, caller_of(context), snapshot=request.snapshot or None
        )
        return coordinator_pb2.CheckpointResponse(
            name=done["name"], version=done["version"], uri=done["uri"], bytes=done["bytes"],
            pause_s=done["pause_s"], seconds=done["seconds"],
        )  # fmt: skip

    @unary_errors
    def ListCheckpoints(
        self, request: coordinator_pb2.ListCheckpointsRequest, context: grpc.ServicerContext
    ) -> coordinator_pb2.ListCheckpointsResponse:
        found = self._coordinator.list_checkpoints(request.model)
        return coordinator_pb2.ListCheckpointsResponse(checkpoints_json=json.dumps(found))

    @unary_errors
    def Restore(
        self, request: coordinator_pb2.RestoreRequest, context: grpc.ServicerContext
    ) -> coordinator_pb2.ModelInfo:
        if request.unless_current and not request.checkpoint:
            raise InvalidArgument("unless_current needs a checkpoint name")
        record = self._coordinator.restore(
            request.model,
            request.checkpoint or None,
            request.num_shards,
            caller_of(context),
            unless_current=request.unless_current,
        )
        return model_info(record, self._coordinator.shard_info(record))

    @unary_errors
    def Fork(
        self, request: coordinator_pb2.ForkRequest, context: grpc.ServicerContext
    ) -> coordinator_pb2.ForkResponse:
        principal = current_principal()  # a token limited to some models makes only those
        if principal is not None and not principal.covers(request.new_name):
            raise PermissionDenied(f"this token does not cover model {request.new_name!r}")
        optimizer = (
            parse_optimizer_config(request.optimizer_json) if request.optimizer_json else None
        )
        done = self._coordinator.fork(
            request.model, request.new_name, request.at or "now", optimizer,
            request.policy or "migrate", caller_of(context),
        )  # fmt: skip
        info = model_info(done.record, self._coordinator.shard_info(done.record))
        report = done.report.model_dump_json(exclude={"version"}) if done.report else ""
        return coordinator_pb2.ForkResponse(model=info, pause_s=done.pause_s, report_json=report)

    @unary_errors
    def Promote(
        self, request: coordinator_pb2.PromoteRequest, context: grpc.ServicerContext
    ) -> coordinator_pb2.PromoteResponse:
        principal = current_principal()  # a scoped token must cover every name it changes:
        if principal is not None:  # the fork's parent, what that name serves now, the copy
            coordinator = self._coordinator
            parent = coordinator.get(request.model).entry.lineage.get("forked_from", "")
            names = {request.keep_as, parent}
            if parent:
                main = coordinator.resolve(parent)
                names.add(main)
                with contextlib.suppress(NotFound):
                    names.update(coordinator.get(main).entry.lineage.get("aliases", []))
            for name in sorted(n for n in names if n):
                if not principal.covers(name):
                    raise PermissionDenied(f"this token does not cover model {name!r}")
        done = self._coordinator.promote(request.model, request.keep_as, caller_of(context))
        record = done["record"]
        return coordinator_pb2.PromoteResponse(
            model=model_info(record, self._coordinator.shard_info(record)), main=done["main"],
            dropped=done["dropped"], kept_as=done["kept_as"],
        )  # fmt: skip


def caller_of(context: grpc.ServicerContext) -> str:
    """Who made a control call, for the audit log: the token's name when auth is on, what the
    client says of itself, and where from."""
    said = str(dict(context.invocation_metadata()).get("x-optserve-caller", ""))[:200]
    principal = current_principal()
    where = f"{said} ({context.peer()})" if said else context.peer()
    return f"token {principal.name!r}: {where}" if principal is not None else where


def model_of_request(method: str, request: Any) -> str | None:
    """The model a Coordinator request is about, for model-scoped tokens (EdgeGuard)."""
    if isinstance(request, coordinator_pb2.CreateModelRequest):
        return request.spec.name if request.WhichOneof("payload") == "spec" else None
    model = getattr(request, "model", None)
    return model if isinstance(model, str) else None
