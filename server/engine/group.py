"""One parameter group's flat buffer on one shard: weights, rule, state, and its kernel.

Kernels (engine/kernels.py), all tested against the readable reference (`Rule.apply` on the
whole buffer):

* fused: torch's fused kernel where torch has one for the rule and device (engine/fused.py);
* compiled: the rule's own `update` compiled by inductor (engine/compiled.py), for the other
  rules on groups of at least COMPILE_MIN_ELEMENTS (the whole group's, on every shard alike);
* eager: the rule's element-wise `update` run slice by slice ("chunked"), so each slice's
  temporaries stay in cache (CPU); or on the whole buffer ("reference"), as torch's foreach
  step does. Both are bit-identical (every element sees the same ops), so a large CPU buffer
  takes whichever has been faster lately (`FasterOf`): slices win on a quiet machine, whole
  buffers on a loaded one. Small buffers and other devices take the whole buffer.

The kernel is chosen once, when the rule is set (create, restore, swap), and compiled then if
it must be, before the group takes a push: never by a thread finishing. Every path steps the
inner rule; Lookahead then acts in one place, `Lookahead.after_step`. OPTSERVE_COMPILE=off in
the environment turns compiling off.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from typing import Any, Literal

import torch

from optserve.common.config import RuleConfig, optimizer_config_json, parse_optimizer_config
from optserve.server.engine import build_rule
from optserve.server.engine.base import (
    CHUNK_ELEMENTS,
    ElementwiseRule,
    Rule,
    State,
    TensorViews,
    slices,
    update_in_parts,
)
from optserve.server.engine.compiled import CompiledStep, CompiledSync
from optserve.server.engine.fused import FusedStep, fused_available
from optserve.server.engine.kernels import COMPILE_MIN_ELEMENTS, Choice, choose, honour
from optserve.server.engine.lookahead import Lookahead
from optserve.server.engine.migration import MigrationReport, Policy, migrate

__all__ = ["CHUNK_ELEMENTS", "COMPILE_MIN_ELEMENTS", "GroupEngine"]

Path = Literal["fast", "reference"]
StepFn = Callable[[torch.Tensor, float], None]
# How often the eager kernel times again the way it is not taking (steps), and the weight of
# the newest timing in each way's running cost.
RETIME_EVERY = 32
MAX_RETIME_EVERY = 1024
TIMING_WEIGHT = 0.3


class FasterOf:
    """Bit-identical ways to take the same step; each step takes the one that has been faster
    lately, and every RETIME_EVERY steps another one is timed again.

    The eager kernel's slices keep their temporaries in cache: 2-3x faster than whole-buffer
    ops on a quiet machine. But each slice's small ops wait on every intra-op thread, so on
    a loaded machine they can be 10x slower than whole-buffer ops (torch's foreach step).
    Timing both keeps the eager kernel at the better of the two, whatever the machine. A way
    that lost its re-timing by more than 2x waits twice as long for the next (up to
    MAX_RETIME_EVERY steps), so a far slower way costs little."""

    def __init__(
        self, ways: dict[str, StepFn], clock: Callable[[], float] = time.perf_counter
    ) -> None:
        self.ways = ways
        self.clock = clock
        self.cost: dict[str, float] = {}
        self.steps = 0
        self.every = RETIME_EVERY
        self.current = next(iter(ways))

    def __call__(self, grad: torch.Tensor, lr: float) -> None:
        self.steps += 1
        untimed = [name for name in self.ways if name not in self.cost]
        best = min(self.cost, key=self.cost.__getitem__) if self.cost else self.current
        retime = not untimed and self.steps % self.every == 0
        if untimed:
            name = untimed[0]
        elif retime:
            name = min((n for n in self.ways if n != best), key=self.cost.__getitem__)
        else:
            name = best
        started = self.clock()
        self.ways[name](grad, lr)
        took = self.clock() - started
        old = self.cost.get(name)
        self.cost[name] = took if old is None else old + TIMING_WEIGHT * (took - old)
        if retime:
            far = self.cost[name] > 2 * self.cost[best]
            self.every = min(2 * self.every, MAX_RETIME_EVERY) if far else RETIME_EVERY
        self.current = name


def _kernel_family(config: RuleConfig) -> tuple[str, bool, bool]:
    """Configs that step with the same kernels: the rule, with Lookahead or not, and (sgd)
    Delayed Nesterov or not."""
    return config.name, config.lookahead is None, getattr(config, "delay", 1) > 1


class GroupEngine:
    def __init__(
        self,
        name: str,
        weights: torch.Tensor,
        config: RuleConfig,
        views: TensorViews = (),
        path: Path = "fast",
        state: State | None = None,
        group_numel: int | None = None,
        kernel: str | None = None,
    ) -> None:
        """`state`, when given, is taken over as it is (tensors on the weights' device, of
        their length: a restore reads them in place); otherwise the rule's fresh state.
        `group_numel` is the whole group's size across the model's shards (default: this
        buffer's): it picks the kernel; `kernel` is the one a checkpoint recorded."""
        self.name = name
        self.weights = weights
        self.views = tuple(views)
        self.path = path
        numel = weights.numel()
        self.group_numel = numel if group_numel is None else group_numel
        whole = weights.device.type != "cpu" or numel <= CHUNK_ELEMENTS
        self._parts = [slice(0, numel)] if whole else slices(numel, CHUNK_ELEMENTS)
        self._set_rule(config, kernel)
        if state is None:
            self.state: State = self.rule.init_state(weights)
        else:
            self._check_state(config, state)
            self.state = dict(state)

    def _set_rule(self, config: RuleConfig, recorded: str | None = None) -> None:
        """Build the rule and choose its kernel, once (compiling it now if it is compiled)."""
        self.config = config
        self.rule: Rule = build_rule(config)
        self._lookahead = self.rule if isinstance(self.rule, Lookahead) else None
        inner = self._lookahead.inner if self._lookahead is not None else self.rule
        assert isinstance(inner, ElementwiseRule)
        self._inner: ElementwiseRule = inner
        self._fused: FusedStep | None = None
        self._compiled: CompiledStep | None = None
        device = self.weights.device
        choice, sync_worth = self._wanted(config, inner, self._lookahead is not None)
        base, _, extra = (recorded or "").partition("+")
        if recorded is not None:
            choice = honour(base, choice, device)
        self._faster: FasterOf | None = None
        if len(self._parts) > 1:
            self._faster = FasterOf(
                {"chunked": self._step_chunked, "reference": self._step_reference}
            )
        eager = ("chunked", self._faster) if self._faster is not None else None
        self._current: tuple[str, StepFn] = eager or ("reference", self._step_reference)
        if self.path == "reference":
            self._current = ("reference", self._step_reference)
        elif choice.kernel == "fused":
            self._fused = FusedStep(inner, self.weights)
            self._current = ("fused", self._step_fused)
        elif choice.kernel == "compiled":
            compiled = CompiledStep(inner, self.weights)
            if compiled.error is None:
                self._compiled = compiled
                self._current = ("compiled", self._step_compiled)
            else:
                choice = Choice("eager", f"compiling failed: {compiled.error}")
        # Lookahead's sync, compiled with the fast kernels where a compile is worth it (and,
        # on a restore, where the run that wrote the checkpoint compiled it).
        self._sync: CompiledSync | None = None
        fast = self._lookahead is not None and choice.kernel != "eager" and self.path == "fast"
        wanted = fast and sync_worth
        if recorded is not None and fast:
            if extra == "sync" and not wanted:
                why = "the run so far compiled Lookahead's sync; here it syncs eagerly"
                choice = Choice(choice.kernel, f"{why} (a few ulp per sync)")
            wanted = wanted and extra == "sync"
        if wanted:
            sync = CompiledSync(self.weights)
            if sync.error is None:
                self._sync = sync
            else:
                choice = Choice(choice.kernel, f"Lookahead's sync syncs eagerly: {sync.error}")
        self.kernel = choice

    @property
    def kernel_record(self) -> str:
        """What status shows and checkpoints record: the kernel, with "+sync" when Lookahead's
        sync is compiled beside it (the two syncs differ by a few ulp)."""
        return self.kernel.kernel + ("+sync" if self._sync is not None else "")

    def warm(self, config: RuleConfig) -> None:
        """Compile, outside any lock, what `set_optimizer(config)` will compile: compiled code
        is the process's, so the swap (under the shard's lock) then finds it ready."""
        rule = build_rule(config)
        inner = rule.inner if isinstance(rule, Lookahead) else rule
        assert isinstance(inner, ElementwiseRule)
        choice, sync_worth = self._wanted(config, inner, isinstance(rule, Lookahead))
        if self.path != "fast":
            return
        if choice.kernel == "compiled":
            CompiledStep(inner, self.weights)
        if sync_worth and choice.kernel != "eager":
            CompiledSync(self.weights)

    def _wanted(
        self, config: RuleConfig, inner: ElementwiseRule, lookahead: bool
    ) -> tuple[Choice, bool]:
        """The kernel `choose` gives this group under `config` (before a recorded one is
        honoured), and whether Lookahead's sync is worth compiling beside a fast kernel."""
        device = self.weights.device
        choice = choose(config.name, fused_available(inner, device), self.group_numel, device)
        big = choose("lookahead", False, self.group_numel, device).kernel == "compiled"
        return choice, lookahead and big

    @property
    def fast_path(self) -> str:
        """Which path steps: fused, compiled, chunked or reference (the last two: the eager
        kernel; a large CPU buffer's, the one its last step took)."""
        if self._current[1] is self._faster and self._faster is not None:
            return self._faster.current
        return self._current[0]

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
            parts = self._parts if self.fast_path == "chunked" else (slice(None),)
            self._lookahead.after_step(self.weights, self.state, parts, self._sync)

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
        for part in slices(numel, CHUNK_ELEMENTS):
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
        scalars = self._inner.prepare(self.state, lr, self.weights)
        update_in_parts(self._inner, self.weights, grad, self.state, scalars, self._parts)

    def set_optimizer(self, config: RuleConfig, policy: Policy) -> MigrationReport:
        """Switch rules, moving the state by `policy` (spec section 5)."""
        old_rule, old_state = self.rule, self.state
        new_rule = build_rule(config)
        new_state, report = migrate(old_rule, old_state, new_rule, self.weights, policy)
        # The same rule (a new lr, say) keeps the kernel it stepped with: the same bits as the
        # run that wrote a restored checkpoint; a new rule's kernel is chosen afresh.
        same = _kernel_family(config) == _kernel_family(self.config)
        self._set_rule(config, self.kernel_record if same else None)
        self.state = new_state
        return report

    def state_dict(self) -> dict[str, Any]:
        """Everything needed to continue exactly: config, state tensors (copies) and scalars."""
        return {
            "config": optimizer_config_json(self.config),
            "kernel": self.kernel_record,
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
        self._set_rule(config, state_dict.get("kernel"))
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
            "kernel": self.kernel_record,
            "kernel_note": self.kernel.why,
            "scalars": {k: v for k, v in self.state.items() if not isinstance(v, torch.Tensor)},
        }
