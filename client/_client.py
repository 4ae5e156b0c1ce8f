"""`ParameterServerClient`: the control plane (coordinator) and the data plane (shards).

The client learns a model's layout from the coordinator, then streams gradient slices to, and
weight slices from, every shard directly and in parallel, so no single process carries all bytes.
It never imports server code.
"""

from __future__ import annotations

import contextlib
import dataclasses
import getpass
import json
import os
import socket
import threading
import uuid
from collections.abc import Callable, Iterable, Iterator, Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, TypeVar

import grpc
import torch

from optserve.client._auth import ChannelSecurity
from optserve.common.codec import (
    DEFAULT_CHUNK_BYTES,
    GRADIENT_WIRE_DTYPES,
    MAX_CHUNK_BYTES,
    MAX_MESSAGE_BYTES,
    TensorAssembler,
    count_nonfinite,
    dtype_name,
    expect_all,
    torch_dtype,
)
from optserve.common.codec import wire_dtype as to_wire_dtype
from optserve.common.config import (
    RuleConfig,
    mode_config_json,
    optimizer_config_json,
    parse_mode_config,
    parse_optimizer_config,
    parse_schedule_config,
    schedule_config_json,
)
from optserve.common.errors import (
    DeadlineExceeded,
    InvalidArgument,
    NotFound,
    OptserveError,
    Unavailable,
    from_rpc_error,
)
from optserve.common.layout import (
    GroupLayout,
    ParamSlot,
    ShardSlice,
    flatten_group,
    plan_group,
    unflatten_group,
)
from optserve.common.wire import chunk_frames, header_frame, parse_frame, passthrough
from optserve.v1 import coordinator_pb2, coordinator_pb2_grpc, shard_pb2

T = TypeVar("T")
# Threads for calls to shards: every shard of a model is called at once, so this bounds
# shards x concurrent calls through one client (the coordinator allows up to 256 shards).
CLIENT_THREADS = 512
# The slowest rate a Load's deadline allows for on top of the client's timeout.
LOAD_FLOOR_BYTES_PER_S = 50e6
_CHANNEL_OPTIONS = [
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
        )


def _param_spec(name: str, tensor: torch.Tensor) -> coordinator_pb2.ParamSpec:
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
class _DataPlane:
    push: grpc.StreamUnaryMultiCallable
    push_pull: grpc.StreamStreamMultiCallable
    pull: grpc.UnaryStreamMultiCallable
    load: grpc.StreamUnaryMultiCallable

    @classmethod
    def open(cls, channel: grpc.Channel) -> _DataPlane:
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


def default_caller() -> str:
    """user@host:pid, how this process signs its control calls in the audit log."""
    try:
        user = getpass.getuser()
    except (KeyError, OSError):
        user = "?"
    return f"{user}@{socket.gethostname()}:{os.getpid()}"


def _jsonable(value: Any) -> Any:
    if isinstance(value, tuple):
        return list(value)
    if hasattr(value, "model_dump"):
        return value.model_dump(mode="json")
    raise InvalidArgument(f"{type(value).__name__} is not a JSON value")


