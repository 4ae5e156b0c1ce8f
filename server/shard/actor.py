"""The shard Ray actor: owns a ShardState and serves it on its own gRPC endpoint.

Shard actors are detached: they outlive the coordinator that started them, keep serving
trainers while it is down, and carry what it needs to adopt them again when it comes back
(the model's catalogue entry on every shard; the leader also keeps the model's history and
the control change it is in the middle of).
"""

from __future__ import annotations

import collections
import threading
from typing import Any

import grpc
import ray
import torch
from pydantic import BaseModel

from optserve.common.config import AsyncMode, ModeConfig, ScheduleConfig, parse_optimizer_config
from optserve.common.errors import InvalidArgument, from_rpc_error
from optserve.server.edge.auth import EdgeGuard, staging_allowance
from optserve.server.edge.rpc import (
    CHANNEL_OPTIONS,
    advertised_address,
    create_server,
    format_address,
    treat_as_unavailable,
)
from optserve.server.edge.tokens import EdgeConfig
from optserve.server.engine.group import GroupEngine
from optserve.server.metrics import ShardMetrics
from optserve.server.shard.checkpoint import RestorePlan, ShardCheckpoints, WriteTarget
from optserve.server.shard.memory import keep_freed_memory
from optserve.server.shard.pipeline import SEQUENCE_WAIT_S
from optserve.server.shard.sequencer import Sequencer
from optserve.server.shard.service import (
    SECRET_METADATA,
    SERVICE_NAME,
    ShardService,
    add_shard_service,
)
from optserve.server.shard.state import GroupInit, ShardState
from optserve.v1 import shard_pb2, shard_pb2_grpc

# A shard that died or timed out is answered UNAVAILABLE (retry), not INTERNAL.
treat_as_unavailable(ray.exceptions.RayActorError, ray.exceptions.GetTimeoutError)

# Handler threads of a shard's gRPC server. A push holds one on its shard until it is decided,
# and one more on the leader per other shard, so a sync round of T trainers on S shards holds
# about T * S of the leader's; the coordinator refuses modes that could exceed this.
SHARD_THREADS = 1024
# The most recently seen trainers a status shows.
STATUS_TRAINERS = 1000
# Results of control changes a shard remembers, so a coordinator that replays an interrupted
# change gets the same answer from shards that had applied it already.
REMEMBERED_CONTROLS = 256
# How many audit entries and metric reports the leader keeps.
HISTORY_LIMIT = 10_000
# Distinct metric names one model keeps (ReportMetric).
MAX_METRIC_NAMES = 64


def _jsonable(changes: dict[str, Any]) -> dict[str, Any]:
    """Catalogue-entry changes as the shard keeps its entry: JSON-able (checkpoint files
    carry it); configs arrive as validated objects."""
    return {
        key: value.model_dump(mode="json") if isinstance(value, BaseModel) else value
        for key, value in changes.items()
    }


