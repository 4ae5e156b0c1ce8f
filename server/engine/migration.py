"""Moving optimizer state from one rule to another mid-run (spec section 5).

`migrate` builds the target rule's state from the source's following the matrix of spec 5.3:
exact carries where the quantities are the same (=), the conversions C1-C12 where they are
related, and the target's fresh state otherwise (F). `reset` starts the target fresh. Either
way the answer names, for every state key, whether it was kept, converted, started fresh or
dropped, and why.

Canonical estimates read from the source (spec 5.1), each only when its counter t > 0:
    g_hat  first moment in gradient units: M / (1 - beta1^t) (Adam family), (1 - mu) B / (1 - tau)
           (SGD momentum), G / (1 - alpha^t) (centered RMSprop), (1 - mu) Bn (sqrt(Q) + eps)
           (RMSprop momentum, C7)
    s_hat  second moment: V / (1 - beta2^t) (Adam family; never Vmax), Q / (1 - rho^t)
           (RMSprop, Adadelta), (S - S0) / t (Adagrad)
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal

import torch

from optserve.server.engine.base import Rule, State

ADAM_FAMILY = frozenset({"adam", "adamw", "amsgrad", "adabound", "radam", "ranger"})
Action = Literal["kept", "converted", "fresh", "dropped"]
Policy = Literal["migrate", "reset"]


@dataclass
class MigrationReport:
    """For every state key: what happened to it and why."""

    source: str
    target: str
    policy: str
    entries: dict[str, tuple[Action, str]] = field(default_factory=dict)

    def set(self, key: str, action: Action, why: str) -> None:
        self.entries[key] = (action, why)

    def as_dict(self) -> dict[str, Any]:
        return {
            "source": self.source,
            "target": self.target,
            "policy": self.policy,
            "keys": {k: {"action": a, "why": w} for k, (a, w) in sorted(self.entries.items())},
        }


def _inner(rule: Rule) -> Rule:
    return getattr(rule, "inner", rule)


def _has_lookahead(rule: Rule) -> bool:
    return hasattr(rule, "inner")


def _is_ams(config: Any) -> bool:
    return config.name == "amsgrad" or bool(
        getattr(config, "amsgrad", False) or getattr(config, "amsbound", False)
    )


def _identity(config: Any) -> tuple[str, bool]:
    """What a rule is, whatever it is called: `amsgrad` is `adam` with `amsgrad: true`, one rule
    spelled two ways, so the two migrate alike (and AdaBound with `amsbound` likewise)."""
    return ("adam" if config.name == "amsgrad" else config.name, _is_ams(config))


@dataclass
class _Estimates:
    step: int = 0
    g_hat: torch.Tensor | None = None
    s_hat: torch.Tensor | None = None


def _estimates(config: Any, state: State) -> _Estimates:
    t = int(state.get("step", 0))
    name = config.name
    est = _Estimates(step=t)
    if name in ADAM_FAMILY and t > 0:
        beta1, beta2 = config.betas
        est.g_hat = state["exp_avg"] / (1 - beta1**t)
        est.s_hat = state["exp_avg_sq"] / (1 - beta2**t)
    elif (
        name == "sgd" and "momentum_buffer" in state and 0 < config.momentum < 1 > config.dampening
    ):
        # (mu >= 1 or tau >= 1 accumulate without a stationary point: no estimate)
        est.g_hat = (1 - config.momentum) * state["momentum_buffer"] / (1 - config.dampening)
    elif name in ("rmsprop", "adadelta") and t > 0:
        beta = config.alpha if name == "rmsprop" else config.rho
        est.s_hat = state["square_avg"] / (1 - beta**t)
        if name == "rmsprop" and "grad_avg" in state:
            est.g_hat = state["grad_avg"] / (1 - beta**t)
        elif name == "rmsprop" and "momentum_buffer" in state:
            denom = state["square_avg"].sqrt().add_(config.eps)
            est.g_hat = (1 - config.momentum) * state["momentum_buffer"] * denom
    elif name == "adagrad" and t > 0:
        est.s_hat = (state["sum"] - config.initial_accumulator_value) / t
    return est


def migrate(
    source: Rule, source_state: State, target: Rule, weights: torch.Tensor, policy: Policy
) -> tuple[State, MigrationReport]:
    """The target rule's state for `weights`, built from the source's by `policy`."""
    src_cfg, dst_cfg = _inner(source).config, _inner(target).config
    report = MigrationReport(src_cfg.name, dst_cfg.name, policy)
    new = target.init_state(weights)
    fresh_keys = set(new)
    if policy == "reset":
        for key in new:
            report.set(key, "fresh", "reset: as a newly built optimizer")
    else:
        _migrate_inner(src_cfg, source_state, dst_cfg, new, report)
        _migrate_lookahead(source, source_state, target, new, report)
    for key in fresh_keys - set(report.entries):
        report.set(key, "fresh", "no counterpart in the source rule")
    if dst_cfg.name == "sgd" and dst_cfg.momentum > 0 and "momentum_buffer" not in new:
        report.set("momentum_buffer", "fresh", "created from the first gradient, as torch does")
    for key in set(source_state) - set(new):
        if key not in report.entries:
            report.set(key, "dropped", f"{dst_cfg.name} keeps no {key}")
    return new, report


def _migrate_inner(src: Any, old: State, dst: Any, new: State, report: MigrationReport) -> None:
    est = _estimates(src, old)
    t = est.step
    same_rule = _identity(dst) == _identity(src)
    if same_rule and not (dst.name in ADAM_FAMILY and src.betas != dst.betas):
        _carry_same_rule(src, old, dst, new, report)
    elif dst.name in ADAM_FAMILY:
        _into_adam_family(src, old, dst, new, report, est)
    elif dst.name == "sgd":
        _into_sgd(src, old, dst, new, report, est)
    elif dst.name == "adagrad":
        if est.s_hat is not None:
            new["sum"] = dst.initial_accumulator_value + t * est.s_hat
            new["step"] = t
            report.set("sum", "converted", f"S0 + n * s_hat with n = {t} (C5)")
            report.set("step", "converted", f"age of the second-moment estimate ({t})")
    elif dst.name in ("rmsprop", "adadelta"):
        _into_rms(src, old, dst, new, report, est)


def _carry_same_rule(src: Any, old: State, dst: Any, new: State, report: MigrationReport) -> None:
    for key in list(new):
        if key in old:
            value = old[key]
            new[key] = value.clone() if isinstance(value, torch.Tensor) else value
            report.set(key, "kept", "same rule")
    if dst.name == "sgd" and "momentum_buffer" in old and dst.momentum > 0:
        buf = old["momentum_buffer"].clone()
        if src.momentum >= 1 or dst.momentum >= 1:  # no (1 - mu) scale to convert between
            if src.momentum != dst.momentum:
                report.set(
                    "momentum_buffer", "kept", "momentum >= 1 has no stationary scale: B as is"
                )
        elif src.momentum != dst.momentum:
            buf.mul_((1 - dst.momentum) / (1 - src.momentum))
            report.set("momentum_buffer", "converted", "B (1 - mu_new) / (1 - mu_old)")
        else:
            report.set("momentum_buffer", "kept", "momentum and Nesterov share B exactly")
        new["momentum_buffer"] = buf
    if dst.name == "adabound" and "base_lr" in old:
        new["base_lr"] = old["base_lr"]


def _into_adam_family(
    src: Any, old: State, dst: Any, new: State, report: MigrationReport, est: _Estimates
) -> None:
    beta1, beta2 = dst.betas
    t = est.step
    if src.name in ADAM_FAMILY and t > 0:
        s_beta1, s_beta2 = src.betas
        new["step"] = t
        report.set("step", "kept", "the moments' shared counter")
        for key, old_beta, new_beta in (
            ("exp_avg", s_beta1, beta1),
            ("exp_avg_sq", s_beta2, beta2),
        ):
            if old_beta == new_beta:
                new[key] = old[key].clone()
                report.set(key, "kept", "same moment, same beta")
            else:
                new[key] = old[key] * ((1 - new_beta**t) / (1 - old_beta**t))
                why = f"beta {old_beta} -> {new_beta}: X_hat (1 - beta^t) (C4)"
                report.set(key, "converted", why)
        if "max_exp_avg_sq" in new:
            if "max_exp_avg_sq" in old:
                new["max_exp_avg_sq"] = old["max_exp_avg_sq"].clone()
                report.set("max_exp_avg_sq", "kept", "same running maximum")
            else:
                new["max_exp_avg_sq"] = new["exp_avg_sq"].clone()
                report.set("max_exp_avg_sq", "converted", "Vmax := V, as if switched on now (C6)")
        if "base_lr" in old and "base_lr" in new:
            new["base_lr"] = old["base_lr"]
            report.set("base_lr", "kept", "AdaBound's bound scale")
        return
    if est.s_hat is None:
        return  # C9: a first moment without a second moment is unsafe; start fresh
    new["step"] = t
    new["exp_avg_sq"] = est.s_hat * (1 - beta2**t)
    report.set("step", "converted", f"age of the second-moment estimate ({t})")
    report.set("exp_avg_sq", "converted", "V := s_hat (1 - beta2^t) (C4)")
    if est.g_hat is not None:
        new["exp_avg"] = est.g_hat * (1 - beta1**t)
        report.set("exp_avg", "converted", "M := g_hat (1 - beta1^t) (C7)")
    else:
        report.set("exp_avg", "fresh", "no first-moment estimate; M warms up by itself (C9)")
    if "max_exp_avg_sq" in new:
        new["max_exp_avg_sq"] = new["exp_avg_sq"].clone()
        report.set("max_exp_avg_sq", "converted", "Vmax := V (C6)")


def _into_sgd(
    src: Any, old: State, dst: Any, new: State, report: MigrationReport, est: _Estimates
) -> None:
    if dst.momentum == 0:
        return
    mu, tau = dst.momentum, dst.dampening
    if mu >= 1:
        report.set(
            "momentum_buffer", "fresh", "momentum >= 1 has no stationary buffer to convert to"
        )
        return
    if src.name in ADAM_FAMILY and est.g_hat is not None:
        beta1 = src.betas[0]
        if mu == beta1 and tau == 0:
            new["momentum_buffer"] = old["exp_avg"] / (1 - beta1)
            why = "B := M / (1 - beta1), exact for mu = beta1 (C1)"
        else:
            new["momentum_buffer"] = (1 - tau) * est.g_hat / (1 - mu)
            why = "B := (1 - tau) g_hat / (1 - mu), stationary approximation (C1)"
        if src.name == "adabound":
            why += "; AdaBound's limit is lr = final_lr * (1 - beta1) (C1')"
        report.set("momentum_buffer", "converted", why)
    elif src.name == "rmsprop" and est.g_hat is not None:
        new["momentum_buffer"] = (1 - tau) * est.g_hat / (1 - mu)
        report.set("momentum_buffer", "converted", "B := (1 - tau) g_hat / (1 - mu) (C7)")


def _into_rms(
    src: Any, old: State, dst: Any, new: State, report: MigrationReport, est: _Estimates
) -> None:
    t = est.step
    if src.name in ("rmsprop", "adadelta"):
        new["square_avg"] = old["square_avg"].clone()
        report.set("square_avg", "kept", "the same un-corrected EMA of g^2")
    elif est.s_hat is not None:
        new["square_avg"] = est.s_hat.clone()
        report.set("square_avg", "converted", "Q := s_hat, bias-corrected (C3)")
    else:
        return
    new["step"] = t
    report.set("step", "converted", f"age of the second-moment estimate ({t})")
    if dst.name == "adadelta":
        report.set("acc_delta", "fresh", "no counterpart anywhere (C8)")
        return
    if est.g_hat is not None and dst.centered:
        # The two estimates come from EMAs of different horizons, so g_hat^2 may exceed Q
        # locally; centered RMSprop takes sqrt(Q - G^2), so G is clipped to keep that >= 0.
        bound = new["square_avg"].sqrt()
        new["grad_avg"] = torch.maximum(torch.minimum(est.g_hat, bound), -bound)
        report.set("grad_avg", "converted", "G := g_hat, clipped to |G| <= sqrt(Q) (C7)")
    if est.g_hat is not None and dst.momentum > 0:
        denom = new["square_avg"].sqrt().add_(dst.eps)
        new["momentum_buffer"] = est.g_hat / ((1 - dst.momentum) * denom)
        report.set("momentum_buffer", "converted", "Bn := g_hat / ((1 - mu)(sqrt(Q) + eps)) (C7)")


def _migrate_lookahead(
    source: Rule, old: State, target: Rule, new: State, report: MigrationReport
) -> None:
    if not _has_lookahead(target):
        return
    k = target.k  # type: ignore[attr-defined]
    ranger = target.config.name == "ranger"
    if _has_lookahead(source):
        new["slow_buffer"] = old["slow_buffer"].clone()
        report.set("slow_buffer", "kept", "Lookahead to Lookahead carries phi (C11)")
    else:
        report.set("slow_buffer", "converted", "phi := the current weights (C11)")
    if ranger:
        new["counter"] = int(new.get("step", 0)) % k
        report.set("counter", "converted", "Ranger syncs when RAdam's t is a multiple of k")
    elif _has_lookahead(source):
        new["counter"] = int(old["counter"]) % k
        report.set("counter", "kept", "position in the slow cycle (C11)")
    else:
        report.set("counter", "fresh", "a new slow cycle starts now (C11)")
