"""Local SGD (DiLoCo) through real Ray and gRPC: the server's outer update against a reference
implementation of the same outer step, the pseudo-gradient in bf16, async mode with the
staleness policies, a live swap of the outer optimizer, and each trainer's local steps in status.
"""

from __future__ import annotations

import contextlib
import re
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from optserve.client import NotFound, RemoteOptimizer
from optserve.server.cli.status import _print_history

OUTER = {"name": "sgd", "lr": 0.7, "momentum": 0.9, "nesterov": True}
INNER = {"name": "adamw", "lr": 0.01}
H, ROUNDS = 4, 3
ROOT = Path(__file__).resolve().parents[2]


def _net() -> torch.nn.Module:
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(6, 8), torch.nn.Tanh(), torch.nn.Linear(8, 3))


def _record(opt: RemoteOptimizer) -> list[tuple[dict[str, torch.Tensor], dict, int]]:
    """Watch `opt`'s pushes (the real call still goes to the server): what each sent, the
    weights it got back, and their version."""
    seen: list[tuple[dict[str, torch.Tensor], dict, int]] = []
    real: Callable[..., Any] = opt.client.push_and_pull

    def push_and_pull(model, grads, **kwargs):
        sent = {n: g.detach().clone() for n, g in grads.items()}
        weights, version = real(model, grads, **kwargs)
        seen.append((sent, {n: w.clone() for n, w in weights.items()}, version))
        return weights, version

    opt.client.push_and_pull = push_and_pull  # type: ignore[method-assign]
    return seen


def _train(opt: RemoteOptimizer, net: torch.nn.Module, seed: int, steps: int) -> None:
    data = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        x = torch.randn(16, 6, generator=data)
        y = torch.randint(0, 3, (16,), generator=data)
        opt.zero_grad()
        torch.nn.functional.cross_entropy(net(x), y).backward()
        opt.step()


def _nesterov(theta: dict, buf: dict | None, g: dict, lr: float, mu: float) -> tuple[dict, dict]:
    """The outer step written out: b <- mu b + g (b = g at first); theta -= lr (g + mu b)."""
    buf = {n: g[n].clone() if buf is None else mu * buf[n] + g[n] for n in g}
    return {n: theta[n] - lr * (g[n] + mu * buf[n]) for n in g}, buf


def test_sync_outer_update_is_nesterov_on_the_mean_pseudo_gradient(service, model_name, capsys):
    nets = [_net(), _net()]
    initial = {n: p.detach().clone() for n, p in nets[0].named_parameters()}
    opts = [
        RemoteOptimizer(
            net.named_parameters(), address=service.address, model=model_name,
            optimizer=OUTER, mode="sync", trainers=2, trainer=f"diloco-{k}",
            local_steps=H, inner=INNER,
        )
        for k, net in enumerate(nets)
    ]  # fmt: skip
    try:
        records = [_record(opt) for opt in opts]
        threads = [
            threading.Thread(target=_train, args=(opt, net, k, H * ROUNDS))
            for k, (opt, net) in enumerate(zip(opts, nets, strict=True))
        ]
        for t in threads:
            t.start()
        for t in threads:
            t.join(timeout=120)
        assert not any(t.is_alive() for t in threads)
        assert [len(r) for r in records] == [ROUNDS, ROUNDS]

        theta, buf = initial, None
        for r in range(ROUNDS):
            (d0, w0, v0), (d1, w1, v1) = records[0][r], records[1][r]
            assert v0 == v1 == r + 1
            mean = {n: (d0[n] + d1[n]) / 2 for n in d0}
            theta, buf = _nesterov(theta, buf, mean, lr=0.7, mu=0.9)
            for n in theta:
                assert (w0[n] - theta[n]).abs().max() <= 1e-6, (r, n)
                assert torch.equal(w0[n], w1[n])
        # Each trainer goes on from the global weights, its AdamW state kept on the trainer.
        for opt, net in zip(opts, nets, strict=True):
            for n, p in net.named_parameters():
                assert torch.equal(p.detach(), records[0][-1][1][n])
            assert opt.inner_optimizer is not None
            state = opt.inner_optimizer.state[next(net.parameters())]
            assert int(state["step"]) == H * ROUNDS
        status = opts[0].status()
        for k in range(2):
            seen = status.trainers[f"diloco-{k}"]
            assert (seen.pushes, seen.applied, seen.local_steps) == (ROUNDS, ROUNDS, H * ROUNDS)
        _print_history(status.to_dict())  # what `optserve status --model` prints of them
        header, _, *rows = capsys.readouterr().out.strip().splitlines()[:4]
        assert "LOCAL STEPS" in header
        at = header.index("LOCAL STEPS")
        assert [row[at:].split()[0] for row in rows] == [str(H * ROUNDS)] * 2
    finally:
        for opt in opts:
            opt.close()


