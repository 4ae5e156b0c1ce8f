"""Benchmark: what a client-side lr scheduler and a framework's resume cost a large model.

Usage: python bench/drop_in.py [--numel 100000000] [--steps 8]

One Adam model of --numel fp32 parameters on 2 shards, trained through `RemoteOptimizer`, in one
run:

* steps with the lr constant (the baseline), then steps under a torch `LambdaLR` that changes
  the lr before every step: each of those steps sends one control change (SetHyperparameters,
  policy "keep") before its push. Printed: the median step time of each and their ratio;
* `state_dict()` (a server checkpoint written for the record), the same again with the model
  unmoved (the last checkpoint named again, nothing written), and `load_state_dict()` of a
  record the model still holds (nothing restored) and of an older one (a restore);
* peak RSS of each shard process and of the trainer (this process) in each phase, sampled
  every 50 ms (psutil).

Goal (issue 16): a control change per step adds a bounded cost (no copy of the state: the
shards' peak RSS is the same with and without the lr changes), and the trainer holds what it
owns: the parameters, their gradients and one receive buffer. Sizes the machine's free memory
cannot hold are skipped, saying so.
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import sys
import tempfile
import time

import psutil
import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from scale import GiB, MiB, Sampler  # noqa: E402

# Bytes per parameter at the peak: the shards' Adam state (12), the trainer's parameter,
# gradient and receive buffer (12), and a restore's second set of shards (12).
BYTES_PER_PARAM = 36


def timed_steps(opt, net, steps: int, scheduler=None) -> float:
    times = []
    for _ in range(steps):
        if net.grad is None:
            net.grad = torch.empty_like(net)
        net.grad.fill_(1e-3)  # in place, as backward() accumulates into an existing .grad
        started = time.perf_counter()
        opt.step()
        times.append(time.perf_counter() - started)
        if scheduler is not None:
            scheduler.step()
    return statistics.median(times)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--numel", type=int, default=100_000_000)
    parser.add_argument("--steps", type=int, default=8)
    args = parser.parse_args()
    need = args.numel * BYTES_PER_PARAM
    available = psutil.virtual_memory().available
    if need > 0.8 * available:
        print(f"skipped: {args.numel / 1e6:.0f}M parameters need about {need / GiB:.1f} GiB; "
              f"{available / GiB:.1f} GiB is available")  # fmt: skip
        return 0

    import ray

    from optserve.client import RemoteOptimizer
    from optserve.server.runtime import start_service

    directory = tempfile.mkdtemp()
    svc = start_service(port=0, checkpoint_dir=directory, checkpoint_policy={"enabled": False},
                        metrics_port=None, ray_metrics=False)  # fmt: skip
    me = psutil.Process()
    rows: list[tuple[str, str]] = []
    memory: list[tuple[str, int, int]] = []

    def phase(name: str):
        sampler = Sampler()
        sampler.roles[me.pid], sampler._processes[me.pid] = "trainer", me
        return name, sampler

    try:
        torch.nn.Parameter(torch.randn(1)).sum()  # torch's lazy imports, before the baseline
        before = me.memory_info().rss  # the trainer with torch and Ray's driver, no model
        net = torch.nn.Parameter(torch.randn(args.numel))
        from optserve.client import ParameterServerClient

        client = ParameterServerClient(svc.address, timeout_s=600)
        client.create_model("drop-in", {"w": net.detach()}, {"name": "adam", "lr": 1e-3},
                            num_shards=2)  # fmt: skip
        opt = RemoteOptimizer([("w", net)], client=client, model="drop-in")
        timed_steps(opt, net, 1)  # warm
        results = {}
        for name, scheduler in (
            ("steps, lr constant", None),
            ("steps, LambdaLR each step", torch.optim.lr_scheduler.LambdaLR(
                opt, lambda s: 1.0 / (1 + s))),
        ):  # fmt: skip
            label, sampler = phase(name)
            with sampler:
                results[name] = timed_steps(opt, net, args.steps, scheduler)
            memory.append((label, *_peaks(sampler)))
        base, changed = results.values()
        rows.append(("step, lr constant", f"{base * 1e3:.0f} ms (median)"))
        rows.append(("step, lr changed each step",
                     f"{changed * 1e3:.0f} ms: {changed / base:.2f}x; {opt.control_changes} "
                     "control changes"))  # fmt: skip
        label, sampler = phase("state_dict, load_state_dict")
        with sampler:
            started = time.perf_counter()
            record = opt.state_dict()
            first = time.perf_counter() - started
            started = time.perf_counter()
            again = opt.state_dict()
            second = time.perf_counter() - started
            assert again["optserve"]["checkpoint"] == record["optserve"]["checkpoint"]
            started = time.perf_counter()
            opt.load_state_dict(record)
            held = time.perf_counter() - started
            timed_steps(opt, net, 1)
            started = time.perf_counter()
            opt.load_state_dict(record)
            restored = time.perf_counter() - started
        memory.append((label, *_peaks(sampler)))
        state_gib = args.numel * 12 / GiB
        rows.append(("state_dict()", f"{first:.2f} s (a checkpoint of {state_gib:.2f} GiB); "
                     f"unmoved: {second:.3f} s (none written)"))  # fmt: skip
        rows.append(("load_state_dict()", f"the model holds it: {held:.3f} s (nothing "
                     f"restored); one step later: {restored:.2f} s (a restore)"))  # fmt: skip
        opt.close()
    finally:
        svc.stop(grace_s=1.0)
        shutil.rmtree(directory, ignore_errors=True)
        ray.shutdown()
    print(f"== {args.numel / 1e6:.0f}M parameters, Adam on 2 shards ==")
    width = max(len(k) for k, _ in rows)
    for key, value in rows:
        print(f"  {key.ljust(width)}  {value}")
    print(f"  peak RSS, MiB (a shard's slice of the state: {args.numel * 6 / MiB:,.0f}; the "
          f"trainer's parameter + gradient + receive buffer: {args.numel * 12 / MiB:,.0f}, on "
          f"top of its {before / MiB:,.0f} before the model)")  # fmt: skip
    for label, shard, trainer in memory:
        print(f"  {label.ljust(30)} largest shard {shard / MiB:>8,.0f}   trainer "
              f"{trainer / MiB:>8,.0f}")  # fmt: skip
    return 0


def _peaks(sampler: Sampler) -> tuple[int, int]:
    shard = max((p for pid, p in sampler.peaks.items() if sampler.roles[pid] == "shard"),
                default=0)  # fmt: skip
    trainer = max((p for pid, p in sampler.peaks.items() if sampler.roles[pid] == "trainer"),
                  default=0)  # fmt: skip
    return shard, trainer


if __name__ == "__main__":
    sys.exit(main())
