"""The shard Ray actor: owns a ShardState and serves it on its own gRPC endpoint."""

from __future__ import annotations

from typing import Any

import grpc
import ray

from optserve.client.config import parse_mode_config, parse_optimizer_config
from optserve.client.errors import from_rpc_error
from optserve.server.auth import EdgeConfig, EdgeGuard
from optserve.server.grpc_util import (
    CHANNEL_OPTIONS,
    advertised_address,
    create_server,
    format_address,
)
from optserve.server.memory import keep_freed_memory
from optserve.server.metrics import ShardMetrics
from optserve.server.sequencer import Sequencer
from optserve.server.shard import GroupInit, ShardState
from optserve.server.shard_service import (
    SECRET_METADATA,
    SEQUENCE_WAIT_S,
    SERVICE_NAME,
    ShardService,
    add_shard_service,
)
from optserve.v1 import shard_pb2, shard_pb2_grpc

# Handler threads of a shard's gRPC server. A push holds one on its shard until it is decided,
# and one more on the leader per other shard, so a sync round of T trainers on S shards holds
# about T * S of the leader's; the coordinator refuses modes that could exceed this.
SHARD_THREADS = 1024
# The most recently seen trainers a status shows.
STATUS_TRAINERS = 1000


class ShardActor:
    """One shard of one model. Wrapped with `ray.remote` by the coordinator.

    The gRPC data plane runs on the server's own threads inside this actor process and talks to
    the ShardState directly; Ray method calls are the coordinator's control plane.

    `groups` maps each group name to {"weights": flat slice, "optimizer": config JSON,
    "views": [(offset, shape), ...]}.
    """

    def __init__(
        self,
        model: str,
        index: int,
        groups: dict[str, dict[str, Any]],
        schedule_json: str = "",
        host: str = "127.0.0.1",
        num_shards: int = 1,
        mode_json: str = "",
        device: str = "cpu",
        secret: str = "",
        edge: EdgeConfig | None = None,
        ray_service: str | None = None,
    ) -> None:
        keep_freed_memory()  # every step allocates and frees buffers the size of the slice
        inits = {
            name: GroupInit(
                weights=g["weights"],
                config=parse_optimizer_config(g["optimizer"]),
                views=tuple((int(o), tuple(s)) for o, s in g.get("views", ())),
            )
            for name, g in groups.items()
        }
        mode = parse_mode_config(mode_json or None)
        # Room for every push of a sync round, or a burst of async pushes, waiting their turn.
        max_staged = max(64, 2 * getattr(mode, "trainers", 0))
        self._state = ShardState(
            model, index, inits, schedule_json or None, device=device, max_staged=max_staged,
            gradients=mode.gradients,
        )  # fmt: skip
        # Shard 0 leads: it orders the model's pushes for every shard (server/sequencer.py).
        sequencer = Sequencer(num_shards, mode) if index == 0 else None
        self._secret = secret
        self._edge = edge or EdgeConfig()
        # With `ray_service`, its series go to Ray's metrics too, tagged with that service.
        self._metrics = ShardMetrics(model, index, ray_service=ray_service)
        self._state.update_timer = self._metrics.update_timer
        if sequencer is not None:
            self._metrics.lead(self._leader_view)
        self._service = ShardService(self._state, sequencer, secret=secret, metrics=self._metrics)
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
        self._service.leader = ask

    def _leader_view(self) -> dict[str, Any]:
        """The model-wide gauges the leader's metrics read at scrape time."""
        sequencer = self._service.sequencer
        return {
            "version": self._state.version,
            "lr": self._state.lrs(),
            "gradient_counters": sequencer.counters() if sequencer is not None else {},
        }

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

    def version(self) -> int:
        return self._state.version

    def digest(self) -> str:
        """A hash of all this shard's state (ShardState.digest): equal means unchanged."""
        return self._state.digest()

    # Control changes. The coordinator pauses the leader's ordering (`pause_updates`, which
    # returns the version boundary), applies the change on every shard at that version, then
    # resumes: every shard switches between the same two updates.

    def pause_updates(self, op_id: str) -> int:
        sequencer = self._service.sequencer
        if sequencer is None:
            raise RuntimeError(f"shard {self._state.index} is not its model's leader")
        return sequencer.pause(op_id)

    def resume_updates(self, op_id: str) -> None:
        if self._service.sequencer is not None:
            self._service.sequencer.resume(op_id)

    def set_optimizer(
        self, configs_json: dict[str, str], policy: str, at_version: int | None = None
    ) -> dict[str, Any]:
        configs = {name: parse_optimizer_config(c) for name, c in configs_json.items()}
        return self._state.set_optimizer(configs, policy, at_version)  # type: ignore[arg-type]

    def set_schedule(self, schedule_json: str, at_version: int | None = None) -> None:
        self._state.set_schedule(schedule_json, at_version)

    def report_metric(
        self, name: str, value: float, at_version: int | None = None
    ) -> dict[str, Any]:
        """Feed a metric to the schedule: whether it changed the lr, and each group's lr."""
        changed = self._state.report_metric(name, value, at_version)
        return {"changed": changed, "lr": self._state.lrs()}

    def state_dict(self, at_version: int | None = None) -> dict[str, Any]:
        return self._state.state_dict(at_version)

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self._state.load_state_dict(state)
        if self._service.sequencer is not None:  # the leader orders from the restored version
            self._service.sequencer.reset(self._state.version)

    def stop(self, grace_s: float = 5.0) -> None:
        self._metrics.stop()
        self._server.stop(grace_s)
        if self._leader_channel is not None:
            self._leader_channel.close()
