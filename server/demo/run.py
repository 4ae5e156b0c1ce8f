"""`optserve demo`: the whole system on one machine, end to end.

Starts an embedded Ray and the optserve server, runs trainer processes (separate OS processes
that talk gRPC, not Ray tasks) that train an MLP on scikit-learn's digits through one shared
model on the server, relays their progress, then pulls the final weights and reports the
accuracy on the held-out test split. Halfway through it swaps the optimizer (Adam to SGD with
momentum = beta1, whose state continues Adam's first moment: spec C1) and shows the migration.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import secrets
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import IO

from tqdm import tqdm

from optserve.client import MigrationReport, ParameterServerClient
from optserve.common.auth import TOKEN_ENV
from optserve.common.config import parse_optimizer_config
from optserve.common.errors import NotFound, OptserveError
from optserve.server.demo.trainer import accuracy, build_model, load_digits_split

MODEL = "digits-mlp"


# A trainer that has not finished by then is stuck; the demo takes about 20 seconds.
TRAINER_TIMEOUT_S = 900


def _relay(prefix: str, stream: IO[str]) -> None:
    for line in stream:  # above the progress bar, when there is one
        tqdm.write(f"{prefix} {line.rstrip()}")
        sys.stdout.flush()


class _Progress(threading.Thread):
    """A progress bar of the model's version against the updates the run will make (shown on
    a terminal only)."""

    def __init__(self, address: str, total: int) -> None:
        super().__init__(name="optserve-demo-progress", daemon=True)
        self.address, self.total = address, total
        self.stop = threading.Event()

    def run(self) -> None:
        bar = tqdm(total=self.total, desc="training", unit="update", disable=None,
                   dynamic_ncols=True, leave=False)  # fmt: skip
        try:
            with ParameterServerClient(self.address) as client:
                while not self.stop.wait(0.25):
                    try:
                        version = client.describe_model(MODEL).version
                    except OptserveError:  # not created yet, or going away
                        continue
                    bar.update(max(0, min(version, self.total) - bar.n))
        except Exception:  # noqa: BLE001 - a progress bar must never fail the demo
            pass
        finally:
            bar.close()


def _trainer_command(
    address: str, rank: int, args: argparse.Namespace, epochs: int, optimizer_json: str
) -> list[str]:
    return [
        sys.executable, "-m", "optserve.server.demo.trainer",
        "--address", address, "--model", MODEL,
        "--rank", str(rank), "--world-size", str(args.trainers),
        "--epochs", str(epochs), "--optimizer", optimizer_json, "--seed", str(args.seed),
    ]  # fmt: skip


def _run_trainers(commands: list[list[str]], abort: threading.Event | None = None) -> list[int]:
    """Run the trainer processes, relaying their output; return the ranks that failed.

    If one fails, `abort` is set (the demo's fork failed) or on Ctrl-C, the others are
    stopped rather than left behind.
    """
    procs = [
        subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                         bufsize=1)
        for cmd in commands
    ]  # fmt: skip
    relays = [
        threading.Thread(target=_relay, args=(f"[trainer {rank}]", proc.stdout), daemon=True)
        for rank, proc in enumerate(procs)
    ]
    for relay in relays:
        relay.start()
    failed: list[int] = []
    deadline = time.monotonic() + TRAINER_TIMEOUT_S
    try:
        while any(p.poll() is None for p in procs) and not failed:
            if time.monotonic() > deadline or (abort is not None and abort.is_set()):
                failed = [r for r, p in enumerate(procs) if p.poll() is None]
                break
            time.sleep(0.1)
            failed = [r for r, p in enumerate(procs) if p.poll() not in (None, 0)]
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.terminate()
        for proc in procs:
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        for relay in relays:
            relay.join(timeout=5)
    return failed


def _updates_expected(args: argparse.Namespace, epochs: int, batch_size: int = 32) -> int:
    x_train, _, _, _ = load_digits_split(args.seed)
    per_rank = [len(x_train[rank :: args.trainers]) for rank in range(args.trainers)]
    return epochs * sum(math.ceil(n / batch_size) for n in per_rank)


class AtVersion(threading.Thread):
    """Acts on the demo's model once it reaches `at_version` (`act`, then `announce`); an
    error is kept in `error` and `failed` is set (trainers waiting on the act stop)."""

    def __init__(self, address: str, at_version: int, name: str) -> None:
        super().__init__(name=name, daemon=True)
        self.address, self.at_version = address, at_version
        self.stop, self.failed = threading.Event(), threading.Event()
        self.error: BaseException | None = None
        self.done = False

    def act(self, client: ParameterServerClient) -> None:
        raise NotImplementedError

    def announce(self) -> None:
        """Say what `act` did (once it did)."""

    def run(self) -> None:
        try:
            with ParameterServerClient(self.address) as client:
                while not self.stop.wait(0.1):
                    try:
                        version = client.describe_model(MODEL).version
                    except NotFound:  # the first trainer has not created it yet
                        continue
                    if version >= self.at_version:
                        self.act(client)
                        self.done = True
                        break
        except BaseException as exc:  # noqa: BLE001 - reported by the demo
            self.error = exc
            self.failed.set()
            return
        if self.done:
            self.announce()


class _Swapper(AtVersion):
    """Swaps the model's optimizer once the run is `at` of the way through (DESIGN section 8:
    the demo swaps the optimizer mid-run), and says what happened to each state key."""

    def __init__(self, address: str, target: str, at_version: int, label: str) -> None:
        super().__init__(address, at_version, "optserve-demo-swap")
        self.target, self.label = target, label
        self.report: MigrationReport | None = None

    def act(self, client: ParameterServerClient) -> None:
        self.report = client.set_optimizer(MODEL, self.target, "migrate")

    def announce(self) -> None:
        assert self.report is not None
        group = self.report.groups["default"]
        said = "; ".join(f"{k} {v.action}" for k, v in group.keys.items())
        source = group.source
        print(f"[demo] at model version {self.report.version}: optimizer swapped "
              f"{source} -> {self.label} (migrate: {said})", flush=True)  # fmt: skip


def _plot(client: ParameterServerClient, path: Path) -> str:
    """Write the run's plot; say what it shows (or why there is none)."""
    from optserve.client.plot import plot_run

    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        summary = plot_run(client.status(MODEL, history=10_000), str(path))
    except Exception as exc:  # noqa: BLE001 - e.g. no matplotlib: the run itself succeeded
        return f"not written: {exc}"
    series = ", ".join([*summary["training"], *summary["validation"], "lr", "version"])
    return f"{series} over {summary['x']}s, {len(summary['markers'])} optimizer change(s) marked"


