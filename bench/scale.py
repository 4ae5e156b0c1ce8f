"""Benchmark: one Adam model on 2 shards at 100M and 250M parameters: step, checkpoint,
restore, and the memory of every process while they run.

Usage: python bench/scale.py [--sizes 100000000 250000000] [--repeat 5] [--dir DIR]

For each size (fp32 parameters), measured in one run:

* create: the model registered, its initial values streamed by the client straight to the
  shards (nothing through the coordinator);
* step: `push_and_pull` of one fp32 gradient (median of --repeat), against the floor: the same
  bytes over a plain TCP socket on loopback, out and back (bench/cluster.py's);
* checkpoint, with each snapshot: "pause" (pushes wait while the shards write) and "copy" (the
  shards copy their state, pushes go on while it is written): its bytes per second against the
  disk's own sequential write of the same byte count (write and fsync, measured here), and how
  long the model's updates were held;
* restore onto 2 new shards (the running model's old shards stay until the new ones are
  loaded): the shards' read, against the disk's own sequential read of the same byte count
  from a cold cache (the pages dropped first), and the whole restore (starting the shards
  included);
* peak RSS of the coordinator and of each shard process, sampled every 50 ms while each phase
  runs (psutil; Ray's worker processes are told apart by their titles), and of all shards
  together (old and new during a restore).

Goals (issue 14): the coordinator's RSS flat in model size (at most 300 MB at 250M); during a
checkpoint, a shard's extra memory at most one copy of its state ("copy") and none ("pause");
during a restore, old and new shards together at most 2x the model's state; checkpoint and
restore each at least 50 % of the disk's speed; 250M parameters checkpointed and restored with
room to spare. Sizes that the machine's free memory cannot hold are skipped, saying so.
"""

from __future__ import annotations

import argparse
import contextlib
import mmap
import os
import shutil
import sys
import tempfile
import threading
import time
from collections import defaultdict

import psutil
import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from cluster import socket_floor, timed  # noqa: E402

from optserve.server.runtime import keep_ray_on_loopback  # noqa: E402

keep_ray_on_loopback()

GiB = 1 << 30
MiB = 1 << 20
# Bytes per parameter this run holds at its peak: the model's Adam state twice (old and new
# shards during a restore), the client's initial values, gradient and pulled weights, and the
# floor's four buffers at once.
BYTES_PER_PARAM = 2 * 12 + 3 * 4 + 4 * 4
BLOCK = 16 * MiB


class Sampler:
    """Peak RSS of the coordinator and of every shard process, sampled in a thread (the process
    list is read again every tenth sample, to find new shards cheaply)."""

    def __init__(self, interval_s: float = 0.05) -> None:
        self.interval_s = interval_s
        self.peaks: dict[int, int] = {}
        self.roles: dict[int, str] = {}
        self.together = 0  # the largest sum over shard processes at one instant
        self._processes: dict[int, psutil.Process] = {}
        self._ticks = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _find(self) -> None:
        for proc in psutil.process_iter(["pid", "cmdline"]):
            title = " ".join(proc.info["cmdline"] or [])
            for role, marks in ROLES.items():
                if proc.pid not in self._processes and any(title.startswith(m) for m in marks):
                    self._processes[proc.pid] = proc
                    self.roles[proc.pid] = role

    def sample(self) -> None:
        if self._ticks % 10 == 0:
            self._find()
        self._ticks += 1
        shards = 0
        for pid, proc in list(self._processes.items()):
            try:
                rss = proc.memory_info().rss
            except (psutil.NoSuchProcess, psutil.AccessDenied):
                del self._processes[pid]
                continue
            self.peaks[pid] = max(self.peaks.get(pid, 0), rss)
            shards += rss if self.roles[pid] == "shard" else 0
        self.together = max(self.together, shards)

    def _run(self) -> None:
        while not self._stop.wait(self.interval_s):
            self.sample()

    def __enter__(self) -> Sampler:
        self.sample()
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        self.sample()


# Ray titles its worker processes after the actor class and, once named, after the actor.
ROLES = {
    "shard": ("ray::ShardActor", "ray::optserve-shard:"),
    "coordinator": ("ray::CoordinatorActor", "ray::optserve-coordinator"),
}


