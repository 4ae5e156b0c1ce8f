"""`optserve demo`: the main job, end to end on an embedded local Ray."""

from __future__ import annotations

import argparse

EXAMPLES_DEMO = """examples:
  optserve demo                       # two trainers on digits, about 20 seconds
  optserve demo --short               # fewer epochs, for a quick check
  optserve demo --optimizer '{"name": "sgd", "lr": 0.05, "momentum": 0.9}'
  optserve demo --fork                # fork halfway: Adam on one branch, SGD on the other,
                                      # compare, promote the better, plot both
"""


def add_parser(sub: argparse._SubParsersAction) -> None:
    demo = sub.add_parser(
        "demo",
        help="train a small network from two trainer processes, end to end",
        description="Start everything locally and train an MLP on scikit-learn's digits from "
        "trainer processes that push gradients over gRPC; print the final test accuracy.",
        epilog=EXAMPLES_DEMO,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    demo.add_argument("--short", action="store_true", help="fewer epochs (a quick check)")
    demo.add_argument("--epochs", type=int, default=None, help="epochs per trainer")
    demo.add_argument("--trainers", type=int, default=2, help="number of trainer processes")
    demo.add_argument("--shards", type=int, default=1, help="shards for the demo model")
    demo.add_argument("--port", type=int, default=0, help="coordinator port (default: any free)")
    demo.add_argument(
        "--optimizer", default='{"name": "adam", "lr": 0.005}', help="optimizer config as JSON"
    )
    demo.add_argument(
        "--swap-to",
        default='{"name": "sgd", "lr": 0.05, "momentum": 0.9}',
        help="optimizer config JSON to swap to mid-run (migrating the state); '' to not swap; "
        "with --fork: the fork's optimizer",
    )
    demo.add_argument(
        "--swap-at", type=float, default=0.5,
        help="fraction of the run at which to swap (with --fork: to fork, in whole epochs)",
    )  # fmt: skip
    demo.add_argument(
        "--fork", action="store_true",
        help="fork the run at --swap-at instead of swapping: the main line keeps --optimizer, "
        "the fork gets --swap-to, half the trainers go to each; then compare the two, promote "
        "the better (held-out accuracy) and plot both (out-dir/digits-mlp-compare.png)",
    )  # fmt: skip
    demo.add_argument("--seed", type=int, default=0)
    demo.add_argument(
        "--out-dir",
        default="optserve-demo",
        help="where the checkpoint and the plot go (default ./optserve-demo)",
    )
    demo.add_argument("--report", default=None, help="write a JSON summary to this file")
    demo.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    if args.fork:
        from optserve.server.demo.fork import run_fork

        return run_fork(args)
    from optserve.server.demo.run import run

    return run(args)
