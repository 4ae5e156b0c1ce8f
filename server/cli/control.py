"""The client commands that change or save a model: `plot`, `set-optimizer`, `set-schedule`,
`checkpoint`, `restore`; and, from server/cli/forks.py, `fork` and `promote`."""

from __future__ import annotations

import argparse
import json
import time

from optserve.server.cli import forks
from optserve.server.cli.common import command, connect, positive, print_json, progress


def add_parsers(sub: argparse._SubParsersAction) -> None:
    _add_plot(sub)
    _add_set_optimizer(sub)
    _add_set_schedule(sub)
    _add_checkpoint(sub)
    _add_restore(sub)
    forks.add_parsers(sub)


def _add_plot(sub: argparse._SubParsersAction) -> None:
    plot = command(
        sub,
        "plot",
        "write a PNG of a model's loss, validation metric, lr and version over steps",
        "Draw the metrics trainers reported (report_metric), the learning rate of each group "
        "and the model version over the trainers' steps, with a dashed red line where the "
        "optimizer or the schedule changed or the model was restored. Needs matplotlib "
        "(pip install 'optserve[plot]').",
        "examples:\n  optserve plot --model my-net                  # writes my-net.png\n"
        "  optserve plot --model my-net --out run.png --history 1000\n",
    )
    plot.add_argument("--out", default=None, help="PNG file to write (default MODEL.png)")
    plot.add_argument(
        "--history", type=positive, default=10_000,
        help="newest metrics and audit entries to draw (default 10000: all the server keeps)",
    )  # fmt: skip
    plot.set_defaults(func=_plot)


def _add_set_optimizer(sub: argparse._SubParsersAction) -> None:
    set_optimizer = command(
        sub,
        "set-optimizer",
        "swap a model's optimizer, or change some hyperparameters, mid-run",
        "Swap the optimizer of a running model (state carried over by the optimizer spec's "
        "migration rules, or reset), or change some hyperparameters with --set; the change "
        "takes effect at one version on every shard.",
        "examples:\n"
        '  optserve set-optimizer --model my-net \'{"name": "sgd", "lr": 0.05, '
        '"momentum": 0.9}\'\n'
        '  optserve set-optimizer --model my-net \'{"name": "ranger"}\' --policy reset\n'
        "  optserve set-optimizer --model my-net --set lr=0.0003 --set betas='[0.9, 0.99]'\n",
    )
    set_optimizer.add_argument("config", nargs="?", default=None, help="optimizer config JSON")
    set_optimizer.add_argument("--policy", default="migrate", choices=["migrate", "reset", "keep"])
    set_optimizer.add_argument(
        "--set", action="append", default=[], metavar="KEY=VALUE",
        help="change one hyperparameter of the current rule (VALUE as JSON); repeatable",
    )  # fmt: skip
    set_optimizer.add_argument("--json", action="store_true", help="print the raw report")
    set_optimizer.set_defaults(func=_set_optimizer)


def _add_set_schedule(sub: argparse._SubParsersAction) -> None:
    set_schedule = command(
        sub,
        "set-schedule",
        "replace a model's learning-rate schedule mid-run",
        "Replace the learning-rate schedule of a running model, at one version on every shard.",
        "examples:\n"
        '  optserve set-schedule --model my-net \'{"name": "cosine", "T_max": 1000}\'\n'
        '  optserve set-schedule --model my-net \'{"name": "plateau"}\'\n',
    )
    set_schedule.add_argument("config", help="schedule config JSON")
    set_schedule.set_defaults(func=_set_schedule)


def _add_checkpoint(sub: argparse._SubParsersAction) -> None:
    checkpoint = command(
        sub,
        "checkpoint",
        "write a consistent checkpoint of a model now, or list its checkpoints",
        "Snapshot every shard of a model at one version (weights, all optimizer state, "
        "configs, schedule state, audit log) under the server's --checkpoint-dir.",
        "examples:\n  optserve checkpoint --model my-net\n"
        "  optserve checkpoint --model my-net --list\n",
    )
    checkpoint.add_argument("--list", action="store_true", help="list the model's checkpoints")
    checkpoint.add_argument(
        "--snapshot",
        choices=["pause", "copy"],
        default=None,
        help="pause the model's pushes while the shards write (no extra memory), or copy "
        "each shard's state first (default: the model's policy)",
    )
    checkpoint.set_defaults(func=_checkpoint)