def disk_speeds(directory: str, nbytes: int) -> dict[str, float]:
    """The disk's own sequential speeds for `nbytes`, in bytes per second: writes (with fsync)
    and cold reads (the pages dropped first), each through the page cache and around it
    (O_DIRECT, where the filesystem has it), 16 MiB at a time from one reused buffer."""
    path = os.path.join(directory, "disk-speed.bin")
    block = mmap.mmap(-1, BLOCK)  # page-aligned, as direct I/O needs
    for i in range(0, BLOCK, 4096):
        block[i] = i % 251
    view = memoryview(block)
    speeds = {}
    for mode in ("buffered", "direct"):
        extra = os.O_DIRECT if mode == "direct" else 0
        started = time.perf_counter()
        try:
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | extra, 0o644)
        except OSError:
            continue  # no direct I/O on this filesystem
        with open(fd, "wb", buffering=0) as f:
            for _ in range(-(-nbytes // BLOCK)):
                f.write(view)
            os.fsync(f.fileno())
        speeds[f"write {mode}"] = nbytes / (time.perf_counter() - started)
        drop_cache(path)
        started = time.perf_counter()
        with open(os.open(path, os.O_RDONLY | extra), "rb", buffering=0) as f:
            while f.readinto(view):
                pass
        speeds[f"read {mode}"] = nbytes / (time.perf_counter() - started)
        os.remove(path)
    return speeds


def drop_cache(path: str) -> None:
    """Evict a written file's pages from the page cache (so the next read comes from disk)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(fd)


def run_size(numel: int, repeat: int, root: str) -> None:
    import ray

    from optserve.client import ParameterServerClient
    from optserve.common.allocator import keep_step_buffers
    from optserve.server.runtime import start_service

    keep_step_buffers()  # as RemoteOptimizer does in a trainer

    state_bytes = numel * 12  # Adam: weights, exp_avg, exp_avg_sq
    print(f"\n== {numel / 1e6:.0f}M parameters, Adam on 2 shards: {state_bytes / GiB:.2f} GiB of "
          "state ==")  # fmt: skip
    floor = socket_floor(numel * 4, repeat)
    disk = disk_speeds(root, state_bytes)
    print("  disk (the same bytes, 16 MiB at a time): " + ", ".join(
        f"{k} {v / 1e9:.2f} GB/s" for k, v in disk.items()))  # fmt: skip
    write_speed = max(v for k, v in disk.items() if k.startswith("write"))
    read_speed = max(v for k, v in disk.items() if k.startswith("read"))
    directory = tempfile.mkdtemp(dir=root)
    svc = start_service(port=0, checkpoint_dir=directory, checkpoint_policy={"enabled": False},
                        metrics_port=None, ray_metrics=False)  # fmt: skip
    phases: dict[str, Sampler] = {}
    rows: list[tuple[str, str]] = []
    try:
        with ParameterServerClient(svc.address, timeout_s=600) as client:
            initial = {"w": torch.randn(numel)}
            with Sampler() as phases["create"]:
                started = time.perf_counter()
                client.create_model("scale", initial, {"name": "adam", "lr": 1e-3}, num_shards=2)
                rows.append(("create", f"{time.perf_counter() - started:.2f} s"))
            del initial
            grads = {"w": torch.randn(numel)}

            def step() -> None:
                client.push_and_pull("scale", grads, reuse_buffers=True)

            with Sampler() as phases["step"]:
                seconds = timed(step, repeat)
            ratio = seconds / floor
            rows.append(
                ("step (push_and_pull)", f"{seconds:.3f} s; floor {floor:.3f} s: {ratio:.2f}x")
            )
            for snapshot in ("pause", "copy"):
                with Sampler() as phases[f"checkpoint {snapshot}"]:
                    done = client.checkpoint("scale", snapshot=snapshot)
                speed = done["bytes"] / done["seconds"]
                said = (
                    f"{done['bytes'] / GiB:.2f} GiB in {done['seconds']:.2f} s: "
                    f"{speed / 1e9:.2f} GB/s; the disk writes {write_speed / 1e9:.2f} GB/s: "
                    f"{speed / write_speed:.0%}; pushes held {done['pause_s']:.2f} s"
                )
                rows.append((f"checkpoint ({snapshot})", said))
            name = done["name"]
            for file in os.listdir(os.path.join(directory, "scale", name)):
                drop_cache(os.path.join(directory, "scale", name, file))
            with Sampler() as phases["restore"]:
                started = time.perf_counter()
                client.restore("scale", name, num_shards=2)
                whole = time.perf_counter() - started
            entry = client.status("scale")["audit"][-1]["new"]
            read = entry["bytes"] / entry["read_s"]
            filled = entry["bytes"] / (entry["read_s"] + entry["allocate_s"])
            said = (
                f"read {entry['bytes'] / GiB:.2f} GiB in {entry['read_s']:.2f} s: "
                f"{read / 1e9:.2f} GB/s; the disk reads {read_speed / 1e9:.2f} GB/s (cold): "
                f"{read / read_speed:.0%}; with filling the new shards' memory first "
                f"({entry['allocate_s']:.2f} s): {filled / 1e9:.2f} GB/s, "
                f"{filled / read_speed:.0%}; the whole restore {whole:.2f} s"
            )
            rows.append(("restore (2 new shards)", said))
            weights, version = client.pull("scale")
            assert version == done["version"] + 0 and weights["w"].numel() == numel
            client.drop_model("scale")
    finally:
        svc.stop(grace_s=1.0)
        shutil.rmtree(directory, ignore_errors=True)
        ray.shutdown()
    width = max(len(k) for k, _ in rows)
    for key, value in rows:
        print(f"  {key.ljust(width)}  {value}")
    print_memory(phases, state_bytes)


def print_memory(phases: dict[str, Sampler], state_bytes: int) -> None:
    """Peak RSS per role and phase: the coordinator, each shard (by its rank in the phase's
    first sample), all shards together."""
    print(f"  peak RSS, MiB (a shard's slice of the state: {state_bytes / 2 / MiB:,.0f}; the "
          f"whole state: {state_bytes / MiB:,.0f})")  # fmt: skip
    header = ["phase", "coordinator", "largest shard", "shards together", "together / state"]
    print("  " + "  ".join(h.rjust(16) if i else h.ljust(20) for i, h in enumerate(header)))
    for phase, sampler in phases.items():
        by_role: dict[str, list[int]] = defaultdict(list)
        for pid, peak in sampler.peaks.items():
            by_role[sampler.roles[pid]].append(peak)
        cells = [
            f"{max(by_role['coordinator'], default=0) / MiB:,.0f}",
            f"{max(by_role['shard'], default=0) / MiB:,.0f}",
            f"{sampler.together / MiB:,.0f}",
            f"{sampler.together / state_bytes:.2f}x",
        ]
        print(f"  {phase.ljust(20)}  " + "  ".join(c.rjust(16) for c in cells))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[100_000_000, 250_000_000])
    parser.add_argument("--repeat", type=int, default=5)
    parser.add_argument("--dir", default=None, help="where checkpoints go (default: a temp dir)")
    args = parser.parse_args()
    from optserve.server.runtime import init_ray

    root = args.dir or tempfile.mkdtemp(prefix="optserve-scale-")
    print(f"checkpoints under {root}; {os.cpu_count()} CPUs; "
          f"{psutil.virtual_memory().total / GiB:.1f} GiB of memory")  # fmt: skip
    for numel in args.sizes:
        needed = numel * BYTES_PER_PARAM + 4 * GiB  # plus Ray's own processes
        free = psutil.virtual_memory().available
        if needed > 0.9 * free:
            print(f"\n== {numel / 1e6:.0f}M parameters: skipped, it needs about "
                  f"{needed / GiB:.1f} GiB and {free / GiB:.1f} GiB are free ==")  # fmt: skip
            continue
        init_ray(num_cpus=os.cpu_count())
        with contextlib.suppress(KeyboardInterrupt):
            run_size(numel, args.repeat, root)
    if args.dir is None:
        shutil.rmtree(root, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
