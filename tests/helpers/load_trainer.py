"""A trainer process for the load test (tests/integration/test_load.py).

Usage: python tests/helpers/load_trainer.py --address A --model M --trainer NAME --pushes N
       [--seed S]

Connects and pulls once (so channels and the model's layout are in place), prints `ready`,
then blocks on a line from stdin: the test starts all its trainers first and releases them
together, so that their pushes overlap instead of trickling in while the others still import
torch. Then it makes N `push_and_pull` calls with random gradients, each on the version its
previous call returned, as an asynchronous trainer does. A failed call is counted, not raised:
the test wants every trainer's tally. The last stdout line is a JSON report.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

import torch

from optserve.client import ParameterServerClient

# About 8k floats (32 KiB in fp32): small, so the run measures the server's per-push overhead
# rather than copying, yet a per-push leak of one gradient slice would show in the RSS bound.
SHAPES = {"w1": (64, 96), "b1": (64,), "w2": (32, 64), "b2": (32,)}
MAX_MESSAGES = 5


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--address", required=True)
    parser.add_argument("--model", required=True)
    parser.add_argument("--trainer", required=True)
    parser.add_argument("--pushes", type=int, required=True)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()

    torch.set_num_threads(1)  # sixteen of these share the machine's cores with the server
    generator = torch.Generator().manual_seed(args.seed)
    with ParameterServerClient(args.address) as client:
        _, version = client.pull(args.model)
        print("ready", flush=True)
        if sys.stdin.readline().strip() != "go":
            raise SystemExit("no go line on stdin")
        errors, messages, versions, latencies = 0, [], [], []
        started = time.monotonic()
        for _ in range(args.pushes):
            grads = {n: torch.randn(shape, generator=generator) for n, shape in SHAPES.items()}
            sent = time.monotonic()
            try:
                _, version = client.push_and_pull(
                    args.model, grads, version=version, trainer=args.trainer
                )
                versions.append(version)
            except Exception as exc:  # noqa: BLE001 - every failure counts, none stops the run
                errors += 1
                if len(messages) < MAX_MESSAGES:
                    messages.append(f"{type(exc).__name__}: {exc}"[:500])
            latencies.append((time.monotonic() - sent, sent - started, version))
        seconds = time.monotonic() - started
    report = {
        "trainer": args.trainer,
        "ok": len(versions),
        "errors": errors,
        "messages": messages,
        "last_version": versions[-1] if versions else None,
        # One trainer's pushes are applied one after another: its versions must rise.
        "increasing": all(a < b for a, b in zip(versions, versions[1:], strict=False)),
        "seconds": seconds,
        # Seconds per call (for the printed figures; never asserted), and the slowest calls
        # as (seconds, seconds after go, version the call returned).
        "latency_s": {
            "p50": sorted(latencies)[len(latencies) // 2][0] if latencies else None,
            "p99": sorted(latencies)[len(latencies) * 99 // 100][0] if latencies else None,
            "max": max(latencies)[0] if latencies else None,
        },
        "slowest": sorted(latencies, reverse=True)[:5],
    }
    print(json.dumps(report), flush=True)
    # Skip the interpreter's teardown: with torch loaded it costs about a CPU-second, and
    # sixteen trainers tearing down while the last ones still push slowed those pushes to
    # 1-2 s each (the server's Ray workers run at niceness 15, the trainers at 0).
    sys.stderr.flush()
    os._exit(0)


if __name__ == "__main__":
    main()
