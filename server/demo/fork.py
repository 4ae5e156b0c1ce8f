"""`optserve demo --fork`: fork a live run, try another optimizer on the copy, keep the better.

The plain demo's run (an embedded Ray and server, trainer processes on scikit-learn's digits),
forked instead of swapped. Every trainer pauses after the first part of its epochs
(`--swap-at`, half by default) until the model is forked; this module forks it then, at that
version, under `digits-mlp-<rule>`, with the `--swap-to` optimizer (SGD with momentum by default,
its momentum carried over from Adam's first moment: spec C1). The odd ranks move to the fork
(`RemoteOptimizer.switch_model`), the even ones go on with the main line's optimizer, so each
branch gets half the trainers and the same number of epochs. At the end it compares the two
(`optserve compare`'s table and plot), tests both on the held-out split, and promotes the fork
if it is the better (by held-out accuracy, then loss), keeping the old main line under
`digits-mlp-<rule>`; if the main line is the better, it stays, and so does the fork.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from optserve.client import ParameterServerClient
from optserve.client.compare import branches, compare_rows, plot_compare, read_branch, table_rows
from optserve.common.config import parse_optimizer_config
from optserve.server.cli.common import table
from optserve.server.demo import run as demo
from optserve.server.demo.run import MODEL
from optserve.server.demo.trainer import accuracy, build_model, load_digits_split


def branch_name(optimizer: dict[str, Any], taken: str, base: str = MODEL) -> str:
    """`<base>-<rule>` (`digits-mlp-sgd`), or `<base>-main` where that is `taken` (both
    branches on one rule)."""
    name = f"{base}-{optimizer.get('name', 'fork')}"
    return name if name != taken else f"{base}-main"


def better(scores: dict[str, dict[str, float]]) -> str:
    """The branch with the higher held-out accuracy; at equal accuracy, the lower loss."""
    return max(scores, key=lambda name: (scores[name]["accuracy"], -scores[name]["loss"]))


class _Forker(demo.AtVersion):
    """Forks the model once it reaches `at_version` (every trainer then waits for the fork)."""

    def __init__(self, address: str, fork: str, at_version: int, optimizer: str) -> None:
        super().__init__(address, at_version, "optserve-demo-fork")
        self.fork, self.optimizer = fork, optimizer
        self.version: int | None = None

    def act(self, client: ParameterServerClient) -> None:
        info = client.fork(MODEL, self.fork, optimizer=self.optimizer)
        self.version = int(info.fork_version)

    def announce(self) -> None:
        rule = json.loads(self.optimizer)["name"]
        print(f"[demo] at model version {self.version}: forked {MODEL} -> {self.fork} "
              f"({rule}, state migrated)", flush=True)  # fmt: skip


@dataclass
class Settled:
    """How a comparison ended: each branch's held-out scores (accuracy, loss, version, rule),
    the better branch, the name the old main line is kept as (None: nothing was promoted), and
    the held-out scores of what the main line's name serves now."""

    scores: dict[str, dict[str, Any]]
    winner: str
    kept_as: str | None
    main_line: dict[str, float]


def settle(client: ParameterServerClient, main: str, fork: str, seed: int) -> Settled:
    """Test both branches on the held-out split and promote the fork if it is the better (the
    old main line kept as `<main>-<rule>`); the main line otherwise stays, and so does the
    fork."""
    scores: dict[str, dict[str, Any]] = {}
    for name in (main, fork):
        weights, version = client.pull(name)
        rule = client.status(name, history=1).optimizer
        scores[name] = {**held_out(weights, seed), "version": version, "optimizer": rule}
    winner = better(scores)
    kept_as = None
    if winner == fork:
        kept_as = branch_name(scores[main]["optimizer"], fork, base=main)
        client.promote(fork, keep_as=kept_as)
    return Settled(scores, winner, kept_as, held_out(client.pull(main)[0], seed))


def held_out(weights: dict[str, torch.Tensor], seed: int) -> dict[str, float]:
    """Test accuracy and cross-entropy of `weights` on the demo's held-out split."""
    net = build_model(seed)
    net.load_state_dict(weights)
    _, _, x_test, y_test = load_digits_split(seed)
    with torch.no_grad():
        loss = float(torch.nn.functional.cross_entropy(net(x_test), y_test))
    return {"accuracy": accuracy(net, x_test, y_test), "loss": loss}


