"""Benchmark: one update of a flat fp32 buffer per rule, against torch's fastest path.

Usage: python bench/engine.py [--sizes 16000000 100000000] [--repeat 5] [--device cpu|cuda]

For every rule it prints, measured in the same run: our time (GroupEngine's fast path), torch's
fastest available path for the same rule on the same buffer (fused, else foreach), their ratio,
and our effective bytes/s (the bytes the rule must read and write: weights and gradient, plus
every state buffer read and written) as a fraction of torch fused Adam's. Targets (issue 3):
sgd/adam/adamw/amsgrad/adagrad within 1/0.9 of torch fused; every other rule at least 50 % of
fused Adam's effective bytes/s.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from optserve.client.config import parse_optimizer_config
from optserve.server.engine.group import GroupEngine

RULES = {
    "sgd-momentum": {"name": "sgd", "lr": 0.01, "momentum": 0.9},
    "adagrad": {"name": "adagrad"},
    "rmsprop": {"name": "rmsprop"},
    "adadelta": {"name": "adadelta"},
    "adam": {"name": "adam"},
    "adamw": {"name": "adamw"},
    "amsgrad": {"name": "amsgrad"},
    "adabound": {"name": "adabound"},
    "radam": {"name": "radam"},
    "ranger": {"name": "ranger"},
    "adam+lookahead": {"name": "adam", "lookahead": {"k": 5, "alpha": 0.5}},
}
FUSED_TARGETS = {"sgd-momentum", "adagrad", "adam", "adamw", "amsgrad"}


def torch_fastest(name: str, param: torch.nn.Parameter) -> tuple[torch.optim.Optimizer, str] | None:
    config = RULES[name]
    fused = {"fused": True}
    foreach = {"foreach": True}
    factories = {
        "sgd-momentum": lambda: (torch.optim.SGD([param], lr=0.01, momentum=0.9, **fused), "fused"),
        "adagrad": lambda: (torch.optim.Adagrad([param], **fused), "fused"),
        "adam": lambda: (torch.optim.Adam([param], **fused), "fused"),
        "adamw": lambda: (torch.optim.AdamW([param], **fused), "fused"),
        "amsgrad": lambda: (torch.optim.Adam([param], amsgrad=True, **fused), "fused"),
        "rmsprop": lambda: (torch.optim.RMSprop([param], **foreach), "foreach"),
        "adadelta": lambda: (torch.optim.Adadelta([param], **foreach), "foreach"),
        "radam": lambda: (torch.optim.RAdam([param], **foreach), "foreach"),
    }
    del config
    return factories[name]() if name in factories else None


def timed(fn, repeat: int, device: str) -> float:
    fn()  # warm-up (and lazily created state)
    times = []
    for _ in range(repeat):
        if device == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        fn()
        if device == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[16_000_000, 100_000_000])
    parser.add_argument("--repeat", type=int, default=5)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = parser.parse_args()
    print(f"device {args.device}, torch {torch.__version__}, threads {torch.get_num_threads()}")
    for n in args.sizes:
        grad = torch.randn(n, device=args.device)
        anchor = torch.nn.Parameter(torch.randn(n, device=args.device))
        anchor.grad = grad
        adam = torch.optim.Adam([anchor], fused=True)
        adam_s = timed(adam.step, args.repeat, args.device)
        adam_bps = 28 * n / adam_s
        del adam, anchor
        print(f"\n{n:,} elements; torch fused Adam {adam_s * 1e3:.1f} ms = "
              f"{adam_bps / 1e9:.1f} GB/s effective")  # fmt: skip
        print(f"{'rule':16} {'ours ms':>8} {'torch ms':>9} {'path':>8} {'torch/ours':>10} "
              f"{'GB/s':>6} {'vs fused Adam':>13}  target")  # fmt: skip
        for name, config in RULES.items():
            engine = GroupEngine("g", torch.randn(n, device=args.device),
                                 parse_optimizer_config(config))  # fmt: skip
            ours = timed(lambda e=engine, g=grad: e.step(g.clone(), e.config.lr), args.repeat,
                         args.device)  # fmt: skip
            clone_s = timed(lambda g=grad: g.clone(), args.repeat, args.device)
            ours = max(ours - clone_s, 1e-9)  # the engine may modify its gradient: not counted
            state_tensors = sum(isinstance(v, torch.Tensor) for v in engine.state.values())
            moved = (12 + 8 * state_tensors) * n
            del engine
            param = torch.nn.Parameter(torch.randn(n, device=args.device))
            param.grad = grad
            reference = torch_fastest(name, param)
            if reference is not None:
                opt, path = reference
                theirs = timed(opt.step, args.repeat, args.device)
                del opt
                ratio = f"{theirs / ours:10.2f}"
                theirs_ms = f"{theirs * 1e3:9.1f}"
            else:
                theirs_ms, path, ratio = f"{'-':>9}", "none", f"{'-':>10}"
            bps = moved / ours
            if name in FUSED_TARGETS and reference is not None:
                met = "met" if theirs / ours >= 0.9 else "MISSED"
                target = f">= 0.9 of torch fused: {met}"
            else:
                target = f">= 50% of fused Adam: {'met' if bps >= 0.5 * adam_bps else 'MISSED'}"
            print(f"{name:16} {ours * 1e3:8.1f} {theirs_ms} {path:>8} {ratio} "
                  f"{bps / 1e9:6.1f} {bps / adam_bps:12.0%}   {target}")  # fmt: skip
            del param


if __name__ == "__main__":
    main()
