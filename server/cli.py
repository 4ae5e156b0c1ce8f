"""The `optserve` command line."""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import os
import signal
import sys
import threading
import time
from collections.abc import Iterator

EXAMPLES_SERVE = """examples:
  optserve serve --tokens-file tokens.json    # embedded local Ray, gRPC on 127.0.0.1:50051
  optserve serve --no-auth --port 6000 --shards 2          # no tokens: loopback experiments
  optserve serve --ray-address auto --host 0.0.0.0 --shards 4 \\
      --tokens-file /etc/optserve/tokens.json \\
      --tls-cert server.pem --tls-key server-key.pem           # on a Ray cluster's head node

tokens.json:
  {"tokens": [{"name": "ops", "role": "admin", "token": "<32+ random characters>"},
              {"name": "trainers", "role": "trainer", "sha256": "<hex digest of a token>",
               "models": ["resnet-*"]}]}
The table may also come from $OPTSERVE_TOKENS_FILE or $OPTSERVE_TOKENS (never the command line).
"""
EXAMPLES_DEMO = """examples:
  optserve demo                       # two trainers on digits, about 20 seconds
  optserve demo --short               # fewer epochs, for a quick check
  optserve demo --optimizer '{"name": "sgd", "lr": 0.05, "momentum": 0.9}'
"""


# The Prometheus endpoint's default port (the one OpenTelemetry's Prometheus exporter uses).
DEFAULT_METRICS_PORT = 9464
# Where the client commands find the coordinator.
ADDRESS_ENV = "OPTSERVE_ADDRESS"
DEFAULT_ADDRESS = "127.0.0.1:50051"
# How long `serve` waits for Ray to restart a dead coordinator before giving up.
COORDINATOR_RESTART_S = 120.0


def _edge_config(args: argparse.Namespace):
    """Tokens, TLS and limits from `serve`'s options and environment."""
    from optserve.server.auth import EdgeConfig, TokenTable
    from optserve.server.runtime import LOOPBACK_HOSTS

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

    if args.no_auth and args.host not in LOOPBACK_HOSTS:
        print(f"optserve: WARNING: serving on {args.host} without authentication: anyone who "
              "can reach the port can change or drop models", file=sys.stderr)  # fmt: skip
    return EdgeConfig(
        tokens=tokens,
        tls_cert=read(args.tls_cert),
        tls_key=read(args.tls_key),
        tls_ca=read(args.tls_ca),
        max_streams_per_client=args.max_streams_per_client,
    )


def _serve(args: argparse.Namespace) -> int:
    from optserve.server.coordinator import Limits, Placement
    from optserve.server.runtime import LOOPBACK_HOSTS, connect_ray, init_ray, start_service

    edge = _edge_config(args)
    limits = Limits(max_models=args.max_models, max_model_bytes=args.max_model_bytes)
    policy = _checkpoint_policy(args)

    if args.ray_address:
        connect_ray(args.ray_address)
    else:
        init_ray(loopback=args.host in LOOPBACK_HOSTS, num_cpus=args.num_cpus)
    import ray

    placement = Placement(cpus=args.shard_cpus, gpus=args.shard_gpus, strategy=args.placement)
    try:
        service = start_service(
            host=args.host,
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
        )
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
            with _progress("restoring every model from its newest checkpoint"):
                restored = ray.get(service.actor.restore_all.remote(), timeout=3600)
            print(f"optserve: restored {len(restored)} model(s): {', '.join(restored)}")
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
        failing_since = None
        while not stop.wait(timeout=5.0):
            try:  # the coordinator must stay alive (Ray restarts it if its process dies)
                ray.get(service.actor.address.remote(), timeout=30)
                failing_since = None
            except Exception as exc:  # noqa: BLE001
                failing_since = failing_since or time.monotonic()
                if time.monotonic() - failing_since > COORDINATOR_RESTART_S:
                    print(f"optserve: the coordinator died: {exc}", file=sys.stderr, flush=True)
                    return 1
                print(f"optserve: the coordinator is not answering ({type(exc).__name__}); "
                      "waiting for Ray to restart it", file=sys.stderr, flush=True)  # fmt: skip
        print("optserve: shutting down ...", flush=True)
        started = time.perf_counter()
        service.stop(grace_s=args.grace_s)
        print(f"optserve: stopped in {time.perf_counter() - started:.1f}s", flush=True)
    finally:
        ray.shutdown()
    return 0


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


