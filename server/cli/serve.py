"""`optserve serve`: the server on an embedded local Ray, or on a Ray cluster."""

from __future__ import annotations

import argparse
import dataclasses
import json
import signal
import sys
import threading
import time

from optserve.common.errors import InvalidArgument
from optserve.server.cli.common import progress
from optserve.server.cli.safety import (
    WILDCARD_HOSTS,
    check_exposure,
    check_token_table,
    is_loopback,
    is_placeholder_token,
    machine_address,
)
from optserve.server.edge.tokens import MIN_TOKEN_CHARS, EdgeConfig

# What the eager kernels cost against the compiled ones (bench/engine.py, 16M and 100M
# elements, 2 cores: RMSprop 2.1-2.3x, AdaDelta 3.0-3.7x, AdaBound 2.6-3.1x).
EAGER_COST = "2-4x slower per step"
# The limits of server/edge/limits.py a serve flag sets ("per token": per address without
# auth; "per address": a host, whatever its tokens); the defaults are EdgeConfig's.
LIMIT_FLAGS = (
    ("max_streams_per_client", int, "calls one token may have in flight on a shard"),
    ("max_streams_per_address", int, "calls one address may have in flight on a shard"),
    ("max_pulls_per_client", int, "Pull streams one token may have open on a shard"),
    ("max_pulls_per_address", int, "Pull streams one address may have open on a shard"),
    ("max_staged_bytes_per_client", int, "bytes of pushes one token may have staged on a shard"),
    ("max_staged_bytes_per_address", int, "bytes of pushes one address may have staged"),
    ("control_calls_per_s", float, "control calls (ReportMetric, ...) per second per token"),
    ("stream_idle_s", float, "seconds a stream may go without a message before it is cut"),
)

EXAMPLES_SERVE = """examples:
  optserve serve --tokens-file tokens.json    # embedded local Ray, gRPC on 127.0.0.1:50051
  optserve serve --no-auth --port 6000 --shards 2          # no tokens: loopback experiments
  optserve serve --ray-address auto --host 0.0.0.0 --shards 4 \\
      --tokens-file /etc/optserve/tokens.json \\
      --tls-cert server.pem --tls-key server-key.pem           # on a Ray cluster's head node
  RAY_AUTH_MODE=token RAY_AUTH_TOKEN_PATH=/etc/ray/auth_token \\
      optserve serve --ray-address auto ...                  # a cluster with Ray's token auth

Off loopback, serve refuses to start without TLS (--tls-cert/--tls-key) or with --no-auth,
unless given --insecure. The embedded Ray always stays on 127.0.0.1, and so do the metrics
unless --metrics-host says otherwise (--metrics-token-file then guards them).

tokens.json:
  {"tokens": [{"name": "ops", "role": "admin", "token": "<32+ random characters>"},
              {"name": "trainers", "role": "trainer", "sha256": "<hex digest of a token>",
               "models": ["resnet-*"]}]}
The table may also come from $OPTSERVE_TOKENS_FILE or $OPTSERVE_TOKENS (never the command line).
"""


# The Prometheus endpoint's default port (the one OpenTelemetry's Prometheus exporter uses).
DEFAULT_METRICS_PORT = 9464

# How long `serve` waits for Ray to restart a dead coordinator before giving up.
COORDINATOR_RESTART_S = 120.0


