"""A trainer process for the integration tests: pushes seeded gradients through RemoteOptimizer.

Usage: python tests/helpers/trainer.py --address A --model M [--optimizer JSON] --steps N --out F
       [--mode JSON] [--trainer NAME] [--seed S]

Saves the initial weights (as loaded from the server when the model exists), every gradient
pushed, the weights after the last step and the final version to F (torch.save), so the test
can replay the same gradients through the oracle.
"""

from __future__ import annotations

import argparse
import json

import torch

from optserve.client import RemoteOptimizer

SHAPES = {"weight": (4, 5), "bias": (7,), "kernel": (2, 3, 2, 2)}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--address", required=True)
    parser.add_argument("--model", required=True)
    parser.add_argument("--optimizer", default=None)
    parser.add_argument("--mode", default=None)
    parser.add_argument("--trainer", default="test-trainer")
    parser.add_argument("--steps", type=int, default=50)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", required=True)
    args = parser.parse_args()

    generator = torch.Generator().manual_seed(args.seed)
    params = {
        name: torch.nn.Parameter(torch.randn(shape, generator=generator))
        for name, shape in SHAPES.items()
    }
    opt = RemoteOptimizer(
        params.items(),
        address=args.address,
        model=args.model,
        optimizer=json.loads(args.optimizer) if args.optimizer else None,
        mode=json.loads(args.mode) if args.mode else None,
        trainer=args.trainer,
    )
    initial = {name: p.detach().clone() for name, p in params.items()}
    pushed = []
    for _ in range(args.steps):
        grads = {name: torch.randn(p.shape, generator=generator) for name, p in params.items()}
        for name, p in params.items():
            p.grad = grads[name].clone()
        opt.step()
        opt.zero_grad()
        assert all(p.grad is None for p in params.values())
        pushed.append(grads)
    final = {name: p.detach().clone() for name, p in params.items()}
    torch.save(
        {"initial": initial, "grads": pushed, "final": final, "version": opt.version}, args.out
    )
    opt.close()


if __name__ == "__main__":
    main()
