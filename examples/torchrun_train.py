"""Data-parallel training under torchrun, with the optimizer on an optserve server.

    torchrun --standalone --nproc-per-node 2 examples/torchrun_train.py --address HOST:PORT

Each process is one trainer. `RemoteOptimizer(mode="sync")` takes its number of trainers from
$WORLD_SIZE and its trainer name from $RANK ("rank-0", "rank-1", ...), so every update is the mean
of one gradient from each rank: the same update as one process training on all ranks' batches.
No process group is needed: the server does the all-reduce. Each rank reads its own part of
every batch (scikit-learn's digits, shipped with scikit-learn, no download).

Rank 0 prints the held-out accuracy, and with --out saves the final weights (torch.save).
"""

from __future__ import annotations

import argparse
import json
import os

import torch
from sklearn.datasets import load_digits

from optserve.client import RemoteOptimizer


def batches(steps: int, batch: int, rank: int, world: int, seed: int = 0):
    """Every step's global batch (the same on every rank), cut into the ranks' parts."""
    x, y = load_digits(return_X_y=True)
    x = torch.tensor(x[:1500], dtype=torch.float32) / 16.0
    y = torch.tensor(y[:1500])
    g = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        index = torch.randint(0, len(x), (batch * world,), generator=g)
        mine = index[rank * batch : (rank + 1) * batch]
        yield x[mine], y[mine]


def make_net() -> torch.nn.Module:
    torch.manual_seed(0)  # every rank starts from the same weights (the server keeps one copy)
    return torch.nn.Sequential(torch.nn.Linear(64, 32), torch.nn.ReLU(), torch.nn.Linear(32, 10))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--address", required=True, help="the optserve server's host:port")
    parser.add_argument("--model", default="torchrun-digits")
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--batch", type=int, default=32, help="examples per rank per step")
    parser.add_argument("--out", help="rank 0 saves the final weights here")
    args = parser.parse_args()
    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])

    net = make_net()
    opt = RemoteOptimizer(
        net.named_parameters(),
        address=args.address,
        model=args.model,
        optimizer={"name": "sgd", "lr": 0.2, "momentum": 0.9},
        mode="sync",  # trainers=$WORLD_SIZE, trainer="rank-$RANK"
    )
    try:
        for x, y in batches(args.steps, args.batch, rank, world):
            opt.zero_grad()
            torch.nn.functional.cross_entropy(net(x), y).backward()
            opt.step()
        if rank == 0:
            x, y = load_digits(return_X_y=True)
            held_out = torch.tensor(x[1500:], dtype=torch.float32) / 16.0
            with torch.no_grad():
                accuracy = (net(held_out).argmax(1) == torch.tensor(y[1500:])).float().mean()
            print(json.dumps({"trainer": opt.trainer, "version": opt.version,
                              "accuracy": round(accuracy.item(), 4)}))  # fmt: skip
            if args.out:
                torch.save(net.state_dict(), args.out)
    finally:
        opt.close()


if __name__ == "__main__":
    main()
