"""RemoteOptimizer's param-group mirror (client/_param_groups.py): what is shown, what is read
back as a change."""

from __future__ import annotations

from optserve.client._param_groups import GroupMirror, same, shown

ADAM = {"name": "adam", "lr": 0.001, "betas": [0.9, 0.999], "eps": 1e-8, "weight_decay": 0.0,
        "amsgrad": False, "maximize": False, "lookahead": None}  # fmt: skip


def test_shown_is_torch_shaped():
    values = shown(ADAM, 0.0005)
    assert "name" not in values and values["lr"] == 0.0005 and values["betas"] == (0.9, 0.999)
    assert shown(ADAM, None)["lr"] == 0.001  # no schedule told: the config's lr


def test_same_compares_as_hyperparameters():
    assert same((0.9, 0.999), [0.9, 0.999]) and same(1, 1.0) and not same((0.9,), (0.9, 0.9))
    assert same(None, None) and not same(0.1, 0.10000000000000002)


def test_changes_are_what_differs_from_what_was_told():
    groups = [{"params": [], "name": "default"}, {"params": [], "name": "head"}]
    mirror = GroupMirror()
    mirror.write(groups, {"default": shown(ADAM, 0.001), "head": shown(ADAM, 0.01)})
    assert mirror.changes(groups) == {}
    groups[1]["lr"] = 0.005
    groups[0]["initial_lr"] = 0.001  # a scheduler's own key: not a hyperparameter
    groups[0]["betas"] = [0.9, 0.999]  # equal as values: no change
    assert mirror.changes(groups) == {"head": {"lr": 0.005}}
    mirror.sent({"head": {"lr": 0.005}})
    assert mirror.changes(groups) == {}


def test_a_swap_removes_the_old_rules_keys():
    groups = [{"params": [], "name": "default"}]
    mirror = GroupMirror()
    mirror.write(groups, {"default": shown(ADAM, 0.001)})
    groups[0]["initial_lr"] = 0.001
    sgd = {"name": "sgd", "lr": 0.1, "momentum": 0.9, "dampening": 0.0, "weight_decay": 0.0,
           "nesterov": False, "maximize": False, "lookahead": None}  # fmt: skip
    mirror.write(groups, {"default": shown(sgd, 0.1)})
    assert "betas" not in groups[0] and groups[0]["momentum"] == 0.9
    assert groups[0]["initial_lr"] == 0.001  # not the server's to remove
