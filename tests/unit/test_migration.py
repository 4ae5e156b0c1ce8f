"""State migration between rules (spec section 5), reproducing the experiments of 6.3."""

from __future__ import annotations

import copy

import pytest
import torch

from optserve.common.config import parse_optimizer_config, with_overrides
from optserve.server.engine.group import GroupEngine

N = 4000


def grads(steps, seed=0):
    """Stationary gradients N(0.3, 1), as in spec 6.3."""
    gen = torch.Generator().manual_seed(seed)
    return [0.3 + torch.randn(N, generator=gen, dtype=torch.float64) for _ in range(steps)]


def engine(config, weights=None):
    w = torch.zeros(N, dtype=torch.float64) if weights is None else weights.clone()
    return GroupEngine("g", w, parse_optimizer_config(config), path="reference")


def run(eng, gs):
    for g in gs:
        eng.step(g.clone(), eng.config.lr)


def test_adam_to_sgd_momentum_continues_exactly_c1():
    stream = grads(80)
    adam = engine({"name": "adam", "lr": 0.01})
    run(adam, stream[:50])
    sgd_config = parse_optimizer_config({"name": "sgd", "lr": 0.01, "momentum": 0.9})
    report = adam.set_optimizer(sgd_config, "migrate")
    assert report.entries["momentum_buffer"][0] == "converted"
    assert report.entries["exp_avg"][0] == report.entries["exp_avg_sq"][0] == "dropped"
    # torch SGD run on the same gradients from the start has exactly this buffer (C1).
    param = torch.nn.Parameter(torch.zeros(N, dtype=torch.float64))
    sgd = torch.optim.SGD([param], lr=0.01, momentum=0.9)
    for g in stream[:50]:
        param.grad = g.clone()
        sgd.step()
    assert (adam.state["momentum_buffer"] - sgd.state[param]["momentum_buffer"]).abs().max() < 1e-12
    before, torch_before = adam.weights.clone(), param.detach().clone()
    for g in stream[50:]:
        adam.step(g.clone(), 0.01)
        param.grad = g.clone()
        sgd.step()
    assert torch.allclose(adam.weights - before, param.detach() - torch_before, atol=1e-12)


def test_adabound_to_sgd_continues_its_limit_c1_prime():
    stream = grads(600, seed=1)
    config = {"name": "adabound", "lr": 0.01, "final_lr": 0.1, "gamma": 0.1}
    a, b = engine(config), engine(config)
    run(a, stream[:500])
    run(b, stream[:500])
    f, beta1 = 0.1, 0.9
    b.set_optimizer(parse_optimizer_config({"name": "sgd", "lr": f * (1 - beta1),
                                            "momentum": beta1}), "migrate")  # fmt: skip
    start = a.weights.clone()
    for g in stream[500:]:
        a.step(g.clone(), 0.01)
        b.step(g.clone(), f * (1 - beta1))
    moved = (a.weights - start).abs().max()
    # Within the bounds' remaining width 1/(gamma t) = 2 % of AdaBound's own movement.
    assert (a.weights - b.weights).abs().max() <= 0.03 * moved


def test_adam_to_amsgrad_keeps_going_c6():
    stream = grads(60, seed=2)
    eng = engine({"name": "adam", "lr": 0.01})
    run(eng, stream[:40])
    report = eng.set_optimizer(parse_optimizer_config({"name": "amsgrad", "lr": 0.01}), "migrate")
    assert report.entries["max_exp_avg_sq"][0] == "converted"
    assert report.entries["exp_avg"][0] == "kept" and report.entries["step"][0] == "kept"
    assert torch.equal(eng.state["max_exp_avg_sq"], eng.state["exp_avg_sq"])
    # The oracle: torch AMSGrad holding the same M, V, t and Vmax := V.
    param = torch.nn.Parameter(eng.weights.clone())
    oracle = torch.optim.Adam([param], lr=0.01, amsgrad=True)
    oracle.state[param] = {
        "step": torch.tensor(40.0),
        "exp_avg": eng.state["exp_avg"].clone(),
        "exp_avg_sq": eng.state["exp_avg_sq"].clone(),
        "max_exp_avg_sq": eng.state["max_exp_avg_sq"].clone(),
    }
    for g in stream[40:]:
        eng.step(g.clone(), 0.01)
        param.grad = g.clone()
        oracle.step()
    assert (eng.weights - param.detach()).abs().max() <= 1e-12


