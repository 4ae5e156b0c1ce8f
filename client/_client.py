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
from collections.abc import Callable, Iterable, Iterator, Mapping
from concurrent.futures import ThreadPoolExecutor
from typing import Any, TypeVar

import grpc
import torch

from optserve.client._auth import ChannelSecurity
from optserve.client._forks import ForkCalls
from optserve.client._plane import Transfers
from optserve.client._stubs import (
    CHANNEL_OPTIONS,
    DataPlane,
    ModelInfo,
    ModelSettings,
    call,
    group_specs,
    param_spec,
)
from optserve.common.codec import (
    DEFAULT_CHUNK_BYTES,
    MAX_CHUNK_BYTES,
)
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
    InvalidArgument,
    NotFound,
    OptserveError,
    Unavailable,
)
from optserve.common.layout import (
    ShardSlice,
    flatten_group,
)
from optserve.common.results import CheckpointInfo, MigrationReport, Status
from optserve.common.wire import chunk_frames, header_frame
from optserve.v1 import coordinator_pb2, coordinator_pb2_grpc, shard_pb2

T = TypeVar("T")
# The slowest rate a Load's deadline allows for on top of the client's timeout.
LOAD_FLOOR_BYTES_PER_S = 50e6


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


class ParameterServerClient(Transfers, ForkCalls):
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
        self._channel = self._security.channel(address, CHANNEL_OPTIONS)
        self._coordinator = coordinator_pb2_grpc.CoordinatorStub(self._channel)
        self._lock = threading.Lock()
        self._shard_channels: dict[str, tuple[grpc.Channel, DataPlane]] = {}
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
        # model -> its settings, as its leader sent them with the last pull
        self._settings: dict[str, ModelSettings] = {}

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
        spec = coordinator_pb2.ModelSpec(
            name=model,
            params=[param_spec(n, t) for n, t in named],
            optimizer_json=optimizer_config_json(config),
            num_shards=num_shards,
            groups=group_specs(groups or {}),
            schedule_json=schedule_config_json(schedule_config),
            mode_json=mode_config_json(mode_config),
            checkpoint_json=json.dumps(dict(checkpoint)) if checkpoint else "",
        )

        reply = call(
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
            call(self._data_plane(shard.address).load, requests(), timeout=timeout,
                  metadata=self._metadata)  # fmt: skip

        self._each_shard(info, load_one)

    def describe_model(self, model: str) -> ModelInfo:
        reply = call(
            self._coordinator.DescribeModel,
            coordinator_pb2.DescribeModelRequest(model=model),
            timeout=self.timeout_s,
            metadata=self._metadata,
        )
        return self._remember(reply, model)

    def list_models(self) -> list[str]:
        reply = call(
            self._coordinator.ListModels,
            coordinator_pb2.ListModelsRequest(),
            timeout=self.timeout_s,
            metadata=self._metadata,
        )
        return list(reply.models)

    def drop_model(self, model: str) -> None:
        call(
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
    ) -> MigrationReport:
        """Swap the model's optimizer; `policy` "migrate" carries state (optimizer spec section
        5), "reset" starts fresh. Returns the report: per group, every state key kept,
        converted, fresh or dropped, and why."""
        request = coordinator_pb2.SetOptimizerRequest(
            model=model,
            optimizer_json=optimizer_config_json(parse_optimizer_config(config)),
            policy=policy,
        )
        reply = call(
            self._coordinator.SetOptimizer, request, timeout=self.timeout_s, metadata=self._metadata
        )
        self._forget_layout(model)
        return MigrationReport.model_validate(
            {**json.loads(reply.report_json), "version": reply.version}
        )

    def set_hyperparameters(
        self,
        model: str,
        groups: Mapping[str, Mapping[str, Any]] | None = None,
        policy: str = "migrate",
        **changes: Any,
    ) -> MigrationReport:
        """Change some hyperparameters of the model's rule, e.g. ``lr=0.01`` or
        ``betas=(0.9, 0.99)`` or ``lookahead={"k": 5, "alpha": 0.5}``; the state is kept.
        `groups` changes parameter groups' own overrides, ``{"head": {"lr": 0.1}}``, in the
        same control change. `policy`: "migrate" converts the state as a same-rule swap does
        (docs/optimizers.md), "keep" keeps it as it is (as torch does when a param group's
        value changes), "reset" starts it fresh. Returns the report, as `set_optimizer` does;
        "version" is where the change took effect (after that update, before the next, on every
        shard). A change that changes nothing applies nothing: its report has no groups and
        ``unchanged``."""
        request = coordinator_pb2.SetHyperparametersRequest(
            model=model,
            changes_json=json.dumps(changes, default=_jsonable) if changes else "",
            group_changes_json=json.dumps(dict(groups), default=_jsonable) if groups else "",
            policy=policy,
        )
        reply = call(
            self._coordinator.SetHyperparameters,
            request,
            timeout=self.timeout_s,
            metadata=self._metadata,
        )
        self._forget_layout(model)
        return MigrationReport.model_validate(
            {**json.loads(reply.report_json), "version": reply.version}
        )

    def checkpoint(self, model: str, *, snapshot: str | None = None) -> CheckpointInfo:
        """Write a consistent checkpoint of the model now (the server needs a checkpoint
        directory); returns its name, version, where it is, its size in bytes, how long the
        model's updates were held (`pause_s`) and how long it took (`seconds`).

        `snapshot` says how the model is held still: "pause" (pushes wait while the shards
        write; no extra memory) or "copy" (the shards copy their state, pushes go on while the
        copy is written); default: the model's checkpoint policy, else "pause"."""
        reply = call(
            self._coordinator.Checkpoint,
            coordinator_pb2.CheckpointRequest(model=model, snapshot=snapshot or ""),
            timeout=self.timeout_s,
            metadata=self._metadata,
        )
        return CheckpointInfo(
            name=reply.name,
            version=reply.version,
            uri=reply.uri,
            bytes=reply.bytes,
            pause_s=reply.pause_s,
            seconds=reply.seconds,
        )

    def list_checkpoints(self, model: str) -> list[CheckpointInfo]:
        """The model's complete checkpoints, oldest first: name, version, time."""
        reply = call(
            self._coordinator.ListCheckpoints,
            coordinator_pb2.ListCheckpointsRequest(model=model),
            timeout=self.timeout_s,
            metadata=self._metadata,
        )
        return [CheckpointInfo.model_validate(c) for c in json.loads(reply.checkpoints_json)]

    def restore(
        self,
        model: str,
        checkpoint: str | None = None,
        *,
        num_shards: int = 0,
        unless_current: bool = False,
    ) -> ModelInfo:
        """Bring the model back from a checkpoint (the newest unless named) onto `num_shards`
        shards (default: as now). Trainers then get Aborted on their next push: pull, go on.
        `unless_current` (with a named checkpoint): leave a model that already holds exactly
        that checkpoint's state (no update since it was written or restored) as it is."""
        reply = call(
            self._coordinator.Restore,
            coordinator_pb2.RestoreRequest(
                model=model,
                checkpoint=checkpoint or "",
                num_shards=num_shards,
                unless_current=unless_current,
            ),
            timeout=self.timeout_s,
            metadata=self._metadata,
        )
        with self._lock:
            self._versions.pop(model, None)
        return self._remember(reply)

    def status(self, model: str, history: int = 50) -> Status:
        """The run as the server sees it: version, mode, rule and hyperparameters, each group's
        lr and state counters (step, Lookahead's counter, ...), schedule state, every shard,
        the trainers that pushed, and the `history` most recent metrics and audit entries
        (control changes)."""
        request = coordinator_pb2.StatusRequest(model=model, history=history)
        reply = call(
            self._coordinator.Status, request, timeout=self.timeout_s, metadata=self._metadata
        )
        return Status.model_validate_json(reply.status_json)

    def set_schedule(self, model: str, config: str | Mapping[str, Any] | None) -> int:
        """Replace the model's learning-rate schedule; returns the model version."""
        request = coordinator_pb2.SetScheduleRequest(
            model=model, schedule_json=schedule_config_json(parse_schedule_config(config))
        )
        return call(
            self._coordinator.SetSchedule, request, timeout=self.timeout_s, metadata=self._metadata
        ).version

    def report_metric(self, model: str, name: str, value: float, step: int | None = None) -> bool:
        """Report a metric (loss, validation metric); True if it changed the learning rate."""
        request = coordinator_pb2.ReportMetricRequest(
            model=model, name=name, value=float(value), step=step
        )
        reply = call(
            self._coordinator.ReportMetric, request, timeout=self.timeout_s, metadata=self._metadata
        )
        return reply.lr_changed

    # ---- data plane ----------------------------------------------------------------------

    # ---- plumbing ------------------------------------------------------------------------

    def _remember(self, reply: coordinator_pb2.ModelInfo | ModelInfo, asked: str = "") -> ModelInfo:
        info = reply if isinstance(reply, ModelInfo) else ModelInfo.from_proto(reply)
        with self._lock:  # under the name asked for too (a promoted fork's alias)
            self._layouts[info.name] = self._layouts[asked or info.name] = info
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
