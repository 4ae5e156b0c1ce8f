"""torch's fused kernels on a flat buffer, for the rules that have one (spec section 2).

torch has `fused=True` implementations of SGD, Adam, AdamW (AMSGrad included) and Adagrad on
CPU and CUDA. They read and write each element once, where the readable path makes several
passes and allocates temporaries. A `FusedStep` wraps a torch optimizer around a Parameter that
aliases the shard's flat buffer and whose state entries are the engine's own state tensors, so
both paths share one copy of everything. Results differ from the readable path by a few ulp
(spec section 2), which the tests bound.

RAdam (and Ranger's RAdam) steps with torch's fused Adam kernel too. Once rectified, RAdam's
step is Adam's with other scalars:

    gamma r_t (M / bc1) sqrt(bc2) / (sqrt(V) + eps)
        = (gamma r_t / bc1) M / (sqrt(V) / sqrt(bc2) + eps / sqrt(bc2))

so the kernel is given lr = gamma r_t and eps = eps / sqrt(bc2), and for decoupled decay (AdamW's
theta (1 - lr lambda)) lambda / r_t, so that the decay stays gamma lambda. The moments, L2 decay
and maximize are Adam's own. The few steps before rectification (rho_t <= threshold: about five
with beta2 = 0.999) take RAdam's readable update on the whole buffer. Over 200 steps of 1M
elements the result stays within 5e-7 of torch.optim.RAdam, as the compiled kernel's did, at
fused Adam's speed and with no compiler.

The step counter stays the engine's: an exact Python int in `state["step"]`, advanced here by
one per step and never read back from torch (a float32 counter stops at 2^24 and would put a
wrong step into checkpoints). torch's fused kernels take the counter as a 0-dim float32 tensor
(the CUDA kernel reads its address as a `float*`, so no other dtype can be handed over): before
each step the tensor is set to the steps taken so far, and torch adds 1 before its kernel reads
it. Up to 2^24 the kernel sees t exactly; beyond, it sees t within one float32 ulp (a relative
error of at most 2^-23, the size of the kernel's own float32 rounding) in its bias corrections
and Adagrad's lr_decay.
"""

from __future__ import annotations

from typing import Any

import torch

from optserve.server.engine.adam import is_amsgrad
from optserve.server.engine.base import (
    CHUNK_ELEMENTS,
    ElementwiseRule,
    State,
    slices,
    update_in_parts,
)
from optserve.server.engine.radam import RAdam

_FUSED_RULES = ("sgd", "adam", "adamw", "amsgrad", "adagrad", "radam", "ranger")
_RADAM_RULES = ("radam", "ranger")  # fused Adam with RAdam's scalars (module docstring)
_TORCH_KEYS = frozenset(
    {"step", "momentum_buffer", "sum", "exp_avg", "exp_avg_sq", "max_exp_avg_sq"}
)


def fused_available(rule: ElementwiseRule, device: torch.device) -> bool:
    """Whether torch has a fused kernel for this rule here (with Lookahead: for its inner rule;
    the engine runs the slow-weight sync itself)."""
    if rule.config.name not in _FUSED_RULES:
        return False
    if getattr(rule.config, "delay", 1) > 1:
        return False  # Delayed Nesterov (sgd with delay > 1): torch's fused SGD cannot run it
    if rule.config.name == "adagrad" and device.type != "cpu":
        return False  # torch's fused Adagrad is documented for CPU; CUDA support is unverified
    from torch.optim.optimizer import _get_fused_kernels_supported_devices

    return device.type in _get_fused_kernels_supported_devices()


