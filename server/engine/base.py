"""What an update rule is: validated hyperparameters, explicit state, an element-wise update.

A step is split in two, as optax splits state from update:

* `prepare(state, lr, weights)` advances the rule's counters and returns the step's *named
  scalars*, a NamedTuple of every number the update reads (hyperparameters, bias corrections,
  bounds, the rectification term) and the booleans that choose its structure;
* `update(weights, grad, state, scalars)` is the rule's maths, written once: purely element-wise,
  in place, and a function of its arguments only (a static method, no `self`).

That one definition serves every path that is not torch's own fused kernel:

* reference: `update` on the whole buffer, op for op the oracle's single-tensor path, so it is
  bit-exact with it;
* chunked: `update` on consecutive slices (it is element-wise, so the result is identical);
* compiled: `torch.compile(update)` (engine/compiled.py). Floats in the scalars are inputs of the
  compiled code (dynamo does not specialise on them), so a new lr or bias correction at every
  step compiles nothing; booleans are structure, and a kernel is compiled for each combination.

Lookahead is not an element-wise rule: it wraps one and acts after the inner step
(engine/lookahead.py).
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Iterable, Sequence
from typing import Any, ClassVar, Generic, TypeVar

import torch

from optserve.common.config import RuleConfig
from optserve.server.engine.estimates import Estimates, MigrationReport

ConfigT = TypeVar("ConfigT", bound=RuleConfig)
ScalarsT = TypeVar("ScalarsT", bound=tuple[Any, ...])

# Elements per slice of the chunked path: 1 MiB of fp32, so a slice and its temporaries stay
# in the L2/L3 caches (measured: 2-3x faster than whole-buffer ops on the development machine).
CHUNK_ELEMENTS = 1 << 18

# A rule's state for one flat buffer: tensors named with torch.optim's keys, plus scalars
# (counters are Python ints here; torch keeps `step` as a 0-dim float32 tensor).
State = dict[str, Any]
# (offset, shape) of each parameter tensor lying wholly inside a flat buffer.
TensorViews = Sequence[tuple[int, tuple[int, ...]]]


class Rule(ABC, Generic[ConfigT]):
    """What the engine steps: a rule's state and its reference step on one flat buffer."""

    name: ClassVar[str]

    def __init__(self, config: ConfigT) -> None:
        self.config = config

    @abstractmethod
    def init_state(self, weights: torch.Tensor) -> State:
        """The state a fresh oracle optimizer would start from for these weights."""

    @abstractmethod
    def apply(self, weights: torch.Tensor, grad: torch.Tensor, state: State, lr: float) -> None:
        """One whole step: the readable reference path."""

    def preprocess(self, grad: torch.Tensor, views: TensorViews) -> None:
        """Per-tensor work on the gradient before the step (gradient centralization)."""


class ElementwiseRule(Rule[ConfigT], Generic[ConfigT, ScalarsT]):
    """An element-wise update rule applied to one flat buffer.

    Subclasses follow the oracle's readable single-tensor path exactly (same operations in the
    same order), so a flat buffer gets bit-for-bit the per-parameter result (spec section 4).
    """

    # Booleans of the scalars that may change from one step to the next (RAdam's rectification,
    # SGD's first step): the compiled path compiles every combination before it is used.
    step_flags: ClassVar[tuple[str, ...]] = ()

    @abstractmethod
    def prepare(self, state: State, lr: float, weights: torch.Tensor) -> ScalarsT:
        """Advance counters, create lazily made state, and return this step's named scalars.

        Called once per step with the whole buffer; `update` may then run slice by slice.
        """

    @staticmethod
    @abstractmethod
    def update(weights: torch.Tensor, grad: torch.Tensor, state: State, s: ScalarsT) -> None:
        """The element-wise part of the step, in place on `weights` and the state tensors.

        It reads nothing but its arguments, so that `torch.compile` can compile it as it is."""

    def apply(self, weights: torch.Tensor, grad: torch.Tensor, state: State, lr: float) -> None:
        self.update(weights, grad, state, self.prepare(state, lr, weights))

    # ---- migration (spec section 5): what the state holds, and how to start from it ----------

    def identity(self) -> tuple[str, bool]:
        """What the rule is, whatever it is called: rules of one identity carry their state
        (`retune`); between identities it goes through `estimates` and `seed`."""
        return (self.config.name, False)

    def estimates(self, state: State) -> Estimates:
        """What this rule's state says about the gradient's moments."""
        return Estimates(self.config.name, int(state.get("step", 0)))

    def seed(self, new: State, est: Estimates, report: MigrationReport) -> None:
        """Fill this rule's fresh state `new` from another rule's estimates, reporting every key
        it sets. By default nothing carries over: the rule starts fresh."""

    def retune(
        self, old: ElementwiseRule, state: State, new: State, report: MigrationReport
    ) -> None:
        """The same rule with other hyperparameters: by default every key carries as it is."""
        for key in list(new):
            if key in state:
                value = state[key]
                new[key] = value.clone() if isinstance(value, torch.Tensor) else value
                report.set(key, "kept", "same rule")

    def lazy_keys(self) -> tuple[str, ...]:
        """State keys the rule creates at its first step rather than in `init_state`."""
        return ()


def update_in_parts(
    rule: ElementwiseRule,
    weights: torch.Tensor,
    grad: torch.Tensor,
    state: State,
    scalars: Any,
    parts: Iterable[slice],
) -> None:
    """`rule.update` on one slice of every tensor at a time: element-wise, so the bits of the
    whole buffer, with each slice's temporaries only (in cache; no buffer-sized allocations)."""
    keys = [k for k, v in state.items() if isinstance(v, torch.Tensor)]
    for part in parts:
        chunk = dict(state)
        for key in keys:
            chunk[key] = state[key][part]
        rule.update(weights[part], grad[part], chunk, scalars)


def slices(numel: int, size: int) -> list[slice]:
    """Consecutive slices of `size` elements (the last shorter) covering `numel`."""
    return [slice(a, min(a + size, numel)) for a in range(0, numel, size)]