def run_fork(args: argparse.Namespace) -> int:
    """The fork demo, end to end (see the module's docstring); 0 when all went well."""
    from optserve.server.runtime import init_ray

    try:
        import sklearn  # noqa: F401 - the data set ships inside it
    except ImportError:
        print("optserve demo needs scikit-learn: pip install 'optserve[demo]'", file=sys.stderr)
        return 1
    if args.trainers < 2:
        print("optserve demo --fork needs at least 2 trainers (half go to each branch)",
              file=sys.stderr)  # fmt: skip
        return 1
    started = time.perf_counter()
    main_optimizer = parse_optimizer_config(args.optimizer).model_dump_json()
    fork_optimizer = parse_optimizer_config(
        args.swap_to or '{"name": "sgd", "lr": 0.05, "momentum": 0.9}'
    ).model_dump_json()
    epochs = args.epochs if args.epochs is not None else (6 if args.short else 20)
    fork_after = min(epochs - 1, max(1, round(args.swap_at * epochs)))
    fork = branch_name(json.loads(fork_optimizer), MODEL)
    at = demo._updates_expected(args, fork_after)
    print(f"optserve demo --fork: {args.trainers} trainers, {epochs} epochs on {args.optimizer}; "
          f"after {fork_after} (model version {at}) the run forks as {fork} on "
          f"{args.swap_to or fork_optimizer} "
          "and half the trainers move to it", flush=True)  # fmt: skip
    init_ray(log_to_driver=False)
    import ray

    service = None
    try:
        checkpoints = Path(args.out_dir).resolve() / "checkpoints"
        service = demo._start(args, checkpoints)
        print(f"server ready at {service.address} ({time.perf_counter() - started:.1f}s)",
              flush=True)  # fmt: skip
        forker = _Forker(service.address, fork, at, fork_optimizer)
        forker.start()
        commands = [
            [*demo._trainer_command(service.address, rank, args, epochs, main_optimizer),
             "--fork", fork, "--fork-after-epochs", str(fork_after)]
            for rank in range(args.trainers)
        ]  # fmt: skip
        try:
            failed = demo._run_trainers(commands, abort=forker.failed)
        finally:
            forker.stop.set()
            forker.join(timeout=120)
        if forker.error is not None:
            print(f"optserve demo: the fork failed: {forker.error}", file=sys.stderr)
            return 1
        if failed:
            print(f"optserve demo: trainer(s) {failed} failed", file=sys.stderr)
            return 1
        _finish(args, service.address, fork, epochs, checkpoints, started)
        return 0
    finally:
        if service is not None:
            service.stop(grace_s=2.0)
        ray.shutdown()


def _finish(
    args: argparse.Namespace, address: str, fork: str, epochs: int, checkpoints: Path,
    started: float,
) -> None:  # fmt: skip
    """Compare the branches, plot them, promote the better, checkpoint the main line, report."""
    plot_path = checkpoints.parent / f"{MODEL}-compare.png"
    plot_path.parent.mkdir(parents=True, exist_ok=True)
    with ParameterServerClient(address) as client:
        statuses = [read_branch(client, name) for name in (MODEL, fork)]
        rows = compare_rows(branches(statuses))
        try:
            drawn = plot_compare(statuses, str(plot_path))
        except Exception as exc:  # noqa: BLE001 - e.g. no matplotlib: the run itself succeeded
            drawn = {"error": str(exc)}
        settled = settle(client, MODEL, fork, args.seed)
        saved = client.checkpoint(MODEL)
        serving = client.describe_model(MODEL).name  # the promoted fork's own name, if promoted
    print(table(*table_rows(rows)))
    for name, score in settled.scores.items():
        print(f"{name} ({score['optimizer']['name']}): held-out accuracy {score['accuracy']:.2%}, "
              f"loss {score['loss']:.4f} at model version {score['version']}")  # fmt: skip
    if settled.kept_as is not None:
        print(f"promoted {fork}: {MODEL} now resolves to it (the old main line is kept as "
              f"{settled.kept_as})")  # fmt: skip
    else:
        print(f"{MODEL} stays the main line (it is the better); {fork} is kept beside it")
    elapsed = time.perf_counter() - started
    print(f"final test accuracy: {settled.main_line['accuracy']:.2%} on the main line, {MODEL} "
          f"({elapsed:.1f}s in all)", flush=True)  # fmt: skip
    print(f"plot:       {plot_path} ({_said(drawn)})")
    print(f"checkpoint: {checkpoints / serving / saved.name} (version {saved.version}, of "
          f"{MODEL}: {serving})")  # fmt: skip
    print(f"(with a server running: optserve compare {MODEL} draws the same for any model)")
    demo._next_steps(checkpoints)
    if args.report:
        report = {
            "epochs": epochs, "trainers": args.trainers, "seconds": elapsed,
            "fork": {"name": fork, "version": statuses[1].get("fork_version"),
                     "optimizer": statuses[1]["optimizer"]},
            "branches": settled.scores, "winner": settled.winner,
            "promoted": settled.kept_as is not None, "kept_as": settled.kept_as,
            "test_accuracy": settled.main_line["accuracy"], "main_line": settled.main_line,
            "rows": [r.to_dict() for r in rows], "plot": str(plot_path), "drawn": drawn,
            "checkpoint": {"dir": str(checkpoints), "model": serving, **saved.to_dict()},
        }  # fmt: skip
        Path(args.report).write_text(json.dumps(report, indent=2) + "\n")


def _said(drawn: dict[str, Any]) -> str:
    if "error" in drawn:
        return f"not written: {drawn['error']}"
    marks = ", ".join(m["label"] for m in drawn["markers"]) or "no fork marked"
    return f"{', '.join(drawn['metrics'])} of both branches over model versions; {marks}"
