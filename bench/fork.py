"""Benchmark: forking a live model at 100M+ parameters (issue 19): what the parent's trainer
waits, how long the fork takes, the disk it adds, and the memory of every process meanwhile.

Usage: python bench/fork.py [--numel 100000000] [--dir DIR] [--same-rule]

One Adam model on 2 shards takes pushes from a trainer thread (push_and_pull of one fp32
gradient, as fast as it can) while `fork("now")` copies it under another name with SGD (with
--same-rule: with Adam, the optimizer not swapped). Printed, measured in the same run:

* the trainer's step: median before the fork, and the longest step while the fork ran (the
  parent's pause: a fork takes the parent's checkpoint, so pushes wait as a checkpoint makes
  them), against a checkpoint's own pause measured just before;
* the fork's wall time, and the same model's restore onto 2 new shards (a fork is a restore
  under a new name: the two should match);
* the disk the fork's first checkpoint adds (its files are hard links to the parent's);
* peak RSS of the coordinator and of all shard processes together while the fork runs, against
  the state the two models hold (the fork's shards are new processes: parent + fork = 2x).

Goals: the parent's longest step during the fork within a checkpoint's pause plus one step;
the fork's disk 0 bytes on a local store; the coordinator flat (no tensor bytes through it);
the shards together at most 2x the model's state plus what one checkpoint takes. Sizes the
machine's free memory cannot hold are skipped, saying so.
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import sys
import tempfile
import threading
import time

import psutil
import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from scale import GiB, MiB, Sampler  # noqa: E402

from optserve.server.runtime import keep_ray_on_loopback  # noqa: E402

keep_ray_on_loopback()

# Bytes per parameter at the peak: two models' Adam state (12 each), the checkpoint's pages in
# the cache (12), the trainer's gradient and pulled weights (8).
BYTES_PER_PARAM = 2 * 12 + 12 + 8


def inodes(path: str) -> set[int]:
    return {os.stat(os.path.join(r, n)).st_ino for r, _, files in os.walk(path) for n in files}


def disk_bytes(path: str, leave_out: set[int] | frozenset[int] = frozenset()) -> int:
    """Bytes the files under `path` hold on disk, each inode counted once, but those of
    `leave_out` (files shared, as hard links, with another directory)."""
    seen, total = set(leave_out), 0
    for root, _, files in os.walk(path):
        for name in files:
            st = os.stat(os.path.join(root, name))
            if st.st_ino not in seen:
                seen.add(st.st_ino)
                total += st.st_blocks * 512
    return total


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--numel", type=int, default=100_000_000)
    parser.add_argument("--dir", default=tempfile.gettempdir())
    parser.add_argument("--same-rule", action="store_true", help="fork without a swap")
    args = parser.parse_args()
    need = args.numel * BYTES_PER_PARAM
    free = psutil.virtual_memory().available
    if need > 0.8 * free:
        print(f"skipped: {args.numel:,} parameters need about {need / GiB:.1f} GiB, "
              f"{free / GiB:.1f} GiB are available")  # fmt: skip
        return
    run(args.numel, args.dir, None if args.same_rule else SWAP)


SWAP = {"name": "sgd", "lr": 0.01, "momentum": 0.9}


def run(numel: int, root: str, optimizer: dict | None) -> None:
    from optserve.client import ParameterServerClient
    from optserve.server.runtime import start_service

    state = numel * 12
    print(f"{numel / 1e6:.0f}M parameters, Adam on 2 shards: {state / GiB:.2f} GiB of state")
    directory = tempfile.mkdtemp(dir=root)
    svc = start_service(port=0, checkpoint_dir=directory, checkpoint_policy={"enabled": False},
                        metrics_port=None, ray_metrics=False)  # fmt: skip
    try:
        with ParameterServerClient(svc.address, timeout_s=600) as client:
            client.create_model("parent", {"w": torch.randn(numel)},
                                {"name": "adam", "lr": 1e-3}, num_shards=2)  # fmt: skip
            grads = {"w": torch.randn(numel)}
            steps: list[tuple[float, float]] = []  # (start, seconds)
            stop = threading.Event()

            def trainer() -> None:
                with ParameterServerClient(svc.address, timeout_s=600) as own:
                    while not stop.is_set():
                        started = time.perf_counter()
                        own.push_and_pull("parent", grads, reuse_buffers=True)
                        steps.append((started, time.perf_counter() - started))

            thread = threading.Thread(target=trainer, daemon=True)
            thread.start()
            while len(steps) < 6:
                time.sleep(0.05)
            step_s = statistics.median(s for _, s in steps)
            checkpoint = client.checkpoint("parent")
            before = Sampler()
            before.sample()  # the parent's shard processes, and their RSS before the fork
            parents = {p: v for p, v in before.peaks.items() if before.roles[p] == "shard"}
            with Sampler() as sampler:
                started = time.perf_counter()
                info = client.fork("parent", "fork", optimizer=optimizer)
                fork_s = time.perf_counter() - started
            during = [s for t, s in steps if started - s <= t <= started + fork_s]
            stop.set()
            thread.join()
            shared = inodes(os.path.join(directory, "parent"))
            added = disk_bytes(os.path.join(directory, "fork"), leave_out=shared)
            started = time.perf_counter()
            client.restore("parent", num_shards=2)
            restore_s = time.perf_counter() - started
            coordinator = max((v for p, v in sampler.peaks.items()
                               if sampler.roles[p] == "coordinator"), default=0)  # fmt: skip
            print(f"  trainer's step: median {step_s * 1e3:.0f} ms before; longest during the "
                  f"fork {max(during, default=0) * 1e3:.0f} ms ({len(during)} steps); a "
                  f"checkpoint's pause {checkpoint.pause_s * 1e3:.0f} ms")  # fmt: skip
            print(f"  fork: {fork_s:.1f} s (at version {info.fork_version}); restore of the "
                  f"same model onto 2 new shards: {restore_s:.1f} s")  # fmt: skip
            whole = disk_bytes(os.path.join(directory, "fork"))
            print(f"  disk the fork's first checkpoint adds beside the parent's: {added / MiB:.1f} "
                  f"MiB of its {whole / MiB:.0f} MiB (the rest: hard links)")  # fmt: skip
            grew = max(sampler.peaks[p] - v for p, v in parents.items())
            forks = [v for p, v in sampler.peaks.items()
                     if sampler.roles[p] == "shard" and p not in parents]  # fmt: skip
            print(f"  a parent shard's RSS grew by at most {grew / MiB:.0f} MiB during the fork "
                  f"(its state: {state / 2 / MiB:.0f} MiB); the fork's shards peaked at "
                  + ", ".join(f"{v / MiB:.0f}" for v in forks) + " MiB")  # fmt: skip
            together = sampler.together
            print(f"  peak RSS during the fork: coordinator {coordinator / MiB:.0f} MiB; all "
                  f"shards together {together / GiB:.2f} GiB = {together / state:.2f}x one "
                  "model's state (parent + fork: 2x)")  # fmt: skip
    finally:
        svc.stop()
        shutil.rmtree(directory, ignore_errors=True)


if __name__ == "__main__":
    main()