@pytest.mark.parametrize("source", [{"name": "adam"}, {"name": "sgd", "momentum": 0.9},
                                    {"name": "rmsprop"}])  # fmt: skip
def test_entering_ranger_seeds_slow_weights_from_current_weights_c11(source):
    stream = grads(23, seed=3)
    eng = engine({**source, "lr": 0.01})
    run(eng, stream)
    report = eng.set_optimizer(parse_optimizer_config({"name": "ranger", "k": 6}), "migrate")
    assert torch.equal(eng.state["slow_buffer"], eng.weights)
    assert report.entries["slow_buffer"][0] == "converted"
    # Ranger syncs on RAdam's own step: the counter continues from t mod k.
    assert eng.state["counter"] == eng.state["step"] % 6


def test_lookahead_to_lookahead_carries_phi():
    stream = grads(7, seed=4)
    eng = engine({"name": "adam", "lr": 0.01, "lookahead": {"k": 5, "alpha": 0.5}})
    run(eng, stream)
    slow = eng.state["slow_buffer"].clone()
    report = eng.set_optimizer(parse_optimizer_config(
        {"name": "sgd", "lr": 0.01, "lookahead": {"k": 5, "alpha": 0.5}}), "migrate")  # fmt: skip
    assert torch.equal(eng.state["slow_buffer"], slow) and eng.state["counter"] == 2
    assert report.entries["slow_buffer"][0] == "kept"


def test_reset_starts_as_a_fresh_oracle_would():
    eng = engine({"name": "adam", "lr": 0.01})
    run(eng, grads(10))
    report = eng.set_optimizer(parse_optimizer_config({"name": "adagrad", "lr": 0.1,
                                                       "initial_accumulator_value": 0.5}),
                               "reset")  # fmt: skip
    assert eng.state["step"] == 0 and torch.equal(
        eng.state["sum"], torch.full((N,), 0.5, dtype=torch.float64)
    )
    assert {k for k, (a, _) in report.entries.items() if a == "fresh"} == {"sum", "step"}
    assert report.entries["exp_avg"][0] == "dropped"


RULES = {
    "sgd": {"name": "sgd", "lr": 0.01},
    "momentum": {"name": "sgd", "lr": 0.01, "momentum": 0.9},
    "nesterov": {"name": "sgd", "lr": 0.01, "momentum": 0.9, "nesterov": True},
    "delayed-nesterov": {"name": "sgd", "lr": 0.01, "momentum": 0.9, "nesterov": True, "delay": 4},
    "adagrad": {"name": "adagrad", "lr": 0.01},
    "rmsprop": {"name": "rmsprop", "lr": 0.001},
    "rmsprop-centered-momentum": {
        "name": "rmsprop",
        "lr": 0.001,
        "centered": True,
        "momentum": 0.9,
    },  # fmt: skip
    "adadelta": {"name": "adadelta"},
    "adam": {"name": "adam", "lr": 0.001},
    "adamw": {"name": "adamw", "lr": 0.001},
    "amsgrad": {"name": "amsgrad", "lr": 0.001},
    "adabound": {"name": "adabound", "lr": 0.001},
    "radam": {"name": "radam", "lr": 0.001},
    "ranger": {"name": "ranger", "lr": 0.001},
    "lookahead-adam": {"name": "adam", "lr": 0.001, "lookahead": {"k": 5, "alpha": 0.5}},
}
SOURCE_STEPS = 300


def step_size(eng, g):
    before = eng.weights.clone()
    eng.step(g.clone(), eng.config.lr)
    return (eng.weights - before).abs().median().item()


@pytest.fixture(scope="module")
def warm_sources():
    stream = grads(SOURCE_STEPS, seed=5)
    warm = {}
    for name, config in RULES.items():
        eng = engine(config)
        run(eng, stream)
        warm[name] = eng
    return warm


FIRST_GRAD = grads(1, seed=7)[0]


