"""The compiled path: a rule's own element-wise `update`, compiled by inductor (spec section 2).

The readable path makes one pass over memory per operation and allocates temporaries; compiled,
the same definition becomes one loop that reads every buffer once and writes it once, so a
step runs near memory speed. It serves the rules torch has no fused kernel for (RMSprop,
AdaDelta, AdaBound, SGD's Delayed Nesterov), and any rule on a device without torch's fused
kernel (Adagrad on CUDA); RAdam and Ranger's RAdam, which step with fused Adam's kernel
(engine/fused.py), where a checkpoint says the run so far stepped with this one.

Nothing is written twice: `torch.compile` is given the rule's static `update` as it is. The
named scalars travel as its last argument: their floats are inputs of the compiled code (dynamo
leaves floats unspecialised), so a new lr, bias correction or bound compiles nothing; their
booleans are structure, and each combination is one graph. Shapes are dynamic, so one kernel
serves every buffer length, and every engine of the process shares the compiled function.

Compiling takes seconds, so `CompiledStep` compiles when it is made, before its group takes a
push (engine/kernels.py: the kernel is chosen once, never by a race), on a small dummy buffer
and for every combination of the rule's `step_flags` (RAdam's rectification switches on early
in a run: it must not compile then). Inductor keeps what it compiled on disk
(TORCHINDUCTOR_CACHE_DIR), so the next process on the machine mostly loads it. If compiling
fails (no C++ compiler, unsupported device), `error` says why and the group steps eagerly.
Inductor rounds a few operations differently from eager torch (a few ulp); the tests bound that.
"""

from __future__ import annotations

import itertools
import logging
import threading
import time
from collections.abc import Callable
from typing import Any

import torch

from optserve.server.engine.base import ElementwiseRule, State
from optserve.server.engine.lookahead import sync_slow_weights

log = logging.getLogger(__name__)
# One compiled wrapper per update function for the whole process: dynamo caches compiled code
# per function, guarded on structure, dtype and device, so every engine shares it.
_COMPILED: dict[Callable[..., None], Callable[..., None]] = {}
_COMPILED_LOCK = threading.Lock()
WARM_UP_ELEMENTS = 4096


# Compiled variants kept per update function: every boolean of a rule's scalars is structure,
# and one process may serve many configs of a rule (dynamo's default is 8).
RECOMPILE_LIMIT = 64


def _compiled(fn: Callable[..., None]) -> Callable[..., None]:
    with _COMPILED_LOCK:
        if torch._dynamo.config.recompile_limit < RECOMPILE_LIMIT:
            torch._dynamo.config.recompile_limit = RECOMPILE_LIMIT
        if fn not in _COMPILED:
            _COMPILED[fn] = torch.compile(fn, dynamic=True, fullgraph=True)
        return _COMPILED[fn]


class CompiledStep:
    """One rule's compiled `update` for one flat buffer's dtype, device and state structure,
    compiled (or failed: `error`) by the time the constructor returns."""

    def __init__(self, rule: ElementwiseRule, weights: torch.Tensor) -> None:
        self.rule = rule
        self.dtype, self.device = weights.dtype, weights.device
        self.error: BaseException | None = None
        started = time.perf_counter()
        try:
            self._fn = _compiled(type(rule).update)
            self._warm_up()
        except Exception as exc:  # noqa: BLE001 - any failure means: step eagerly
            self.error = exc
            log.warning("compiling the %s kernel failed; it steps eagerly: %s",
                        rule.config.name, exc)  # fmt: skip
        self.seconds = time.perf_counter() - started
        if self.error is None:
            log.info("compiled the %s kernel in %.1f s", rule.config.name, self.seconds)

    @property
    def ready(self) -> bool:
        return self.error is None

    def _warm_up(self) -> None:
        """Compile on a dummy buffer of the same dtype, device and state structure, once for
        each combination of the booleans that may change between steps."""
        weights = torch.zeros(WARM_UP_ELEMENTS, dtype=self.dtype, device=self.device)
        state = self.rule.init_state(weights)
        scalars: Any = self.rule.prepare(state, 0.0, weights)
        flags = type(self.rule).step_flags
        for values in itertools.product((False, True), repeat=len(flags)):
            variant = scalars._replace(**dict(zip(flags, values, strict=True)))
            self.step(weights, torch.zeros_like(weights), state, variant)

    def step(self, weights: torch.Tensor, grad: torch.Tensor, state: State, s: Any) -> None:
        """The element-wise part of one step; `s` is what the rule's `prepare` returned."""
        self._fn(weights, grad, state, s)


class CompiledSync:
    """Lookahead's sync (`lookahead.sync_slow_weights`) compiled for one buffer's dtype and
    device, by the time the constructor returns (or failed: `error`)."""

    def __init__(self, weights: torch.Tensor) -> None:
        self.error: BaseException | None = None
        try:
            self._fn = _compiled(sync_slow_weights)
            dummy = torch.zeros(WARM_UP_ELEMENTS, dtype=weights.dtype, device=weights.device)
            self._fn(dummy, dummy.clone(), 0.5)
        except Exception as exc:  # noqa: BLE001 - any failure means: sync eagerly
            self.error = exc
            log.warning("compiling Lookahead's sync failed; it syncs eagerly: %s", exc)

    def __call__(self, weights: torch.Tensor, slow: torch.Tensor, alpha: float) -> None:
        self._fn(weights, slow, alpha)