def _call(fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
    try:
        return fn(*args, **kwargs)
    except grpc.RpcError as exc:
        raise from_rpc_error(exc) from None


class ParameterServerClient:
    """A connection to an optserve server.

    `address` is the coordinator's host:port. Every method raises a subclass of
    `optserve.client.OptserveError` (InvalidArgument, NotFound, ...) on failure.
    """

    def __init__(
        self,
        address: str,
        *,
        timeout_s: float = 120.0,
        chunk_bytes: int = DEFAULT_CHUNK_BYTES,
        caller: str = "",
        token: str | None = None,
        tls: bool | None = None,
        tls_ca: str | bytes | None = None,
        tls_server_name: str | None = None,
    ) -> None:
        if not 0 < chunk_bytes <= MAX_CHUNK_BYTES:
            raise InvalidArgument(
                f"chunk_bytes must be in (0, {MAX_CHUNK_BYTES}], got {chunk_bytes}"
            )
        self.address = address
        self.timeout_s = timeout_s
        self.chunk_bytes = chunk_bytes
        # The token (else $OPTSERVE_TOKEN or $OPTSERVE_TOKEN_FILE) and TLS (a CA file, else
        # $OPTSERVE_TLS_CA) are used for the coordinator and for every shard.
        self._security = ChannelSecurity.resolve(token, tls, tls_ca, tls_server_name)
        self._channel = self._security.channel(address, _CHANNEL_OPTIONS)
        self._coordinator = coordinator_pb2_grpc.CoordinatorStub(self._channel)
        self._lock = threading.Lock()
        self._shard_channels: dict[str, tuple[grpc.Channel, _DataPlane]] = {}
        self._layouts: dict[str, ModelInfo] = {}
        self._versions: dict[str, int] = {}
        self._pool: ThreadPoolExecutor | None = None
        # Sent on every call: the token, and who this is for the server's audit log.
        self._metadata = (
            *self._security.metadata,
            ("x-optserve-caller", caller or default_caller()),
        )
        # (model, wire dtype) -> per-group receive buffers, for calls with reuse_buffers=True
        self._buffers: dict[tuple[str, torch.dtype], dict[str, torch.Tensor]] = {}

    # ---- control plane -------------------------------------------------------------------

    def create_model(
        self,
        model: str,
        params: Mapping[str, torch.Tensor] | Iterable[tuple[str, torch.Tensor]],
        optimizer: str | Mapping[str, Any] | RuleConfig,
        *,
        num_shards: int = 0,
        groups: Mapping[str, Mapping[str, Any]] | None = None,
        schedule: str | Mapping[str, Any] | None = None,
        mode: str | Mapping[str, Any] | None = None,
        checkpoint: Mapping[str, Any] | None = None,
    ) -> ModelInfo:
        """Register a model with its initial parameter values and optimizer config.

        The coordinator starts the model's shards and answers with the layout; this client then
        streams each shard its slice of the initial values directly, in parallel (no tensor
        byte passes through the coordinator). If that fails, the half-made model is dropped.

        `groups` maps a group name to ``{"params": [names], <hyperparameter overrides>}``, for
        example ``{"no_decay": {"params": ["fc.bias"], "weight_decay": 0.0}}``; parameters in no
        group form the group "default". `schedule` is a schedule config (default constant).
        `mode` says how pushes become updates (default ``{"mode": "async"}``):
        ``{"mode": "sync", "trainers": 3, "round_timeout_s": 30}`` averages one push from each
        trainer per update; ``{"mode": "async", "max_staleness": 4}`` refuses stale pushes.
        `checkpoint` asks for periodic checkpoints: ``{"every_versions": 1000, "every_s": 600}``.
        """
        named = list(params.items() if isinstance(params, Mapping) else params)
        config = parse_optimizer_config(optimizer)
        schedule_config = parse_schedule_config(schedule)
        mode_config = parse_mode_config(mode)
        group_specs = []
        for group_name, body in (groups or {}).items():
            body = dict(body)
            names = body.pop("params", None)
            if not isinstance(names, list | tuple) or not all(isinstance(n, str) for n in names):
                raise InvalidArgument(f"group {group_name!r} needs a list of parameter names")
            group_specs.append(
                coordinator_pb2.ParamGroupSpec(
                    name=group_name, params=list(names), overrides_json=json.dumps(body)
                )
            )
        spec = coordinator_pb2.ModelSpec(
            name=model,
            params=[_param_spec(n, t) for n, t in named],
            optimizer_json=optimizer_config_json(config),
            num_shards=num_shards,
            groups=group_specs,
            schedule_json=schedule_config_json(schedule_config),
            mode_json=mode_config_json(mode_config),
            checkpoint_json=json.dumps(dict(checkpoint)) if checkpoint else "",
        )

        reply = _call(
            self._coordinator.CreateModel,
            iter([coordinator_pb2.CreateModelRequest(spec=spec)]),
            timeout=self.timeout_s,
            metadata=self._metadata,
        )
        info = self._remember(reply)
        try:
            self._load(info, dict(named))
        except BaseException:
            with contextlib.suppress(OptserveError):  # it never had its values: not a model
                self.drop_model(model)
            raise
        return self._remember(dataclasses.replace(info, initializing=False))

    def _load(self, info: ModelInfo, tensors: Mapping[str, torch.Tensor]) -> None:
        """Stream every shard its slice of the initial values (float32 masters)."""
        flats = {g.name: flatten_group(g, tensors, torch.float32) for g in info.groups}
        header = header_frame(shard_pb2.LoadHeader(model=info.name))

        def load_one(shard: ShardSlice) -> None:
            def requests() -> Iterator[bytes]:
                yield header
                for group, (start, end) in shard.ranges.items():
                    yield from chunk_frames(group, flats[group][start:end], self.chunk_bytes)

            numel = sum(end - start for start, end in shard.ranges.values())
            timeout = self.timeout_s + numel * 4 / LOAD_FLOOR_BYTES_PER_S
            _call(self._data_plane(shard.address).load, requests(), timeout=timeout,
                  metadata=self._metadata)  # fmt: skip

        self._each_shard(info, load_one)

    def describe_model(self, model: str) -> ModelInfo:
        reply = _call(
            self._coordinator.DescribeModel,
            coordinator_pb2.DescribeModelRequest(model=model),
            timeout=self.timeout_s,
            metadata=self._metadata,
        )
        return self._remember(reply)

    def list_models(self) -> list[str]:
        reply = _call(
            self._coordinator.ListModels,
            coordinator_pb2.ListModelsRequest(),
            timeout=self.timeout_s,
            metadata=self._metadata,
        )
        return list(reply.models)

    def drop_model(self, model: str) -> None:
        _call(
            self._coordinator.DropModel,
            coordinator_pb2.DropModelRequest(model=model),
            timeout=self.timeout_s,
            metadata=self._metadata,
        )
        with self._lock:
            self._layouts.pop(model, None)
            self._versions.pop(model, None)
            for key in [k for k in self._buffers if k[0] == model]:
                del self._buffers[key]

    def set_optimizer(
        self,
        model: str,
        config: str | Mapping[str, Any] | RuleConfig,
        policy: str = "migrate",
    ) -> dict[str, Any]:
        """Swap the model's optimizer; `policy` "migrate" carries state (optimizer spec section
        5), "reset" starts fresh. Returns the report: per group, every state key kept,
        converted, fresh or dropped, and why."""
        request = coordinator_pb2.SetOptimizerRequest(
            model=model,
            optimizer_json=optimizer_config_json(parse_optimizer_config(config)),
            policy=policy,
        )
        reply = _call(
            self._coordinator.SetOptimizer, request, timeout=self.timeout_s, metadata=self._metadata
        )
        self._forget_layout(model)
        return {**json.loads(reply.report_json), "version": reply.version}

    def set_hyperparameters(self, model: str, **changes: Any) -> dict[str, Any]:
        """Change some hyperparameters of the model's rule, e.g. ``lr=0.01`` or
        ``betas=(0.9, 0.99)`` or ``lookahead={"k": 5, "alpha": 0.5}``; the state is kept.
        Returns the report, as `set_optimizer` does; "version" is where the change took effect
        (after that update, before the next, on every shard)."""
        request = coordinator_pb2.SetHyperparametersRequest(
            model=model, changes_json=json.dumps(changes, default=_jsonable)
        )
        reply = _call(
            self._coordinator.SetHyperparameters,
            request,
            timeout=self.timeout_s,
            metadata=self._metadata,
        )
        self._forget_layout(model)
        return {**json.loads(reply.report_json), "version": reply.version}

    def checkpoint(self, model: str, *, snapshot: str | None = None) -> dict[str, Any]:
        """Write a consistent checkpoint of the model now (the server needs a checkpoint
        directory); returns its name, version, where it is, its size in bytes, how long the
        model's updates were held (`pause_s`) and how long it took (`seconds`).

        `snapshot` says how the model is held still: "pause" (pushes wait while the shards
        write; no extra memory) or "copy" (the shards copy their state, pushes go on while the
        copy is written); default: the model's checkpoint policy, else "pause"."""
        reply = _call(
            self._coordinator.Checkpoint,
            coordinator_pb2.CheckpointRequest(model=model, snapshot=snapshot or ""),
            timeout=self.timeout_s,
            metadata=self._metadata,
        )
        return {
            "name": reply.name,
            "version": reply.version,
            "uri": reply.uri,
            "bytes": reply.bytes,
            "pause_s": reply.pause_s,
            "seconds": reply.seconds,
        }

    def list_checkpoints(self, model: str) -> list[dict[str, Any]]:
        """The model's complete checkpoints, oldest first: name, version, time."""
        reply = _call(
            self._coordinator.ListCheckpoints,
            coordinator_pb2.ListCheckpointsRequest(model=model),
            timeout=self.timeout_s,
            metadata=self._metadata,
        )
        return json.loads(reply.checkpoints_json)

    def restore(
        self, model: str, checkpoint: str | None = None, *, num_shards: int = 0
    ) -> ModelInfo:
        """Bring the model back from a checkpoint (the newest unless named) onto `num_shards`
        shards (default: as now). Trainers then get Aborted on their next push: pull, go on."""
        reply = _call(
            self._coordinator.Restore,
            coordinator_pb2.RestoreRequest(
                model=model, checkpoint=checkpoint or "", num_shards=num_shards
            ),
            timeout=self.timeout_s,
            metadata=self._metadata,
        )
        with self._lock:
            self._versions.pop(model, None)
        return self._remember(reply)

    def status(self, model: str, history: int = 50) -> dict[str, Any]:
        """The run as the server sees it: version, mode, rule and hyperparameters, each group's
        lr and state counters (step, Lookahead's counter, ...), schedule state, every shard,
        the trainers that pushed, and the `history` most recent metrics and audit entries
        (control changes)."""
        request = coordinator_pb2.StatusRequest(model=model, history=history)
        reply = _call(
            self._coordinator.Status, request, timeout=self.timeout_s, metadata=self._metadata
        )
        return json.loads(reply.status_json)

    def set_schedule(self, model: str, config: str | Mapping[str, Any] | None) -> int:
        """Replace the model's learning-rate schedule; returns the model version."""
        request = coordinator_pb2.SetScheduleRequest(
            model=model, schedule_json=schedule_config_json(parse_schedule_config(config))
        )
        return _call(
            self._coordinator.SetSchedule, request, timeout=self.timeout_s, metadata=self._metadata
        ).version

    def report_metric(self, model: str, name: str, value: float, step: int | None = None) -> bool:
        """Report a metric (loss, validation metric); True if it changed the learning rate."""
        request = coordinator_pb2.ReportMetricRequest(
            model=model, name=name, value=float(value), step=step
        )
        reply = _call(
            self._coordinator.ReportMetric, request, timeout=self.timeout_s, metadata=self._metadata
        )
        return reply.lr_changed

    # ---- data plane ----------------------------------------------------------------------

    def push(
        self,
        model: str,
        grads: Mapping[str, torch.Tensor],
        *,
        version: int | None = None,
        wire_dtype: torch.dtype = torch.float32,
        trainer: str = "",
    ) -> int:
        """Push one gradient per parameter; return the model version of the update it is in.

        `version` is the model version the gradient was computed on (default: the version this
        client last pulled). Gradients may travel as float16 or bfloat16 (`wire_dtype`); the
        server keeps fp32 masters. Every shard of the model applies the push, or none does:
        a refused push (invalid, stale beyond `max_staleness`: FailedPrecondition, a closed
        sync round: Aborted) changes nothing. In sync mode the call returns once the round
        that includes the push is applied. `trainer` names the pusher (one push per trainer
        per sync round).
        """
        return self._push(model, grads, version, wire_dtype, trainer, None)[1]

    def push_and_pull(
        self,
        model: str,
        grads: Mapping[str, torch.Tensor],
        *,
        version: int | None = None,
        wire_dtype: torch.dtype = torch.float32,
        pull_dtype: torch.dtype = torch.float32,
        trainer: str = "",
        reuse_buffers: bool = False,
    ) -> tuple[dict[str, torch.Tensor], int]:
        """Push, and get the weights after the update back in the same round trip.

        Returns (weights, version): the weights' version is the push's or a later one.
        `reuse_buffers`: as for `pull`.
        """
        weights, version = self._push(
            model, grads, version, wire_dtype, trainer, pull_dtype, reuse_buffers
        )
        assert weights is not None
        return weights, version

    def _push(
        self,
        model: str,
        grads: Mapping[str, torch.Tensor],
        version: int | None,
        wire_dtype: torch.dtype,
        trainer: str,
        pull_dtype: torch.dtype | None,
        reuse_buffers: bool = False,
    ) -> tuple[dict[str, torch.Tensor] | None, int]:
        if wire_dtype not in GRADIENT_WIRE_DTYPES:
            raise InvalidArgument(
                f"wire_dtype must be float32, float16 or bfloat16, got {dtype_name(wire_dtype)}"
            )

        def push_all(info: ModelInfo) -> tuple[dict[str, torch.Tensor] | None, int]:
            self._check_gradients(info, grads)
            based_on = self._versions.get(model, info.version) if version is None else version
            flats = {g.name: flatten_group(g, grads, wire_dtype) for g in info.groups}
            # A sync push waits for its round: give it the round's time on top of ours.
            deadline = self.timeout_s + float(getattr(info.mode, "round_timeout_s", 0.0))
            header = shard_pb2.PushHeader(
                model=model,
                version=based_on,
                trainer=trainer,
                push_id=uuid.uuid4().hex,
                pull_dtype=to_wire_dtype(pull_dtype or torch.float32),
            )

            def requests(shard: ShardSlice) -> Iterator[bytes]:
                # Ready-made PushRequest frames: the data is copied once (common/wire.py).
                yield header_frame(header)
                for group, (start, end) in shard.ranges.items():
                    yield from chunk_frames(group, flats[group][start:end], self.chunk_bytes)

            if pull_dtype is None:

                def push_one(shard: ShardSlice) -> int:
                    push = self._data_plane(shard.address).push
                    reply = _call(push, requests(shard), timeout=deadline, metadata=self._metadata)
                    return reply.version

                return None, max(self._each_shard(info, push_one))

            flat_out = self._receive_buffers(info, pull_dtype) if reuse_buffers else None

            def push_pull_one(shard: ShardSlice) -> tuple[int, dict[str, torch.Tensor]]:
                stream = self._data_plane(shard.address).push_pull(
                    requests(shard), timeout=deadline, metadata=self._metadata
                )
                return self._receive_weights(shard, stream, pull_dtype, flat_out)

            return self._join_weights(info, self._each_shard(info, push_pull_one), flat_out)

        weights, new_version = self._with_layout(model, push_all)
        if weights is not None:
            with self._lock:
                self._versions[model] = new_version
        return weights, new_version

    def pull(
        self, model: str, *, wire_dtype: torch.dtype = torch.float32, reuse_buffers: bool = False
    ) -> tuple[dict[str, torch.Tensor], int]:
        """The model's current weights (each in its parameter's dtype) and their version.

        With `reuse_buffers`, the weights are received into buffers this client keeps per model
        and reuses on its next call with `reuse_buffers` (no fresh memory per step, which is
        costly for large models): the returned tensors are then views of those buffers, valid
        until that next call; copy what you keep (RemoteOptimizer copies into the parameters).
        """
        request = shard_pb2.PullRequest(model=model, dtype=to_wire_dtype(wire_dtype))

        def pull_all(info: ModelInfo) -> tuple[dict[str, torch.Tensor], int]:
            flat_out = self._receive_buffers(info, wire_dtype) if reuse_buffers else None

            def pull_one(shard: ShardSlice) -> tuple[int, dict[str, torch.Tensor]]:
                stream = self._data_plane(shard.address).pull(
                    request, timeout=self.timeout_s, metadata=self._metadata
                )
                return self._receive_weights(shard, stream, wire_dtype, flat_out)

            return self._join_weights(info, self._each_shard(info, pull_one), flat_out)

        weights, version = self._with_layout(model, pull_all)
        with self._lock:
            self._versions[model] = version
        return weights, version

    def _receive_buffers(self, info: ModelInfo, dtype: torch.dtype) -> dict[str, torch.Tensor]:
        """One flat receive buffer per group for this model and wire dtype, kept and reused."""
        key = (info.name, dtype)
        with self._lock:
            buffers = self._buffers.get(key)
            if buffers is None or {g: b.numel() for g, b in buffers.items()} != {
                g.name: g.numel for g in info.groups
            }:
                buffers = {g.name: torch.empty(g.numel, dtype=dtype) for g in info.groups}
                self._buffers[key] = buffers
            return buffers

    @staticmethod
    def _receive_weights(
        shard: ShardSlice,
        stream: Iterable[shard_pb2.PullResponse],
        wire_dtype: torch.dtype,
        flat_out: Mapping[str, torch.Tensor] | None = None,
    ) -> tuple[int, dict[str, torch.Tensor]]:
        expected = expect_all(
            (g, (end - start,), (wire_dtype,)) for g, (start, end) in shard.ranges.items()
        )
        out = None
        if flat_out is not None:  # each shard's slices land in place in the group buffers
            out = {g: flat_out[g][start:end] for g, (start, end) in shard.ranges.items()}
        assembler = TensorAssembler(expected, what="weights", out=out)
        version = None
        try:
            for reply in stream:  # read by parse_pull_response
                if isinstance(reply, OptserveError):
                    raise reply
                if isinstance(reply, shard_pb2.PullHeader):
                    version = reply.version
                else:
                    assembler.add(reply)
        except grpc.RpcError as exc:
            raise from_rpc_error(exc) from None
        if version is None:
            raise OptserveError(f"shard {shard.index} sent no version header")
        return version, assembler.finish()

    @staticmethod
    def _join_weights(
        info: ModelInfo,
        results: list[tuple[int, dict[str, torch.Tensor]]],
        flat_out: Mapping[str, torch.Tensor] | None = None,
    ) -> tuple[dict[str, torch.Tensor], int]:
        """Per-parameter weights from every shard's slices; the version is the lowest seen."""
        weights: dict[str, torch.Tensor] = {}
        for group in info.groups:
            pieces = [parts[group.name] for _, parts in results if parts[group.name].numel()]
            buffer = flat_out[group.name] if flat_out is not None else None
            if buffer is not None and all(
                p.untyped_storage().data_ptr() == buffer.untyped_storage().data_ptr()
                for p in pieces
            ):
                flat = buffer  # the slices were written in place
            elif len(pieces) == 1:
                flat = pieces[0]
            else:
                flat = torch.cat(pieces) if pieces else torch.empty(0)
            views = unflatten_group(group, flat)
            for slot in group.params:
                weights[slot.name] = views[slot.name].to(slot.dtype)
        return weights, min(v for v, _ in results)

    # ---- plumbing ------------------------------------------------------------------------

    def _remember(self, reply: coordinator_pb2.ModelInfo | ModelInfo) -> ModelInfo:
        info = reply if isinstance(reply, ModelInfo) else ModelInfo.from_proto(reply)
        with self._lock:
            self._layouts[info.name] = info
        return info

    def _with_layout(self, model: str, fn: Callable[[ModelInfo], T]) -> T:
        """Run `fn` with the model's layout; if the cached layout is stale, refresh and retry once.

        A layout goes stale when the model is dropped and created again (new shard addresses).
        Retrying is safe then: the shards that refused or could not be reached were not the
        model's current ones, so nothing was applied.
        """
        info = self._layout(model)
        try:
            return fn(info)
        except (NotFound, Unavailable):
            fresh = self.describe_model(model)
            if [s.address for s in fresh.shards] == [s.address for s in info.shards]:
                raise
            return fn(fresh)

    def _forget_layout(self, model: str) -> None:
        with self._lock:
            self._layouts.pop(model, None)

    def _layout(self, model: str) -> ModelInfo:
        with self._lock:
            info = self._layouts.get(model)
        return info if info is not None else self.describe_model(model)

    @staticmethod
    def _check_gradients(info: ModelInfo, grads: Mapping[str, torch.Tensor]) -> None:
        names = {p.name for p in info.params}
        policy = getattr(info.mode, "gradients", None)
        rejects_nonfinite = policy is None or policy.nonfinite == "reject"
        unknown = sorted(set(grads) - names)
        if unknown:
            raise InvalidArgument(f"model {info.name!r} has no parameter(s) {unknown}")
        for slot in info.params:
            grad = grads.get(slot.name)
            if grad is None:
                raise InvalidArgument(f"missing gradient for parameter {slot.name!r}")
            if tuple(grad.shape) != slot.shape:
                raise InvalidArgument(
                    f"gradient for {slot.name!r} has shape {list(grad.shape)}; "
                    f"the parameter has shape {list(slot.shape)}"
                )
            if grad.dtype != slot.dtype:
                raise InvalidArgument(
                    f"gradient for {slot.name!r} has dtype {dtype_name(grad.dtype)}; "
                    f"the parameter has dtype {dtype_name(slot.dtype)}"
                )
            # Refused here, before any bytes move, when the server would refuse it anyway.
            if rejects_nonfinite and count_nonfinite(grad):
                raise InvalidArgument(f"gradient for {slot.name!r} contains NaN or Inf")

    def _data_plane(self, address: str) -> _DataPlane:
        """The shard's Push, PushPull and Pull calls, speaking frames (common/wire.py)."""
        with self._lock:
            entry = self._shard_channels.get(address)
            if entry is None:
                channel = self._security.channel(address, _CHANNEL_OPTIONS)
                entry = (channel, _DataPlane.open(channel))
                self._shard_channels[address] = entry
            return entry[1]

    def _each_shard(self, info: ModelInfo, fn: Callable[[ShardSlice], T]) -> list[T]:
        """Run `fn` on every shard at once; results in shard order.

        All shards' calls must be in flight together (a push is decided only once every shard
        holds its slice), hence a thread per shard call. If calls fail, the error raised is
        the most telling one: a shard's own refusal rather than the others' timeouts."""
        if len(info.shards) == 1:
            return [fn(info.shards[0])]
        with self._lock:
            if self._pool is None:
                self._pool = ThreadPoolExecutor(
                    max_workers=CLIENT_THREADS, thread_name_prefix="optserve-client"
                )
            pool = self._pool
        futures = [pool.submit(fn, shard) for shard in info.shards]
        errors = [f.exception() for f in futures]
        failed = [e for e in errors if e is not None]
        if failed:
            vague = (Unavailable, DeadlineExceeded)
            telling = [e for e in failed if not isinstance(e, vague)]
            raise (telling or failed)[0]
        return [f.result() for f in futures]

    def close(self) -> None:
        with self._lock:
            channels = [c for c, _ in self._shard_channels.values()]
            self._shard_channels.clear()
            pool, self._pool = self._pool, None
        if pool is not None:
            pool.shutdown(wait=True)
        for channel in channels:
            channel.close()
        self._channel.close()

    def __enter__(self) -> ParameterServerClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"ParameterServerClient({self.address!r})"
