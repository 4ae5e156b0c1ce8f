"""Benchmark: one update of a flat fp32 buffer per rule, against torch's fastest path.

Usage: python bench/engine.py [--sizes 16000000 100000000] [--repeat 9] [--device cpu|cuda]
       [--load 0]

For every rule it prints, measured in the same run and interleaved call by call: our time
(GroupEngine's fast path: fused, compiled or chunked, named in the table; a kernel is compiled
before the engine is made), torch's fastest available path for the same rule on the same
buffer (fused, else foreach), their ratio, and our effective bytes/s (the bytes the rule must
read and write: weights and gradient, plus every state buffer read and written) as a fraction
of torch fused Adam's (28 bytes per element). A Lookahead rule's row times k steps as one
and divides: an average step, its sync included. For a compiled rule, its eager fallback (the
kernel with no C++ compiler) is timed too, against torch's foreach step. `--load N` keeps N
busy processes spinning meanwhile. Targets: sgd/adam/adamw/amsgrad/adagrad within 1/0.9 of
torch fused (issue 3); Adam+Lookahead and Ranger at least 90 % of fused Adam's bytes/s (issue
18); every other rule at least 50 %; the eager fallback never slower than torch's foreach
step (issue 18)."""

from __future__ import annotations

import argparse
import multiprocessing
import statistics
import time

import torch

from optserve.common.config import parse_optimizer_config
from optserve.server.engine.group import GroupEngine

RULES = {
    "sgd-momentum": {"name": "sgd", "lr": 0.01, "momentum": 0.9},
    # Delayed Nesterov (async local SGD's outer rule): no torch counterpart, no fused kernel
    "sgd-delayed": {"name": "sgd", "lr": 0.7, "momentum": 0.9, "nesterov": True, "delay": 4},
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


def bytes_per_element(engine: GroupEngine) -> float:
    """What one step must move per element: read weights and gradient, write weights, read
    and write every state buffer; Lookahead's sync moves 16 more bytes every k steps."""
    state = engine.state
    buffers = sum(isinstance(v, torch.Tensor) for k, v in state.items() if k != "slow_buffer")
    lookahead = engine.config.lookahead or (
        engine.config if engine.config.name == "ranger" else None
    )
    sync = 16 / lookahead.k if lookahead is not None else 0.0
    return 12 + 8 * buffers + sync


# Calls made before timing: lazily created state, and RAdam's first steps (rho_t <= 5, about
# five with beta2 = 0.999) take other code than the rest of a run.
WARM_UP_CALLS = 8


def timed(fns, repeat: int, device: str) -> list[float]:
    """Median seconds per call of each function, calls interleaved so drift hits all alike."""
    for _ in range(WARM_UP_CALLS):
        for fn in fns:
            fn()
    times: list[list[float]] = [[] for _ in fns]
    for _ in range(repeat):
        for fn, samples in zip(fns, times, strict=True):
            if device == "cuda":
                torch.cuda.synchronize()
            start = time.perf_counter()
            fn()
            if device == "cuda":
                torch.cuda.synchronize()
            samples.append(time.perf_counter() - start)
    return [statistics.median(samples) for samples in times]


def _spin(stop) -> None:
    while not stop.is_set():
        pass


def _lookahead_k(engine: GroupEngine) -> int:
    """Steps per slow-weight sync (1 without Lookahead): a timed call takes that many steps,
    so every row's time is an average step, syncs included."""
    config = engine.config
    lookahead = config.lookahead or (config if config.name == "ranger" else None)
    return lookahead.k if lookahead is not None else 1


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[16_000_000, 100_000_000])
    parser.add_argument("--repeat", type=int, default=9)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--rules", nargs="+", choices=sorted(RULES), default=list(RULES))
    parser.add_argument("--load", type=int, default=0,
                        help="busy processes spinning meanwhile (a loaded machine)")  # fmt: skip
    args = parser.parse_args()
    stop = multiprocessing.Event()
    spinners = [multiprocessing.Process(target=_spin, args=(stop,), daemon=True)
                for _ in range(args.load)]  # fmt: skip
    for spinner in spinners:
        spinner.start()
    try:
        run(args)
    finally:
        stop.set()
        for spinner in spinners:
            spinner.join()