def add_parser(sub: argparse._SubParsersAction) -> None:
    serve = sub.add_parser(
        "serve",
        help="run the server (embedded local Ray, or --ray-address to join a cluster)",
        description="Start the optserve server on an embedded local Ray, or on an existing Ray "
        "cluster with --ray-address; stop on Ctrl-C/SIGTERM.",
        epilog=EXAMPLES_SERVE,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    _server_options(serve)
    _checkpoint_options(serve)
    _edge_options(serve.add_argument_group("authentication, TLS and limits"))
    _metrics_options(serve.add_argument_group("metrics"))
    serve.set_defaults(func=run)


def _server_options(serve: argparse.ArgumentParser) -> None:
    serve.add_argument("--host", default="127.0.0.1", help="interface to bind (default 127.0.0.1)")
    serve.add_argument("--port", type=int, default=50051, help="coordinator gRPC port (0 = any)")
    serve.add_argument("--shards", type=int, default=1, help="default number of shards per model")
    serve.add_argument("--num-cpus", type=int, default=None, help="CPUs for the embedded Ray")
    serve.add_argument(
        "--ray-address",
        default=None,
        help="join this Ray cluster ('auto', 'ray://head:10001', 'head:6379') instead of "
        "starting an embedded one; bind --host 0.0.0.0 so trainers on other machines reach it",
    )
    serve.add_argument(
        "--shard-cpus", type=float, default=0.0, help="CPUs each shard reserves (default: a token)"
    )
    serve.add_argument(
        "--shard-gpus",
        type=float,
        default=None,
        help="GPUs per shard (default: 1 when the cluster has GPUs, else 0)",
    )
    serve.add_argument(
        "--placement",
        default="SPREAD",
        choices=["SPREAD", "PACK", "STRICT_SPREAD", "STRICT_PACK"],
        help="placement-group strategy for a model's shards (default SPREAD: across nodes)",
    )
    serve.add_argument(
        "--grace-s",
        type=float,
        default=5.0,
        help="seconds in-flight calls get to finish on shutdown",
    )


def _checkpoint_options(serve: argparse.ArgumentParser) -> None:
    serve.add_argument(
        "--checkpoint-dir",
        default=None,
        help="where checkpoints go: a directory, or any fsspec URI (s3://bucket/path, ...)",
    )
    serve.add_argument(
        "--keep-checkpoints", type=int, default=3, help="checkpoints kept per model (default 3)"
    )
    serve.add_argument(
        "--restore",
        action="store_true",
        help="at start, restore every model from its newest checkpoint in --checkpoint-dir",
    )
    serve.add_argument(
        "--checkpoint-every-s",
        type=float,
        default=600.0,
        help="with --checkpoint-dir: checkpoint each model that sets no policy of its own this "
        "often, once it has moved (default 600)",
    )
    serve.add_argument(
        "--checkpoint-every-versions",
        type=int,
        default=None,
        help="with --checkpoint-dir: also checkpoint such a model after this many updates",
    )
    serve.add_argument(
        "--checkpoint-snapshot",
        choices=["pause", "copy"],
        default="pause",
        help="how a checkpoint holds a model still: pause its pushes while each shard writes "
        "(default; no extra memory), or copy each shard's state first (pushes pause for the "
        "copy only; one more copy of the state in memory while it is written)",
    )
    serve.add_argument(
        "--no-periodic-checkpoints",
        action="store_true",
        help="no periodic checkpoints for models that set no policy (they are then lost if a "
        "shard dies before someone checkpoints them)",
    )


def _edge_options(auth: argparse._ArgumentGroup) -> None:
    auth.add_argument(
        "--tokens-file",
        default=None,
        help="JSON token table (default $OPTSERVE_TOKENS_FILE, or the JSON in $OPTSERVE_TOKENS)",
    )
    auth.add_argument(
        "--no-auth",
        action="store_true",
        help="serve without authentication (anyone who reaches the port may do anything)",
    )
    auth.add_argument(
        "--insecure",
        action="store_true",
        help="allow a non-loopback --host without TLS, or with --no-auth (tokens and weights "
        "cross the network in clear, or anyone may change any model)",
    )
    auth.add_argument("--tls-cert", default=None, help="PEM certificate: serve TLS only")
    auth.add_argument("--tls-key", default=None, help="PEM private key of --tls-cert")
    auth.add_argument(
        "--tls-ca",
        default=None,
        help="PEM CA the shards trust when they call each other (default: --tls-cert itself)",
    )
    defaults = {f.name: f.default for f in dataclasses.fields(EdgeConfig)}
    for name, kind, text in LIMIT_FLAGS:
        auth.add_argument(
            "--" + name.replace("_", "-"),
            type=kind,
            default=defaults[name],
            help=f"{text} (default {defaults[name]:,})",
        )
    auth.add_argument(
        "--max-models", type=int, default=64, help="models the server holds at most (default 64)"
    )
    auth.add_argument(
        "--max-model-bytes",
        type=int,
        default=None,
        help="largest model, as fp32 masters, in bytes (default: the Ray cluster's memory / 6, "
        "room for the weights and the largest optimizer state; at least 1 GiB)",
    )


def _metrics_options(metrics: argparse._ArgumentGroup) -> None:
    metrics.add_argument(
        "--metrics-port",
        type=int,
        default=DEFAULT_METRICS_PORT,
        help=f"Prometheus metrics at http://HOST:PORT/metrics (default {DEFAULT_METRICS_PORT}; "
        "0 = any free port, printed at start)",
    )
    metrics.add_argument(
        "--metrics-host",
        default=None,
        help="interface the metrics bind (default 127.0.0.1, whatever --host is)",
    )
    metrics.add_argument(
        "--metrics-token-file",
        default=None,
        help="file holding a token every scrape must send as 'Authorization: Bearer <token>' "
        "(401 without it); advised with a non-loopback --metrics-host",
    )
    metrics.add_argument("--no-metrics", action="store_true", help="serve no metrics endpoint")
    metrics.add_argument(
        "--no-ray-metrics",
        action="store_true",
        help="do not also record the series in Ray's metrics (by default each node's Ray "
        "metrics agent exports them as ray_optserve_*, with ray[default])",
    )


def run(args: argparse.Namespace) -> int:
    from optserve.server.coordinator.core import Limits, Placement
    from optserve.server.runtime import RayConnectError, connect_ray, init_ray, start_service

    # Every refusal comes before anything starts.
    edge = _edge_config(args)
    metrics_token = _metrics_token(args)
    limits = Limits(max_models=args.max_models, max_model_bytes=args.max_model_bytes)
    policy = _checkpoint_policy(args)
    host = args.host
    _say_if_no_compiler()

    if args.ray_address:
        try:
            connect_ray(args.ray_address)
        except RayConnectError as exc:
            print(f"optserve: {exc}", file=sys.stderr)
            return 1
    else:
        # The embedded Ray stays on 127.0.0.1, so a wildcard bind would advertise that to
        # trainers: bind (and advertise) the machine's own address instead.
        if host in WILDCARD_HOSTS:
            host = machine_address()
            print(f"optserve: the embedded Ray stays on 127.0.0.1; serving on {host} "
                  f"(this machine's address) for --host {args.host}")  # fmt: skip
        init_ray(num_cpus=args.num_cpus)
    import ray

    placement = Placement(cpus=args.shard_cpus, gpus=args.shard_gpus, strategy=args.placement)
    try:
        service = start_service(
            host=host,
            port=args.port,
            default_num_shards=args.shards,
            placement=placement,
            checkpoint_dir=args.checkpoint_dir,
            keep_checkpoints=args.keep_checkpoints,
            edge=edge,
            limits=limits,
            metrics_port=None if args.no_metrics else args.metrics_port,
            metrics_host=args.metrics_host,
            ray_metrics=not args.no_ray_metrics,
            checkpoint_policy=policy,
            metrics_token=metrics_token,
        )
        _announce(service, args, policy)
    except RuntimeError as exc:
        print(f"optserve: {exc}", file=sys.stderr)
        ray.shutdown()
        return 1
    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    if service.metrics_address is not None:
        print(f"optserve: Prometheus metrics on http://{service.metrics_address}/metrics")
    print(f"optserve: serving on {service.address} (Ctrl-C or SIGTERM to stop)", flush=True)
    try:
        if not _watch(service, stop):
            return 1
        print("optserve: shutting down ...", flush=True)
        started = time.perf_counter()
        service.stop(grace_s=args.grace_s)
        print(f"optserve: stopped in {time.perf_counter() - started:.1f}s", flush=True)
    finally:
        ray.shutdown()
    return 0


def _announce(service, args: argparse.Namespace, policy: dict | None) -> None:
    """Say what the server holds and where its checkpoints go; restore with --restore."""
    import ray

    largest = ray.get(service.actor.max_model_bytes.remote(), timeout=60)
    print(f"optserve: models of up to {largest / 2**30:.1f} GiB of fp32 weights "
          f"({largest // 4:,} parameters)" + ("" if args.max_model_bytes else
          ", from the cluster's memory (--max-model-bytes sets it)"))  # fmt: skip
    if args.checkpoint_dir:
        print(f"optserve: checkpoints in {args.checkpoint_dir}; models that set no policy: "
              f"{json.dumps(policy) if policy else 'none periodic'}")  # fmt: skip
    if args.restore:
        if not args.checkpoint_dir:
            raise SystemExit("optserve serve: --restore needs --checkpoint-dir")
        with progress("restoring every model from its newest checkpoint"):
            restored = ray.get(service.actor.restore_all.remote(), timeout=3600)
        print(f"optserve: restored {len(restored)} model(s): {', '.join(restored)}")


def _watch(service, stop: threading.Event) -> bool:
    """Until `stop` is set, check that the coordinator answers (Ray restarts it if its process
    dies); False when it has not answered for COORDINATOR_RESTART_S."""
    import ray

    failing_since = None
    while not stop.wait(timeout=5.0):
        try:
            ray.get(service.actor.address.remote(), timeout=30)
            failing_since = None
        except Exception as exc:  # noqa: BLE001
            failing_since = failing_since or time.monotonic()
            if time.monotonic() - failing_since > COORDINATOR_RESTART_S:
                print(f"optserve: the coordinator died: {exc}", file=sys.stderr, flush=True)
                return False
            print(f"optserve: the coordinator is not answering ({type(exc).__name__}); "
                  "waiting for Ray to restart it", file=sys.stderr, flush=True)  # fmt: skip
    return True


def _say_if_no_compiler() -> None:
    """Once, at start: without a C++ compiler the rules torch has no fused kernel for step in
    eager torch ops (engine/kernels.py), and what that costs; each group's status says so too."""
    from optserve.server.engine.kernels import (
        COMPILE_MIN_ELEMENTS,
        compile_switched_off,
        compiler_problem,
    )

    why = "OPTSERVE_COMPILE=off" if compile_switched_off() else compiler_problem("cpu")
    if why is not None:
        print(f"optserve: WARNING: {why}: on CPU shards, groups of {COMPILE_MIN_ELEMENTS:,}+ "
              f"elements under RMSprop, AdaDelta, AdaBound or SGD's Delayed Nesterov step in eager "
              f"torch ops, {EAGER_COST} than their compiled kernels (bench/engine.py); install "
              "g++ (deploy/Dockerfile does)", file=sys.stderr)  # fmt: skip


def _checkpoint_policy(args: argparse.Namespace) -> dict | None:
    """The periodic-checkpoint policy of models that set none (None: the server's default)."""
    if not args.checkpoint_dir:
        return None
    if args.no_periodic_checkpoints:
        return {"enabled": False}
    policy: dict = {"every_s": args.checkpoint_every_s, "snapshot": args.checkpoint_snapshot}
    if args.checkpoint_every_versions:
        policy["every_versions"] = args.checkpoint_every_versions
    return policy


def _edge_config(args: argparse.Namespace):
    """Tokens, TLS and limits from `serve`'s options and environment."""
    from optserve.server.edge.tokens import TokenTable

    check_token_table(args.tokens_file)
    tokens = TokenTable.from_environment(args.tokens_file)
    if tokens is None and not args.no_auth:
        raise SystemExit(
            "optserve serve: give a token table (--tokens-file FILE, $OPTSERVE_TOKENS_FILE or "
            "$OPTSERVE_TOKENS), or turn authentication off with --no-auth"
        )
    if tokens is not None and args.no_auth:
        raise SystemExit("optserve serve: --no-auth, but a token table was given")

    def read(path: str | None) -> bytes | None:
        if path is None:
            return None
        with open(path, "rb") as f:
            return f.read()

    tls = args.tls_cert is not None or args.tls_key is not None
    for warning in check_exposure(args.host, tls, not args.no_auth, args.insecure):
        print(f"optserve: {warning}", file=sys.stderr)
    try:
        return EdgeConfig(
            tokens=tokens,
            tls_cert=read(args.tls_cert),
            tls_key=read(args.tls_key),
            tls_ca=read(args.tls_ca),
            **{name: getattr(args, name) for name, _, _ in LIMIT_FLAGS},
        )
    except InvalidArgument as exc:
        raise SystemExit(f"optserve serve: {exc}") from None


def _metrics_token(args: argparse.Namespace) -> str | None:
    """The metrics endpoint's bearer token, from --metrics-token-file (never the command line);
    a warning when the metrics leave loopback without one."""
    metrics_host = args.metrics_host or "127.0.0.1"
    if args.metrics_token_file is None:
        if not args.no_metrics and not is_loopback(metrics_host):
            print(f"optserve: WARNING: metrics on {metrics_host} without --metrics-token-file: "
                  "anyone who reaches the port sees every model's name, lr and trainers",
                  file=sys.stderr)  # fmt: skip
        return None
    try:
        with open(args.metrics_token_file, encoding="utf-8") as f:
            token = f.read().strip()
    except OSError as exc:
        raise SystemExit(f"optserve serve: cannot read --metrics-token-file: {exc}") from None
    if len(token) < MIN_TOKEN_CHARS or not token.isprintable() or " " in token:
        raise SystemExit(
            f"optserve serve: the metrics token ({args.metrics_token_file}) needs at least "
            f"{MIN_TOKEN_CHARS} printable characters without spaces"
        )
    if is_placeholder_token(token):
        raise SystemExit(
            f"optserve serve: the metrics token ({args.metrics_token_file}) is a placeholder: "
            "put a random one there, e.g. `python3 -c 'import secrets; "
            "print(secrets.token_urlsafe(32))'`"
        )
    return token
