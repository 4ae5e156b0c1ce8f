"""The trainer processes of the load test (tests/integration/test_load.py).

Usage: python tests/helpers/load_trainer.py --address A --model M --trainers N --pushes P
       --out-dir DIR [--seed S]

One launcher process imports torch and the client once, then forks N trainer processes (named
t0 .. t{N-1}, trainer k seeded S + k): sixteen interpreters each importing torch cost about 35
CPU-seconds on a two-core machine before the first push, and forked ones share the launcher's.
The fork happens before any gRPC channel exists; each trainer makes its own client.

Each trainer connects and pulls once (so channels and the model's layout are in place) and
then waits for the launcher's go. The launcher prints `ready` once every trainer is ready, then
blocks on a line from stdin: the test releases all the trainers together, so that their pushes
overlap instead of trickling in. Each trainer then makes P `push_and_pull` calls with random
gradients, each on the version its previous call returned, as an asynchronous trainer does. A
failed call is counted, not raised: the test wants every trainer's tally. Trainer k writes its
JSON report to DIR/t{k}.json. The launcher exits 0 once every trainer has exited 0.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
import traceback

import torch

from optserve.client import ParameterServerClient

# About 8k floats (32 KiB in fp32): small, so the run measures the server's per-push overhead
# rather than copying, yet a per-push leak of one gradient slice would show in the RSS bound.
SHAPES = {"w1": (64, 96), "b1": (64,), "w2": (32, 64), "b2": (32,)}
MAX_MESSAGES = 5


def train(args: argparse.Namespace, k: int, ready_fd: int, go_fd: int) -> None:
    """Trainer k, in a forked process: ready, wait for go, push, write the report."""
    name = f"t{k}"
    generator = torch.Generator().manual_seed(args.seed + k)
    with ParameterServerClient(args.address) as client:
        _, version = client.pull(args.model)
        os.write(ready_fd, b"r")
        if os.read(go_fd, 1) != b"g":
            raise SystemExit("the launcher went away before go")
        errors, messages, versions, latencies = 0, [], [], []
        started = time.monotonic()
        for _ in range(args.pushes):
            grads = {n: torch.randn(shape, generator=generator) for n, shape in SHAPES.items()}
            sent = time.monotonic()
            try:
                _, version = client.push_and_pull(args.model, grads, version=version, trainer=name)
                versions.append(version)
            except Exception as exc:  # noqa: BLE001 - every failure counts, none stops the run
                errors += 1
                if len(messages) < MAX_MESSAGES:
                    messages.append(f"{type(exc).__name__}: {exc}"[:500])
            latencies.append((time.monotonic() - sent, sent - started, version))
        seconds = time.monotonic() - started
    report = {
        "trainer": name,
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
    with open(os.path.join(args.out_dir, f"{name}.json"), "w") as out:
        json.dump(report, out)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--address", required=True)
    parser.add_argument("--model", required=True)
    parser.add_argument("--trainers", type=int, required=True)
    parser.add_argument("--pushes", type=int, required=True)
    parser.add_argument("--out-dir", required=True)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()

    torch.set_num_threads(1)  # the trainers share the machine's cores with the server
    ready_r, ready_w = os.pipe()
    go_r, go_w = os.pipe()
    pids = []
    for k in range(args.trainers):
        pid = os.fork()
        if pid == 0:
            os.close(ready_r)
            os.close(go_w)
            code = 0
            try:
                train(args, k, ready_w, go_r)
            except BaseException:  # noqa: BLE001 - reported on stderr, counted by the exit code
                traceback.print_exc()
                os.write(ready_w, b"x")  # the launcher stops waiting for a trainer that died
                code = 1
            # Skip the interpreter's teardown: with torch loaded it costs about a CPU-second,
            # and trainers tearing down while the last ones still push slowed those pushes to
            # 1-2 s each (the server's Ray workers run at niceness 15, the trainers at 0).
            sys.stdout.flush()
            sys.stderr.flush()
            os._exit(code)
        pids.append(pid)
    os.close(ready_w)
    os.close(go_r)
    readies = 0
    while readies < args.trainers:
        got = os.read(ready_r, args.trainers)
        if not got or b"x" in got:
            raise SystemExit(f"a trainer failed; {readies} of {args.trainers} were ready")
        readies += len(got)
    print("ready", flush=True)
    if sys.stdin.readline().strip() != "go":
        raise SystemExit("no go line on stdin")
    os.write(go_w, b"g" * args.trainers)
    failed = []
    for k, pid in enumerate(pids):
        _, status = os.waitpid(pid, 0)
        if os.waitstatus_to_exitcode(status) != 0:
            failed.append(f"t{k}")
    if failed:
        raise SystemExit(f"trainers {failed} failed")


if __name__ == "__main__":
    main()
