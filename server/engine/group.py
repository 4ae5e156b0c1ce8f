"""One parameter group's flat buffer on one shard: weights, rule, state, and the fast paths.

Paths, all tested against the readable reference (`Rule.apply` on the whole buffer):

* fused: torch's fused kernel where torch has one for the rule and device (engine/fused.py);
* compiled: the rule's own `update` compiled by inductor (engine/compiled.py), for the other
  rules on buffers of at least COMPILE_MIN_ELEMENTS; compiled in the background, and used from
  the step after it is ready;
* chunked: the rule's element-wise `update` run slice by slice, so each slice's temporaries
  stay in cache (CPU); bit-identical to the reference, since every element sees the same ops;
* reference: `update` on the whole buffer (also what other devices use).

The path is chosen once, when the rule is set (and changes once more when a kernel finishes
compiling), not on every step. Every path steps the inner rule; Lookahead then acts in one
place, `Lookahead.after_step`. OPTSERVE_COMPILE=off in the environment turns compiling off.
"""

from __future__ import annotations

import json
import os
import threading
from collections.abc import Callable
from typing import Any, Literal

import torch

from optserve.common.config import RuleConfig, optimizer_config_json, parse_optimizer_config
from optserve.server.engine import build_rule
from optserve.server.engine.base import ElementwiseRule, Rule, State, TensorViews
from optserve.server.engine.compiled import CompiledStep
from optserve.server.engine.fused import FusedStep, fused_available
from optserve.server.engine.lookahead import Lookahead
from optserve.server.engine.migration import MigrationReport, Policy, migrate

# Elements per slice of the chunked path: 1 MiB of fp32, so a slice and its temporaries stay
# in the L2/L3 caches (measured: 2-3x faster than whole-buffer ops on the development machine).
CHUNK_ELEMENTS = 1 << 18
# Below this, a step costs well under a millisecond on any path and a compile (seconds of CPU)
# would not pay for itself; tests' small models stay on the eager paths.
COMPILE_MIN_ELEMENTS = 1 << 20
Path = Literal["fast", "reference"]
StepFn = Callable[[torch.Tensor, float], None]


