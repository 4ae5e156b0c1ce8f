"""`optserve demo`: the whole system on one machine, end to end.

Starts an embedded Ray and the optserve server, runs trainer processes (separate OS processes
that talk gRPC, not Ray tasks) that train an MLP on scikit-learn's digits through one shared
model on the server, relays their progress, then pulls the final weights and reports the
accuracy on the held-out test split.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import threading
import time
from pathlib import Path

from optserve.client.client import ParameterServerClient
from optserve.client.config import parse_optimizer_config
from optserve.client.demo_trainer import accuracy, build_model, load_digits_split

MODEL = "digits-mlp"


def _relay(prefix: str, stream, lines: list[str]) -> None:
    for line in stream:
        lines.append(line)
        print(f"{prefix} {line}", end="", flush=True)


def run(args: argparse.Namespace) -> int:
    from optserve.server.runtime import init_ray, keep_ray_on_loopback, start_service

    keep_ray_on_loopback()  # before `import ray`, which reads it
    import ray

    started = time.perf_counter()
    optimizer = parse_optimizer_config(args.optimizer)
    epochs = args.epochs if args.epochs is not None else (5 if args.short else 20)
    print(f"optserve demo: {args.trainers} trainers, {epochs} epochs, optimizer {args.optimizer}")
    print("starting an embedded Ray and the optserve server ...", flush=True)
    init_ray(log_to_driver=False)
    service = start_service(port=args.port, default_num_shards=args.shards)
    try:
        print(
            f"server ready at {service.address} ({time.perf_counter() - started:.1f}s)", flush=True
        )
        procs, relays = [], []
        for rank in range(args.trainers):
            cmd = [
                sys.executable,
                "-m",
                "optserve.client.demo_trainer",
                "--address",
                service.address,
                "--model",
                MODEL,
                "--rank",
                str(rank),
                "--world-size",
                str(args.trainers),
                "--epochs",
                str(epochs),
                "--optimizer",
                optimizer.model_dump_json(),
                "--seed",
                str(args.seed),
            ]
            proc = subprocess.Popen(
                cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, bufsize=1
            )
            lines: list[str] = []
            relay = threading.Thread(
                target=_relay, args=(f"[trainer {rank}]", proc.stdout, lines), daemon=True
            )
            relay.start()
            procs.append((rank, proc, lines))
            relays.append(relay)
        failed = []
        for rank, proc, _ in procs:
            if proc.wait() != 0:
                failed.append(rank)
        for relay in relays:
            relay.join(timeout=5)
        if failed:
            print(f"optserve demo: trainer(s) {failed} failed", file=sys.stderr)
            return 1

        with ParameterServerClient(service.address) as client:
            weights, version = client.pull(MODEL)
        net = build_model(args.seed)
        net.load_state_dict(weights)
        _, _, x_test, y_test = load_digits_split(args.seed)
        test_accuracy = accuracy(net, x_test, y_test)
        elapsed = time.perf_counter() - started
        print(
            f"final test accuracy: {test_accuracy:.2%} on {len(y_test)} held-out digits "
            f"(model version {version}, {elapsed:.1f}s in all)",
            flush=True,
        )
        if args.report:
            report = {
                "test_accuracy": test_accuracy,
                "version": version,
                "epochs": epochs,
                "trainers": args.trainers,
                "seconds": elapsed,
                "optimizer": json.loads(optimizer.model_dump_json()),
            }
            Path(args.report).write_text(json.dumps(report, indent=2) + "\n")
        return 0
    finally:
        service.stop(grace_s=2.0)
        ray.shutdown()
