"""The coordinator Ray actor: one Coordinator plus the gRPC front door it serves.

On every start it adopts the running shards of its service (a coordinator that died and came
back, or a `serve` started again on a cluster whose shards outlived the last one); when Ray
restarted it, it also restores, from its checkpoints, the models whose shards are all gone.
"""

from __future__ import annotations

import logging
import threading
from typing import Any

import ray

from optserve.server.coordinator import recovery
from optserve.server.coordinator.catalogue import Limits
from optserve.server.coordinator.core import Coordinator
from optserve.server.coordinator.launch import Placement
from optserve.server.coordinator.service import (
    SERVICE_NAME,
    CoordinatorService,
    model_of_request,
)
from optserve.server.edge.auth import EdgeGuard
from optserve.server.edge.rpc import (
    advertised_address,
    create_server,
    format_address,
    treat_as_unavailable,
)
from optserve.server.edge.tokens import EdgeConfig
from optserve.v1 import coordinator_pb2_grpc

# A shard that died or timed out is answered UNAVAILABLE (retry), not INTERNAL.
treat_as_unavailable(ray.exceptions.RayActorError, ray.exceptions.GetTimeoutError)


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
        service: str = "optserve-coordinator",
        checkpoint_policy: dict[str, Any] | None = None,
        metrics_token_sha256: str | None = None,
    ) -> None:
        """`metrics_port` serves Prometheus metrics over HTTP (0: any free port; None: off)
        on `metrics_host` (default: `host`); with `ray_service` (the service's name) they are
        recorded in Ray's metrics too, tagged with it. `service` is this actor's name (what
        its shard actors are named after); `checkpoint_policy` the periodic-checkpoint policy
        of models that set none (None: every 10 minutes, with a checkpoint directory). With
        `metrics_token_sha256` (a bearer token's digest), a scrape must carry that token."""
        logging.basicConfig(level=logging.INFO)
        edge = edge or EdgeConfig()
        self._coordinator = Coordinator(
            host, default_num_shards, limits, placement, checkpoint_dir, keep_checkpoints,
            edge=edge, ray_service=ray_service, service=service,
            checkpoint_policy=checkpoint_policy, adopt=True,
        )  # fmt: skip
        import ray

        restarted = ray.get_runtime_context().was_current_actor_reconstructed
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
            # More than one address may hold (max_coordinator_calls_per_address): one trainer
            # cannot take every thread of the front door.
            max_workers=edge.coordinator_threads,
        )
        self._server.start()
        self._address = advertised_address(host, self._server.port)
        self._metrics_address: str | None = None
        if metrics_port is not None:
            bind = metrics_host or host
            bound = self._coordinator.metrics.serve(bind, metrics_port, metrics_token_sha256)
            self._metrics_address = advertised_address(bind, bound)
        if restarted:
            # Ray restarted this coordinator: its running shards are adopted already; the models
            # it served whose shards are all gone come back from their newest checkpoints.
            threading.Thread(
                target=self._restore_lost, name="optserve-restore", daemon=True
            ).start()

    def _restore_lost(self) -> None:
        restored = recovery.restore_from_store(self._coordinator, this_service_only=True)
        logging.getLogger(__name__).warning("coordinator restarted; restored %s", restored)

    def address(self) -> str:
        return self._address

    def metrics_address(self) -> str | None:
        """host:port of the Prometheus endpoint (http://<it>/metrics), or None if off."""
        return self._metrics_address

    def shard_actors(self, model: str) -> list:
        """Handles of a model's shard actors (for tests and operations tooling)."""
        return list(self._coordinator.get(model).actors)

    def restore_all(self) -> list[str]:
        """Restore every model that has a checkpoint under the checkpoint directory and is not
        running (nor dropped after its last checkpoint)."""
        return recovery.restore_from_store(self._coordinator, this_service_only=False)

    def max_model_bytes(self) -> int:
        """The largest model this server takes (fp32 master bytes)."""
        return self._coordinator.max_model_bytes

    def stop(self, grace_s: float = 5.0) -> None:
        """Stop accepting calls, let in-flight ones finish, then stop every shard."""
        self._server.stop(grace_s)
        self._coordinator.shutdown(grace_s)  # its metrics endpoint too
