"""A trainer process of `optserve demo`: trains a small MLP on scikit-learn's digits.

The digits data set (1,797 8x8 images, 10 classes) ships inside scikit-learn, so nothing is
downloaded. Each trainer takes every `world_size`-th training example, computes gradients
locally and lets a `RemoteOptimizer` apply them on the server.

With ``--fork NAME --fork-after-epochs K`` (``optserve demo --fork``), each trainer waits
after K epochs until the demo has forked the model as NAME; then the odd ranks move to the fork
(`RemoteOptimizer.switch_model`) and the even ones stay, so half the trainers go on each
branch. The lowest rank on each branch reports its held-out metrics.

Run by the demo as ``python -m optserve.server.demo.trainer --address HOST:PORT --rank R ...``.
"""

from __future__ import annotations

import argparse
import json
import sys
import time

import torch
from torch import nn

from optserve.client import NotFound, ParameterServerClient, RemoteOptimizer

TEST_FRACTION = 0.2
# How long a trainer waits for the demo's fork before it gives up (the demo forks as soon as
# every trainer has made its first-half pushes: about a second).
FORK_WAIT_S = 120.0


def load_digits_split(
    seed: int = 0,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(x_train, y_train, x_test, y_test): a fixed, seeded hold-out split of digits."""
    try:
        from sklearn.datasets import load_digits
    except ImportError as exc:  # pragma: no cover - depends on the install
        raise SystemExit(
            "the demo needs scikit-learn for its data set: pip install 'optserve[demo]'"
        ) from exc
    digits = load_digits()
    x = torch.tensor(digits.data, dtype=torch.float32) / 16.0
    y = torch.tensor(digits.target, dtype=torch.int64)
    order = torch.randperm(len(y), generator=torch.Generator().manual_seed(seed))
    n_test = int(len(y) * TEST_FRACTION)
    test, train = order[:n_test], order[n_test:]
    return x[train], y[train], x[test], y[test]


def build_model(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(64, 128), nn.ReLU(), nn.Linear(128, 10))


@torch.no_grad()
def accuracy(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> float:
    return float((model(x).argmax(dim=1) == y).float().mean())


def wait_for_model(address: str, model: str, timeout_s: float = FORK_WAIT_S) -> None:
    """Return once `model` exists on the server (the demo's fork); SystemExit after
    `timeout_s`."""
    deadline = time.monotonic() + timeout_s
    with ParameterServerClient(address) as client:
        while True:
            try:
                client.describe_model(model)
                return
            except NotFound:
                if time.monotonic() > deadline:
                    raise SystemExit(f"{model} did not appear within {timeout_s:.0f}s") from None
                time.sleep(0.1)


def train(args: argparse.Namespace) -> None:
    torch.set_num_threads(1)
    x_train, y_train, _, _ = load_digits_split(args.seed)
    x, y = x_train[args.rank :: args.world_size], y_train[args.rank :: args.world_size]
    net = build_model(args.seed)
    opt = RemoteOptimizer(
        net.named_parameters(),
        address=args.address,
        model=args.model,
        optimizer=json.loads(args.optimizer),
        trainer=f"trainer-{args.rank}",
    )
    loss_fn = nn.CrossEntropyLoss()
    generator = torch.Generator().manual_seed(args.seed * 1000 + args.rank)
    # Rank 0 reports the held-out loss and accuracy each epoch (what `optserve plot` draws
    # in its validation panel, and what a plateau schedule would read).
    _, _, x_val, y_val = load_digits_split(args.seed)
    start = time.perf_counter()
    reports_val = args.rank == 0
    for epoch in range(1, args.epochs + 1):
        if args.fork and epoch == args.fork_after_epochs + 1:
            wait_for_model(args.address, args.fork)
            if args.rank % 2 == 1:
                opt.switch_model(args.fork)
                reports_val = args.rank == 1
            print(f"on {args.fork if args.rank % 2 else args.model} from model version "
                  f"{opt.version}", flush=True)  # fmt: skip
        order = torch.randperm(len(y), generator=generator)
        total, batches, window = 0.0, 0, []
        for i in range(0, len(y), args.batch_size):
            idx = order[i : i + args.batch_size]
            opt.zero_grad()
            loss = loss_fn(net(x[idx]), y[idx])
            loss.backward()
            opt.step()
            total += loss.item()
            batches += 1
            window.append(loss.item())
            if args.report_every and len(window) == args.report_every:
                opt.report_metric("loss", sum(window) / len(window), step=opt.version)
                window = []
        if reports_val and args.report_every:
            with torch.no_grad():
                val_loss = float(loss_fn(net(x_val), y_val))
            opt.report_metric("val_loss", val_loss, step=opt.version)
            opt.report_metric("val_accuracy", accuracy(net, x_val, y_val), step=opt.version)
        print(
            f"epoch {epoch:>2}/{args.epochs}  loss {total / batches:.4f}  "
            f"train-acc {accuracy(net, x, y):.3f}  model version {opt.version}  "
            f"{time.perf_counter() - start:.1f}s",
            flush=True,
        )
    opt.close()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--address", required=True, help="coordinator host:port")
    parser.add_argument("--model", default="digits-mlp")
    parser.add_argument("--rank", type=int, default=0)
    parser.add_argument("--world-size", type=int, default=1)
    parser.add_argument("--epochs", type=int, default=10)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--optimizer", default='{"name": "adam", "lr": 0.005}')
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--report-every", type=int, default=10,
        help="report the mean training loss every N batches (0: report no metrics)",
    )  # fmt: skip
    parser.add_argument("--fork", default=None, help="the fork the odd ranks move to")
    parser.add_argument(
        "--fork-after-epochs", type=int, default=0, help="epochs before moving to --fork"
    )
    args = parser.parse_args(argv)
    if not 0 <= args.rank < args.world_size:
        parser.error(f"--rank must be in [0, {args.world_size}), got {args.rank}")
    train(args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