def _next_steps(checkpoints: Path) -> None:
    """What to try next: bring the model back on a server of your own and drive it."""
    here = Path.cwd()
    where = checkpoints.relative_to(here) if checkpoints.is_relative_to(here) else checkpoints
    print(
        f"""
what next: serve the model again from its checkpoint, then look at it and steer it
(with the virtualenv's bin on your PATH: source .venv/bin/activate)
  export OPTSERVE_TOKEN=$(python3 -c 'import secrets; print(secrets.token_urlsafe(32))')
  printf '{{"tokens": [{{"name": "me", "role": "admin", "token": "%s"}}]}}' \\
      "$OPTSERVE_TOKEN" > tokens.json
  optserve serve --tokens-file tokens.json --checkpoint-dir {where} --restore
then, in another terminal (export the same OPTSERVE_TOKEN there), once it says "serving on":
  optserve status                                  # every model, as a table
  optserve status --model {MODEL}              # optimizer, shards, trainers, metrics, audit
  optserve set-optimizer --model {MODEL} '{{"name": "ranger", "lr": 0.001}}'
  optserve plot --model {MODEL} --out run.png
  optserve checkpoint --model {MODEL} && optserve restore --model {MODEL} --shards 2
(optserve <command> --help shows each command's options and examples)""",
        flush=True,
    )


def run(args: argparse.Namespace) -> int:
    from optserve.server.runtime import init_ray

    try:
        import sklearn  # noqa: F401 - the data set ships inside it
    except ImportError:
        print("optserve demo needs scikit-learn: pip install 'optserve[demo]'", file=sys.stderr)
        return 1
    started = time.perf_counter()
    optimizer = parse_optimizer_config(args.optimizer)
    epochs = args.epochs if args.epochs is not None else (5 if args.short else 20)
    print(f"optserve demo: {args.trainers} trainers, {epochs} epochs, optimizer {args.optimizer}")
    print("starting an embedded Ray and the optserve server ...", flush=True)
    init_ray(log_to_driver=False)
    import ray

    service = None
    try:
        checkpoints = Path(args.out_dir).resolve() / "checkpoints"
        service = _start(args, checkpoints)
        print(
            f"server ready at {service.address} ({time.perf_counter() - started:.1f}s)", flush=True
        )
        trained, swap = _train(args, service.address, epochs, optimizer.model_dump_json())
        if not trained:
            return 1
        run = _Run(args, epochs, optimizer.model_dump_json(), checkpoints, started)
        run.finish(service.address, swap)
        return 0
    finally:
        if service is not None:
            service.stop(grace_s=2.0)
        ray.shutdown()


