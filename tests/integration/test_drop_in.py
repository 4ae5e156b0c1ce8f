"""RemoteOptimizer as torch code uses an optimizer: param_groups that mirror the server, torch lr
schedulers, GradScaler and clip_grad_norm_, and a state_dict that resumes consistently."""

from __future__ import annotations

import warnings

import pytest
import torch

from optserve.client import FailedPrecondition, InvalidArgument, PermissionDenied, RemoteOptimizer


def _net(seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Linear(6, 5), torch.nn.Tanh(), torch.nn.Linear(5, 3))


def _batches(n: int, seed: int = 1) -> list[tuple[torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(seed)
    return [
        (torch.randn(8, 6, generator=g), torch.randint(0, 3, (8,), generator=g)) for _ in range(n)
    ]


def _train(net, opt, sched, batches, *, clip: float | None = None, scaler=None) -> None:
    for x, y in batches:
        opt.zero_grad()
        loss = torch.nn.functional.cross_entropy(net(x), y)
        if scaler is not None:
            scaler.scale(loss).backward()
            scaler.unscale_(opt)
        else:
            loss.backward()
        if clip is not None:
            torch.nn.utils.clip_grad_norm_(net.parameters(), clip)
        if scaler is not None:
            scaler.step(opt)
            scaler.update()
        else:
            opt.step()
        if sched is not None:
            sched.step()


def _close(a: torch.nn.Module, b: torch.nn.Module, rel: float = 1e-6) -> None:
    for (name, p), q in zip(a.named_parameters(), b.parameters(), strict=True):
        scale = max(q.abs().max().item(), 1e-12)
        assert (p - q).abs().max().item() <= rel * scale, name


def test_param_groups_mirror_the_server(service, model_name):
    net = _net()
    opt = RemoteOptimizer(
        net.named_parameters(), address=service.address, model=model_name,
        optimizer={"name": "adam", "lr": 0.01, "betas": [0.8, 0.99]},
        groups={"head": {"params": ["2.weight", "2.bias"], "lr": 0.1}},
    )  # fmt: skip
    try:
        by_name = {g["name"]: g for g in opt.param_groups}
        assert set(by_name) == {"default", "head"}
        assert by_name["head"]["lr"] == 0.1 and by_name["default"]["lr"] == 0.01
        assert by_name["default"]["betas"] == (0.8, 0.99) and by_name["default"]["eps"] == 1e-8
        assert sum(len(g["params"]) for g in opt.param_groups) == 4
        # A change made by someone else reaches the mirror at the next pull.
        opt.client.set_hyperparameters(model_name, eps=1e-6)
        opt.pull()
        assert all(g["eps"] == 1e-6 for g in opt.param_groups)
        # A change made here reaches the server at the next step, per group, audited.
        by_name["head"]["lr"] = 0.05
        by_name["default"]["weight_decay"] = 0.1
        _train(net, opt, None, _batches(1))
        groups = opt.status().groups
        assert groups["head"].lr == 0.05 and groups["head"].overrides["lr"] == 0.05
        assert groups["default"].optimizer["weight_decay"] == 0.1
        audit = opt.status().audit[-1]
        assert audit.action == "set_optimizer" and audit.new["policy"] == "keep"
        assert audit.old["overrides"] == {"head": {"lr": 0.1}, "default": {}}
        assert audit.new["overrides"] == {"head": {"lr": 0.05}, "default": {"weight_decay": 0.1}}
        # A bad value is refused at the step, before its push; nothing changes.
        version = opt.version
        by_name["head"]["lr"] = -1.0
        with pytest.raises(InvalidArgument):
            _train(net, opt, None, _batches(1))
        assert opt.status().version == version
    finally:
        opt.close()


def test_an_unchanged_value_sends_nothing(service, model_name, client):
    net = _net()
    opt = RemoteOptimizer(net.named_parameters(), address=service.address, model=model_name,
                          optimizer={"name": "sgd", "lr": 0.1})  # fmt: skip
    try:
        report = client.set_hyperparameters(model_name, lr=0.1)
        assert report.unchanged and not report.groups
        _train(net, opt, None, _batches(2))
        assert opt.control_changes == 0
        assert not [a for a in opt.status().audit if a.action == "set_optimizer"]
    finally:
        opt.close()


@pytest.mark.parametrize(
    ("rule", "make_scheduler"),
    [
        ({"name": "adamw", "lr": 0.01, "weight_decay": 0.01},
         lambda o: torch.optim.lr_scheduler.LambdaLR(o, lambda s: 1.0 - s / 10)),
        ({"name": "sgd", "lr": 0.1, "momentum": 0.9},
         lambda o: torch.optim.lr_scheduler.OneCycleLR(o, max_lr=0.2, total_steps=8)),
    ],
)  # fmt: skip
def test_torch_schedulers_drive_the_server(service, model_name, rule, make_scheduler):
    """The lr a torch scheduler sets is the lr of the server's next update: the trajectory is
    the local torch optimizer's under the same scheduler (OneCycleLR cycles momentum too)."""
    batches = _batches(8)
    local_net, remote_net = _net(), _net()
    cls = {"adamw": torch.optim.AdamW, "sgd": torch.optim.SGD}[rule["name"]]
    local = cls(local_net.parameters(), **{k: v for k, v in rule.items() if k != "name"})
    _train(local_net, local, make_scheduler(local), batches, clip=0.5)
    opt = RemoteOptimizer(remote_net.named_parameters(), address=service.address,
                          model=model_name, optimizer=rule)  # fmt: skip
    try:
        sched = make_scheduler(opt)
        _train(remote_net, opt, sched, batches, clip=0.5)
        _close(remote_net, local_net)
        assert opt.param_groups[0]["lr"] == local.param_groups[0]["lr"]
        assert opt.control_changes >= 7
    finally:
        opt.close()


def test_a_server_schedule_is_not_silently_overridden(service, model_name):
    net = _net()
    opt = RemoteOptimizer(net.named_parameters(), address=service.address, model=model_name,
                          optimizer={"name": "sgd", "lr": 0.1},
                          schedule={"name": "exponential", "gamma": 0.5})  # fmt: skip
    try:
        _train(net, opt, None, _batches(2))
        assert opt.param_groups[0]["lr"] == pytest.approx(0.025)  # the server's schedule shows
        sched = torch.optim.lr_scheduler.StepLR(opt, step_size=1, gamma=0.9)
        version = opt.version
        with pytest.raises(FailedPrecondition, match="override_schedule"):
            _train(net, opt, sched, _batches(2))
        assert opt.status().version == version + 1  # the first step went; the second refused
        opt.override_schedule = True
        opt.param_groups[0]["lr"] = 0.02
        _train(net, opt, None, _batches(1))
        status = opt.status()
        assert status.schedule["name"] == "constant" and status.groups["default"].lr == 0.02
        actions = [a.action for a in status.audit]
        assert actions[-2:] == ["set_schedule", "set_optimizer"]
    finally:
        opt.close()


def test_grad_scaler_and_a_skipped_step(service, model_name):
    """GradScaler unscales the grads in param_groups, finds an Inf, and skips the step: no push."""
    batches = _batches(4)
    local_net, remote_net = _net(), _net()
    local = torch.optim.Adam(local_net.parameters(), lr=0.01)
    _train(local_net, local, None, batches, scaler=torch.amp.GradScaler("cpu", init_scale=64.0))
    opt = RemoteOptimizer(remote_net.named_parameters(), address=service.address,
                          model=model_name, optimizer={"name": "adam", "lr": 0.01})  # fmt: skip
    try:
        scaler = torch.amp.GradScaler("cpu", init_scale=64.0)
        _train(remote_net, opt, None, batches, scaler=scaler)
        _close(remote_net, local_net)
        version = opt.status().version
        opt.zero_grad()
        torch.nn.functional.cross_entropy(remote_net(batches[0][0]), batches[0][1]).backward()
        next(remote_net.parameters()).grad[0, 0] = float("inf")
        scaler.step(opt)
        scaler.update()
        status = opt.status()
        assert status.version == version and scaler.get_scale() == 32.0
        assert sum(t.pushes for t in status.trainers.values()) == version
    finally:
        opt.close()


def test_state_dict_resumes_weights_and_state_of_one_version(service, model_name, client):
    batches = _batches(10)
    straight_net = _net()
    straight = torch.optim.Adam(straight_net.parameters(), lr=0.01)
    _train(straight_net, straight, None, batches)

    net = _net()
    opt = RemoteOptimizer(net.named_parameters(), address=service.address, model=model_name,
                          optimizer={"name": "adam", "lr": 0.01})  # fmt: skip
    try:
        _train(net, opt, None, batches[:4])
        saved = {"model": {k: v.clone() for k, v in net.state_dict().items()},
                 "optimizer": opt.state_dict()}  # fmt: skip
        record = saved["optimizer"]["optserve"]
        assert record["version"] == 4 and record["checkpoint"]
        assert saved["optimizer"]["param_groups"][0]["params"] == [0, 1, 2, 3]
        _train(net, opt, None, batches[4:7])  # goes on past the checkpoint, then "crashes"
    finally:
        opt.close()
    # A new process resumes from the framework's checkpoint, twice (two trainers): restored once.
    for _ in range(2):
        net = _net(seed=5)
        net.load_state_dict(saved["model"])
        opt = RemoteOptimizer(net.named_parameters(), address=service.address, model=model_name)
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            opt.load_state_dict(saved["optimizer"])
        assert opt.version == 4
        opt.close()
    restores = [a for a in client.status(model_name).audit if a.action == "restore"]
    assert len(restores) == 1
    opt = RemoteOptimizer(net.named_parameters(), address=service.address, model=model_name)
    try:
        _train(net, opt, None, batches[4:])
        _close(net, straight_net)
        with pytest.raises(InvalidArgument, match="optserve"):
            opt.load_state_dict(straight.state_dict())
    finally:
        opt.close()


def test_several_trainers_changing_lr(service, model_name, client):
    """Last writer wins; an equal value from another trainer changes nothing; every trainer's
    param groups show the server's value after its next step."""
    from optserve.client import ParameterServerClient

    nets = [_net(), _net()]
    clients = [ParameterServerClient(service.address, caller=f"trainer-{i}") for i in range(2)]
    a, b = (RemoteOptimizer(net.named_parameters(), client=c, model=model_name,
                            optimizer={"name": "sgd", "lr": 0.1})
            for net, c in zip(nets, clients, strict=True))  # fmt: skip
    try:
        batch = _batches(1)
        a.param_groups[0]["lr"] = 0.05
        _train(nets[0], a, None, batch)
        b.param_groups[0]["lr"] = 0.05  # the same value: applied once
        _train(nets[1], b, None, batch)
        b.param_groups[0]["lr"] = 0.02
        _train(nets[1], b, None, batch)
        _train(nets[0], a, None, batch)
        assert a.param_groups[0]["lr"] == b.param_groups[0]["lr"] == 0.02
        changes = [e for e in client.status(model_name).audit if e.action == "set_optimizer"]
        assert [(e.new["lr"], e.caller.split(" ")[2]) for e in changes] == [
            (0.05, "trainer-0"), (0.02, "trainer-1")]  # fmt: skip
    finally:
        for opt in (a, b):
            opt.close()
        for c in clients:
            c.close()


def test_resume_without_a_server_checkpoint(service, model_name, caplog):
    """A trainer token may not write checkpoints: the record names none, and a resume keeps the
    server's state, loads its weights and says so."""
    from tests.helpers import auth

    net = _net()
    admin = RemoteOptimizer(net.named_parameters(), address=service.address, model=model_name,
                            optimizer={"name": "adam", "lr": 0.01})  # fmt: skip
    admin.close()
    opt = RemoteOptimizer(net.named_parameters(), address=service.address, model=model_name,
                          token=auth.TRAINER)  # fmt: skip
    try:
        _train(net, opt, None, _batches(2))
        with caplog.at_level("WARNING"):
            saved = opt.state_dict()
        assert saved["optserve"]["checkpoint"] is None and saved["optserve"]["version"] == 2
        assert "no server checkpoint" in caplog.text
        _train(net, opt, None, _batches(2))
        other = _net(seed=3)
        resumed = RemoteOptimizer(other.named_parameters(), address=service.address,
                                  model=model_name, token=auth.TRAINER)  # fmt: skip
        with pytest.warns(UserWarning, match="server's version 4, not at the record's 2"):
            resumed.load_state_dict(saved)
        _close(other, net, rel=0.0)
        # A trainer token may not send hyperparameter changes either: a clear refusal.
        resumed.param_groups[0]["lr"] = 0.5
        with pytest.raises(PermissionDenied, match="lr_scheduler_type='constant'"):
            _train(other, resumed, None, _batches(1))
        resumed.close()
    finally:
        opt.close()
