"""The oracle of every rule (spec section 1 table), run per parameter tensor, for the tests."""

from __future__ import annotations

import torch


class PaperLookahead:
    """Lookahead as the paper (and michaelrzhang/lookahead) defines it, around any optimizer:
    phi <- theta at construction; every k inner steps theta <- phi + alpha (theta - phi),
    phi <- theta. Hand-written; PO.Lookahead is bit-identical to this (spec 6.2)."""

    def __init__(self, inner: torch.optim.Optimizer, k: int, alpha: float) -> None:
        self.inner = inner
        self.k, self.alpha = k, alpha
        self.params = [p for g in inner.param_groups for p in g["params"]]
        self.slow = [p.detach().clone() for p in self.params]
        self.counter = 0
        self.param_groups = inner.param_groups

    @torch.no_grad()
    def step(self) -> None:
        self.inner.step()
        self.counter += 1
        if self.counter == self.k:
            self.counter = 0
            for p, slow in zip(self.params, self.slow, strict=True):
                slow.add_(p - slow, alpha=self.alpha)
                p.copy_(slow)


class PaperDelayedNesterov:
    """Delayed Nesterov as Liu, Douillard et al. 2024 write it (arXiv 2401.09135, Algorithm 3,
    momentum activation c = 0), per parameter tensor, with torch SGD's L2 decay and maximize in
    front. Hand-written from the paper; the engine's `sgd` with `delay` > 1 must match it.

        Delta <- Delta + g_t
        if t mod N == 0:  m <- beta m + Delta / N;  theta <- theta - eps (g_t / N + beta m);
                          Delta <- 0
        else:             theta <- theta - eps g_t / N
    """

    def __init__(self, params, lr, momentum, delay, weight_decay=0.0, maximize=False, **rest):
        assert rest.get("nesterov", True) and not rest.get("dampening", 0.0), rest
        self.params = list(params)
        self.param_groups = [{"params": self.params, "lr": lr}]
        self.beta, self.n = momentum, delay
        self.weight_decay, self.maximize = weight_decay, maximize
        self.t = 0
        self.m = [torch.zeros_like(p) for p in self.params]  # the paper's m_0 = 0
        self.delta = [torch.zeros_like(p) for p in self.params]

    @torch.no_grad()
    def step(self) -> None:
        self.t += 1
        lr = self.param_groups[0]["lr"]
        for p, m, delta in zip(self.params, self.m, self.delta, strict=True):
            g = -p.grad if self.maximize else p.grad
            g = g + self.weight_decay * p
            delta += g
            if self.t % self.n == 0:
                m.copy_(self.beta * m + delta / self.n)
                p -= lr * (g / self.n + self.beta * m)
                delta.zero_()
            else:
                p -= lr * (g / self.n)


def _adabound(params, **kwargs):
    import adabound

    return adabound.AdaBound(params, **kwargs)


def torch_oracle(config: dict, params: list[torch.nn.Parameter]):
    """The oracle optimizer for one of our configs (a JSON-like dict)."""
    cfg = {k: v for k, v in config.items() if k not in ("name", "lookahead")}
    if "betas" in cfg:
        cfg["betas"] = tuple(cfg["betas"])
    name = config["name"]
    if name == "sgd" and cfg.pop("delay", 1) > 1:
        opt = PaperDelayedNesterov(params, delay=config["delay"], **cfg)
        if config.get("lookahead"):
            la = {"k": 5, "alpha": 0.5, **config["lookahead"]}
            return PaperLookahead(opt, la["k"], la["alpha"])  # type: ignore[arg-type]
        return opt
    if name == "ranger":
        use_gc = cfg.pop("use_gc", False)
        cfg.pop("gc_conv_only", None)
        cfg.pop("N_sma_threshold", None)
        k, alpha = cfg.pop("k", 6), cfg.pop("alpha", 0.5)
        cfg.setdefault("betas", (0.95, 0.999))
        cfg.setdefault("eps", 1e-5)
        inner = torch.optim.RAdam(params, decoupled_weight_decay=True, **cfg)
        opt = PaperLookahead(inner, k, alpha)
        opt.use_gc = use_gc
        return opt
    factory = {
        "sgd": torch.optim.SGD,
        "adagrad": torch.optim.Adagrad,
        "rmsprop": torch.optim.RMSprop,
        "adadelta": torch.optim.Adadelta,
        "adam": torch.optim.Adam,
        "adamw": torch.optim.AdamW,
        "amsgrad": lambda ps, **kw: torch.optim.Adam(ps, amsgrad=True, **kw),
        "adabound": _adabound,
        "radam": torch.optim.RAdam,
    }[name]
    opt = factory(params, **cfg)
    if config.get("lookahead"):
        la = {"k": 5, "alpha": 0.5, **config["lookahead"]}
        return PaperLookahead(opt, la["k"], la["alpha"])
    return opt


def centralize(grad: torch.Tensor) -> torch.Tensor:
    """Gradient centralization (Ranger 20.4.11+): subtract the mean over all dims but the first."""
    if grad.dim() <= 1:
        return grad
    return grad - grad.mean(dim=tuple(range(1, grad.dim())), keepdim=True)