def run(args: argparse.Namespace) -> None:
    print(f"device {args.device}, torch {torch.__version__}, threads {torch.get_num_threads()}, "
          f"{args.load} busy processes beside")  # fmt: skip
    for n in args.sizes:
        grad = torch.randn(n, device=args.device)
        anchor = torch.nn.Parameter(torch.randn(n, device=args.device))
        anchor.grad = grad
        adam = torch.optim.Adam([anchor], fused=True)
        print(f"\n{n:,} elements. Every row times, interleaved: our step, torch's fastest step "
              f"for the rule, torch fused Adam (the yardstick: 28 bytes/element), and for a "
              f"compiled rule its eager fallback (no compiler)")  # fmt: skip
        print(f"{'rule':16} {'our path':>9} {'ours ms':>8} {'torch ms':>9} {'path':>8} "
              f"{'torch/ours':>10} {'GB/s':>6} {'adam ms':>8} {'vs adam':>8} "
              f"{'eager ms':>9} {'torch/eager':>11}  target")  # fmt: skip
        for name, config in ((r, RULES[r]) for r in args.rules):
            engine = GroupEngine("g", torch.randn(n, device=args.device),
                                 parse_optimizer_config(config))  # fmt: skip
            our_path, k = engine.fast_path, _lookahead_k(engine)
            param = torch.nn.Parameter(torch.randn(n, device=args.device))
            param.grad = grad
            reference = torch_fastest(name, param)

            # The engine may modify its gradient (gradient centralization); a step costs the
            # same on any values, so the same gradient is passed every time, with no copy.
            def steps(e: GroupEngine, g: torch.Tensor = grad, k: int = k) -> None:
                for _ in range(k):
                    e.step(g, e.config.lr)

            fns = [lambda e=engine: steps(e), adam.step]
            if reference is not None:
                fns.append(reference[0].step)
            eager = None
            if our_path == "compiled":
                eager = GroupEngine("g", torch.randn(n, device=args.device), engine.config,
                                    kernel="eager")  # fmt: skip
                fns.append(lambda e=eager: steps(e))
            ours, adam_s, *rest = timed(fns, args.repeat, args.device)
            ours /= k
            eager_s = rest.pop() / k if eager is not None else None
            moved = bytes_per_element(engine) * n
            adam_bps = 28 * n / adam_s
            if rest:
                theirs, path = rest[0], reference[1]
                ratio, theirs_ms = f"{theirs / ours:10.2f}", f"{theirs * 1e3:9.1f}"
            else:
                theirs_ms, path, ratio = f"{'-':>9}", "none", f"{'-':>10}"
            bps = moved / ours
            if name in FUSED_TARGETS and rest:
                target = f">= 0.9 of torch fused: {'met' if rest[0] / ours >= 0.9 else 'MISSED'}"
            elif k > 1:
                target = f">= 90% of fused Adam: {'met' if bps >= 0.9 * adam_bps else 'MISSED'}"
            else:
                target = f">= 50% of fused Adam: {'met' if bps >= 0.5 * adam_bps else 'MISSED'}"
            if eager_s is None:
                eager_ms, versus = f"{'-':>9}", f"{'-':>11}"
            else:
                eager_ms = f"{eager_s * 1e3:9.1f}"
                versus = f"{rest[0] / eager_s:11.2f}" if rest else f"{'-':>11}"
                if rest:
                    target += f"; eager >= torch: {'met' if rest[0] >= eager_s else 'MISSED'}"
            print(f"{name:16} {our_path:>9} {ours * 1e3:8.1f} {theirs_ms} {path:>8} {ratio} "
                  f"{bps / 1e9:6.1f} {adam_s * 1e3:8.1f} {bps / adam_bps:8.0%} {eager_ms} "
                  f"{versus}  {target}")  # fmt: skip
            del engine, eager, param, reference, fns


if __name__ == "__main__":
    main()