class ShardActor:
    """One shard of one model. Wrapped with `ray.remote` by the coordinator.

    The gRPC data plane runs on the server's own threads inside this actor process and talks to
    the ShardState directly; Ray method calls are the coordinator's control plane.

    `groups` maps each group name to {"numel": length of this shard's slice, "group_numel":
    the whole group's, "range": [start, end) of the group's elements, "optimizer": its
    validated config, "views": [(offset, shape), ...]}; `schedule` and `mode` are validated
    configs too (None: constant, async).
    The shard starts empty: its values arrive from the model's creator (Shard/Load) or from a
    checkpoint (`restore_checkpoint`). `entry` is the model's catalogue entry; `history` the
    leader's starting history ({"audit": [...], "metrics": [...]}).
    """

    def __init__(
        self,
        model: str,
        index: int,
        groups: dict[str, dict[str, Any]],
        schedule: ScheduleConfig | None = None,
        host: str = "127.0.0.1",
        num_shards: int = 1,
        mode: ModeConfig | None = None,
        device: str = "cpu",
        secret: str = "",
        edge: EdgeConfig | None = None,
        ray_service: str | None = None,
        entry: dict[str, Any] | None = None,
        history: dict[str, list[dict[str, Any]]] | None = None,
    ) -> None:
        keep_freed_memory()  # every step allocates and frees buffers the size of the slice
        inits = {
            name: GroupInit(
                weights=None,
                numel=int(g["numel"]),
                config=parse_optimizer_config(g["optimizer"]),  # (a config passes as it is)
                views=tuple((int(o), tuple(s)) for o, s in g.get("views", ())),
                group_numel=g.get("group_numel"),
            )
            for name, g in groups.items()
        }
        self._ranges = {name: (int(g["range"][0]), int(g["range"][1]))
                        for name, g in groups.items()}  # fmt: skip
        mode = mode if mode is not None else AsyncMode()
        # Room for every push of a sync round, or a burst of async pushes, waiting their turn.
        max_staged = max(64, 2 * getattr(mode, "trainers", 0))
        self._state = ShardState(
            model, index, inits, schedule, device=device, max_staged=max_staged,
            gradients=mode.gradients,
        )  # fmt: skip
        self._checkpoints = ShardCheckpoints(self._state)
        # A rule's first use imports the rest of torch it needs (its optimizers): seconds of
        # CPU, paid here while the shards start, not while the values stream in. (A compiled
        # kernel compiles once the values are in: `ShardState.initialize`, status "preparing".)
        for init in inits.values():
            GroupEngine("warm-up", torch.zeros(1), init.config)
        self._entry: dict[str, Any] = dict(entry or {})
        self._controls: collections.OrderedDict[str, Any] = collections.OrderedDict()
        self._control_lock = threading.Lock()
        # Shard 0 leads: it orders the model's pushes for every shard (server/shard/sequencer.py).
        sequencer = Sequencer(num_shards, mode, lrs=self._state.lrs_at) if index == 0 else None
        # The leader's: the control change holding the updates, and the model's history.
        self._intent: dict[str, Any] | None = None
        self._audit: collections.deque[dict[str, Any]] = collections.deque(maxlen=HISTORY_LIMIT)
        self._metric_history: collections.deque[dict[str, Any]] = collections.deque(
            maxlen=HISTORY_LIMIT
        )
        if sequencer is not None and history:
            self._audit.extend(history.get("audit", []))
            self._metric_history.extend(history.get("metrics", []))
        self._metric_names = {m.get("name") for m in self._metric_history}
        self._secret = secret
        # Allowances at least a sync round wide: one token may run all of a round's trainers.
        self._edge = (edge or EdgeConfig()).fit_round(
            getattr(mode, "trainers", 0), 4 * self._state.numel
        )
        self._serve(host, sequencer, ray_service)

    def _serve(self, host: str, sequencer: Sequencer | None, ray_service: str | None) -> None:
        """The shard's metrics and its gRPC data plane, started."""
        model, index = self._state.model, self._state.index
        # With `ray_service`, its series go to Ray's metrics too, tagged with that service.
        self._metrics = ShardMetrics(model, index, ray_service=ray_service)
        self._metrics.watch_health(self._state.health)
        self._state.update_timer = self._metrics.update_timer
        if sequencer is not None:
            self._metrics.lead(self._leader_view)
        self._service = ShardService(
            self._state, sequencer, secret=self._secret, metrics=self._metrics,
            staging=staging_allowance(self._edge),
        )  # fmt: skip
        self._leader_channel: grpc.Channel | None = None
        self._server = create_server(
            format_address(host, 0),
            [(add_shard_service, self._service, SERVICE_NAME)],
            # Pushes wait in their handler threads for their turn (a sync round, the leader).
            max_workers=SHARD_THREADS,
            guard=EdgeGuard(self._edge, model=model, on_error=self._metrics.errors),
        )
        self._server.start()
        self._address = advertised_address(host, self._server.port)

    def address(self) -> str:
        return self._address

    def set_leader(self, address: str) -> None:
        """Tell a non-leader shard where its model's leader (shard 0) serves."""
        if self._service.sequencer is not None:
            return
        channel = self._edge.peer_channel(address, CHANNEL_OPTIONS)
        stub = shard_pb2_grpc.ShardStub(channel)

        def ask(request: shard_pb2.SequenceRequest) -> shard_pb2.SequenceDecision:
            try:
                return stub.Sequence(
                    request,
                    timeout=SEQUENCE_WAIT_S + 60,
                    metadata=((SECRET_METADATA, self._secret),),
                )
            except grpc.RpcError as exc:
                raise from_rpc_error(exc) from None

        self._leader_channel = channel
        self._service.use_leader(ask)

    def _leader_view(self) -> dict[str, Any]:
        """The model-wide gauges the leader's metrics read at scrape time."""
        sequencer = self._service.sequencer
        return {
            "version": self._state.version,
            "lr": self._state.lrs(),
            "gradient_counters": sequencer.counters() if sequencer is not None else {},
        }

    # ---- what the coordinator reads --------------------------------------------------------

    @ray.method(concurrency_group="observe")
    def entry(self) -> dict[str, Any]:
        """The model's catalogue entry, as this shard carries it."""
        return {**self._entry, "address": self._address, "index": self._state.index}

    def update_entry(self, changes: dict[str, Any]) -> None:
        self._entry.update(_jsonable(changes))

    @ray.method(concurrency_group="observe")
    def health(self) -> dict[str, Any]:
        """Version, broken (why, or None) and ready: what the coordinator's watch reads."""
        return self._state.health()

    @ray.method(concurrency_group="observe")
    def metrics(self) -> list[Any]:
        """This shard's Prometheus metric families (the coordinator's endpoint merges them)."""
        return self._metrics.families()

    def decisions(self) -> list[dict[str, Any]]:
        """The leader's log of decided updates (empty on other shards)."""
        sequencer = self._service.sequencer
        return sequencer.log() if sequencer is not None else []

    @ray.method(concurrency_group="observe")
    def info(self) -> dict[str, Any]:
        node = ray.get_runtime_context().get_node_id()
        info = {**self._state.info(), "address": self._address, "node_id": node}
        if self._service.sequencer is not None:  # what the gradient policy did, model-wide
            info["gradient_counters"] = self._service.sequencer.counters()
            info["trainers"] = self._metrics.trainers.snapshot(newest=STATUS_TRAINERS)
        return info

    @ray.method(concurrency_group="observe")
    def history(self, recent: int = HISTORY_LIMIT) -> dict[str, Any]:
        """The leader's newest `recent` audit entries and metric reports, and how many it keeps."""
        audit, metrics = list(self._audit), list(self._metric_history)
        return {
            "audit": audit[-recent:] if recent > 0 else [],
            "metrics": metrics[-recent:] if recent > 0 else [],
            "audit_kept": len(audit),
            "metrics_kept": len(metrics),
        }

    def record_history(
        self, audit: list[dict[str, Any]] | None = None, metrics: list[dict[str, Any]] | None = None
    ) -> None:
        self._audit.extend(audit or [])
        self._metric_history.extend(metrics or [])

    def version(self) -> int:
        return self._state.version

    def digest(self) -> str:
        """A hash of all this shard's state (ShardState.digest): equal means unchanged."""
        return self._state.digest()

    def state_dict(self, at_version: int | None = None) -> dict[str, Any]:
        """A copy of all this shard's state (for tests and tools; checkpoints do not use it)."""
        return self._state.state_dict(at_version)

    # ---- control changes ---------------------------------------------------------------------
    # The coordinator pauses the leader's ordering (`pause_updates`, which returns the version
    # boundary and keeps the change as the leader's intent), applies the change on every shard
    # at that version (`control`), then resumes (recording the change in the leader's history).
    # A coordinator that died in between finds the intent on the leader when it comes back and
    # runs the change again: shards that had applied it answer from memory. Pausing and
    # resuming have threads of their own ("leader"): a resume never waits behind a long call
    # (a checkpoint's write) on the default thread.

    @ray.method(concurrency_group="leader")
    def pause_updates(
        self, op_id: str, intent: dict[str, Any] | None = None, max_hold_s: float = 900.0
    ) -> int:
        """Hold the model's updates for a control change (lifted after `max_hold_s` if
        nobody resumes them: its coordinator died); return the version boundary."""
        sequencer = self._require_leader()
        boundary = sequencer.pause(op_id, max_hold_s=max_hold_s)
        self._intent = {"op_id": op_id, "boundary": boundary, "op": intent}
        return boundary

    @ray.method(concurrency_group="observe")
    def paused(self) -> dict[str, Any] | None:
        """The control change holding this model's updates: {"op_id", "boundary", "op"}."""
        sequencer = self._service.sequencer
        if sequencer is None:
            return None
        held_by = sequencer.paused_by()
        if held_by is None:
            return None
        intent = self._intent
        if intent is None or intent["op_id"] != held_by:
            return {"op_id": held_by, "boundary": sequencer.version, "op": None}
        return dict(intent)

    @ray.method(concurrency_group="leader")
    def resume_updates(
        self, op_id: str, history: dict[str, list[dict[str, Any]]] | None = None
    ) -> bool:
        """Let the updates go on; False if `op_id` no longer held them."""
        sequencer = self._service.sequencer
        if sequencer is None:
            return False
        if history and (self._intent or {}).get("op_id") == op_id:
            self.record_history(history.get("audit", []), history.get("metrics", []))
        if (self._intent or {}).get("op_id") == op_id:
            self._intent = None
        return sequencer.resume(op_id)

    def mark_broken(self, reason: str) -> None:
        """This shard no longer matches its peers (a control change failed here alone)."""
        self._state.mark_broken(reason)

    def control(self, op: dict[str, Any]) -> Any:
        """Apply one control change at its version boundary, once: {"op_id", "kind",
        "at_version", "args", "entry": catalogue entry changes}."""
        op_id = op["op_id"]
        with self._control_lock:
            if op_id in self._controls:
                return self._controls[op_id]
            kind, args, at = op["kind"], op.get("args", {}), op.get("at_version")
            if kind == "set_optimizer":
                # config objects, as the coordinator sends them (they pass as they are)
                configs = {g: parse_optimizer_config(c) for g, c in args["configs"].items()}
                result: Any = self._state.set_optimizer(configs, args["policy"], at)
            elif kind == "set_schedule":
                self._state.set_schedule(args["schedule"], at)
                result = None
            else:
                raise InvalidArgument(f"unknown control change {kind!r}")
            self._entry.update(_jsonable(op.get("entry", {})))
            self._controls[op_id] = result
            while len(self._controls) > REMEMBERED_CONTROLS:
                self._controls.popitem(last=False)
            return result

    @ray.method(concurrency_group="metrics")
    def report_metric(
        self, name: str, value: float, step: int | None, when: float
    ) -> tuple[int, bool]:
        """The leader's: feed a metric to the model's one schedule and keep it in the history.
        Nothing pauses: the updates the leader decides from now on carry the lr it gives.
        Returns the last version decided and whether the lr changed. A model keeps at most
        MAX_METRIC_NAMES names (status and plots show each). On a thread of its own: a storm
        of reports never delays a control change or a checkpoint."""
        sequencer = self._require_leader()
        names = self._metric_names
        if name not in names and len(names) >= MAX_METRIC_NAMES:
            raise InvalidArgument(
                f"model {self._state.model!r} already has {len(names)} metric names, the most "
                f"it keeps; report under one of them"
            )
        names.add(name)
        changed = self._state.report_metric(name, value)
        version = sequencer.version
        self._metric_history.append({
            "name": name, "value": value, "step": step, "time": when, "version": version,
            "lr_changed": changed, "lr": self._state.lrs_at(version + 1),
        })  # fmt: skip
        return version, changed

    def _require_leader(self) -> Sequencer:
        sequencer = self._service.sequencer
        if sequencer is None:
            raise RuntimeError(f"shard {self._state.index} is not its model's leader")
        return sequencer

    # ---- checkpoints -------------------------------------------------------------------------

    def begin_checkpoint(self, target: WriteTarget, at_version: int) -> dict[str, float]:
        """Write (or copy out, by the target's snapshot) this shard's slice at `at_version`."""
        return self._checkpoints.begin(target, at_version)

    @ray.method(concurrency_group="checkpoint")
    def finish_checkpoint(self, checkpoint: str) -> dict[str, Any]:
        """This shard's file of `checkpoint`, once written: its FileEntry and the scalars."""
        report = self._checkpoints.finish(checkpoint)
        return {**report, "ranges": self._ranges}

    def restore_checkpoint(self, plan: RestorePlan) -> dict[str, Any]:
        """Read this shard's range of a checkpoint and start from it; return its version and
        how long filling its new memory and the reading took."""
        took = self._checkpoints.restore(plan, self._ranges)
        if self._service.sequencer is not None:  # the leader orders from the restored version
            self._service.sequencer.reset(self._state.version)
        return {"version": self._state.version, **took}

    def stop(self, grace_s: float = 5.0) -> None:
        self._metrics.stop()
        self._server.stop(grace_s)
        if self._leader_channel is not None:
            self._leader_channel.close()