def _client(args: argparse.Namespace):
    from optserve.client import ParameterServerClient

    token = None
    if args.token_file:
        with open(args.token_file, encoding="utf-8") as f:
            token = f.read()
    return ParameterServerClient(
        args.address,
        timeout_s=args.timeout_s,
        token=token,
        tls_ca=args.tls_ca,
        tls_server_name=args.tls_server_name,
    )


@contextlib.contextmanager
def _progress(description: str) -> Iterator[None]:
    """A progress line with the elapsed time while a long call runs (on a terminal only: tqdm
    turns itself off when stderr is not one)."""
    from tqdm import tqdm

    done = threading.Event()
    bar = tqdm(desc=description, total=None, bar_format="{desc}: {elapsed}", disable=None,
               leave=False)  # fmt: skip

    def tick() -> None:
        while not done.wait(0.5):
            bar.refresh()

    ticker = threading.Thread(target=tick, daemon=True)
    ticker.start()
    try:
        yield
    finally:
        done.set()
        ticker.join()
        bar.close()


def _print_json(value: object) -> None:
    print(json.dumps(value, indent=2, default=str))


def _table(headers: list[str], rows: list[list[str]]) -> str:
    """Rows as aligned columns under a header line."""
    widths = [max(len(str(c)) for c in column) for column in zip(headers, *rows, strict=True)]
    lines = [headers, ["-" * w for w in widths], *rows]
    return "\n".join(
        "  ".join(str(c).ljust(w) for c, w in zip(line, widths, strict=True)).rstrip()
        for line in lines
    )


def _rule(optimizer: dict) -> str:
    extra = " + lookahead" if optimizer.get("lookahead") else ""
    return f"{optimizer.get('name', '?')}{extra}"


def _ago(seconds: float) -> str:
    seconds = max(0.0, seconds)
    if seconds < 120:
        return f"{seconds:.0f}s ago"
    if seconds < 7200:
        return f"{seconds / 60:.0f}m ago"
    return f"{seconds / 3600:.1f}h ago"


def _active_trainers(status: dict) -> int:
    from optserve.server.metrics import TRAINER_WINDOW_S

    return sum(1 for t in status.get("trainers", {}).values() if t["idle_s"] <= TRAINER_WINDOW_S)


def _status(args: argparse.Namespace) -> int:
    from optserve.client.errors import OptserveError

    with _client(args) as client:
        if args.model is None:
            statuses, errors = [], {}
            for model in client.list_models():
                try:
                    statuses.append(client.status(model))
                except OptserveError as exc:  # one model down must not hide the others
                    errors[model] = f"{exc.code.name}: {exc}"
        else:
            statuses, errors = [client.status(args.model)], {}
    if args.json:
        _print_json(statuses[0] if args.model else {"models": statuses, "errors": errors})
        return 2 if errors else 0
    if args.model is None:
        if not statuses and not errors:
            print("no models (create one with ParameterServerClient.create_model or by "
                  "starting a RemoteOptimizer)")  # fmt: skip
            return 0
        rows = [
            [
                s["model"], f"{s['version']:,}", _rule(s["optimizer"]),
                ", ".join(f"{g['lr']:.4g}" for g in s["groups"].values()),
                s["schedule"].get("name", "constant"), s["mode"]["mode"],
                _shards_cell(s), f"{_active_trainers(s)}/{len(s.get('trainers', {}))}",
                _checkpoint_cell(s["checkpoint"]), f"{s['checkpoint']['updates_at_risk']:,}",
            ]
            for s in statuses
        ]  # fmt: skip
        rows += [[name, *["-"] * 9] for name in errors]
        headers = ["MODEL", "VERSION", "RULE", "LR", "SCHEDULE", "MODE", "SHARDS", "TRAINERS",
                   "CHECKPOINT", "AT RISK"]  # fmt: skip
        print(_table(headers, rows))
        for name, error in errors.items():
            print(f"optserve: {name}: {error}", file=sys.stderr)
        return 2 if errors else 0
    _print_model(statuses[0])
    return 0


def _shards_cell(status: dict) -> str:
    """How many shards on which device, and which are broken or still loading."""
    cell = f"{len(status['shards'])} on {status['device']}"
    broken = [str(s["index"]) for s in status["shards"] if s.get("broken")]
    if broken:
        cell += f" (broken: {','.join(broken)})"
    elif status.get("initializing"):
        cell += " (loading)"
    return cell