@pytest.fixture(scope="module")
def reference_steps():
    """Per target rule, the larger of: its median step in its own steady state on the same
    gradient stream, and its first step from a fresh start (its own cold start, which every
    newly built optimizer takes)."""
    stream = grads(SOURCE_STEPS + 50, seed=6)
    reference = {}
    for name, config in RULES.items():
        eng = engine(config)
        run(eng, stream[:SOURCE_STEPS])
        steady = sorted(step_size(eng, g) for g in stream[SOURCE_STEPS:])[25]
        reference[name] = max(steady, step_size(engine(config), FIRST_GRAD))
    return reference


@pytest.mark.parametrize("target", sorted(RULES))
@pytest.mark.parametrize("source", sorted(RULES))
def test_no_migration_in_the_matrix_overshoots_c9(source, target, warm_sources, reference_steps):
    """The C9 hazard: a migrated state must not make the target step far beyond anything the
    target rule itself takes (carrying a warm M with a cold V gave 14-44x in spec 5.2).

    Steps of different rules are in different units (an lr multiplies gradients for SGD, a
    normalised step for Adam), so the yardstick is the target rule's own steps."""
    eng = copy.deepcopy(warm_sources[source])
    config = parse_optimizer_config(RULES[target])
    report = eng.set_optimizer(config, "migrate")
    # The report names every key of both rules.
    assert set(eng.state) <= set(report.entries)
    assert set(warm_sources[source].state) <= set(report.entries)
    assert {a for a, _ in report.entries.values()} <= {"kept", "converted", "fresh", "dropped"}
    first = step_size(eng, FIRST_GRAD)
    assert first <= 2 * reference_steps[target], (first, reference_steps[target], report.as_dict())


@pytest.mark.parametrize(
    "source, target",
    [
        ({"name": "sgd", "momentum": 1.0}, {"name": "sgd", "momentum": 0.9}),
        ({"name": "sgd", "momentum": 0.9}, {"name": "sgd", "momentum": 1.0}),
        ({"name": "sgd", "momentum": 0.5, "dampening": 1.0}, {"name": "adam"}),
        ({"name": "adam"}, {"name": "sgd", "momentum": 1.5}),
        ({"name": "rmsprop", "centered": True}, {"name": "sgd", "momentum": 1.0}),
    ],
)
def test_momentum_or_dampening_of_one_or_more_migrates_without_dividing_by_zero(source, target):
    """torch accepts momentum >= 1 and dampening >= 1 (no stationary point): the conversions
    that scale by 1 / (1 - mu) or 1 / (1 - tau) must not run, and what is left stays finite."""
    eng = engine({**source, "lr": 1e-3})
    run(eng, grads(5))
    report = eng.set_optimizer(parse_optimizer_config({**target, "lr": 1e-3}), "migrate")
    assert "momentum_buffer" in report.entries or target["name"] == "adam"
    for key, value in eng.state.items():
        if isinstance(value, torch.Tensor):
            assert torch.isfinite(value).all(), key
    eng.step(grads(1, seed=1)[0], 1e-3)
    assert torch.isfinite(eng.weights).all()


RULE_NAMES = ["sgd", "adagrad", "rmsprop", "adadelta", "adam", "adamw", "amsgrad", "adabound",
              "radam", "ranger"]  # fmt: skip


def _trained_and_migrated(source: dict, target: dict):
    from optserve.common.config import parse_optimizer_config
    from optserve.server.engine import build_rule
    from optserve.server.engine.migration import migrate

    torch.manual_seed(0)
    weights = torch.randn(8)
    rule = build_rule(parse_optimizer_config(source))
    state = rule.init_state(weights)
    for _ in range(3):
        rule.apply(weights, torch.randn(8), state, 0.01)
    new, report = migrate(rule, state, build_rule(parse_optimizer_config(target)), weights,
                          "migrate")  # fmt: skip
    actions = {key: action for key, (action, _) in report.entries.items()}
    return new, actions


@pytest.mark.parametrize("other", RULE_NAMES)
def test_amsgrad_and_adam_with_amsgrad_are_one_rule_in_migration(other):
    """`amsgrad` is `adam` with `amsgrad: true`: to and from every rule they migrate alike."""
    for pair in (
        ({"name": "adam", "amsgrad": True}, {"name": other}),
        ({"name": other}, {"name": "adam", "amsgrad": True}),
    ):
        spelled = [{"name": "amsgrad"} if p.get("amsgrad") else p for p in pair]
        state_a, actions_a = _trained_and_migrated(*pair)
        state_b, actions_b = _trained_and_migrated(*spelled)
        assert actions_a == actions_b, (pair, actions_a, actions_b)
        assert set(state_a) == set(state_b)
        for key, value in state_a.items():
            if isinstance(value, torch.Tensor):
                assert torch.equal(value, state_b[key]), key
            else:
                assert value == state_b[key], key


