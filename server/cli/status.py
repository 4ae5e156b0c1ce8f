"""`optserve status`: every model as a table, or one model's run in detail."""

from __future__ import annotations

import argparse
import json
import sys
import time

from optserve.server.cli.common import ago, command, connect, print_json, table


def add_parser(sub: argparse._SubParsersAction) -> None:
    status = command(
        sub,
        "status",
        "show every model as a table, or one model's run in detail",
        "Without --model: one line per model (version, rule, lr, schedule, mode, shards, "
        "trainers active in the last 5 minutes / seen). With --model: that model's optimizer, "
        "schedule, gradient policy, groups, shards, trainers, recent metrics and audit log.",
        "examples:\n  optserve status\n  optserve status --model my-net\n"
        "  optserve status --model my-net --json | jq .trainers\n"
        "  OPTSERVE_ADDRESS=head:50051 optserve status --token-file ~/.optserve-token\n",
        model_required=False,
    )
    status.add_argument("--json", action="store_true", help="print the raw JSON")
    status.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from optserve.common.errors import OptserveError

    with connect(args) as client:
        if args.model is None:
            statuses, errors = [], {}
            for model in client.list_models():
                try:
                    statuses.append(client.status(model))
                except OptserveError as exc:  # one model down must not hide the others
                    errors[model] = f"{exc.code.name}: {exc}"
        else:
            statuses, errors = [client.status(args.model)], {}
    if args.json:
        print_json(statuses[0] if args.model else {"models": statuses, "errors": errors})
        return 2 if errors else 0
    if args.model is None:
        if not statuses and not errors:
            print("no models (create one with ParameterServerClient.create_model or by "
                  "starting a RemoteOptimizer)")  # fmt: skip
            return 0
        rows = [
            [
                s["model"], f"{s['version']:,}", _rule(s["optimizer"]),
                ", ".join(f"{g['lr']:.4g}" for g in s["groups"].values()),
                s["schedule"].get("name", "constant"), s["mode"]["mode"],
                _shards_cell(s), f"{_active_trainers(s)}/{len(s.get('trainers', {}))}",
                _checkpoint_cell(s["checkpoint"]), f"{s['checkpoint']['updates_at_risk']:,}",
            ]
            for s in statuses
        ]  # fmt: skip
        rows += [[name, *["-"] * 9] for name in errors]
        headers = ["MODEL", "VERSION", "RULE", "LR", "SCHEDULE", "MODE", "SHARDS", "TRAINERS",
                   "CHECKPOINT", "AT RISK"]  # fmt: skip
        print(table(headers, rows))
        for name, error in errors.items():
            print(f"optserve: {name}: {error}", file=sys.stderr)
        return 2 if errors else 0
    _print_model(statuses[0])
    return 0


def _rule(optimizer: dict) -> str:
    extra = " + lookahead" if optimizer.get("lookahead") else ""
    return f"{optimizer.get('name', '?')}{extra}"


def _active_trainers(status: dict) -> int:
    from optserve.server.metrics import TRAINER_WINDOW_S

    return sum(1 for t in status.get("trainers", {}).values() if t["idle_s"] <= TRAINER_WINDOW_S)


def _shards_cell(status: dict) -> str:
    """How many shards on which device, and which are broken or still loading."""
    cell = f"{len(status['shards'])} on {status['device']}"
    broken = [str(s["index"]) for s in status["shards"] if s.get("broken")]
    if broken:
        cell += f" (broken: {','.join(broken)})"
    elif status.get("initializing"):
        cell += " (loading)"
    return cell


def _checkpoint_cell(checkpoint: dict) -> str:
    """When the model was last checkpointed (and, without periodic ones, that it is not)."""
    last = "never" if checkpoint["age_s"] is None else ago(checkpoint["age_s"])
    return last if checkpoint["periodic"] else f"{last}, not periodic"


