"""Benchmark: one trainer step (push gradients, apply, pull weights) against three baselines.

Usage: python bench/cluster.py [--sizes 1000000 16000000 100000000] [--shards 1 2 4] [--repeat 5]

For each size (fp32 parameters) it prints, measured in the same run:

* optserve: `push_and_pull` of one gradient to a model on 1, 2 and 4 shards (SGD, so the step
  is dominated by moving bytes), over gRPC on loopback;
* floor: a plain Python TCP socket on loopback moving the same bytes to another process and
  back (`sendall` / `recv_into` preallocated buffers): no framing, no apply;
* ray-docs: the parameter-server pattern of Ray's documentation, one actor holding a numpy
  vector, the gradient passed to `apply_gradients.remote` and the weights fetched by `ray.get`.
  On one machine its bytes move through Ray's shared-memory object store, not a network;
* gloo: torch.distributed all-reduce of the same bytes between 2 processes (what a
  data-parallel step without a parameter server moves).

Targets (issue 4), at 16M parameters: optserve <= 3x the floor, and <= 1.5x the ray-docs step.

`--auth` also times each optserve step against a second server that checks a token on every
call (issue 7), and prints the ratio: what authentication costs on the data plane.
`--ray-metrics` also times it against a server that records no Ray metrics (the default server
records every series in Ray's metrics too, issue 8), and prints the ratio: what they cost.
Small sizes show a per-push cost best: `--sizes 1000 1000000 --ray-metrics`.
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import os
import socket
import statistics
import sys
import time

import numpy as np
import torch

from optserve.server.runtime import keep_ray_on_loopback

keep_ray_on_loopback()


def timed(fn, repeat: int) -> float:
    fn()  # warm-up
    samples = []
    for _ in range(repeat):
        start = time.perf_counter()
        fn()
        samples.append(time.perf_counter() - start)
    return statistics.median(samples)


# ---- floor: raw TCP, out and back ---------------------------------------------------------------


def _recv_exact(sock: socket.socket, view: memoryview) -> None:
    got = 0
    while got < len(view):
        n = sock.recv_into(view[got:])
        if n == 0:
            raise ConnectionError("peer closed")
        got += n


def _echo_server(port_queue, nbytes: int) -> None:
    server = socket.create_server(("127.0.0.1", 0))
    port_queue.put(server.getsockname()[1])
    conn, _ = server.accept()
    conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    buf = bytearray(nbytes)
    view = memoryview(buf)
    out = memoryview(bytearray(nbytes))  # the "weights" sent back
    try:
        while True:
            _recv_exact(conn, view)
            conn.sendall(out)
    except (ConnectionError, OSError):
        pass


def socket_floor(nbytes: int, repeat: int) -> float:
    ctx = mp.get_context("spawn")
    ports = ctx.Queue()
    proc = ctx.Process(target=_echo_server, args=(ports, nbytes), daemon=True)
    proc.start()
    sock = socket.create_connection(("127.0.0.1", ports.get(timeout=60)))
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    grad = memoryview(bytearray(nbytes))
    back = memoryview(bytearray(nbytes))

    def step() -> None:
        sock.sendall(grad)
        _recv_exact(sock, back)

    try:
        return timed(step, repeat)
    finally:
        sock.close()
        proc.terminate()
        proc.join(timeout=10)


# ---- gloo all-reduce between 2 processes --------------------------------------------------------


def _gloo_rank(rank: int, port: int, numel: int, repeat: int, results) -> None:
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
    tensor = torch.ones(numel)
    seconds = timed(lambda: dist.all_reduce(tensor), repeat)
    if rank == 0:
        results.put(seconds)
    dist.barrier()
    dist.destroy_process_group()


def gloo_allreduce(numel: int, repeat: int) -> float:
    ctx = mp.get_context("spawn")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    results = ctx.Queue()
    procs = [
        ctx.Process(target=_gloo_rank, args=(r, port, numel, repeat, results)) for r in range(2)
    ]
    for p in procs:
        p.start()
    seconds = results.get(timeout=900)
    for p in procs:
        p.join(timeout=60)
    return seconds


# ---- the Ray-docs parameter server --------------------------------------------------------------


def ray_docs_step(numel: int, repeat: int) -> float:
    import ray

    @ray.remote(num_cpus=0)
    class ParameterServer:
        def __init__(self, numel: int) -> None:
            self.weights = np.zeros(numel, dtype=np.float32)

        def apply_gradients(self, grad: np.ndarray) -> np.ndarray:
            self.weights -= 0.01 * grad
            return self.weights

    server = ParameterServer.remote(numel)
    grad = np.ones(numel, dtype=np.float32)
    try:
        return timed(lambda: ray.get(server.apply_gradients.remote(grad)), repeat)
    finally:
        ray.kill(server)


# ---- optserve -----------------------------------------------------------------------------


def optserve_step(address: str, numel: int, shards: int, repeat: int) -> float:
    from optserve.client import ParameterServerClient

    name = f"bench-{numel}-{shards}"
    with ParameterServerClient(address) as client:
        client.create_model(
            name, {"w": torch.zeros(numel)}, {"name": "sgd", "lr": 0.01}, num_shards=shards
        )
        grad = {"w": torch.ones(numel)}
        try:
            # As RemoteOptimizer does: weights land in reused buffers (then copied into params).
            return timed(lambda: client.push_and_pull(name, grad, reuse_buffers=True), repeat)
        finally:
            client.drop_model(name)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--sizes", type=int, nargs="+", default=[1_000_000, 16_000_000, 100_000_000]
    )
    parser.add_argument("--shards", type=int, nargs="+", default=[1, 2, 4])
    parser.add_argument("--repeat", type=int, default=5)
    parser.add_argument("--skip-gloo", action="store_true")
    parser.add_argument("--auth", action="store_true", help="also time a server with tokens")
    parser.add_argument(
        "--ray-metrics",
        action="store_true",
        help="also time a server that records no Ray metrics",
    )
    args = parser.parse_args()

    import ray

    from optserve.server.runtime import init_ray, start_service

    init_ray(num_cpus=max(4, os.cpu_count() or 1), log_to_driver=False)
    service = start_service(default_num_shards=1)  # the default: Ray's metrics recorded too
    # Other servers whose step is compared with the default one's: (what differs, server).
    variants = []
    if args.auth:
        import secrets

        from optserve.server.edge.tokens import EdgeConfig, TokenTable

        token = secrets.token_urlsafe(32)
        os.environ["OPTSERVE_TOKEN"] = token  # every client sends it (the open server ignores it)
        edge = EdgeConfig(tokens=TokenTable.single(token))
        variants.append(("tokens", start_service(name="optserve-bench-auth", edge=edge)))
    if args.ray_metrics:
        plain = start_service(name="optserve-bench-no-ray-metrics", ray_metrics=False)
        variants.append(("no Ray metrics", plain))
    print(f"python {sys.version.split()[0]}, torch {torch.__version__}, ray {ray.__version__}, "
          f"{os.cpu_count()} cores; step = push gradients + apply + pull weights, fp32, "
          f"1 trainer, medians of {args.repeat}")  # fmt: skip
    try:
        for numel in args.sizes:
            nbytes = numel * 4
            floor = socket_floor(nbytes, args.repeat)
            docs = ray_docs_step(numel, args.repeat)
            gloo = None if args.skip_gloo else gloo_allreduce(numel, args.repeat)
            print(f"\n{numel:,} params ({nbytes / 1e6:.0f} MB each way)")
            print(f"  floor: raw TCP socket out and back     {floor * 1e3:8.1f} ms")
            print(f"  ray-docs parameter server (shared mem) {docs * 1e3:8.1f} ms")
            if gloo is not None:
                print(f"  gloo all-reduce, 2 processes           {gloo * 1e3:8.1f} ms")
            for shards in args.shards:
                ours = optserve_step(service.address, numel, shards, args.repeat)
                verdict = ""
                if numel == 16_000_000:
                    ok = ours <= 3 * floor and ours <= 1.5 * docs
                    verdict = (
                        f"  targets (<=3x floor, <=1.5x ray-docs): {'met' if ok else 'MISSED'}"
                    )
                print(f"  optserve, {shards} shard(s)                {ours * 1e3:8.1f} ms   "
                      f"{ours / floor:5.2f}x floor  {ours / docs:5.2f}x ray-docs"
                      f"{verdict}")  # fmt: skip
                for what, other in variants:
                    theirs = optserve_step(other.address, numel, shards, args.repeat)
                    label = f"optserve, {shards} shard(s), {what}"
                    print(f"  {label:38} {theirs * 1e3:8.1f} ms   "
                          f"{theirs / ours:5.2f}x the default server")  # fmt: skip
    finally:
        for _, other in variants:
            other.stop(grace_s=1.0)
        service.stop(grace_s=1.0)
        ray.shutdown()


if __name__ == "__main__":
    main()
