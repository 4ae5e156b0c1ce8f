"""Benchmark: a well-behaved trainer's step time while a hostile client attacks its model.

Usage: python bench/hostile.py [--numel 4000000] [--steps 20] [--settle 1.0]

One server with authentication on loopback; model "shared" (Adam, --numel fp32 parameters, 2
shards). Trainer "alice" (her own trainer token) takes steps: push her gradient and pull the
new weights (PushPull). Attacker "mallory" holds another trainer token that covers the same
model, and runs each attack of bench/attacks.py in a process of its own: a pull flood (streams
never read), slow-loris pushes (streams that never end), 2 MiB push ids and trainer names,
pushes under alice's name, a ReportMetric storm with a fresh metric name per call, and
gradients of 3e38 (finite, squares overflow). Then a full disk: another model, checkpointed
every second onto a 1 MiB tmpfs (root only; else a path a file blocks), fails every checkpoint.

Printed per attack: alice's median step time and its ratio to the median of the no-attack
phases (measured before and after), what the server answered the attacker, and the peak RSS
of the largest shard process while the attack ran. The first row is a control, no attack: a
second, honest trainer pushing as fast as it can (what any busy tenant of the same cores
costs alice). Goal (issue 17): every ratio at most 2x, and shard memory bounded.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time

import psutil
import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from attacks import ATTACKS, Target  # noqa: E402
from scale import GiB, MiB, Sampler  # noqa: E402

ALICE, MALLORY, ADMIN = (
    "alice-token-0123456789abcdef",
    "mallory-token-0123456789abcd",
    ("admin-token-0123456789abcdefgh"),
)


def _attacker(name: str, target: Target, stop, results) -> None:
    """In the attacker's process: run one attack until `stop` (a multiprocessing Event)."""
    local = threading.Event()
    threading.Thread(target=lambda: (stop.wait(), local.set()), daemon=True).start()
    try:
        results.put(dict(ATTACKS[name](target, local, None)))
    except Exception as exc:  # noqa: BLE001 - reported, not raised, in the bench's table
        results.put({"attack failed": f"{type(exc).__name__}: {exc}"[:200]})


def steps(client, model: str, grad: dict[str, torch.Tensor], n: int) -> list[float]:
    times = []
    for _ in range(n):
        started = time.perf_counter()
        client.push_and_pull(model, grad)
        times.append(time.perf_counter() - started)
    return times


