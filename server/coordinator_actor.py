"""The coordinator Ray actor: one Coordinator plus the gRPC front door it serves."""

from __future__ import annotations

import logging

from optserve.server.auth import EdgeConfig, EdgeGuard
from optserve.server.coordinator import Coordinator, Limits, Placement
from optserve.server.coordinator_service import (
    SERVICE_NAME,
    CoordinatorService,
    model_of_request,
)
from optserve.server.grpc_util import advertised_address, create_server, format_address
from optserve.v1 import coordinator_pb2_grpc


class CoordinatorActor:
    """Wrapped with `ray.remote` by `optserve.server.runtime.start_service`."""

    def __init__(
        self,
        host: str = "127.0.0.1",
        port: int = 0,
        default_num_shards: int = 1,
        limits: Limits | None = None,
        placement: Placement | None = None,
        checkpoint_dir: str | None = None,
        keep_checkpoints: int = 3,
        edge: EdgeConfig | None = None,
        metrics_port: int | None = None,
        metrics_host: str | None = None,
        ray_service: str | None = None,
    ) -> None:
        """`metrics_port` serves Prometheus metrics over HTTP (0: any free port; None: off)
        on `metrics_host` (default: `host`); with `ray_service` (the service's name) they are
        recorded in Ray's metrics too, tagged with it."""
        logging.basicConfig(level=logging.INFO)
        edge = edge or EdgeConfig()
        self._coordinator = Coordinator(
            host, default_num_shards, limits, placement, checkpoint_dir, keep_checkpoints,
            edge=edge, ray_service=ray_service,
        )  # fmt: skip
        import ray

        if ray.get_runtime_context().was_current_actor_reconstructed:
            # Ray restarted this coordinator: its shards died with it. Every model that has a
            # checkpoint comes back from its newest one.
            logging.getLogger(__name__).warning(
                "coordinator restarted; restored %s", self.restore_all()
            )
        self._server = create_server(
            format_address(host, port),
            [
                (
                    coordinator_pb2_grpc.add_CoordinatorServicer_to_server,
                    CoordinatorService(self._coordinator),
                    SERVICE_NAME,
                )
            ],
            guard=EdgeGuard(
                edge, model_of=model_of_request, on_error=self._coordinator.metrics.errors
            ),
        )
        self._server.start()
        self._address = advertised_address(host, self._server.port)
        self._metrics_address: str | None = None
        if metrics_port is not None:
            bind = metrics_host or host
            bound = self._coordinator.metrics.serve(bind, metrics_port)
            self._metrics_address = advertised_address(bind, bound)

    def address(self) -> str:
        return self._address

    def metrics_address(self) -> str | None:
        """host:port of the Prometheus endpoint (http://<it>/metrics), or None if off."""
        return self._metrics_address

    def shard_actors(self, model: str) -> list:
        """Handles of a model's shard actors (for tests and operations tooling)."""
        return list(self._coordinator.get(model).actors)

    def restore_all(self) -> list[str]:
        """Restore every model that has a checkpoint under the checkpoint directory."""
        store = self._coordinator.store
        if store is None:
            return []
        restored = []
        for model in store.models():
            if store.dropped_after_last_checkpoint(model):
                continue
            try:
                self._coordinator.restore(model, caller="startup")
                restored.append(model)
            except Exception:  # noqa: BLE001 - one bad model must not keep the others down
                logging.getLogger(__name__).exception("could not restore model %s", model)
        return restored

    def stop(self, grace_s: float = 5.0) -> None:
        """Stop accepting calls, let in-flight ones finish, then stop every shard."""
        self._server.stop(grace_s)
        self._coordinator.shutdown(grace_s)  # its metrics endpoint too