def _checkpoint_cell(checkpoint: dict) -> str:
    """When the model was last checkpointed (and, without periodic ones, that it is not)."""
    last = "never" if checkpoint["age_s"] is None else _ago(checkpoint["age_s"])
    return last if checkpoint["periodic"] else f"{last}, not periodic"


def _print_model(status: dict) -> None:
    gradients = status["mode"].get("gradients", {})
    print(f"model     {status['model']}")
    print(f"version   {status['version']:,}")
    print(f"optimizer {json.dumps(status['optimizer'])}")
    print(
        f"schedule  {json.dumps(status['schedule'])}  state {json.dumps(status['schedule_state'])}"
    )
    print(f"mode      {json.dumps({k: v for k, v in status['mode'].items() if k != 'gradients'})}")
    print(f"gradients {json.dumps(gradients)}  counters "
          f"{json.dumps(status.get('gradient_counters', {}))}")  # fmt: skip
    checkpoint = status["checkpoint"]
    last = ("none yet" if checkpoint["last_version"] is None else
            f"version {checkpoint['last_version']:,}, {_ago(checkpoint['age_s'])}")  # fmt: skip
    print(f"checkpoint last {last}; policy {json.dumps(checkpoint['policy'])}; a lost shard "
          f"now costs {checkpoint['updates_at_risk']:,} update(s)")  # fmt: skip
    print()
    print(_table(
        ["GROUP", "PARAMS", "LR", "STATE", "OVERRIDES"],
        [[name, f"{g['numel']:,}", f"{g['lr']:.6g}", json.dumps(g["state"]),
          json.dumps(g["overrides"])] for name, g in status["groups"].items()],
    ))  # fmt: skip
    print()
    print(_table(
        ["SHARD", "ADDRESS", "DEVICE", "VERSION", "STATE", "RULES"],
        [[str(s["index"]), s["address"], s["device"], f"{s['version']:,}",
          f"broken: {s['broken']}" if s.get("broken") else
          ("ok" if s.get("ready", True) else "loading"),
          ", ".join(f"{g}: {i['rule']} ({i['path']})" for g, i in s["groups"].items())]
         for s in status["shards"]],
    ))  # fmt: skip
    trainers = status.get("trainers", {})
    if trainers:
        print()
        print(_table(
            ["TRAINER", "PUSHES", "APPLIED", "REFUSED", "ON VERSION", "STALENESS", "LAST PUSH",
             "PEER"],
            [[name, f"{t['pushes']:,}", f"{t['applied']:,}", f"{t['refused']:,}",
              f"{t['version']:,}", str(t["staleness"]), _ago(t["idle_s"]), t["peer"]]
             for name, t in trainers.items()],
        ))  # fmt: skip
    if status["metrics"]:
        print()
        print(_table(
            ["METRIC", "VALUE", "STEP", "VERSION", "LR CHANGED"],
            [[m["name"], f"{m['value']:.6g}", "-" if m["step"] is None else str(m["step"]),
              f"{m['version']:,}", "yes" if m["lr_changed"] else ""]
             for m in status["metrics"][-10:]],
        ))  # fmt: skip
    if status["audit"]:
        print()
        print(_table(
            ["WHEN", "VERSION", "ACTION", "BY", "CHANGE"],
            [[time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(e["time"])),
              f"{e['version']:,}", e["action"], e["caller"] or "-",
              f"{json.dumps(e['old'])} -> {json.dumps(e['new'])}"] for e in status["audit"][-10:]],
        ))  # fmt: skip


def _plot(args: argparse.Namespace) -> int:
    from optserve.client.plot import plot_run

    with _client(args) as client:
        status = client.status(args.model, history=args.history)
    out = args.out or f"{args.model}.png"
    summary = plot_run(status, out)
    drawn = [*summary["training"], *summary["validation"]]
    marked = len(summary["markers"])
    print(f"wrote {out}: {', '.join(drawn) or 'no metrics yet'}, lr and version over "
          f"{summary['x']}s; {marked} optimizer/schedule change(s) marked")  # fmt: skip
    history = status.get("history", {})
    if history.get("metrics_shown", 0) < history.get("metrics_kept", 0):
        print(f"(the newest {history['metrics_shown']:,} of {history['metrics_kept']:,} "
              "metrics the server keeps)")  # fmt: skip
    return 0