def _add_restore(sub: argparse._SubParsersAction) -> None:
    restore = command(
        sub,
        "restore",
        "bring a model back from a checkpoint, on any number of shards",
        "Restore a model from its newest checkpoint (or --checkpoint NAME), replacing the "
        "running model of that name once the checkpoint is verified and loaded.",
        "examples:\n  optserve restore --model my-net\n"
        "  optserve restore --model my-net --checkpoint 000000001200-1764000000000 --shards 4\n",
    )
    restore.add_argument("--checkpoint", default=None, help="checkpoint name (default: newest)")
    restore.add_argument("--shards", type=int, default=0, help="shards (default: as now)")
    restore.set_defaults(func=_restore)


def _plot(args: argparse.Namespace) -> int:
    from optserve.client.plot import plot_run

    with connect(args) as client:
        status = client.status(args.model, history=args.history)
    out = args.out or f"{args.model}.png"
    summary = plot_run(status, out)
    drawn = [*summary["training"], *summary["validation"]]
    marked = len(summary["markers"])
    print(f"wrote {out}: {', '.join(drawn) or 'no metrics yet'}, lr and version over "
          f"{summary['x']}s; {marked} optimizer/schedule change(s) marked")  # fmt: skip
    history = status.get("history", {})
    if history.get("metrics_shown", 0) < history.get("metrics_kept", 0):
        print(f"(the newest {history['metrics_shown']:,} of {history['metrics_kept']:,} "
              "metrics the server keeps)")  # fmt: skip
    return 0


def _set_optimizer(args: argparse.Namespace) -> int:
    with connect(args) as client:
        if args.config is not None:
            report = client.set_optimizer(args.model, args.config, args.policy)
        else:
            changes = dict(_key_value(item) for item in args.set)
            if not changes:
                raise SystemExit("optserve set-optimizer: give a config JSON or --set KEY=VALUE")
            report = client.set_hyperparameters(args.model, **changes)
    if args.json:
        print_json(report)
        return 0
    print(f"optimizer of {args.model} is now {json.dumps(report['optimizer'])}, "
          f"from version {report['version']} on, on {report['shards']} shard(s)")  # fmt: skip
    for group, migration in report["groups"].items():
        print(f"  group {group}: {migration['source']} -> {migration['target']} "
              f"({migration['policy']})")  # fmt: skip
        for key, entry in migration["keys"].items():
            print(f"    {key}: {entry['action']} ({entry['why']})")
    return 0


def _key_value(item: str) -> tuple[str, object]:
    key, sep, value = item.partition("=")
    if not sep or not key:
        raise SystemExit(f"optserve: --set wants KEY=VALUE, got {item!r}")
    try:
        return key, json.loads(value)
    except json.JSONDecodeError:
        return key, value


def _checkpoint(args: argparse.Namespace) -> int:
    with connect(args) as client:
        if args.list:
            for entry in client.list_checkpoints(args.model):
                stamp = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(entry["time"]))
                print(f"{entry['name']}  version {entry['version']}  {stamp}")
            return 0
        with progress(f"checkpointing {args.model}"):
            done = client.checkpoint(args.model, snapshot=args.snapshot)
    print(f"checkpoint {done['name']} of {args.model} at version {done['version']} "
          f"in {done['uri']}: {done['bytes'] / 1e6:,.1f} MB in {done['seconds']:.1f}s "
          f"(pushes held {done['pause_s']:.2f}s)")  # fmt: skip
    return 0


def _restore(args: argparse.Namespace) -> int:
    with connect(args) as client, progress(f"restoring {args.model}"):
        info = client.restore(args.model, args.checkpoint, num_shards=args.shards)
    print(f"restored {args.model} at version {info.version} on {len(info.shards)} shard(s)")
    return 0


def _set_schedule(args: argparse.Namespace) -> int:
    with connect(args) as client:
        version = client.set_schedule(args.model, args.config)
    print(f"schedule of {args.model} is now {args.config}, from version {version} on")
    return 0