def test_async_bf16_pseudo_gradients_staleness_policies_and_a_live_outer_swap(
    service, client, model_name
):
    """Async mode with max_staleness and staleness_lr: one trainer, so each push is fresh and
    the update is exactly the outer rule on the bf16-rounded pseudo-gradient. Then the outer
    optimizer is swapped live, and local rounds go on."""
    net = _net()
    theta = {n: p.detach().clone() for n, p in net.named_parameters()}
    opt = RemoteOptimizer(
        net.named_parameters(), address=service.address, model=model_name, optimizer=OUTER,
        mode={"mode": "async", "max_staleness": 2, "staleness_lr": "inverse"},
        local_steps=3, inner={"name": "sgd", "lr": 0.05, "momentum": 0.5},
        wire_dtype=torch.bfloat16, trainer="async-diloco",
    )  # fmt: skip
    try:
        record = _record(opt)
        _train(opt, net, seed=7, steps=6)
        buf = None
        for r, (sent, weights, version) in enumerate(record):
            assert version == r + 1
            g = {n: d.to(torch.bfloat16).float() for n, d in sent.items()}
            theta, buf = _nesterov(theta, buf, g, lr=0.7, mu=0.9)
            for n in theta:
                assert (weights[n] - theta[n]).abs().max() <= 1e-6, (r, n)
        opt.set_optimizer({"name": "adam", "lr": 0.01})
        _train(opt, net, seed=8, steps=6)
        assert opt.version == 4 and opt.dropped_pushes == 0
        status = client.status(model_name)
        assert status.optimizer["name"] == "adam"
        assert status.trainers["async-diloco"].local_steps == 12
    finally:
        opt.close()


def _python_blocks(path: Path, section: str) -> list[str]:
    """The ```python blocks under the heading `section` of a Markdown file."""
    text = path.read_text()
    start = text.index(f"\n## {section}")
    end = text.find("\n## ", start + 1)
    body = text[start : end if end != -1 else None]
    return re.findall(r"^```python\n(.*?)^```", body, re.MULTILINE | re.DOTALL)


def test_the_readme_and_docs_examples_run_as_written(service, client, capsys):
    """The README's local-SGD example (one trainer) and docs/frameworks.md's (two trainers in
    sync mode), run in this process against the session's server; what they print is what
    their comments say."""
    (readme,) = _python_blocks(ROOT / "README.md", "Local SGD")
    (docs,) = _python_blocks(ROOT / "docs" / "frameworks.md", "Local SGD / DiLoCo")
    try:
        for code, said in [
            (readme, "4 200"),
            (docs, "10 {'rank-0': 100, 'rank-1': 100}"),
        ]:
            assert "127.0.0.1:50051" in code and said in code
            exec(compile(code.replace("127.0.0.1:50051", service.address), "example", "exec"), {})
            assert capsys.readouterr().out.strip().splitlines()[-1] == said
    finally:
        for model in ("diloco", "diloco-digits"):
            with contextlib.suppress(NotFound):
                client.drop_model(model)


def test_a_refused_pseudo_gradient_starts_a_new_round_from_the_global_weights(service, model_name):
    """Async, max_staleness 0: of two trainers that started a round on the same version, the
    second's pseudo-gradient is refused. It loads the global weights, counts the drop, and its
    next round starts there; its inner steps and inner state go on."""
    nets = [_net(), _net()]
    mode = {"mode": "async", "max_staleness": 0}
    opts = [
        RemoteOptimizer(
            net.named_parameters(), address=service.address, model=model_name,
            optimizer=OUTER, mode=mode, trainer=f"t{k}", local_steps=2, inner=INNER,
        )
        for k, net in enumerate(nets)
    ]  # fmt: skip
    try:
        _train(opts[0], nets[0], seed=1, steps=2)  # pushed: version 1
        _train(opts[1], nets[1], seed=2, steps=2)  # computed on version 0: refused
        assert (opts[0].version, opts[1].version, opts[1].dropped_pushes) == (1, 1, 1)
        for p, q in zip(nets[0].parameters(), nets[1].parameters(), strict=True):
            assert torch.equal(p, q)  # the global weights of version 1
        _train(opts[1], nets[1], seed=3, steps=2)  # a fresh round on version 1: applied
        assert opts[1].version == 2 and opts[1].dropped_pushes == 1
        seen = opts[1].status().trainers["t1"]
        assert (seen.pushes, seen.applied, seen.refused, seen.local_steps) == (2, 1, 1, 4)
    finally:
        for opt in opts:
            opt.close()
