"""Benchmark: the outer optimizer of asynchronous local SGD under staleness, in one process.

Usage: python bench/async_outer.py [--workers 4] [--local-steps 10] [--pushes 200]

K workers each take H inner SGD steps (lr 0.05, batch 32) on their own shard of a synthetic
4-class task (a 32-64-4 MLP) from the global weights as they were when they started, and push
the pseudo-gradient (start minus local weights) to the server's rule, the engine's GroupEngine
here. Pushes are applied in arrival order and each worker then starts again from the newest
weights, so every push is K - 1 updates stale, as with K equally fast trainers in async mode.
It prints the held-out loss and accuracy after the same number of pseudo-gradients for: sync
DiLoCo (the K pseudo-gradients of a round averaged into one Nesterov step), and async with
Nesterov at every push, Delayed Nesterov with delay K (Liu, Douillard et al. 2024), and plain
SGD outers. Everything is seeded: a rerun prints the same table."""

from __future__ import annotations

import argparse
from collections import deque
from collections.abc import Callable
from typing import Any

import torch

from optserve.common.config import parse_optimizer_config
from optserve.server.engine.group import GroupEngine

D, C, INNER_LR, BATCH = 32, 4, 0.05, 32
NESTEROV = {"name": "sgd", "lr": 0.7, "momentum": 0.9, "nesterov": True}


class Task:
    def __init__(self, workers: int, local_steps: int) -> None:
        gen = torch.Generator().manual_seed(0)
        teacher = torch.randn(D, C, generator=gen)
        x = torch.randn(8000, D, generator=gen)
        y = (x @ teacher + 0.5 * torch.randn(8000, C, generator=gen)).argmax(1)
        self.test_x = torch.randn(4000, D, generator=gen)
        self.test_y = (self.test_x @ teacher).argmax(1)
        self.shards = [(x[i::workers], y[i::workers]) for i in range(workers)]
        self.workers, self.local_steps = workers, local_steps

    @staticmethod
    def net() -> torch.nn.Module:
        torch.manual_seed(1)
        return torch.nn.Sequential(torch.nn.Linear(D, 64), torch.nn.ReLU(), torch.nn.Linear(64, C))

    def net_at(self, theta: torch.Tensor) -> torch.nn.Module:
        net, offset = self.net(), 0
        for p in net.parameters():
            p.data.copy_(theta[offset : offset + p.numel()].view_as(p))
            offset += p.numel()
        return net

    def initial(self) -> torch.Tensor:
        return torch.cat([p.detach().reshape(-1) for p in self.net().parameters()])

    def pseudo_gradient(self, theta: torch.Tensor, worker: int, seed: int) -> torch.Tensor:
        net = self.net_at(theta)
        inner = torch.optim.SGD(net.parameters(), lr=INNER_LR)
        x, y = self.shards[worker]
        gen = torch.Generator().manual_seed(seed)
        for _ in range(self.local_steps):
            batch = torch.randint(0, len(x), (BATCH,), generator=gen)
            inner.zero_grad()
            torch.nn.functional.cross_entropy(net(x[batch]), y[batch]).backward()
            inner.step()
        return theta - torch.cat([p.detach().reshape(-1) for p in net.parameters()])

    def evaluate(self, theta: torch.Tensor) -> tuple[float, float]:
        with torch.no_grad():
            out = self.net_at(theta)(self.test_x)
        loss = torch.nn.functional.cross_entropy(out, self.test_y).item()
        return loss, (out.argmax(1) == self.test_y).float().mean().item()


def run_async(task: Task, config: dict[str, Any], pushes: int) -> tuple[float, float]:
    engine = GroupEngine("g", task.initial(), parse_optimizer_config(config), path="reference")
    started = deque((k, engine.weights.clone()) for k in range(task.workers))
    for push in range(pushes):
        worker, theta = started.popleft()
        engine.step(task.pseudo_gradient(theta, worker, 1000 * push + worker), config["lr"])
        started.append((worker, engine.weights.clone()))
    return task.evaluate(engine.weights)


def run_sync(task: Task, config: dict[str, Any], pushes: int) -> tuple[float, float]:
    engine = GroupEngine("g", task.initial(), parse_optimizer_config(config), path="reference")
    for rnd in range(pushes // task.workers):
        theta = engine.weights.clone()
        grads = [task.pseudo_gradient(theta, k, 1000 * rnd + k) for k in range(task.workers)]
        engine.step(torch.stack(grads).mean(0), config["lr"])
    return task.evaluate(engine.weights)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workers", type=int, default=4)
    parser.add_argument("--local-steps", type=int, default=10)
    parser.add_argument("--pushes", type=int, default=200)
    args = parser.parse_args()
    torch.set_num_threads(1)
    k = args.workers
    task = Task(k, args.local_steps)
    Run = Callable[[Task, dict[str, Any], int], tuple[float, float]]
    rows: list[tuple[str, Run, dict[str, Any]]] = [
        ("sync DiLoCo: Nesterov on the mean of K", run_sync, NESTEROV),
        ("async: Nesterov at every push", run_async, NESTEROV),
        (f"async: Delayed Nesterov, delay {k}", run_async, {**NESTEROV, "delay": k}),
        ("async: plain SGD, lr 0.7", run_async, {"name": "sgd", "lr": 0.7}),
        (f"async: plain SGD, lr 0.7/{k}", run_async, {"name": "sgd", "lr": 0.7 / k}),
    ]
    print(f"{k} workers, {args.local_steps} inner steps each, {args.pushes} pseudo-gradients")
    print("| outer optimizer | held-out loss | accuracy |\n|---|---|---|")
    for label, run, config in rows:
        loss, accuracy = run(task, config, args.pushes)
        print(f"| {label} | {loss:.4f} | {accuracy:.4f} |")


if __name__ == "__main__":
    main()
