"""The `optserve` command line."""

from __future__ import annotations

import argparse
import logging
import signal
import sys
import threading
import time

EXAMPLES_SERVE = """examples:
  optserve serve                      # embedded local Ray, gRPC on 127.0.0.1:50051
  optserve serve --port 6000 --shards 2
  optserve serve --ray-address auto --host 0.0.0.0 --shards 4   # on a Ray cluster's head node
"""
EXAMPLES_DEMO = """examples:
  optserve demo                       # two trainers on digits, about 20 seconds
  optserve demo --short               # fewer epochs, for a quick check
  optserve demo --optimizer '{"name": "sgd", "lr": 0.05, "momentum": 0.9}'
"""


def _serve(args: argparse.Namespace) -> int:
    from optserve.server.coordinator import Placement
    from optserve.server.runtime import LOOPBACK_HOSTS, connect_ray, init_ray, start_service

    if args.ray_address:
        connect_ray(args.ray_address)
    else:
        init_ray(loopback=args.host in LOOPBACK_HOSTS, num_cpus=args.num_cpus)
    import ray

    placement = Placement(cpus=args.shard_cpus, gpus=args.shard_gpus, strategy=args.placement)
    try:
        service = start_service(
            host=args.host, port=args.port, default_num_shards=args.shards, placement=placement
        )
    except RuntimeError as exc:
        print(f"optserve: {exc}", file=sys.stderr)
        ray.shutdown()
        return 1
    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    print(f"optserve: serving on {service.address} (Ctrl-C or SIGTERM to stop)", flush=True)
    try:
        while not stop.wait(timeout=5.0):
            try:  # the coordinator must stay alive; exit loudly if it is gone
                ray.get(service.actor.address.remote(), timeout=30)
            except Exception as exc:  # noqa: BLE001
                print(f"optserve: the coordinator died: {exc}", file=sys.stderr, flush=True)
                return 1
        print("optserve: shutting down ...", flush=True)
        started = time.perf_counter()
        service.stop(grace_s=args.grace_s)
        print(f"optserve: stopped in {time.perf_counter() - started:.1f}s", flush=True)
    finally:
        ray.shutdown()
    return 0


def _demo(args: argparse.Namespace) -> int:
    from optserve.server.demo import run

    return run(args)


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
    demo.add_argument("--seed", type=int, default=0)
    demo.add_argument("--report", default=None, help="write a JSON summary to this file")
    demo.set_defaults(func=_demo)
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
        raise


if __name__ == "__main__":
    sys.exit(main())
