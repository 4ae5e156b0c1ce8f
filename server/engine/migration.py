"""Moving optimizer state from one rule to another mid-run (spec section 5).

`migrate` builds the target rule's state from the source's, generically: each rule knows what
its own state says (`estimates`: the spec's g_hat, s_hat, t and the moments as kept, 5.1) and
how to start from such estimates (`seed`: the conversions C1-C12), so the matrix of spec 5.3 is
what the rules declare, not a table here. Rules of one identity (the same rule under other
hyperparameters, `amsgrad` and `adam` with `amsgrad: true` alike) carry their state (`retune`).
Lookahead seeds its slow weights itself (C11). `reset` starts the target fresh; `keep`, for
the same rule under other hyperparameters, keeps every state value as it is (what torch does
when a param group's value changes; RemoteOptimizer sends such edits with it). Either way the
report names, for every state key of both rules, whether it was kept, converted, started fresh
or dropped, and why; docs/optimizers.md's matrix is generated from these reports.
"""

from __future__ import annotations

import torch

from optserve.common.errors import InvalidArgument
from optserve.server.engine.base import ElementwiseRule, Rule, State
from optserve.server.engine.estimates import Action, MigrationReport, Policy
from optserve.server.engine.lookahead import Lookahead

__all__ = ["Action", "MigrationReport", "Policy", "migrate"]


def _elementwise(rule: Rule) -> ElementwiseRule:
    inner = rule.inner if isinstance(rule, Lookahead) else rule
    assert isinstance(inner, ElementwiseRule)
    return inner


def migrate(
    source: Rule, source_state: State, target: Rule, weights: torch.Tensor, policy: Policy
) -> tuple[State, MigrationReport]:
    """The target rule's state for `weights`, built from the source's by `policy`."""
    src, dst = _elementwise(source), _elementwise(target)
    report = MigrationReport(src.config.name, dst.config.name, policy)
    if policy == "keep":
        return _keep(source, source_state, target, weights, report), report
    new = target.init_state(weights)
    if policy == "reset":
        for key in new:
            report.set(key, "fresh", "reset: as a newly built optimizer")
    else:
        if dst.identity() == src.identity():
            dst.retune(src, source_state, new, report)
        else:
            dst.seed(new, src.estimates(source_state), report)
        if isinstance(target, Lookahead):
            target.seed(source, source_state, new, report)
    for key in set(new) - set(report.entries):
        report.set(key, "fresh", "no counterpart in the source rule")
    for key in set(dst.lazy_keys()) - set(new) - set(report.entries):
        report.set(key, "fresh", "created from the first gradient, as torch does")
    for key in set(source_state) - set(new) - set(report.entries):
        report.set(key, "dropped", f"{dst.config.name} keeps no {key}")
    return new, report


def _keep(
    source: Rule, source_state: State, target: Rule, weights: torch.Tensor, report: MigrationReport
) -> State:
    """The source's state as it is (same tensors, no copy): `keep` of the same rule."""
    if _elementwise(target).identity() != _elementwise(source).identity():
        if report.source == report.target:  # amsgrad or amsbound turned on or off
            raise InvalidArgument(
                f"policy 'keep' keeps state as it is; turning {report.target}'s "
                f"{'amsbound' if report.target == 'adabound' else 'amsgrad'} on or off changes "
                "which state it keeps and needs 'migrate' (which starts max_exp_avg_sq at the "
                "current exp_avg_sq, C6) or 'reset'"
            )
        raise InvalidArgument(
            f"policy 'keep' keeps state within one rule; {report.source} -> {report.target} "
            "needs 'migrate' or 'reset'"
        )
    keys = set(target.init_state(weights[:0]))
    new = {
        k: v for k, v in source_state.items() if k in keys | set(_elementwise(target).lazy_keys())
    }
    if keys - set(new):  # a key the source lacks (Lookahead turned on): as a new rule starts it
        fresh = target.init_state(weights)
        new.update({k: fresh[k] for k in keys - set(new)})
    for key in new:
        kept = key in source_state
        report.set(key, "kept" if kept else "fresh",
                   "keep: as it is, as torch does when a hyperparameter changes" if kept
                   else "no counterpart in the source rule")  # fmt: skip
    for key in set(source_state) - set(new):
        report.set(key, "dropped", f"{report.target} keeps no {key}")
    return new