def _print_model(status: dict) -> None:
    gradients = status["mode"].get("gradients", {})
    print(f"model     {status['model']}")
    print(f"version   {status['version']:,}")
    print(f"optimizer {json.dumps(status['optimizer'])}")
    print(
        f"schedule  {json.dumps(status['schedule'])}  state {json.dumps(status['schedule_state'])}"
    )
    print(f"mode      {json.dumps({k: v for k, v in status['mode'].items() if k != 'gradients'})}")
    print(f"gradients {json.dumps(gradients)}  counters "
          f"{json.dumps(status.get('gradient_counters', {}))}")  # fmt: skip
    checkpoint = status["checkpoint"]
    last = ("none yet" if checkpoint["last_version"] is None else
            f"version {checkpoint['last_version']:,}, {ago(checkpoint['age_s'])}")  # fmt: skip
    print(f"checkpoint last {last}; policy {json.dumps(checkpoint['policy'])}; a lost shard "
          f"now costs {checkpoint['updates_at_risk']:,} update(s)")  # fmt: skip
    failing = checkpoint.get("failures_in_a_row") or 0
    if failing:
        last_failure = checkpoint.get("last_failure") or {}
        print(f"checkpoint FAILING: {failing} in a row, last {last_failure.get('reason', '?')}: "
              f"{last_failure.get('error', '')}; next try in "
              f"{checkpoint.get('next_try_in_s') or 0:.0f} s")  # fmt: skip
    print()
    print(table(
        ["GROUP", "PARAMS", "LR", "KERNEL", "STATE", "OVERRIDES"],
        [[name, f"{g['numel']:,}", f"{g['lr']:.6g}", _kernel_cell(g), json.dumps(g["state"]),
          json.dumps(g["overrides"])] for name, g in status["groups"].items()],
    ))  # fmt: skip
    print()
    print(table(
        ["SHARD", "ADDRESS", "DEVICE", "VERSION", "STATE", "RULES"],
        [[str(s["index"]), s["address"], s["device"], f"{s['version']:,}",
          f"broken: {s['broken']}" if s.get("broken") else
          ("ok" if s.get("ready", True) else
           "compiling kernels" if s.get("preparing") else "loading"),
          ", ".join(f"{g}: {i['rule']} ({i['path']})" for g, i in s["groups"].items())]
         for s in status["shards"]],
    ))  # fmt: skip
    _print_history(status)


def _kernel_cell(group: dict) -> str:
    kernel, note = group.get("kernel", ""), group.get("kernel_note", "")
    return f"{kernel} ({note})" if note and kernel != "fused" else kernel


def _local_steps(trainer: dict) -> str:
    """A trainer's inner steps under local SGD; "-" for one that pushes every step."""
    steps = trainer.get("local_steps", 0)
    return f"{steps:,}" if steps else "-"


def _print_history(status: dict) -> None:
    """The model's trainers, newest metrics and audit entries, as tables."""
    trainers = status.get("trainers", {})
    if trainers:
        print()
        print(table(
            ["TRAINER", "PUSHES", "APPLIED", "REFUSED", "ON VERSION", "STALENESS", "LOCAL STEPS",
             "LAST PUSH", "PEER"],
            [[name, f"{t['pushes']:,}", f"{t['applied']:,}", f"{t['refused']:,}",
              f"{t['version']:,}", str(t["staleness"]), _local_steps(t), ago(t["idle_s"]),
              t["peer"]]
             for name, t in trainers.items()],
        ))  # fmt: skip
    if status["metrics"]:
        print()
        print(table(
            ["METRIC", "VALUE", "STEP", "VERSION", "LR CHANGED"],
            [[m["name"], f"{m['value']:.6g}", "-" if m["step"] is None else str(m["step"]),
              f"{m['version']:,}", "yes" if m["lr_changed"] else ""]
             for m in status["metrics"][-10:]],
        ))  # fmt: skip
    if status["audit"]:
        print()
        print(table(
            ["WHEN", "VERSION", "ACTION", "BY", "CHANGE"],
            [[time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(e["time"])),
              f"{e['version']:,}", e["action"], e["caller"] or "-",
              f"{json.dumps(e['old'])} -> {json.dumps(e['new'])}"] for e in status["audit"][-10:]],
        ))  # fmt: skip
