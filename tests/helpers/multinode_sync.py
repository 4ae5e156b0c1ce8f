"""A two-node Ray cluster (ray.cluster_utils), a model on 3 shards spread over both nodes, and 3
trainer processes in sync mode. Run by tests/integration/test_multinode.py in its own process,
because a cluster_utils cluster needs a process without a Ray of its own.

Usage: python tests/helpers/multinode_sync.py --out RESULT.json --workdir DIR [--rounds 30]

Writes {"shard_nodes": [...], "nodes": [...], "max_abs_diff": d, "version": v} to RESULT.json.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

from optserve.server.runtime import keep_ray_on_loopback

keep_ray_on_loopback()  # before `import ray`: both nodes stay on 127.0.0.1

import ray  # noqa: E402
import torch  # noqa: E402
from ray.cluster_utils import Cluster  # noqa: E402

from optserve.client import ParameterServerClient  # noqa: E402
from optserve.server.coordinator.core import Placement  # noqa: E402
from optserve.server.runtime import NAMESPACE, start_service  # noqa: E402

TRAINER = Path(__file__).resolve().parent / "trainer.py"
SHAPES = {"weight": (4, 5), "bias": (7,), "kernel": (2, 3, 2, 2)}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", required=True)
    parser.add_argument("--workdir", required=True)
    parser.add_argument("--rounds", type=int, default=30)
    args = parser.parse_args()
    workdir = Path(args.workdir)

    cluster = Cluster(
        initialize_head=True,
        head_node_args={"num_cpus": 1, "object_store_memory": 150 << 20},
    )
    cluster.add_node(num_cpus=1, object_store_memory=150 << 20)
    cluster.wait_for_nodes()
    ray.init(address=cluster.address, namespace=NAMESPACE, logging_level="WARNING")
    service = None
    try:
        # STRICT_SPREAD would refuse 3 shards on 2 nodes; SPREAD puts them on both.
        service = start_service(placement=Placement(cpus=0.1, strategy="SPREAD"))
        generator = torch.Generator().manual_seed(0)
        initial = {n: torch.randn(s, generator=generator) for n, s in SHAPES.items()}
        with ParameterServerClient(service.address) as client:
            client.create_model(
                "multinode",
                initial,
                {"name": "adam", "lr": 0.01},
                num_shards=3,
                mode={"mode": "sync", "trainers": 3, "round_timeout_s": 300},
            )
            shards = ray.get(service.actor.shard_actors.remote("multinode"))
            shard_nodes = [i["node_id"] for i in ray.get([s.info.remote() for s in shards])]
            procs = [
                subprocess.Popen(
                    [
                        sys.executable,
                        str(TRAINER),
                        "--address",
                        service.address,
                        "--model",
                        "multinode",
                        "--steps",
                        str(args.rounds),
                        "--seed",
                        str(k + 1),
                        "--trainer",
                        f"trainer{k}",
                        "--out",
                        str(workdir / f"t{k}.pt"),
                    ],
                    stderr=subprocess.PIPE,
                    text=True,
                )  # fmt: skip
                for k in range(3)
            ]
            for proc in procs:
                _, err = proc.communicate(timeout=600)
                if proc.returncode != 0:
                    raise SystemExit(f"trainer failed: {err[-3000:]}")
            records = [torch.load(workdir / f"t{k}.pt", weights_only=True) for k in range(3)]
            params = {n: torch.nn.Parameter(t.clone()) for n, t in initial.items()}
            opt = torch.optim.Adam(params.values(), lr=0.01)
            for i in range(args.rounds):
                for name, p in params.items():
                    p.grad = sum(r["grads"][i][name] for r in records) / 3
                opt.step()
            pulled, version = client.pull("multinode")
            diff = max(float((pulled[n] - p.detach()).abs().max()) for n, p in params.items())
        result = {
            "shard_nodes": shard_nodes,
            "nodes": [n["NodeID"] for n in ray.nodes() if n["Alive"]],
            "max_abs_diff": diff,
            "version": version,
            "trainer_versions": [r["version"] for r in records],
        }
        Path(args.out).write_text(json.dumps(result))
    finally:
        if service is not None:
            service.stop(grace_s=1.0)
        ray.shutdown()
        cluster.shutdown()


if __name__ == "__main__":
    main()
