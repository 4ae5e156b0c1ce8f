"""Benchmark: a shard's memory while many Pull streams of one version are open at once.

Usage: python bench/pull_flood.py [--numel 50000000] [--pulls 8] [--repeat 3]

One SGD model of --numel fp32 parameters on one shard. --pulls Pull streams are opened at once
and each is read past its header, then left unread, as a client that never reads on leaves
them (the slice is far more than a stream's flow-control window, so none can finish: the shard
holds whatever each stream sends from). The shard process's RSS is sampled every 10 ms
(psutil, on the pid the shard gives through Ray) from before the streams open until all are;
then they are read to the end. Then --repeat pulls one after the other (a lone puller).

Measured in one run, each on a model of its own (so each shard is a fresh process, whose
freed memory is kept for reuse: server/shard/memory.py):

* baseline: every stream copies the slice for itself (`PullSnapshots(share=False)`: how
  pulls worked before issue 17);
* shared: the streams of one version read one snapshot (server/shard/snapshots.py).

Prints, for each, the shard's peak RSS above its RSS before the flood, in MiB and in copies of
the slice; how much more the lone pulls took after it; the snapshots the shard took; and the
ratio shared / baseline. Goal (issue 17): N
concurrent pulls of one version cost one copy, not N; a lone puller's pulls cost no more than
one copy whatever their number. Sizes that the machine's free memory cannot hold are skipped.
"""

from __future__ import annotations

import argparse
import os
import sys
import threading
import time

import psutil
import torch

from optserve.server.runtime import keep_ray_on_loopback

keep_ray_on_loopback()

MiB = 1 << 20
GiB = 1 << 30


class PeakRss:
    """The peak RSS of one process, sampled in a thread."""

    def __init__(self, pid: int, interval_s: float = 0.01) -> None:
        self.process = psutil.Process(pid)
        self.interval_s = interval_s
        self.start = self.process.memory_info().rss
        self.peak = self.start
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.wait(self.interval_s):
            self.peak = max(self.peak, self.process.memory_info().rss)

    def __enter__(self) -> PeakRss:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, self.process.memory_info().rss)

    @property
    def grown(self) -> int:
        return self.peak - self.start


def flood(address: str, model: str, pulls: int) -> None:
    """Open `pulls` Pull streams, read each past its header, then read them all to the end."""
    import grpc

    from optserve.v1 import shard_pb2, shard_pb2_grpc

    options = [("grpc.http2.bdp_probe", 0)]
    with grpc.insecure_channel(address, options=options) as channel:
        stub = shard_pb2_grpc.ShardStub(channel)
        streams = [stub.Pull(shard_pb2.PullRequest(model=model), timeout=600) for _ in range(pulls)]
        for stream in streams:
            next(stream)  # the header: this stream's snapshot is taken
        time.sleep(0.2)  # a few samples with every stream open
        for stream in streams:
            for _ in stream:
                pass


def run(numel: int, pulls: int, repeat: int) -> None:
    import ray

    from optserve.client import ParameterServerClient
    from optserve.server.runtime import start_service

    slice_bytes = numel * 4
    svc = start_service(port=0, metrics_port=None, ray_metrics=False,
                        checkpoint_policy={"enabled": False})  # fmt: skip
    rows = {}
    try:
        with ParameterServerClient(svc.address, timeout_s=600) as client:
            initial = {"w": torch.randn(numel)}
            for label, share in (("baseline (a copy per stream)", False),
                                 ("shared (one snapshot)", True)):  # fmt: skip
                model = f"flood-{int(share)}"
                client.create_model(model, initial, {"name": "sgd", "lr": 0.1}, num_shards=1)
                (actor,) = ray.get(svc.actor.shard_actors.remote(model))
                address = ray.get(actor.address.remote())

                def set_share(a, share=share):
                    a._service.snapshots.share = share
                    return os.getpid()

                pid = ray.get(actor.__ray_call__.remote(set_share))
                with PeakRss(pid) as concurrent:
                    flood(address, model, pulls)
                with PeakRss(pid) as lone:
                    for _ in range(repeat):
                        client.pull(model)
                taken = ray.get(actor.__ray_call__.remote(lambda a: a._service.snapshots.taken))
                rows[label] = (concurrent.grown, lone.grown, taken)
                client.drop_model(model)
    finally:
        svc.stop(grace_s=1.0)
        ray.shutdown()
    lone_head = f"then {repeat} lone pulls"
    print(f"  {'':30}  {'flood: RSS grown':>17}  {'copies':>7}  {lone_head:>18}  {'snapshots':>9}")
    for label, (grown, lone, taken) in rows.items():
        print(f"  {label:30}  {grown / MiB:>13,.0f} MiB  {grown / slice_bytes:>7.2f}"
              f"  {lone / MiB:>14,.0f} MiB  {taken:>9}")  # fmt: skip
    (base, *_), (shared, *_) = rows.values()
    print(
        f"  shared / baseline: {shared / max(base, 1):.3f} "
        f"(goal: about 1/{pulls} = {1 / pulls:.3f} or less)"
    )


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--numel", type=int, default=50_000_000)
    parser.add_argument("--pulls", type=int, default=8)
    parser.add_argument("--repeat", type=int, default=3)
    args = parser.parse_args()
    from optserve.server.runtime import init_ray

    slice_bytes = args.numel * 4
    # The shard (weights and a copy per stream) and this process (initial values, and what the
    # unread streams buffer), plus Ray's own processes.
    needed = slice_bytes * (args.pulls + 4) + 3 * GiB
    free = psutil.virtual_memory().available
    print(f"{args.numel / 1e6:.0f}M fp32 parameters on one shard ({slice_bytes / MiB:,.0f} MiB "
          f"a copy), {args.pulls} concurrent pulls; {os.cpu_count()} CPUs, "
          f"{free / GiB:.1f} GiB free")  # fmt: skip
    if needed > 0.9 * free:
        print(f"skipped: it needs about {needed / GiB:.1f} GiB")
        return 0
    init_ray(num_cpus=os.cpu_count())
    run(args.numel, args.pulls, args.repeat)
    return 0


if __name__ == "__main__":
    sys.exit(main())