def _set_optimizer(args: argparse.Namespace) -> int:
    with _client(args) as client:
        if args.config is not None:
            report = client.set_optimizer(args.model, args.config, args.policy)
        else:
            changes = dict(_key_value(item) for item in args.set)
            if not changes:
                raise SystemExit("optserve set-optimizer: give a config JSON or --set KEY=VALUE")
            report = client.set_hyperparameters(args.model, **changes)
    if args.json:
        _print_json(report)
        return 0
    print(f"optimizer of {args.model} is now {json.dumps(report['optimizer'])}, "
          f"from version {report['version']} on, on {report['shards']} shard(s)")  # fmt: skip
    for group, migration in report["groups"].items():
        print(f"  group {group}: {migration['source']} -> {migration['target']} "
              f"({migration['policy']})")  # fmt: skip
        for key, entry in migration["keys"].items():
            print(f"    {key}: {entry['action']} ({entry['why']})")
    return 0


def _key_value(item: str) -> tuple[str, object]:
    key, sep, value = item.partition("=")
    if not sep or not key:
        raise SystemExit(f"optserve: --set wants KEY=VALUE, got {item!r}")
    try:
        return key, json.loads(value)
    except json.JSONDecodeError:
        return key, value


def _checkpoint(args: argparse.Namespace) -> int:
    with _client(args) as client:
        if args.list:
            for entry in client.list_checkpoints(args.model):
                stamp = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(entry["time"]))
                print(f"{entry['name']}  version {entry['version']}  {stamp}")
            return 0
        with _progress(f"checkpointing {args.model}"):
            done = client.checkpoint(args.model, snapshot=args.snapshot)
    print(f"checkpoint {done['name']} of {args.model} at version {done['version']} "
          f"in {done['uri']}: {done['bytes'] / 1e6:,.1f} MB in {done['seconds']:.1f}s "
          f"(pushes held {done['pause_s']:.2f}s)")  # fmt: skip
    return 0


def _restore(args: argparse.Namespace) -> int:
    with _client(args) as client, _progress(f"restoring {args.model}"):
        info = client.restore(args.model, args.checkpoint, num_shards=args.shards)
    print(f"restored {args.model} at version {info.version} on {len(info.shards)} shard(s)")
    return 0


def _set_schedule(args: argparse.Namespace) -> int:
    with _client(args) as client:
        version = client.set_schedule(args.model, args.config)
    print(f"schedule of {args.model} is now {args.config}, from version {version} on")
    return 0


def _demo(args: argparse.Namespace) -> int:
    from optserve.server.demo import run

    return run(args)