class FusedStep:
    """Runs one rule's fused torch kernel on a flat buffer and the engine's state."""

    def __init__(self, rule: ElementwiseRule, weights: torch.Tensor) -> None:
        cfg = rule.config
        self.name = cfg.name
        self.radam = rule if isinstance(rule, RAdam) else None
        self.weights = weights
        self.param = torch.nn.Parameter(weights, requires_grad=False)  # aliases the buffer
        if cfg.name == "sgd":
            self.optimizer: torch.optim.Optimizer = torch.optim.SGD(
                [self.param], lr=cfg.lr, momentum=cfg.momentum, dampening=cfg.dampening,
                weight_decay=cfg.weight_decay, nesterov=cfg.nesterov, maximize=cfg.maximize,
                fused=True,
            )  # fmt: skip
        elif cfg.name == "adagrad":
            self.optimizer = torch.optim.Adagrad(
                [self.param], lr=cfg.lr, lr_decay=cfg.lr_decay, weight_decay=cfg.weight_decay,
                initial_accumulator_value=cfg.initial_accumulator_value, eps=cfg.eps,
                maximize=cfg.maximize, fused=True,
            )  # fmt: skip
        elif self.radam is not None:
            decoupled = self.radam.decoupled  # lr, eps and decay: set every step (`_step_radam`)
            optimizer_cls = torch.optim.AdamW if decoupled else torch.optim.Adam
            self.optimizer = optimizer_cls(
                [self.param], lr=cfg.lr, betas=cfg.betas, eps=cfg.eps,
                weight_decay=cfg.weight_decay, maximize=bool(getattr(cfg, "maximize", False)),
                fused=True,
            )  # fmt: skip
        else:
            optimizer_cls = torch.optim.AdamW if cfg.name == "adamw" else torch.optim.Adam
            self.optimizer = optimizer_cls(
                [self.param], lr=cfg.lr, betas=cfg.betas, eps=cfg.eps,
                weight_decay=cfg.weight_decay, maximize=cfg.maximize,
                amsgrad=is_amsgrad(cfg), fused=True,
            )  # fmt: skip
        # torch's step tensor, refilled from the engine's counter before every step
        self._step = torch.zeros((), dtype=torch.float32, device=weights.device)

    def step(self, grad: torch.Tensor, state: State, lr: float) -> None:
        if self.radam is not None:
            self._step_radam(grad, state, lr)
            return
        self.optimizer.param_groups[0]["lr"] = lr
        counted = "step" in state
        self._run(grad, state, int(state["step"]) if counted else None)
        if counted:
            state["step"] = int(state["step"]) + 1

    def _step_radam(self, grad: torch.Tensor, state: State, lr: float) -> None:
        assert self.radam is not None
        s = self.radam.prepare(state, lr, self.weights)  # counts this step
        if not (s.rectified and isinstance(s.rect, float) and s.rect > 0):  # before: its own
            parts = slices(self.weights.numel(), CHUNK_ELEMENTS)  # ops, slice by slice
            update_in_parts(self.radam, self.weights, grad, state, s, parts)
            return
        group = self.optimizer.param_groups[0]
        group["lr"] = s.lr * s.rect
        group["eps"] = s.eps / s.bias_correction2**0.5
        group["weight_decay"] = s.weight_decay / s.rect if s.decoupled else s.weight_decay
        self._run(grad, state, int(state["step"]) - 1)

    def _run(self, grad: torch.Tensor, state: State, steps_before: int | None) -> None:
        """torch's step on the engine's state; `steps_before` (None: the rule counts no steps)
        is the counter torch adds one to before its kernel reads it."""
        group = self.optimizer.param_groups[0]
        torch_state: dict[str, Any] = {
            key: value for key, value in state.items() if key in _TORCH_KEYS and key != "step"
        }  # Lookahead's slow weights and counter, when wrapped, stay out
        if steps_before is not None:  # torch adds 1 before its kernel reads it (docstring)
            self._step.fill_(float(steps_before))
            torch_state["step"] = self._step
        if self.name == "sgd" and group["momentum"] != 0 and "momentum_buffer" not in state:
            torch_state.pop("momentum_buffer", None)  # torch creates it as a copy of g
        self.optimizer.state[self.param] = torch_state
        self.param.grad = grad
        try:
            self.optimizer.step()
        finally:
            self.param.grad = None
        for key, value in self.optimizer.state[self.param].items():
            if key != "step":
                state[key] = value
