"""One table of rules drives one contract suite: every rule (and each with Lookahead) on a flat
buffer against its oracle run per tensor (spec section 1 table and section 6.1)."""

from __future__ import annotations

import copy
import inspect

import pytest
import torch

from optserve.common.config import RULE_CONFIGS, parse_optimizer_config
from optserve.server.engine import build_rule
from optserve.server.engine.group import CHUNK_ELEMENTS, GroupEngine
from tests.unit.oracles import centralize, torch_oracle

SHAPES = [(4, 5), (7,), (2, 3, 2, 2)]
VIEWS = [(0, (4, 5)), (20, (7,)), (27, (2, 3, 2, 2))]

BASE = {
    "sgd": {"name": "sgd", "lr": 0.05},
    "momentum": {"name": "sgd", "lr": 0.05, "momentum": 0.9},
    "nesterov": {"name": "sgd", "lr": 0.05, "momentum": 0.9, "nesterov": True},
    "dampened": {"name": "sgd", "lr": 0.02, "momentum": 0.5, "dampening": 0.3, "maximize": True},
    # Delayed Nesterov (engine/delayed_nesterov.py) against the paper's Algorithm 3
    "delayed-nesterov": {
        "name": "sgd",
        "lr": 0.1,
        "momentum": 0.8,
        "nesterov": True,
        "delay": 3,
        "maximize": True,
    },
    "adagrad": {"name": "adagrad", "lr": 0.05, "lr_decay": 0.01, "initial_accumulator_value": 0.1},
    "rmsprop": {"name": "rmsprop", "lr": 0.01},
    "rmsprop-centered-momentum": {
        "name": "rmsprop",
        "lr": 0.005,
        "centered": True,
        "momentum": 0.9,
    },
    "adadelta": {"name": "adadelta"},
    "adadelta-lr": {"name": "adadelta", "lr": 0.5, "rho": 0.95},
    "adam": {"name": "adam", "lr": 0.01},
    "adam-betas": {"name": "adam", "lr": 0.003, "betas": [0.8, 0.99], "eps": 1e-6},
    "adamw": {"name": "adamw", "lr": 0.01},
    "amsgrad": {"name": "amsgrad", "lr": 0.01},
    "adabound": {"name": "adabound", "lr": 0.01},
    "amsbound": {"name": "adabound", "lr": 0.01, "amsbound": True, "final_lr": 0.05},
    "radam": {"name": "radam", "lr": 0.01},
    "radam-decoupled": {"name": "radam", "lr": 0.01, "decoupled_weight_decay": True},
    "ranger": {"name": "ranger", "lr": 0.01},
    "ranger-gc": {"name": "ranger", "lr": 0.01, "use_gc": True, "k": 4, "alpha": 0.6},
}


def _cases():
    cases = {}
    for key, config in BASE.items():
        cases[key] = config
        wd = 0.1 if config["name"] == "adamw" else 0.01
        cases[f"{key}+wd"] = {**config, "weight_decay": wd}
        if config["name"] != "ranger":
            cases[f"{key}+lookahead"] = {**config, "lookahead": {"k": 3, "alpha": 0.6}}
    return cases


CASES = _cases()


def seeded(shape, seed, dtype=torch.float64):
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed), dtype=dtype)


def trajectories(config, steps=100, dtype=torch.float64, lr_change=None, path="reference"):
    """Run our flat engine and the per-tensor oracle on the same seeded gradients."""
    params = [torch.nn.Parameter(seeded(s, i, dtype)) for i, s in enumerate(SHAPES)]
    oracle = torch_oracle(config, params)
    engine = GroupEngine(
        "g", torch.cat([p.detach().reshape(-1) for p in params]).clone(),
        parse_optimizer_config(config), VIEWS, path,
    )  # fmt: skip
    lr = config.get("lr", RULE_CONFIGS[config["name"]].model_fields["lr"].default)
    use_gc = getattr(oracle, "use_gc", False)
    for step in range(steps):
        if lr_change is not None and step == steps // 2:
            lr *= lr_change
            for group in oracle.param_groups:
                group["lr"] = lr
        grads = [seeded(s, 1000 * step + i, dtype) for i, s in enumerate(SHAPES)]
        for p, g in zip(params, grads, strict=True):
            p.grad = centralize(g) if use_gc else g.clone()
        oracle.step()
        engine.step(torch.cat([g.reshape(-1) for g in grads]), lr)
    return engine, torch.cat([p.detach().reshape(-1) for p in params])