def _positive(text: str) -> int:
    value = int(text)
    if not 1 <= value <= 1_000_000:
        raise argparse.ArgumentTypeError(f"must be between 1 and 1000000, got {value}")
    return value


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="optserve",
        description="optserve: an optimizer-as-a-server parameter server on Ray.",
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    serve = sub.add_parser(
        "serve",
        help="run the server (embedded local Ray, or --ray-address to join a cluster)",
        description="Start the optserve server on an embedded local Ray, or on an existing Ray "
        "cluster with --ray-address; stop on Ctrl-C/SIGTERM.",
        epilog=EXAMPLES_SERVE,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
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
    auth = serve.add_argument_group("authentication, TLS and limits")
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
    auth.add_argument("--tls-cert", default=None, help="PEM certificate: serve TLS only")
    auth.add_argument("--tls-key", default=None, help="PEM private key of --tls-cert")
    auth.add_argument(
        "--tls-ca",
        default=None,
        help="PEM CA the shards trust when they call each other (default: --tls-cert itself)",
    )
    auth.add_argument(
        "--max-streams-per-client",
        type=int,
        default=64,
        help="calls one client connection may have in flight per endpoint (default 64)",
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
    metrics = serve.add_argument_group("metrics")
    metrics.add_argument(
        "--metrics-port",
        type=int,
        default=DEFAULT_METRICS_PORT,
        help=f"Prometheus metrics at http://HOST:PORT/metrics (default {DEFAULT_METRICS_PORT}; "
        "0 = any free port, printed at start)",
    )
    metrics.add_argument(
        "--metrics-host", default=None, help="interface the metrics bind (default: --host)"
    )
    metrics.add_argument("--no-metrics", action="store_true", help="serve no metrics endpoint")
    metrics.add_argument(
        "--no-ray-metrics",
        action="store_true",
        help="do not also record the series in Ray's metrics (by default each node's Ray "
        "metrics agent exports them as ray_optserve_*, with ray[default])",
    )
    serve.add_argument(
        "--grace-s",
        type=float,
        default=5.0,
        help="seconds in-flight calls get to finish on shutdown",
    )
    serve.set_defaults(func=_serve)

    demo = sub.add_parser(
        "demo",
        help="train a small network from two trainer processes, end to end",
        description="Start everything locally and train an MLP on scikit-learn's digits from "
        "trainer processes that push gradients over gRPC; print the final test accuracy.",
        epilog=EXAMPLES_DEMO,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    demo.add_argument("--short", action="store_true", help="fewer epochs (a quick check)")
    demo.add_argument("--epochs", type=int, default=None, help="epochs per trainer")
    demo.add_argument("--trainers", type=int, default=2, help="number of trainer processes")
    demo.add_argument("--shards", type=int, default=1, help="shards for the demo model")
    demo.add_argument("--port", type=int, default=0, help="coordinator port (default: any free)")
    demo.add_argument(
        "--optimizer", default='{"name": "adam", "lr": 0.005}', help="optimizer config as JSON"
    )
    demo.add_argument(
        "--swap-to",
        default='{"name": "sgd", "lr": 0.05, "momentum": 0.9}',
        help="optimizer config JSON to swap to mid-run (migrating the state); '' to not swap",
    )
    demo.add_argument(
        "--swap-at", type=float, default=0.5, help="fraction of the run at which to swap"
    )
    demo.add_argument("--seed", type=int, default=0)
    demo.add_argument(
        "--out-dir",
        default="optserve-demo",
        help="where the checkpoint and the plot go (default ./optserve-demo)",
    )
    demo.add_argument("--report", default=None, help="write a JSON summary to this file")
    demo.set_defaults(func=_demo)

    def control(
        name: str, help: str, description: str, epilog: str, model_required: bool = True
    ) -> argparse.ArgumentParser:
        command = sub.add_parser(
            name, help=help, description=description, epilog=epilog,
            formatter_class=argparse.RawDescriptionHelpFormatter,
        )  # fmt: skip
        command.add_argument(
            "--address",
            default=os.environ.get(ADDRESS_ENV, DEFAULT_ADDRESS),
            help=f"coordinator host:port (default ${ADDRESS_ENV}, else {DEFAULT_ADDRESS})",
        )
        command.add_argument(
            "--model",
            required=model_required,
            help="model name" if model_required else "model name (default: every model)",
        )
        command.add_argument("--timeout-s", type=float, default=120.0, help="RPC deadline")
        command.add_argument(
            "--token-file",
            default=None,
            help="file holding the token (default $OPTSERVE_TOKEN or $OPTSERVE_TOKEN_FILE)",
        )
        command.add_argument(
            "--tls-ca", default=None, help="PEM CA file: use TLS (default $OPTSERVE_TLS_CA)"
        )
        command.add_argument(
            "--tls-server-name",
            default=None,
            help="name the server certificate must carry, if not the address's host",
        )
        return command

    status = control(
        "status",
        "show every model as a table, or one model's run in detail",
        "Without --model: one line per model (version, rule, lr, schedule, mode, shards, "
        "trainers active in the last 5 minutes / seen). With --model: that model's optimizer, "
        "schedule, gradient policy, groups, shards, trainers, recent metrics and audit log.",
        "examples:\n  optserve status\n  optserve status --model my-net\n"
        "  optserve status --model my-net --json | jq .trainers\n"
        "  OPTSERVE_ADDRESS=head:50051 optserve status --token-file ~/.optserve-token\n",
        model_required=False,
    )
    status.add_argument("--json", action="store_true", help="print the raw JSON")
    status.set_defaults(func=_status)

    plot = control(
        "plot",
        "write a PNG of a model's loss, validation metric, lr and version over steps",
        "Draw the metrics trainers reported (report_metric), the learning rate of each group "
        "and the model version over the trainers' steps, with a dashed red line where the "
        "optimizer or the schedule changed or the model was restored. Needs matplotlib "
        "(pip install 'optserve[plot]').",
        "examples:\n  optserve plot --model my-net                  # writes my-net.png\n"
        "  optserve plot --model my-net --out run.png --history 1000\n",
    )
    plot.add_argument("--out", default=None, help="PNG file to write (default MODEL.png)")
    plot.add_argument(
        "--history", type=_positive, default=10_000,
        help="newest metrics and audit entries to draw (default 10000: all the server keeps)",
    )  # fmt: skip
    plot.set_defaults(func=_plot)

    set_optimizer = control(
        "set-optimizer",
        "swap a model's optimizer, or change some hyperparameters, mid-run",
        "Swap the optimizer of a running model (state carried over by the optimizer spec's "
        "migration rules, or reset), or change some hyperparameters with --set; the change "
        "takes effect at one version on every shard.",
        "examples:\n"
        '  optserve set-optimizer --model my-net \'{"name": "sgd", "lr": 0.05, '
        '"momentum": 0.9}\'\n'
        '  optserve set-optimizer --model my-net \'{"name": "ranger"}\' --policy reset\n'
        "  optserve set-optimizer --model my-net --set lr=0.0003 --set betas='[0.9, 0.99]'\n",
    )
    set_optimizer.add_argument("config", nargs="?", default=None, help="optimizer config JSON")
    set_optimizer.add_argument("--policy", default="migrate", choices=["migrate", "reset"])
    set_optimizer.add_argument(
        "--set", action="append", default=[], metavar="KEY=VALUE",
        help="change one hyperparameter of the current rule (VALUE as JSON); repeatable",
    )  # fmt: skip
    set_optimizer.add_argument("--json", action="store_true", help="print the raw report")
    set_optimizer.set_defaults(func=_set_optimizer)

    set_schedule = control(
        "set-schedule",
        "replace a model's learning-rate schedule mid-run",
        "Replace the learning-rate schedule of a running model, at one version on every shard.",
        "examples:\n"
        '  optserve set-schedule --model my-net \'{"name": "cosine", "T_max": 1000}\'\n'
        '  optserve set-schedule --model my-net \'{"name": "plateau"}\'\n',
    )
    set_schedule.add_argument("config", help="schedule config JSON")
    set_schedule.set_defaults(func=_set_schedule)

    checkpoint = control(
        "checkpoint",
        "write a consistent checkpoint of a model now, or list its checkpoints",
        "Snapshot every shard of a model at one version (weights, all optimizer state, "
        "configs, schedule state, audit log) under the server's --checkpoint-dir.",
        "examples:\n  optserve checkpoint --model my-net\n"
        "  optserve checkpoint --model my-net --list\n",
    )
    checkpoint.add_argument("--list", action="store_true", help="list the model's checkpoints")
    checkpoint.add_argument(
        "--snapshot",
        choices=["pause", "copy"],
        default=None,
        help="pause the model's pushes while the shards write (no extra memory), or copy "
        "each shard's state first (default: the model's policy)",
    )
    checkpoint.set_defaults(func=_checkpoint)

    restore = control(
        "restore",
        "bring a model back from a checkpoint, on any number of shards",
        "Restore a model from its newest checkpoint (or --checkpoint NAME), replacing the "
        "running model of that name once the checkpoint is verified and loaded.",
        "examples:\n  optserve restore --model my-net\n"
        "  optserve restore --model my-net --checkpoint 000000001200-1764000000000 --shards 4\n",
    )
    restore.add_argument("--checkpoint", default=None, help="checkpoint name (default: newest)")
    restore.add_argument("--shards", type=int, default=0, help="shards (default: as now)")
    restore.set_defaults(func=_restore)
    return parser


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    args = build_parser().parse_args(argv)
    try:
        return int(args.func(args))
    except KeyboardInterrupt:
        return 130
    except Exception as exc:  # noqa: BLE001 - a CLI reports, it does not dump a traceback
        from optserve.client.errors import OptserveError

        if isinstance(exc, OptserveError):
            print(f"optserve: {exc.code.name}: {exc}", file=sys.stderr)
            return 2
        if isinstance(exc, OSError | RuntimeError):  # a file, a missing extra, ...
            print(f"optserve: {exc}", file=sys.stderr)
            return 1
        raise


if __name__ == "__main__":
    sys.exit(main())
