"""Compiled element-wise kernels for the rules torch has no fused kernel for (spec section 2).

RMSprop, AdaDelta, AdaBound and RAdam (Ranger's inner rule) have only torch's foreach path,
which makes one pass over memory per operation and allocates temporaries. Here each rule's
update is written once more as a pure tensor expression that `torch.compile` (inductor) fuses
into a single loop: every buffer is read once and written once, so the step runs near memory
speed. Adagrad has one too, for devices without torch's fused Adagrad (CUDA).

Two details keep one compilation serving a whole run:

* every number that can change between steps (lr, bias corrections, bounds) and every
  hyperparameter is passed in one 1-D tensor `sc`, never as a Python float, which dynamo would
  specialise on and recompile for at every step;
* shapes are dynamic, so one kernel serves every buffer length.

Only the structure (which state tensors exist: centered, momentum, AMSBound) is baked in.
Compiling takes seconds, so `CompiledStep` compiles in a background thread on a small dummy
buffer and the engine uses its chunked path until the kernel is ready; if compiling fails
(no C++ compiler, unsupported device) the engine stays on the chunked path and says why.
The kernels round differently from the readable path by a few ulp; the tests bound that.
"""

from __future__ import annotations

import logging
import math
import threading
from collections.abc import Callable
from dataclasses import dataclass

import torch

from optserve.server.engine.base import Rule, Scalars, State

log = logging.getLogger(__name__)
Tensor = torch.Tensor


def _rmsprop(w: Tensor, g: Tensor, sc: Tensor, square_avg: Tensor,
             momentum_buffer: Tensor | None, grad_avg: Tensor | None) -> None:  # fmt: skip
    lr, alpha, one_minus_alpha, eps, wd, sign, momentum = sc.unbind()
    g = g * sign + w * wd
    sq = square_avg * alpha + g * g * one_minus_alpha
    square_avg.copy_(sq)
    if grad_avg is not None:
        ga = grad_avg + (g - grad_avg) * one_minus_alpha
        grad_avg.copy_(ga)
        avg = (sq - ga * ga).sqrt() + eps
    else:
        avg = sq.sqrt() + eps
    if momentum_buffer is not None:
        buf = momentum_buffer * momentum + g / avg
        momentum_buffer.copy_(buf)
        w.copy_(w - lr * buf)
    else:
        w.copy_(w - lr * g / avg)


def _adadelta(w: Tensor, g: Tensor, sc: Tensor, square_avg: Tensor, acc_delta: Tensor) -> None:
    lr, rho, one_minus_rho, eps, wd, sign = sc.unbind()
    g = g * sign + w * wd
    sq = square_avg * rho + g * g * one_minus_rho
    square_avg.copy_(sq)
    delta = (acc_delta + eps).sqrt() / (sq + eps).sqrt() * g
    acc_delta.copy_(acc_delta * rho + delta * delta * one_minus_rho)
    w.copy_(w - lr * delta)


def _adabound(w: Tensor, g: Tensor, sc: Tensor, exp_avg: Tensor, exp_avg_sq: Tensor,
              max_exp_avg_sq: Tensor | None) -> None:  # fmt: skip
    step_size, lower, upper, beta1, one_minus_beta1, beta2, one_minus_beta2, eps, wd = sc.unbind()
    g = g + w * wd
    m = exp_avg * beta1 + g * one_minus_beta1
    v = exp_avg_sq * beta2 + g * g * one_minus_beta2
    exp_avg.copy_(m)
    exp_avg_sq.copy_(v)
    if max_exp_avg_sq is not None:
        v = torch.maximum(max_exp_avg_sq, v)
        max_exp_avg_sq.copy_(v)
    rate = torch.minimum(torch.maximum(step_size / (v.sqrt() + eps), lower), upper)
    w.copy_(w - rate * m)


def _radam(w: Tensor, g: Tensor, sc: Tensor, exp_avg: Tensor, exp_avg_sq: Tensor) -> None:
    (lr, beta1, one_minus_beta1, beta2, one_minus_beta2, eps, l2, decay, sign, bias_correction1,
     bias_correction2_sqrt, rect, rectified) = sc.unbind()  # fmt: skip
    g = g * sign + w * l2
    m = exp_avg + (g - exp_avg) * one_minus_beta1
    v = exp_avg_sq * beta2 + g * g * one_minus_beta2
    exp_avg.copy_(m)
    exp_avg_sq.copy_(v)
    adaptive = torch.where(rectified > 0, bias_correction2_sqrt / (v.sqrt() + eps) * rect, 1.0)
    w.copy_(w * decay - m / bias_correction1 * lr * adaptive)


def _adagrad(w: Tensor, g: Tensor, sc: Tensor, state_sum: Tensor) -> None:
    clr, eps, wd, sign = sc.unbind()
    g = g * sign + w * wd
    total = state_sum + g * g
    state_sum.copy_(total)
    w.copy_(w - clr * g / (total.sqrt() + eps))


def _sign(maximize: bool) -> float:
    return -1.0 if maximize else 1.0


def _rmsprop_scalars(rule: Rule, s: Scalars) -> list[float]:
    c = rule.config
    return [s["lr"], c.alpha, 1 - c.alpha, c.eps, c.weight_decay, _sign(c.maximize), c.momentum]