def assert_close(ours, expected, dtype):
    diff = (ours.double() - expected.double()).abs().max().item()
    if dtype == torch.float64:
        assert diff <= 1e-10, diff
    else:
        scale = expected.double().abs().max().item()
        assert diff <= 1e-5 * scale, (diff, scale)


@pytest.mark.parametrize("case", sorted(CASES))
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_flat_rule_matches_per_tensor_oracle(case, dtype):
    engine, expected = trajectories(CASES[case], dtype=dtype)
    assert_close(engine.weights, expected, dtype)


@pytest.mark.parametrize("case", sorted(BASE))
def test_lr_change_mid_run_matches_oracle(case):
    engine, expected = trajectories(CASES[case], steps=40, lr_change=0.3)
    assert_close(engine.weights, expected, torch.float64)


@pytest.mark.parametrize("case", sorted(CASES))
def test_fast_path_equals_reference_path(case):
    config = parse_optimizer_config(CASES[case])
    numel = CHUNK_ELEMENTS * 2 + 1000  # several chunks and a ragged tail
    engines = {
        path: GroupEngine("g", seeded(numel, 1, torch.float32), config, (), path)
        for path in ("fast", "reference")
    }
    for step in range(12):
        grad = seeded(numel, step + 10, torch.float32)
        for engine in engines.values():
            engine.step(grad.clone(), config.lr)
    fast, ref = engines["fast"], engines["reference"]
    if fast._fused is None:  # chunked: the same element-wise ops, so bit-identical
        assert torch.equal(fast.weights, ref.weights)
    else:  # torch's fused kernels round differently by a few ulp (spec section 2)
        assert torch.allclose(fast.weights, ref.weights, rtol=1e-5, atol=1e-6)
    assert set(fast.state) == set(ref.state)


@pytest.mark.parametrize("case", sorted(CASES))
def test_state_round_trips_exactly(case):
    config = parse_optimizer_config(CASES[case])
    views = ((0, (5, 10)),)
    a = GroupEngine("g", seeded(50, 0), config, views)
    for step in range(7):
        a.step(seeded(50, step + 1), config.lr)
    saved = copy.deepcopy(a.state_dict())
    b = GroupEngine("g", a.weights.clone(), parse_optimizer_config({"name": "sgd"}), views)
    b.load_state_dict(saved)
    assert b.config == a.config
    for key, value in a.state.items():
        if isinstance(value, torch.Tensor):
            assert torch.equal(b.state[key], value), key
        else:
            assert b.state[key] == value, key
    for step in range(5):
        grad = seeded(50, step + 100)
        a.step(grad.clone(), config.lr)
        b.step(grad.clone(), config.lr)
    assert torch.equal(a.weights, b.weights)


@pytest.mark.parametrize("case", sorted(CASES))
def test_zero_lr_changes_nothing(case):
    config = parse_optimizer_config({**CASES[case], "lr": 0.0})
    engine = GroupEngine("g", seeded(20, 0), config)
    before = engine.weights.clone()
    for step in range(8):
        engine.step(seeded(20, step + 1), 0.0)
    assert torch.equal(engine.weights, before)


@pytest.mark.parametrize("case", sorted(BASE))
def test_converges_on_a_quadratic(case):
    config = {**BASE[case], "maximize": False} if "maximize" in BASE[case] else BASE[case]
    if config["name"] == "adagrad":  # its steps shrink as 1/sqrt(t): give it room
        config = {**config, "lr": 0.5, "lr_decay": 0.0}
    engine = GroupEngine("g", torch.zeros(16, dtype=torch.float64), parse_optimizer_config(config))
    target = seeded(16, 3)
    lr = parse_optimizer_config(config).lr
    for _ in range(3000):
        engine.step(2 * (engine.weights - target), lr)
    assert (engine.weights - target).abs().max() < 0.05


def test_state_keys_are_torchs():
    expected = {
        "sgd": set(), "adagrad": {"sum", "step"}, "rmsprop": {"square_avg", "step"},
        "adadelta": {"square_avg", "acc_delta", "step"}, "adam": {"exp_avg", "exp_avg_sq", "step"},
        "amsgrad": {"exp_avg", "exp_avg_sq", "max_exp_avg_sq", "step"},
        "adabound": {"exp_avg", "exp_avg_sq", "step", "base_lr"},
        "radam": {"exp_avg", "exp_avg_sq", "step"},
        "ranger": {"exp_avg", "exp_avg_sq", "step", "slow_buffer", "counter"},
    }  # fmt: skip
    for name, keys in expected.items():
        rule = build_rule(parse_optimizer_config({"name": name}))
        assert set(rule.init_state(torch.zeros(3))) == keys, name


