"""What the client knows of a model and how it reaches a shard: the model's layout
(`ModelInfo`, from the coordinator's answer), its settings as a pull tells them
(`ModelSettings`), a new model's spec as CreateModel takes it, and the shard's data-plane stubs,
which speak raw frames (common/wire.py)."""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, TypeVar

import grpc
import torch

from optserve.common.codec import MAX_MESSAGE_BYTES, torch_dtype
from optserve.common.codec import wire_dtype as to_wire_dtype
from optserve.common.config import (
    RuleConfig,
    parse_mode_config,
    parse_optimizer_config,
    parse_schedule_config,
)
from optserve.common.errors import InvalidArgument, from_rpc_error
from optserve.common.layout import GroupLayout, ParamSlot, ShardSlice, plan_group
from optserve.common.wire import parse_frame, passthrough
from optserve.v1 import coordinator_pb2, shard_pb2

T = TypeVar("T")
CHANNEL_OPTIONS = [
    ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
    ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
]


@dataclass(frozen=True)
class ModelInfo:
    """What the coordinator says about a model: parameters, layout, version, optimizer."""

    name: str
    groups: tuple[GroupLayout, ...]
    shards: tuple[ShardSlice, ...]
    version: int
    optimizer: RuleConfig
    schedule: Any = None
    # Per group: its overrides, its effective optimizer config and its current lr.
    group_configs: Mapping[str, dict[str, Any]] = field(default_factory=dict)
    # How pushes become updates: AsyncMode or SyncMode (optserve.common.config).
    mode: Any = None
    # True while the shards wait for their initial values (the creator sends them).
    initializing: bool = False
    # A fork's lineage (docs/forks.md): its parent ("" if not a fork), the parent's version it
    # copied and the checkpoint it started from; names that resolve to it (a promoted fork).
    forked_from: str = ""
    fork_version: int = 0
    fork_checkpoint: str = ""
    aliases: tuple[str, ...] = ()

    @property
    def params(self) -> tuple[ParamSlot, ...]:
        return tuple(p for g in self.groups for p in g.params)

    @property
    def numel(self) -> int:
        return sum(g.numel for g in self.groups)

    @classmethod
    def from_proto(cls, info: coordinator_pb2.ModelInfo) -> ModelInfo:
        specs = {p.name: (tuple(p.shape), torch_dtype(p.dtype)) for p in info.params}
        groups = tuple(plan_group(g.name, [(n, *specs[n]) for n in g.params]) for g in info.groups)
        shards = tuple(
            ShardSlice(s.index, {r.group: (r.start, r.end) for r in s.ranges}, s.address)
            for s in sorted(info.shards, key=lambda s: s.index)
        )
        return cls(
            name=info.name,
            groups=groups,
            shards=shards,
            version=info.version,
            optimizer=parse_optimizer_config(info.optimizer_json),
            schedule=parse_schedule_config(info.schedule_json or None),
            mode=parse_mode_config(info.mode_json or None),
            group_configs={
                g.name: {
                    "overrides": json.loads(g.overrides_json or "{}"),
                    "optimizer": json.loads(g.optimizer_json) if g.optimizer_json else None,
                    "lr": g.lr,
                }
                for g in info.groups
            },
            initializing=info.initializing,
            forked_from=info.forked_from,
            fork_version=info.fork_version,
            fork_checkpoint=info.fork_checkpoint,
            aliases=tuple(info.aliases),
        )


@dataclass(frozen=True)
class ModelSettings:
    """A model's settings after `version`, as its leader (shard 0) tells them in a pull's
    header: each group's lr for the next update (its schedule applied), each group's optimizer
    config with every hyperparameter filled in, and the schedule's config."""

    version: int
    lrs: Mapping[str, float]
    groups: Mapping[str, dict[str, Any]]
    schedule: dict[str, Any]

    @classmethod
    def from_header(cls, header: shard_pb2.PullHeader) -> ModelSettings:
        told = json.loads(header.settings_json)
        return cls(
            version=header.version,
            lrs=dict(header.lrs),
            groups=dict(told.get("groups", {})),
            schedule=dict(told.get("schedule") or {}),
        )


def group_specs(groups: Mapping[str, Mapping[str, Any]]) -> list[coordinator_pb2.ParamGroupSpec]:
    """`create_model`'s groups: {name: {"params": [names], <overrides>}} as the wire has them."""
    specs = []
    for group_name, body in groups.items():
        overrides = dict(body)
        names = overrides.pop("params", None)
        if not isinstance(names, list | tuple) or not all(isinstance(n, str) for n in names):
            raise InvalidArgument(f"group {group_name!r} needs a list of parameter names")
        specs.append(
            coordinator_pb2.ParamGroupSpec(
                name=group_name, params=list(names), overrides_json=json.dumps(overrides)
            )
        )
    return specs


def param_spec(name: str, tensor: torch.Tensor) -> coordinator_pb2.ParamSpec:
    if not isinstance(tensor, torch.Tensor):
        raise InvalidArgument(f"parameter {name!r} must be a tensor, got {type(tensor).__name__}")
    try:
        dtype = to_wire_dtype(tensor.dtype)
    except InvalidArgument as exc:
        raise InvalidArgument(f"parameter {name!r}: {exc}") from None
    return coordinator_pb2.ParamSpec(name=name, dtype=dtype, shape=list(tensor.shape))


def parse_pull_response(data: bytes) -> Any:
    """A PullResponse as a PullHeader or a RawChunk viewing `data`; a malformed one as its
    InvalidArgument (raised by the reader, not inside gRPC's deserializer)."""
    try:
        return parse_frame(data, shard_pb2.PullHeader)
    except InvalidArgument as exc:
        return exc
    except Exception as exc:  # noqa: BLE001
        return InvalidArgument(f"malformed pull message: {exc}")


@dataclass(frozen=True)
class DataPlane:
    push: grpc.StreamUnaryMultiCallable
    push_pull: grpc.StreamStreamMultiCallable
    pull: grpc.UnaryStreamMultiCallable
    load: grpc.StreamUnaryMultiCallable

    @classmethod
    def open(cls, channel: grpc.Channel) -> DataPlane:
        method = "/optserve.v1.Shard/"
        return cls(
            push=channel.stream_unary(
                method + "Push",
                request_serializer=passthrough,
                response_deserializer=shard_pb2.PushResponse.FromString,
            ),
            push_pull=channel.stream_stream(
                method + "PushPull",
                request_serializer=passthrough,
                response_deserializer=parse_pull_response,
            ),
            pull=channel.unary_stream(
                method + "Pull",
                request_serializer=shard_pb2.PullRequest.SerializeToString,
                response_deserializer=parse_pull_response,
            ),
            load=channel.stream_unary(
                method + "Load",
                request_serializer=passthrough,
                response_deserializer=shard_pb2.LoadResponse.FromString,
            ),
        )


def call(fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
    try:
        return fn(*args, **kwargs)
    except grpc.RpcError as exc:
        raise from_rpc_error(exc) from None