def _adadelta_scalars(rule: Rule, s: Scalars) -> list[float]:
    c = rule.config
    return [s["lr"], c.rho, 1 - c.rho, c.eps, c.weight_decay, _sign(c.maximize)]


def _adabound_scalars(rule: Rule, s: Scalars) -> list[float]:
    c = rule.config
    (beta1, beta2), wd = c.betas, c.weight_decay
    bounds = [s["step_size"], s["lower_bound"], s["upper_bound"]]
    return [*bounds, beta1, 1 - beta1, beta2, 1 - beta2, c.eps, wd]


def _radam_scalars(rule: Rule, s: Scalars) -> list[float]:
    c = rule.config
    beta1, beta2 = c.betas
    decoupled = getattr(rule, "decoupled", False)
    l2 = 0.0 if decoupled else c.weight_decay
    decay = 1 - s["lr"] * c.weight_decay if decoupled else 1.0
    rect = s["rect"]
    return [
        s["lr"], beta1, 1 - beta1, beta2, 1 - beta2, c.eps, l2, decay,
        _sign(getattr(c, "maximize", False)), s["bias_correction1"],
        math.sqrt(s["bias_correction2"]), 0.0 if rect is None else rect,
        0.0 if rect is None else 1.0,
    ]  # fmt: skip


def _adagrad_scalars(rule: Rule, s: Scalars) -> list[float]:
    c = rule.config
    return [s["clr"], c.eps, c.weight_decay, _sign(c.maximize)]


@dataclass(frozen=True)
class Kernel:
    fn: Callable[..., None]
    scalars: Callable[[Rule, Scalars], list[float]]
    # The state keys passed after `sc`, in order; a key the rule does not keep is passed as None.
    keys: tuple[str, ...]


KERNELS: dict[str, Kernel] = {
    "rmsprop": Kernel(_rmsprop, _rmsprop_scalars, ("square_avg", "momentum_buffer", "grad_avg")),
    "adadelta": Kernel(_adadelta, _adadelta_scalars, ("square_avg", "acc_delta")),
    "adabound": Kernel(_adabound, _adabound_scalars, ("exp_avg", "exp_avg_sq", "max_exp_avg_sq")),
    "radam": Kernel(_radam, _radam_scalars, ("exp_avg", "exp_avg_sq")),
    "ranger": Kernel(_radam, _radam_scalars, ("exp_avg", "exp_avg_sq")),
    "adagrad": Kernel(_adagrad, _adagrad_scalars, ("sum",)),
}
# One compiled wrapper per kernel function for the whole process: dynamo caches compiled code
# per function, guarded on structure, dtype and device, so every engine shares it.
_COMPILED: dict[Callable[..., None], Callable[..., None]] = {}
_COMPILED_LOCK = threading.Lock()
WARM_UP_ELEMENTS = 4096


def compiled_available(rule: Rule) -> bool:
    """Whether there is a kernel for this (bare, not Lookahead-wrapped) rule."""
    return rule.config.name in KERNELS


def _compiled(fn: Callable[..., None]) -> Callable[..., None]:
    with _COMPILED_LOCK:
        if fn not in _COMPILED:
            _COMPILED[fn] = torch.compile(fn, dynamic=True, fullgraph=True)
        return _COMPILED[fn]


class CompiledStep:
    """One rule's compiled kernel for one flat buffer's dtype, device and state structure."""

    def __init__(self, rule: Rule, weights: torch.Tensor, background: bool = True) -> None:
        self.rule = rule
        kernel = KERNELS[rule.config.name]
        self._kernel = kernel
        self._fn = _compiled(kernel.fn)
        present = rule.init_state(weights[:0])
        self._keys = tuple(key if key in present else None for key in kernel.keys)
        self.dtype, self.device = weights.dtype, weights.device
        self.error: BaseException | None = None
        self._ready = threading.Event()
        self._done = threading.Event()
        if background:
            threading.Thread(target=self._warm_up, name="optserve-compile", daemon=True).start()
        else:
            self._warm_up()

    @property
    def ready(self) -> bool:
        return self._ready.is_set()

    def wait(self, timeout: float | None = None) -> bool:
        """Block until compiling ended; True if the kernel is ready."""
        self._done.wait(timeout)
        return self.ready

    def _warm_up(self) -> None:
        """Compile on a dummy buffer of the same dtype, device and state structure."""
        try:
            n = WARM_UP_ELEMENTS
            weights = torch.zeros(n, dtype=self.dtype, device=self.device)
            state = self.rule.init_state(weights)
            scalars = self.rule.prepare(state, 0.0, weights)
            self.step(weights, torch.zeros_like(weights), state, scalars)
        except Exception as exc:  # noqa: BLE001 - any failure means: keep the chunked path
            self.error = exc
            log.warning("compiling the %s kernel failed; using the eager path: %s",
                        self.rule.config.name, exc)  # fmt: skip
        else:
            self._ready.set()
        finally:
            self._done.set()

    def step(self, weights: torch.Tensor, grad: torch.Tensor, state: State, s: Scalars) -> None:
        """The element-wise part of one step; `s` is what the rule's `prepare` returned."""
        sc = torch.tensor(self._kernel.scalars(self.rule, s), dtype=self.dtype, device=self.device)
        self._fn(weights, grad, sc, *[None if k is None else state[k] for k in self._keys])
