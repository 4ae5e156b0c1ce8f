"""Starting and stopping optserve on Ray: an embedded local Ray, or an existing cluster."""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

NAMESPACE = "optserve"
COORDINATOR_NAME = "optserve-coordinator"
# No tensor rides Ray's object store (initial values, pushes, pulls and checkpoints all go over
# the shards' gRPC or straight to the store): it carries only small control messages.
DEFAULT_OBJECT_STORE_BYTES = 512 << 20
LOOPBACK = "127.0.0.1"
LOOPBACK_HOSTS = frozenset({"127.0.0.1", "localhost", "::1", "[::1]"})
# Ray's token authentication (Ray >= 2.52): the mode, and where a driver finds the token.
RAY_AUTH_MODE_ENV = "RAY_AUTH_MODE"
RAY_AUTH_TOKEN_ENV = "RAY_AUTH_TOKEN"
RAY_AUTH_TOKEN_PATH_ENV = "RAY_AUTH_TOKEN_PATH"


def keep_ray_on_loopback() -> None:
    """Make a local Ray (ray.cluster_utils clusters included) keep every node on 127.0.0.1.

    Ray advertises the machine's non-loopback address by default. Ray reads this variable when
    `ray` is first imported, so call this before that in any process that starts a local Ray;
    the processes Ray starts inherit it.
    """
    os.environ["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = "0"


def init_ray(
    *,
    num_cpus: int | None = None,
    object_store_memory: int | None = DEFAULT_OBJECT_STORE_BYTES,
    log_to_driver: bool = True,
) -> None:
    """Start an embedded local Ray (a no-op if this process already has one).

    Every node stays on 127.0.0.1, whatever interface optserve itself serves on: Ray's own
    ports (its GCS, and the Jobs API, which runs any code it is sent) never leave the machine.
    """
    keep_ray_on_loopback()
    import ray

    if ray.is_initialized():
        return
    ray.init(
        address="local",
        namespace=NAMESPACE,
        num_cpus=num_cpus,
        object_store_memory=object_store_memory,
        include_dashboard=False,
        log_to_driver=log_to_driver,
        logging_level=logging.WARNING,
        # In case `ray` was imported before the variable was set: pin this node to loopback.
        _node_ip_address=LOOPBACK,
    )


def connect_ray(address: str) -> None:
    """Join an existing Ray cluster ("auto", "ray://host:10001", or a GCS "host:6379").

    Raises `RayConnectError` when Ray cannot connect, saying what to set when the likely cause
    is Ray's own token authentication."""
    import ray

    if ray.is_initialized():
        return
    try:
        ray.init(address=address, namespace=NAMESPACE, logging_level=logging.WARNING)
    except (ConnectionError, RuntimeError, ray.exceptions.AuthenticationError) as exc:
        raise RayConnectError(explain_ray_connect_error(exc, os.environ)) from exc


class RayConnectError(RuntimeError):
    """`connect_ray` could not join the cluster; the message says what to check."""


def explain_ray_connect_error(exc: BaseException, environ: Mapping[str, str]) -> str:
    """What to tell an operator whose `ray.init(address=...)` failed.

    Ray 2.59 and later turn token authentication on for clusters started with `ray start`
    (2.61: for every cluster). A driver without the token is refused with a bare "Failed to
    connect to Ray cluster"; name the settings that give it one."""
    text = str(exc) or type(exc).__name__
    mode = environ.get(RAY_AUTH_MODE_ENV, "").strip().lower()
    has_token = bool(environ.get(RAY_AUTH_TOKEN_ENV) or environ.get(RAY_AUTH_TOKEN_PATH_ENV))
    looks_like_auth = (
        "failed to connect to ray cluster" in text.lower()
        or "authenticat" in text.lower()
        or "unauthenticated" in text.lower()
    )
    if not looks_like_auth:
        return f"cannot join the Ray cluster: {text}"
    if mode != "token":
        return (
            f"cannot join the Ray cluster ({text}). If the cluster uses Ray's token "
            f"authentication (on by default since Ray 2.59 for `ray start`), set "
            f"{RAY_AUTH_MODE_ENV}=token and give Ray's token in a file: "
            f"{RAY_AUTH_TOKEN_PATH_ENV}=/path/to/token (default ~/.ray/auth_token; "
            f"{RAY_AUTH_TOKEN_ENV} also works, from a secret, never on a command line); "
            "`ray get-auth-token` on the head node prints it"
        )
    if not has_token and not (Path.home() / ".ray" / "auth_token").exists():
        return (
            f"cannot join the Ray cluster ({text}). {RAY_AUTH_MODE_ENV}=token is set but no "
            f"token was found: set {RAY_AUTH_TOKEN_PATH_ENV} to a file holding the cluster's "
            f"token (or write it to ~/.ray/auth_token)"
        )
    return (
        f"cannot join the Ray cluster ({text}). {RAY_AUTH_MODE_ENV}=token is set: check that "
        f"the token ({RAY_AUTH_TOKEN_PATH_ENV}, {RAY_AUTH_TOKEN_ENV} or ~/.ray/auth_token) is "
        "the cluster's, and that the address is right"
    )


@dataclass
class Service:
    """A running optserve: the coordinator actor and the address of its gRPC front door."""

    actor: Any
    address: str
    # host:port of the Prometheus endpoint (http://<it>/metrics), None when off.
    metrics_address: str | None = None

    def stop(self, grace_s: float = 5.0) -> None:
        import ray

        try:
            ray.get(self.actor.stop.remote(grace_s), timeout=grace_s + 60)
        finally:
            ray.kill(self.actor)


def start_service(
    host: str = "127.0.0.1",
    port: int = 0,
    default_num_shards: int = 1,
    name: str = COORDINATOR_NAME,
    placement: Any = None,
    checkpoint_dir: str | None = None,
    keep_checkpoints: int = 3,
    edge: Any = None,
    limits: Any = None,
    metrics_port: int | None = None,
    metrics_host: str | None = None,
    ray_metrics: bool = True,
    checkpoint_policy: dict[str, Any] | None = None,
    metrics_token: str | None = None,
) -> Service:
    """Start the coordinator actor (Ray must be initialised) and wait until it serves.

    `edge` (an `optserve.server.edge.tokens.EdgeConfig`) holds the token table, TLS certificate and
    stream limit of every endpoint; None serves without authentication or TLS. `limits` (an
    `optserve.server.coordinator.core.Limits`) bounds model size and count. `metrics_port` serves
    Prometheus metrics on `metrics_host` (default 127.0.0.1, whatever `host` is; port 0: any
    free one; None: off); with `metrics_token`, only scrapes that carry it as a bearer token.
    `ray_metrics` also records every series in Ray's metrics (`ray.util.metrics`), which each
    node's Ray metrics agent exports as `ray_optserve_*` (needs `ray[default]`), labelled
    `service` = `name`. `checkpoint_policy` is the periodic-checkpoint policy of models that
    set none (None: every 10 minutes when there is a checkpoint directory).

    The shard actors the service starts are detached: if the coordinator dies they go on
    serving, and a coordinator started under the same `name` adopts them (Ray restarts this
    one by itself). `Service.stop` stops them all."""
    import ray
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    from optserve.server.coordinator.actor import CoordinatorActor
    from optserve.server.metrics.endpoint import token_sha256

    # On this process's node (a cluster's head node, where `optserve serve` runs): the node a
    # load balancer or Kubernetes Service sends the coordinator's port to.
    here = NodeAffinitySchedulingStrategy(ray.get_runtime_context().get_node_id(), soft=True)
    args = (
        host, port, default_num_shards, limits, placement, checkpoint_dir, keep_checkpoints, edge,
        metrics_port, metrics_host or LOOPBACK, name if ray_metrics else None, name,
        checkpoint_policy,
        # Its digest only: the token itself never leaves this process.
        None if metrics_token is None else token_sha256(metrics_token),
    )  # fmt: skip
    # Restarted by Ray whenever its process dies; it then adopts its models' shards. (A Ray actor
    # handle: Ray's stubs cannot type its methods' .remote.)
    actor: Any = (
        ray.remote(CoordinatorActor)
        .options(
            name=name,
            namespace=NAMESPACE,
            num_cpus=0,
            max_restarts=-1,
            scheduling_strategy=here,
        )  # fmt: skip
        .remote(*args)
    )
    try:
        address = ray.get(actor.address.remote(), timeout=300)
        metrics_address = ray.get(actor.metrics_address.remote(), timeout=60)
    except ray.exceptions.RayActorError as exc:
        ray.kill(actor)
        # The message carries the actor's traceback; its last line names the error.
        lines = [line for line in str(getattr(exc, "error_msg", exc)).splitlines() if line.strip()]
        reason = lines[-1].strip() if lines else repr(exc)
        raise RuntimeError(f"the optserve coordinator failed to start: {reason}") from exc
    return Service(actor, address, metrics_address)