def _tmpfs(path: str) -> str:
    """A 1 MiB tmpfs at `path` (root), else a file where `path`'s directory should be."""
    os.makedirs(path, exist_ok=True)
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", path],
                          capture_output=True, check=False)  # fmt: skip
    if done.returncode == 0:
        return "a 1 MiB tmpfs"
    os.rmdir(path)
    with open(path, "w") as f:
        f.write("not a directory")
    return "a path a file blocks (no tmpfs without root)"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--numel", type=int, default=4_000_000)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--settle", type=float, default=1.0, help="s an attack runs first")
    args = parser.parse_args()
    need = args.numel * 4 * 12  # two shards' Adam state, pull snapshots, alice's buffers
    if need > 0.5 * psutil.virtual_memory().available:
        print(f"skipped: needs about {need / GiB:.1f} GiB")
        return 0
    os.environ["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = "0"
    import ray

    from optserve.client import ParameterServerClient
    from optserve.server.edge.tokens import EdgeConfig, TokenTable
    from optserve.server.runtime import init_ray, start_service

    entries = [("admin", "admin", ADMIN), ("alice", "trainer", ALICE),
               ("mallory", "trainer", MALLORY)]  # fmt: skip
    table = TokenTable.parse(json.dumps(
        {"tokens": [{"name": n, "role": r, "token": t} for n, r, t in entries]}
    ))  # fmt: skip
    directory = tempfile.mkdtemp()
    init_ray()
    svc = start_service(port=0, edge=EdgeConfig(tokens=table), checkpoint_dir=directory,
                        checkpoint_policy={"enabled": False}, metrics_port=None,
                        ray_metrics=False)  # fmt: skip
    admin = ParameterServerClient(svc.address, token=ADMIN)
    admin.create_model("shared", {"w": torch.zeros(args.numel)}, {"name": "adam", "lr": 1e-3},
                       num_shards=2)  # fmt: skip
    alice = ParameterServerClient(svc.address, token=ALICE, timeout_s=120)
    grad = {"w": torch.full((args.numel,), 1e-3)}
    steps(alice, "shared", grad, 10)  # warm
    rows: list[tuple[str, float, str, int]] = []
    baseline: list[float] = []
    context = multiprocessing.get_context("spawn")

    def measured(label: str, answers: str = "") -> None:
        sampler = Sampler()
        with sampler:
            median = statistics.median(steps(alice, "shared", grad, args.steps))
        shard = max((p for pid, p in sampler.peaks.items() if sampler.roles[pid] == "shard"),
                    default=0)  # fmt: skip
        rows.append((label, median, answers, shard))

    try:
        measured("no attack")
        target = Target(svc.address, "shared", token=MALLORY, trainer="alice")
        for name in ATTACKS:
            stop, results, started = context.Event(), context.Queue(), context.Event()
            target.started = started
            proc = context.Process(target=_attacker, args=(name, target, stop, results))
            proc.start()
            started.wait(timeout=120)
            time.sleep(args.settle)  # the attack is under way
            measured(name)
            stop.set()
            answers = results.get(timeout=120)
            proc.join(timeout=30)
            if proc.is_alive():
                proc.kill()
            answers.pop("attempts", None)
            label, median, _, shard = rows[-1]
            rows[-1] = (label, median, ", ".join(f"{k} {v}" for k, v in answers.items()), shard)
        disk = os.path.join(directory, "tenant-b")
        how = _tmpfs(disk)
        # Another tenant trains a model checkpointed every second onto the full disk.
        numel_b = max(1 << 18, args.numel // 4)  # more than 1 MiB of fp32
        admin.create_model("tenant-b", {"w": torch.zeros(numel_b)}, {"name": "adam"},
                           checkpoint={"enabled": True, "every_s": 1})  # fmt: skip
        stop_b = threading.Event()
        grad_b = {"w": torch.full((numel_b,), 1e-3)}

        def train_b() -> None:
            while not stop_b.wait(0.05):
                admin.push("tenant-b", grad_b)

        tenant_b = threading.Thread(target=train_b)
        tenant_b.start()
        time.sleep(args.settle + 2)
        measured("full disk", f"tenant-b's checkpoints onto {how}")
        stop_b.set()
        tenant_b.join()
        state = admin.status("tenant-b")["checkpoint"]
        failure = state.get("last_failure") or {}
        rows[-1] = (*rows[-1][:2], f"{rows[-1][2]}: {state['failures_in_a_row']} failure(s) in a "
                    f"row, last {failure.get('reason')}", rows[-1][3])  # fmt: skip
        measured("no attack (after)")
    finally:
        admin.close()
        alice.close()
        svc.stop(grace_s=1.0)
        ray.shutdown()
        subprocess.run(["umount", os.path.join(directory, "tenant-b")], capture_output=True,
                       check=False)  # fmt: skip
        shutil.rmtree(directory, ignore_errors=True)
    baseline = [median for label, median, _, _ in rows if label.startswith("no attack")]
    base = statistics.mean(baseline)
    print(f"== alice's step (PushPull of {args.numel / 1e6:.0f}M fp32, Adam on 2 shards) while "
          "mallory attacks ==")  # fmt: skip
    print(f"  {'attack'.ljust(26)} {'step':>8} {'ratio':>6} {'shard RSS':>10}  server's answers")
    for label, median, answers, shard in rows:
        print(f"  {label.ljust(26)} {median * 1e3:6.0f}ms {median / base:5.2f}x "
              f"{shard / MiB:7,.0f}MiB  {answers}")  # fmt: skip
    return 0


if __name__ == "__main__":
    sys.exit(main())
