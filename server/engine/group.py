"""One parameter group's flat buffer on one shard: weights, rule, state, and the fast paths.

Paths, all tested against the readable reference (`Rule.apply` on the whole buffer):

* fused: torch's fused kernel where torch has one for the rule and device (engine/fused.py);
* compiled: the rule's kernel compiled by inductor (engine/compiled.py), for the other rules on
  buffers of at least COMPILE_MIN_ELEMENTS; compiled in the background, and used once ready;
* chunked: the rule's element-wise `update` run slice by slice, so each slice's temporaries
  stay in cache (CPU); bit-identical to the reference, since every element sees the same ops;
* reference: `update` on the whole buffer (also what other devices use).

A Lookahead wrapper runs its inner rule on the inner rule's fast path and syncs the slow weights
itself. OPTSERVE_COMPILE=off in the environment turns the compiled path off.
"""

from __future__ import annotations

import json
import os
from typing import Any, Literal

import torch

from optserve.common.config import RuleConfig, optimizer_config_json, parse_optimizer_config
from optserve.server.engine import build_rule
from optserve.server.engine.base import Rule, State, TensorViews
from optserve.server.engine.compiled import CompiledStep, compiled_available
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
        self._set_rule(config)
        if state is None:
            self.state: State = self.rule.init_state(weights)
        else:
            self._check_state(config, state)
            self.state = dict(state)

    def _set_rule(self, config: RuleConfig) -> None:
        self.config = config
        self.rule: Rule = build_rule(config)
        self._lookahead = self.rule if isinstance(self.rule, Lookahead) else None
        base = self._lookahead.inner if self._lookahead is not None else self.rule
        self._fused: FusedStep | None = None
        self._compiled: CompiledStep | None = None
        if self.path == "reference":
            return
        if fused_available(base, self.weights.device):
            self._fused = FusedStep(base, self.weights)
        elif compiled_available(base) and self._compile_wanted():
            self._compiled = CompiledStep(base, self.weights)

    def _compile_wanted(self) -> bool:
        if os.environ.get("OPTSERVE_COMPILE", "auto").lower() in ("off", "0", "false", "no"):
            return False
        return self.weights.numel() >= COMPILE_MIN_ELEMENTS

    @property
    def fast_path(self) -> str:
        """Which path the next step takes: fused, compiled, chunked or reference."""
        if self.path == "reference":
            return "reference"
        if self._fused is not None:
            return "fused"
        if self._compiled is not None and self._compiled.ready:
            return "compiled"
        if self.weights.device.type == "cpu" and self.weights.numel() > CHUNK_ELEMENTS:
            return "chunked"
        return "reference"

    def wait_compiled(self, timeout: float | None = None) -> bool:
        """Block until a compile in progress ended; True if the compiled path is in use."""
        return self._compiled is not None and self._compiled.wait(timeout)

    def step(self, grad: torch.Tensor, lr: float) -> None:
        """Apply one update with gradient `grad` (fp32, same length; may be modified)."""
        self.rule.preprocess(grad, self.views)
        path = self.fast_path
        if path == "fused":
            assert self._fused is not None
            sync = self._lookahead is not None and self._lookahead.tick(self.state)
            self._fused.step(grad, self.state, lr)
            if sync:
                self._sync()
        elif path == "compiled":
            assert self._compiled is not None
            scalars = self.rule.prepare(self.state, lr, self.weights)
            self._compiled.step(self.weights, grad, self.state, scalars)
            if scalars.get("lookahead_sync"):
                self._sync()
        elif path == "chunked":
            self._chunked(grad, lr)
        else:
            self.rule.apply(self.weights, grad, self.state, lr)

    def _slices(self) -> list[slice]:
        numel = self.weights.numel()
        if self.weights.device.type != "cpu":
            return [slice(0, numel)]
        return [slice(a, min(a + CHUNK_ELEMENTS, numel)) for a in range(0, numel, CHUNK_ELEMENTS)]

    def _sync(self) -> None:
        """Lookahead's slow-weight sync after a fused or compiled inner step."""
        assert self._lookahead is not None
        slow = self.state["slow_buffer"]
        for part in self._slices():
            self._lookahead.sync(self.weights[part], {"slow_buffer": slow[part]})

    def _chunked(self, grad: torch.Tensor, lr: float) -> None:
        scalars = self.rule.prepare(self.state, lr, self.weights)
        tensor_keys = [k for k, v in self.state.items() if isinstance(v, torch.Tensor)]
        for part in self._slices():
            chunk = dict(self.state)
            for key in tensor_keys:
                chunk[key] = self.state[key][part]
            self.rule.update(self.weights[part], grad[part], chunk, scalars)

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
