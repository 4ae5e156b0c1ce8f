"""The client commands of forks (docs/forks.md): `fork` and `promote`."""

from __future__ import annotations

import argparse

from optserve.server.cli.common import command, connect, progress


def add_parsers(sub: argparse._SubParsersAction) -> None:
    fork = command(
        sub,
        "fork",
        "copy a live model (or one of its checkpoints) as a new model, maybe with another "
        "optimizer",
        "Copy a model at one version under a new name: weights, all optimizer state, schedule "
        "and its state, update mode, param groups, metrics and audit history. The copy starts "
        "from a consistent checkpoint taken now (the model's pushes wait as long as a "
        "checkpoint makes them wait) or from one of the model's checkpoints (--at "
        "checkpoint:NAME, from 'optserve checkpoint --list'). --optimizer swaps the copy's rule "
        "before its first update. The fork is a model like any other; trainers move to it with "
        "RemoteOptimizer.switch_model, and 'optserve promote' makes it the main line.",
        "examples:\n  optserve fork --model my-net my-net-sgd --optimizer "
        '\'{"name": "sgd", "lr": 0.05, "momentum": 0.9}\'\n'
        "  optserve fork --model my-net my-net-old --at checkpoint:1764000000000-000000001200-"
        "3f2a9c1b7d4e\n",
    )
    fork.add_argument("new_name", help="the fork's name (a new model)")
    fork.add_argument("--at", default="now", help='"now" (default) or "checkpoint:NAME"')
    fork.add_argument("--optimizer", default=None, help="the fork's optimizer config JSON")
    fork.add_argument("--policy", default="migrate", choices=["migrate", "reset", "keep"],
                      help="how state follows a swapped optimizer (as set-optimizer)")  # fmt: skip
    fork.set_defaults(func=_fork)
    promote = command(
        sub,
        "promote",
        "make a fork its model's main line: the model's name resolves to the fork",
        "Promote FORK: its parent's name (and every name that resolved to the parent) names "
        "the fork from now on, for pushes, pulls, status and checkpoints; trainers that push to "
        "that name are told to pull once, then go on with the fork. The parent's run is "
        "dropped, or kept as another model with --keep-as. The audit log records it.",
        "examples:\n  optserve promote my-net-sgd\n"
        "  optserve promote my-net-sgd --keep-as my-net-adam\n",
        model_option=False,  # FORK names the model
    )
    promote.add_argument("fork", help="the fork to promote")
    promote.add_argument("--keep-as", default=None, metavar="NAME",
                         help="keep the parent's run as a model of this name (default: drop "
                         "it)")  # fmt: skip
    promote.set_defaults(func=_promote)


def _fork(args: argparse.Namespace) -> int:
    with connect(args) as client, progress(f"forking {args.model}"):
        info = client.fork(args.model, args.new_name, args.at, args.optimizer, args.policy)
    print(f"forked {info.forked_from} at version {info.fork_version} (checkpoint "
          f"{info.fork_checkpoint}) as {info.name}: {info.optimizer.name} on "
          f"{len(info.shards)} shard(s)")  # fmt: skip
    return 0


def _promote(args: argparse.Namespace) -> int:
    with connect(args) as client, progress(f"promoting {args.fork}"):
        info = client.promote(args.fork, keep_as=args.keep_as)
    parent = info.forked_from
    then = f"kept as {args.keep_as}" if args.keep_as else "dropped"
    print(f"promoted {info.name}: {', '.join(info.aliases)} now resolve to it; the run {parent} "
          f"had is {then}")  # fmt: skip
    return 0
