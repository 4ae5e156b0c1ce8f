"""The shard Ray actor: owns a ShardState and serves it on its own gRPC endpoint."""

from __future__ import annotations

from typing import Any

import torch

from optserve.client.config import parse_optimizer_config
from optserve.server.grpc_util import advertised_address, create_server, format_address
from optserve.server.shard import ShardState
from optserve.server.shard_service import SERVICE_NAME, ShardService
from optserve.v1 import shard_pb2_grpc


class ShardActor:
    """One shard of one model. Wrapped with `ray.remote` by the coordinator.

    The gRPC data plane runs on the server's own threads inside this actor process and talks to
    the ShardState directly; Ray method calls are for the coordinator (info, stop).
    """

    def __init__(
        self,
        model: str,
        index: int,
        weights: dict[str, torch.Tensor],
        optimizer_json: str,
        host: str = "127.0.0.1",
    ) -> None:
        config = parse_optimizer_config(optimizer_json)
        self._state = ShardState(model, index, weights, config)
        self._server = create_server(
            format_address(host, 0),
            [(shard_pb2_grpc.add_ShardServicer_to_server, ShardService(self._state), SERVICE_NAME)],
        )
        self._server.start()
        self._address = advertised_address(host, self._server.port)

    def address(self) -> str:
        return self._address

    def info(self) -> dict[str, Any]:
        return {**self._state.info(), "address": self._address}

    def version(self) -> int:
        return self._state.version

    def optimizer_state(self) -> tuple[int, dict[str, dict[str, Any]]]:
        return self._state.state_snapshot()

    def stop(self, grace_s: float = 5.0) -> None:
        self._server.stop(grace_s)