class GroupEngine:
    def __init__(
        self,
        name: str,
        weights: torch.Tensor,
        config: RuleConfig,
        views: TensorViews = (),
        path: Path = "fast",
        state: State | None = None,
    ) -> None:
        """`state`, when given, is taken over as it is (tensors on the weights' device, of
        their length: a restore reads them in place); otherwise the rule's fresh state."""
        self.name = name
        self.weights = weights
        self.views = tuple(views)
        self.path = path
        numel = weights.numel()
        whole = weights.device.type != "cpu" or numel <= CHUNK_ELEMENTS
        self._parts = (
            [slice(0, numel)]
            if whole
            else [slice(a, min(a + CHUNK_ELEMENTS, numel)) for a in range(0, numel, CHUNK_ELEMENTS)]
        )
        self._path_lock = threading.Lock()
        self._set_rule(config)
        if state is None:
            self.state: State = self.rule.init_state(weights)
        else:
            self._check_state(config, state)
            self.state = dict(state)

    def __getstate__(self) -> dict[str, Any]:  # a copy gets a lock of its own
        return {k: v for k, v in self.__dict__.items() if k != "_path_lock"}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        self._path_lock = threading.Lock()

    def _set_rule(self, config: RuleConfig) -> None:
        """Build the rule and choose its path, once."""
        with self._path_lock:  # a compile finishing now must not install the old kernel
            self._choose(config)

    def _choose(self, config: RuleConfig) -> None:
        self.config = config
        self.rule: Rule = build_rule(config)
        self._lookahead = self.rule if isinstance(self.rule, Lookahead) else None
        inner = self._lookahead.inner if self._lookahead is not None else self.rule
        assert isinstance(inner, ElementwiseRule)
        self._inner: ElementwiseRule = inner
        self._fused: FusedStep | None = None
        self._compiled: CompiledStep | None = None
        eager = ("chunked", self._step_chunked) if len(self._parts) > 1 else None
        self._current: tuple[str, StepFn] = eager or ("reference", self._step_reference)
        if self.path == "reference":
            self._current = ("reference", self._step_reference)
        elif fused_available(inner, self.weights.device):
            self._fused = FusedStep(inner, self.weights)
            self._current = ("fused", self._step_fused)
        elif self._compile_wanted():
            self._compiled = CompiledStep(inner, self.weights, None, self._compiled_ready)
            self._compiled.start()  # only now: it may be ready at once (a warm cache)

    def _compile_wanted(self) -> bool:
        if os.environ.get("OPTSERVE_COMPILE", "auto").lower() in ("off", "0", "false", "no"):
            return False
        return self.weights.numel() >= COMPILE_MIN_ELEMENTS

    def _compiled_ready(self, compiled: CompiledStep) -> None:
        """From the compiling thread: take the kernel, unless the rule changed meanwhile."""
        with self._path_lock:
            if compiled is self._compiled:
                self._current = ("compiled", self._step_compiled)

    @property
    def fast_path(self) -> str:
        """Which path the next step takes: fused, compiled, chunked or reference."""
        return self._current[0]

    def wait_compiled(self, timeout: float | None = None) -> bool:
        """Block until a compile in progress ended; True if its kernel is ready (the next step
        takes it)."""
        return self._compiled is not None and self._compiled.wait(timeout)

    def step(self, grad: torch.Tensor, lr: float) -> None:
        """Apply one update with gradient `grad` (fp32, same length; may be modified)."""
        self.preprocess(grad)
        self.step_preprocessed(grad, lr)

    def preprocess(self, grad: torch.Tensor) -> None:
        """The rule's per-tensor work on the gradient, in place (gradient centralization)."""
        self.rule.preprocess(grad, self.views)

    def step_preprocessed(self, grad: torch.Tensor, lr: float) -> None:
        """`step` for a gradient `preprocess` has seen."""
        self._current[1](grad, lr)
        if self._lookahead is not None:
            self._lookahead.after_step(self.weights, self.state, self._parts)

    def stays_finite(self, grad: torch.Tensor, lr: float) -> bool:
        """Whether `step_preprocessed(grad, lr)` would leave every weight and state element
        finite. Computed with the rule's own update on copies, one slice at a time (memory: a
        slice of each tensor), so nothing changes. Lookahead's sync is a convex combination of
        finite values, so the inner step decides. Neither `grad` nor the state is modified."""
        inner = self._inner
        state = dict(self.state)  # `prepare` advances the copy's counters, not the model's
        scalars = inner.prepare(state, lr, self.weights)
        keys = [k for k, v in state.items() if isinstance(v, torch.Tensor)]
        numel = self.weights.numel()
        for a in range(0, numel, CHUNK_ELEMENTS):
            part = slice(a, min(a + CHUNK_ELEMENTS, numel))
            chunk = dict(state)
            for key in keys:
                chunk[key] = state[key][part].clone()
            weights = self.weights[part].clone()
            inner.update(weights, grad[part].clone(), chunk, scalars)
            if not all(bool(torch.isfinite(t).all()) for t in (weights, *(chunk[k] for k in keys))):
                return False
        return True

    def _step_reference(self, grad: torch.Tensor, lr: float) -> None:
        self._inner.apply(self.weights, grad, self.state, lr)

    def _step_fused(self, grad: torch.Tensor, lr: float) -> None:
        assert self._fused is not None
        self._fused.step(grad, self.state, lr)

    def _step_compiled(self, grad: torch.Tensor, lr: float) -> None:
        assert self._compiled is not None
        scalars = self._inner.prepare(self.state, lr, self.weights)
        self._compiled.step(self.weights, grad, self.state, scalars)

    def _step_chunked(self, grad: torch.Tensor, lr: float) -> None:
        inner = self._inner
        scalars = inner.prepare(self.state, lr, self.weights)
        tensor_keys = [k for k, v in self.state.items() if isinstance(v, torch.Tensor)]
        for part in self._parts:
            chunk = dict(self.state)
            for key in tensor_keys:
                chunk[key] = self.state[key][part]
            inner.update(self.weights[part], grad[part], chunk, scalars)

    def set_optimizer(self, config: RuleConfig, policy: Policy) -> MigrationReport:
        """Switch rules, moving the state by `policy` (spec section 5)."""
        old_rule, old_state = self.rule, self.state
        new_rule = build_rule(config)
        new_state, report = migrate(old_rule, old_state, new_rule, self.weights, policy)
        self._set_rule(config)
        self.state = new_state
        return report

    def state_dict(self) -> dict[str, Any]:
        """Everything needed to continue exactly: config, state tensors (copies) and scalars."""
        return {
            "config": optimizer_config_json(self.config),
            "state": {
                k: v.detach().to("cpu", copy=True) if isinstance(v, torch.Tensor) else v
                for k, v in self.state.items()
            },
        }

    def _check_state(self, config: RuleConfig, state: State) -> None:
        expected = set(build_rule(config).init_state(self.weights[:0]))
        missing = expected - set(state) - {"momentum_buffer"}
        if missing:
            raise ValueError(f"state for {config.name} lacks {sorted(missing)}")
        for key, value in state.items():
            if isinstance(value, torch.Tensor) and value.shape != self.weights.shape:
                raise ValueError(f"state {key!r} has shape {list(value.shape)}, the weights "
                                 f"{list(self.weights.shape)}")  # fmt: skip

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        config = parse_optimizer_config(state_dict["config"])
        loaded = state_dict["state"]
        self._check_state(config, {k: v.reshape(-1) if isinstance(v, torch.Tensor) else v
                                   for k, v in loaded.items()})  # fmt: skip
        self._set_rule(config)
        self.state = {
            k: v.to(self.weights.device, copy=True) if isinstance(v, torch.Tensor) else v
            for k, v in loaded.items()
        }

    def describe(self) -> dict[str, Any]:
        return {
            "rule": self.config.name,
            "config": json.loads(optimizer_config_json(self.config)),
            "numel": self.weights.numel(),
            "path": self.fast_path,
            "scalars": {k: v for k, v in self.state.items() if not isinstance(v, torch.Tensor)},
        }
