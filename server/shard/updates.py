"""One decided update on one shard's groups: the gradient each group steps with (a push's, or a
sync round's weighted sum), and the step, verified first when the decision asks for it.

Pure math on the shard's GroupEngines; `ShardState.apply` calls it under its lock.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence

import torch

from optserve.common.errors import OptserveError
from optserve.server.engine.group import GroupEngine
from optserve.server.shard.memory import BufferPool
from optserve.server.shard.sequencer import Decision

# What a shard asks the leader once it computed a verified update on copies (finite or not):
# None, apply it; or the refusal every shard gets (shard/verdicts.py).
Verdict = Callable[[bool], OptserveError | None]


def step_groups(
    groups: Mapping[str, GroupEngine],
    used: Sequence[tuple[Mapping[str, torch.Tensor], float]],
    decision: Decision,
    pool: BufferPool | None,
    verdict: Verdict | None = None,
) -> OptserveError | None:
    """Every group steps once, with the members' gradients weighted as decided (a sync round's
    sum goes in `pool`'s buffers when given). With a `verdict`, the update is first computed on
    copies, and applied only if the verdict says every shard's slice stays finite; otherwise
    nothing changes and the verdict's refusal is returned."""
    combined: dict[str, torch.Tensor] | None = None
    grads = {}
    try:
        for name, group in groups.items():
            if len(used) == 1:
                grad = used[0][0][name]
                if used[0][1] != 1.0:
                    grad.mul_(used[0][1])  # clipped (the staged tensor is ours)
            else:  # a sync round: the weighted sum
                if pool is not None:
                    combined = combined or pool.take()
                    grad = combined[name].zero_()
                else:
                    grad = torch.zeros_like(group.weights)
                for staged, weight in used:
                    grad.add_(staged[name], alpha=weight)
            group.preprocess(grad)
            grads[name] = grad
        lrs = {name: decision.lrs[name] * decision.lr_scale for name in groups}
        if verdict is not None:
            finite = all(group.stays_finite(grads[n], lrs[n]) for n, group in groups.items())
            refused = verdict(finite)
            if refused is not None:
                return refused
        for name, group in groups.items():
            group.step_preprocessed(grads[name], lrs[name])
        return None
    finally:
        if pool is not None:
            pool.give(combined)