@pytest.mark.parametrize(
    ("config", "changes", "torch_cls"),
    [
        ({"name": "sgd", "lr": 0.01, "momentum": 0.9}, {"momentum": 0.5, "lr": 0.02},
         torch.optim.SGD),
        ({"name": "adam", "lr": 0.01}, {"betas": (0.8, 0.99), "eps": 1e-6}, torch.optim.Adam),
    ],
)  # fmt: skip
def test_keep_changes_a_value_as_torch_does_when_a_param_group_changes(config, changes, torch_cls):
    """Policy keep: the same state tensors, no conversion; the trajectory is torch's with the
    param group edited mid-run."""
    stream = grads(40)
    eng = engine(config)
    run(eng, stream[:20])
    before = dict(eng.state)
    new_config = parse_optimizer_config({**config, **changes})
    report = eng.set_optimizer(new_config, "keep")
    assert all(action == "kept" for action, _ in report.entries.values())
    assert all(eng.state[k] is v for k, v in before.items() if isinstance(v, torch.Tensor))
    run(eng, stream[20:])

    w = torch.zeros(N, dtype=torch.float64, requires_grad=True)
    opt = torch_cls([w], **{k: v for k, v in config.items() if k != "name"})
    for i, g in enumerate(stream):
        if i == 20:
            opt.param_groups[0].update(changes)
        w.grad = g.clone()
        opt.step()
    torch.testing.assert_close(eng.weights, w.detach(), rtol=0, atol=0)


def test_keep_refuses_another_rule():
    eng = engine({"name": "adam", "lr": 0.01})
    run(eng, grads(2))
    with pytest.raises(Exception, match="keep"):
        eng.set_optimizer(parse_optimizer_config({"name": "sgd", "lr": 0.01}), "keep")
    assert eng.config.name == "adam"


def _adabound_oracle_run(param, opt, stream):
    for g in stream:
        param.grad = g.clone()
        opt.step()


@pytest.mark.parametrize("policy", ["migrate", "reset", "keep"])
def test_adabound_lr_change_follows_the_oracle_c12(policy):
    """A swap that changes only AdaBound's lr. migrate and reset build the rule anew with the
    request's lr (C12), so base_lr is the new lr and the bounds close on final_lr as configured:
    the oracle is adabound built with the new lr (holding the old state, for migrate). keep is a
    torch param-group edit: the oracle is adabound with `group["lr"]` set mid-run, whose bounds
    then close on final_lr * lr_new / lr_old."""
    adabound = pytest.importorskip("adabound")
    stream = grads(60, seed=8)
    old, new = {"name": "adabound", "lr": 1e-3, "gamma": 0.1}, {"name": "adabound", "lr": 1e-2,
                                                                  "gamma": 0.1}  # fmt: skip
    eng = engine(old)
    run(eng, stream[:30])
    report = eng.set_optimizer(parse_optimizer_config(new), policy)
    assert eng.state["base_lr"] == (1e-3 if policy == "keep" else 1e-2)
    assert report.entries["base_lr"][0] == ("kept" if policy == "keep" else "fresh")

    param = torch.nn.Parameter(torch.zeros(N, dtype=torch.float64))
    before = adabound.AdaBound([param], lr=1e-3, gamma=0.1)
    _adabound_oracle_run(param, before, stream[:30])
    if policy == "keep":
        oracle = before
    else:
        oracle = adabound.AdaBound([param], lr=1e-2, gamma=0.1)  # base_lrs = [1e-2]
        if policy == "migrate":
            oracle.load_state_dict(before.state_dict())  # M, V, t (and the old group lr)
    oracle.param_groups[0]["lr"] = 1e-2
    _adabound_oracle_run(param, oracle, stream[30:])
    run(eng, stream[30:])
    assert torch.equal(eng.weights, param.detach())