def _start(args: argparse.Namespace, checkpoints: Path):
    """The embedded server, with a token made up for this run (the trainer processes and this
    process send it)."""
    from optserve.server.edge.tokens import EdgeConfig, TokenTable
    from optserve.server.runtime import start_service

    token = secrets.token_urlsafe(32)
    os.environ[TOKEN_ENV] = token
    return start_service(
        port=args.port,
        default_num_shards=args.shards,
        edge=EdgeConfig(tokens=TokenTable.single(token, name="demo")),
        checkpoint_dir=str(checkpoints),
        metrics_port=0,
    )


def _train(
    args: argparse.Namespace, address: str, epochs: int, optimizer: str
) -> tuple[bool, MigrationReport | None]:
    """Run the trainer processes to the end, swapping the optimizer on the way: whether all
    went well (if not, it says why) and the swap's report (None without a swap)."""
    commands = [
        _trainer_command(address, rank, args, epochs, optimizer) for rank in range(args.trainers)
    ]
    swapper = None
    if args.swap_to:
        target = parse_optimizer_config(args.swap_to).model_dump_json()
        at = max(1, int(args.swap_at * _updates_expected(args, epochs)))
        print(f"the optimizer will be swapped to {args.swap_to} at model version {at}",
              flush=True)  # fmt: skip
        swapper = _Swapper(address, target, at, args.swap_to)
        swapper.start()
    progress = _Progress(address, _updates_expected(args, epochs))
    progress.start()
    try:
        failed = _run_trainers(commands)
    finally:
        progress.stop.set()
        progress.join(timeout=10)
        if swapper is not None:
            swapper.stop.set()
            swapper.join(timeout=60)
    if swapper is not None and swapper.error is not None:
        print(f"optserve demo: the optimizer swap failed: {swapper.error}", file=sys.stderr)
        return False, None
    if failed:
        print(f"optserve demo: trainer(s) {failed} failed", file=sys.stderr)
        return False, None
    return True, swapper.report if swapper is not None else None


class _Run:
    """The end of a demo run: the trained weights tested, a checkpoint, a plot, the report."""

    def __init__(
        self, args: argparse.Namespace, epochs: int, optimizer: str, checkpoints: Path,
        started: float,
    ) -> None:  # fmt: skip
        self.args, self.epochs, self.optimizer = args, epochs, optimizer
        self.checkpoints, self.started = checkpoints, started

    def finish(self, address: str, swap: MigrationReport | None) -> None:
        plot_path = self.checkpoints.parent / f"{MODEL}.png"
        with ParameterServerClient(address) as client:
            weights, version = client.pull(MODEL)
            saved = client.checkpoint(MODEL)
            drawn = _plot(client, plot_path)
        net = build_model(self.args.seed)
        net.load_state_dict(weights)
        _, _, x_test, y_test = load_digits_split(self.args.seed)
        test_accuracy = accuracy(net, x_test, y_test)
        elapsed = time.perf_counter() - self.started
        print(
            f"final test accuracy: {test_accuracy:.2%} on {len(y_test)} held-out digits "
            f"(model version {version}, {elapsed:.1f}s in all)",
            flush=True,
        )
        print(f"checkpoint: {self.checkpoints / MODEL / saved.name} (version "
              f"{saved.version}: weights, optimizer state, schedule, metrics)")  # fmt: skip
        print(f"plot:       {plot_path} ({drawn})")
        _next_steps(self.checkpoints)
        if self.args.report:
            report = {
                "test_accuracy": test_accuracy,
                "version": version,
                "epochs": self.epochs,
                "trainers": self.args.trainers,
                "seconds": elapsed,
                "optimizer": json.loads(self.optimizer),
                "checkpoint": {"dir": str(self.checkpoints), **saved.to_dict()},
                "plot": str(plot_path),
                "swap": None
                if swap is None
                else {
                    "version": swap.version,
                    "to": swap.optimizer,
                    "keys": swap.groups["default"].to_dict()["keys"],
                },
            }
            Path(self.args.report).write_text(json.dumps(report, indent=2) + "\n")