@pytest.mark.parametrize(
    "name", ["sgd", "adagrad", "rmsprop", "adadelta", "adam", "adamw", "radam"]
)
def test_defaults_are_the_oracles(name):
    oracle = {"sgd": torch.optim.SGD, "adagrad": torch.optim.Adagrad,
              "rmsprop": torch.optim.RMSprop, "adadelta": torch.optim.Adadelta,
              "adam": torch.optim.Adam, "adamw": torch.optim.AdamW,
              "radam": torch.optim.RAdam}[name]  # fmt: skip
    signature = inspect.signature(oracle.__init__).parameters
    for field, info in RULE_CONFIGS[name].model_fields.items():
        if field in ("name", "lookahead") or (name, field) == ("sgd", "delay"):
            continue  # ours: Lookahead, and Delayed Nesterov (whose default 1 is torch's SGD)
        assert field in signature, f"{field} is not an argument of {oracle.__name__}"
        default = signature[field].default
        assert info.default == (tuple(default) if isinstance(default, tuple) else default), field


def test_adabound_defaults_are_the_authors():
    adabound = pytest.importorskip("adabound")
    signature = inspect.signature(adabound.AdaBound.__init__).parameters
    for field, info in RULE_CONFIGS["adabound"].model_fields.items():
        if field in ("name", "lookahead"):
            continue
        default = signature[field].default
        assert info.default == (tuple(default) if isinstance(default, tuple) else default), field


@pytest.mark.parametrize("path", ["fast", "reference"])
def test_stays_finite_computes_on_copies_and_finds_an_overflowing_state(path):
    """AdaGrad's sum after two gradients of 1.5e19 (each square finite) is infinite: found on
    copies, slice by slice, with the model's weights and state untouched."""
    n = CHUNK_ELEMENTS + 10  # two slices; the overflow is in the second
    engine = GroupEngine("g", torch.ones(n), parse_optimizer_config({"name": "adagrad"}), path=path)
    grad = torch.zeros(n)
    grad[-1] = 1.5e19
    assert engine.stays_finite(grad, 0.1)
    engine.step(grad.clone(), 0.1)
    before = {k: v.clone() if isinstance(v, torch.Tensor) else v for k, v in engine.state.items()}
    weights = engine.weights.clone()
    assert not engine.stays_finite(grad, 0.1)
    assert engine.stays_finite(torch.ones(n), 0.1)
    assert torch.equal(engine.weights, weights) and engine.state["step"] == before["step"]
    for key, value in before.items():
        if isinstance(value, torch.Tensor):
            assert torch.equal(engine.state[key], value)


def test_the_eager_kernel_takes_the_way_that_has_been_faster_lately():
    """FasterOf (engine/group.py), on a fake clock each way advances by its own cost: both ways
    are timed first, the cheaper one is taken, the other timed again every RETIME_EVERY steps,
    and when the machine changes (the cheap way gets dear) the choice follows."""
    from optserve.server.engine import group as group_module

    now = [0.0]
    costs = {"chunked": 1.0, "reference": 1.5}
    taken: list[str] = []

    def way(name):
        def step(grad, lr):
            taken.append(name)
            now[0] += costs[name]

        return step

    faster = group_module.FasterOf({name: way(name) for name in costs}, clock=lambda: now[0])
    every = group_module.RETIME_EVERY
    for _ in range(2 * every + 1):
        faster(None, 0.0)
    assert taken[:2] == ["chunked", "reference"]
    # its first timing, then at steps RETIME_EVERY and 2 x RETIME_EVERY
    assert [i + 1 for i, name in enumerate(taken) if name == "reference"] == [2, every, 2 * every]
    assert faster.current == "chunked"
    costs["chunked"] = 10.0  # a loaded machine: the slices' many small ops wait on threads
    taken.clear()
    for _ in range(every):
        faster(None, 0.0)
    # One dear step tips the running cost (1 + 0.3 x 9 > 1.5); after it, only a re-timing.
    assert taken[0] == "chunked" and taken.count("chunked") == 2
    assert faster.current == "reference"

    # Far slower at every re-timing (> 2x): each waits twice as long as the one before.
    costs["chunked"] = 100.0
    taken.clear()
    for _ in range(8 * every):
        faster(None, 0.0)
    assert 1 <= taken.count("chunked") <= 3 and faster.every >= 4 * every