def test_adabound_migrate_and_reset_agree_on_base_lr():
    """Both policies take base_lr from the request, whatever the source (C12)."""
    for source in ({"name": "adabound", "lr": 1e-3}, {"name": "adabound", "lr": 1e-3,
                   "amsbound": True}, {"name": "adam", "lr": 1e-3}):  # fmt: skip
        for policy in ("migrate", "reset"):
            eng = engine(source)
            run(eng, grads(3))
            eng.set_optimizer(parse_optimizer_config({"name": "adabound", "lr": 0.02}), policy)
            assert eng.state["base_lr"] == 0.02, (source, policy)


def _oracle_holding(config: dict, weights: torch.Tensor, state: dict):
    """The oracle of `config` (AMSGrad or AMSBound) holding a copy of the engine's state."""
    param = torch.nn.Parameter(weights.clone())
    if config["name"] == "adabound":
        adabound = pytest.importorskip("adabound")
        opt = adabound.AdaBound([param], lr=config["lr"], amsbound=True)
        step = state["step"]
    else:
        cls = torch.optim.AdamW if config["name"] == "adamw" else torch.optim.Adam
        opt = cls([param], lr=config["lr"], amsgrad=True)
        step = torch.tensor(float(state["step"]))
    keys = ("exp_avg", "exp_avg_sq", "max_exp_avg_sq")
    opt.state[param] = {"step": step, **{k: state[k].clone() for k in keys}}
    return param, opt


@pytest.mark.parametrize(
    ("source", "switch"),
    [({"name": "adam"}, "amsgrad"), ({"name": "adamw"}, "amsgrad"),
     ({"name": "adabound"}, "amsbound")],
    ids=["adam", "adamw", "adabound"],
)  # fmt: skip
@pytest.mark.parametrize("path", ["fast", "reference"])
def test_turning_amsgrad_on_under_the_same_name_applies_c6(source, switch, path):
    """`adam` -> `adam` with `amsgrad: true` (`--set amsgrad=true`), likewise `adamw`, and
    `adabound` with `amsbound: true`: Vmax := V (C6), as `adam` -> `amsgrad` does, and the run
    continues as the oracle's AMSGrad / AMSBound holding M, V, t and Vmax = V."""
    stream = grads(50, seed=9)
    source = {**source, "lr": 0.01}
    eng = GroupEngine("g", torch.zeros(N), parse_optimizer_config(source), path=path)
    for g in stream[:30]:
        eng.step(g.float(), 0.01)
    target = with_overrides(eng.config, {switch: True})
    report = eng.set_optimizer(target, "migrate")
    assert report.entries["max_exp_avg_sq"][0] == "converted"
    assert torch.equal(eng.state["max_exp_avg_sq"], eng.state["exp_avg_sq"])
    assert eng.state["max_exp_avg_sq"].abs().max() > 0
    if source["name"] == "adam":  # the other spelling migrates to the same bits
        other = GroupEngine("g", torch.zeros(N), parse_optimizer_config(source), path=path)
        for g in stream[:30]:
            other.step(g.float(), 0.01)
        other.set_optimizer(parse_optimizer_config({"name": "amsgrad", "lr": 0.01}), "migrate")
        assert other.state.keys() == eng.state.keys()
        assert other.state["step"] == eng.state["step"]
        for key in ("exp_avg", "exp_avg_sq", "max_exp_avg_sq"):
            assert torch.equal(other.state[key], eng.state[key]), key
    param, oracle = _oracle_holding(source, eng.weights, eng.state)
    for g in stream[30:]:
        eng.step(g.float(), 0.01)
        param.grad = g.float()
        oracle.step()
    if eng.fast_path in ("reference", "chunked"):  # the oracle's single-tensor ops
        assert torch.equal(eng.weights, param.detach())
    else:  # torch's fused kernel (or a compiled one): a few ulp off (spec section 2)
        torch.testing.assert_close(eng.weights, param.detach(), rtol=1e-5, atol=1e-6)


def test_keep_refuses_turning_amsgrad_on_and_names_migrate():
    """torch raises KeyError when amsgrad is turned on over a live state (spec C6); keep, which
    adds no state, refuses and names the policy that applies C6."""
    eng = engine({"name": "adam", "lr": 0.01})
    run(eng, grads(2))
    with pytest.raises(Exception, match="amsgrad on or off .* needs 'migrate'"):
        eng.set_optimizer(with_overrides(eng.config, {"amsgrad": True}), "keep")
    assert "max_exp_avg_sq" not in eng.state and eng.config.name == "adam"
