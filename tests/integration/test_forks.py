"""Forks (issue 19): fork a live model or one of its checkpoints, swap the fork's optimizer,
move trainers between branches, promote a fork; through real Ray and gRPC."""

from __future__ import annotations

import contextlib

import pytest
import ray
import torch

from optserve.client import ParameterServerClient, RemoteOptimizer
from optserve.common.errors import (
    AlreadyExists,
    FailedPrecondition,
    InvalidArgument,
    NotFound,
)
from optserve.server.coordinator.catalogue import ModelEntry
from optserve.server.store.manifest import Store
from tests.helpers.models import dropped
from tests.integration.test_checkpoints import full_state
from tests.integration.test_readme import ADDRESS, BLOCK, ROOT

SHAPES = {"weight": (4, 3), "bias": (5,)}
ADAM = {"name": "adam", "lr": 0.01}
SCHEDULE = {"name": "step", "step_size": 2, "gamma": 0.5}


def weights(seed=0):
    generator = torch.Generator().manual_seed(seed)
    return {n: torch.randn(s, generator=generator) for n, s in SHAPES.items()}


def grads(step):
    generator = torch.Generator().manual_seed(100 + step)
    return {n: torch.randn(s, generator=generator) for n, s in SHAPES.items()}


def same_state(a, b):
    assert a.keys() == b.keys()
    for key in a:
        if isinstance(a[key], torch.Tensor):
            assert torch.equal(a[key], b[key]), key
        else:
            assert a[key] == b[key], key


def test_a_fork_is_the_model_at_one_version_then_goes_its_own_way(service, client, model_name):
    fork = f"{model_name}-fork"
    client.create_model(model_name, weights(), ADAM, num_shards=2, schedule=SCHEDULE)
    with dropped(client, fork):
        for step in range(3):
            client.push(model_name, grads(step))
        client.report_metric(model_name, "loss", 1.5, step=3)
        info = client.fork(model_name, fork)
        assert (info.forked_from, info.fork_version) == (model_name, 3)
        assert info.fork_checkpoint and info.name == fork
        # Weights, every state buffer, step counters and the schedule's state: all equal.
        versions, parent_state, parent_schedule = full_state(service, model_name)
        fork_versions, fork_state, fork_schedule = full_state(service, fork)
        assert versions == fork_versions == {3}
        same_state(parent_state, fork_state)
        assert parent_schedule == fork_schedule
        status = client.status(fork)
        assert (status.forked_from, status.fork_version) == (model_name, 3)
        assert status.fork_checkpoint == info.fork_checkpoint
        assert status.mode == client.status(model_name).mode
        assert [m.value for m in status.metrics] == [1.5]  # the parent's history came along
        assert any(a.action == "fork" for a in status.audit)
        assert any(a.action == "forked" for a in client.status(model_name).audit)
        # From here each goes its own way: pushes to one leave the other as it was.
        client.push(fork, grads(10))
        client.push(fork, grads(11))
        _, after, _ = full_state(service, model_name)
        same_state(parent_state, after)
        assert client.pull(fork)[1] == 5 and client.pull(model_name)[1] == 3
        assert not torch.equal(client.pull(fork)[0]["weight"], client.pull(model_name)[0]["weight"])
        assert model_name in client.list_models() and fork in client.list_models()


def test_a_fork_from_a_checkpoint_with_another_optimizer_by_the_cli(service, client, model_name):
    fork = f"{model_name}-sgd"
    client.create_model(model_name, weights(), ADAM)
    with dropped(client, fork):
        client.push(model_name, grads(0))
        first = client.checkpoint(model_name)
        at_one, _ = client.pull(model_name)
        client.push(model_name, grads(1))
        said = cli("fork", "--address", service.address, "--model", model_name, fork,
                   "--at", f"checkpoint:{first.name}", "--optimizer",
                   '{"name": "sgd", "lr": 0.1, "momentum": 0.9}')  # fmt: skip
        assert said == (f"forked {model_name} at version 1 (checkpoint {first.name}) as {fork}: "
                        "sgd on 1 shard(s)")  # fmt: skip
        info = client.describe_model(fork)
        assert (info.fork_version, info.fork_checkpoint, info.version) == (1, first.name, 1)
        assert info.optimizer.name == "sgd"
        assert client.describe_model(model_name).optimizer.name == "adam"
        assert all(torch.equal(at_one[k], v) for k, v in client.pull(fork)[0].items())
        audit = [a.action for a in client.status(fork).audit]
        assert audit.index("fork") < audit.index("set_optimizer")
        # The fork is a model like any other: it checkpoints and restores, lineage and all.
        client.push(fork, grads(5))
        taken = client.checkpoint(fork)
        client.push(fork, grads(6))
        restored = client.restore(fork, taken.name)
        assert restored.version == 2 and restored.forked_from == model_name
        assert client.status(fork).fork_checkpoint == first.name
        assert len(client.list_checkpoints(fork)) >= 2  # its first: the copy it started from


def cli(*argv):
    """Run an `optserve` command in this process; return what it printed."""
    import io
    from contextlib import redirect_stdout

    from optserve.server.cli import main

    out = io.StringIO()
    with redirect_stdout(out):
        assert main(list(argv)) == 0
    return out.getvalue().strip()


def test_fork_refuses_bad_input_and_changes_nothing(service, client, model_name):
    client.create_model(model_name, weights(), ADAM)
    before = client.list_models()
    with pytest.raises(NotFound):
        client.fork(f"{model_name}-nobody", f"{model_name}-x")
    with pytest.raises(AlreadyExists):
        client.fork(model_name, model_name)
    with pytest.raises(NotFound):
        client.fork(model_name, f"{model_name}-x", at="checkpoint:0000000000000-000000000001-abc")
    with pytest.raises(InvalidArgument):
        client.fork(model_name, f"{model_name}-x", at="yesterday")
    with pytest.raises(InvalidArgument):
        client.fork(model_name, "bad name!")
    with pytest.raises(FailedPrecondition):  # only a fork can be promoted
        client.promote(model_name)
    assert client.list_models() == before
    assert [a.action for a in client.status(model_name).audit] == []
    # A fork of a run that was dropped and created again is not that model's to replace.
    fork = f"{model_name}-orphan"
    with dropped(client, fork):
        client.fork(model_name, fork)
        client.drop_model(model_name)
        client.create_model(model_name, weights(1), ADAM)
        with pytest.raises(FailedPrecondition, match="created again"):
            client.promote(fork)
        assert client.describe_model(model_name).name == model_name


def test_trainers_switch_branches_and_a_promoted_fork_takes_the_name(
    service, client, model_name, checkpoint_dir
):
    fork, kept = f"{model_name}-b", f"{model_name}-was-main"
    model = torch.nn.Linear(3, 2)
    trainer = RemoteOptimizer(model.named_parameters(), model=model_name, address=service.address,
                              optimizer=ADAM)  # fmt: skip
    with dropped(client, fork, kept), contextlib.closing(trainer):
        for _ in range(2):
            model(torch.ones(4, 3)).sum().backward()
            trainer.step()
        client.fork(model_name, fork, optimizer={"name": "sgd", "lr": 0.5})
        trainer.switch_model(fork)
        model(torch.ones(4, 3)).sum().backward()
        trainer.step()
        assert client.pull(fork)[1] == 3 and client.pull(model_name)[1] == 2
        trainer.switch_model(model_name)  # and back: the parent's weights again
        assert torch.equal(model.weight.detach(), client.pull(model_name)[0]["weight"])
        other = ParameterServerClient(service.address)  # a trainer that knows the old layout
        other.pull(model_name)
        with pytest.raises(AlreadyExists):
            client.promote(fork, keep_as=fork)
        said = cli("promote", "--address", service.address, fork, "--keep-as", kept)
        assert said == (f"promoted {fork}: {model_name} now resolve to it; the run "
                        f"{model_name} had is kept as {kept}")  # fmt: skip
        assert model_name in client.describe_model(fork).aliases
        assert client.describe_model(model_name).name == fork
        assert client.status(model_name).model == fork
        assert model_name not in client.list_models() and kept in client.list_models()
        assert client.describe_model(kept).version == 2
        # Checkpoints under the old name are the fork's, where the fork's files are.
        assert client.checkpoint(model_name).uri.endswith(f"/{fork}")
        # A trainer on the old name: its push is refused once (pull), then lands on the fork.
        model(torch.ones(4, 3)).sum().backward()
        trainer.step()
        assert trainer.dropped_pushes == 1
        assert torch.equal(model.weight.detach(), client.pull(fork)[0]["weight"])
        model(torch.ones(4, 3)).sum().backward()
        trainer.step()
        assert client.pull(fork)[1] == 4
        assert other.pull(model_name)[1] == 4
        other.close()
        assert any(a.action == "promote" for a in client.status(fork).audit)
        with pytest.raises(AlreadyExists):  # the name is taken: it names the fork
            client.create_model(model_name, weights(), ADAM)
        with pytest.raises(FailedPrecondition):
            client.promote(fork)
        # Every shard carries the aliases in its catalogue entry (what a coordinator that
        # comes back adopts), and the checkpoint taken at the promotion holds them (a restore
        # brings them back).
        shards = ray.get(service.actor.shard_actors.remote(fork))
        for entry in ray.get([shard.entry.remote() for shard in shards]):
            assert ModelEntry.from_dict(entry).lineage["aliases"] == [model_name]
        newest = Store(checkpoint_dir).read(fork)
        assert newest.lineage["aliases"] == [model_name] and newest.version == 3


def python_blocks(path):
    text = (ROOT / path).read_text()
    return [m.group(2) for m in BLOCK.finditer(text) if m.group(1) == "python"]


@pytest.mark.parametrize("path, section", [("docs/forks.md", None), ("README.md", "fork")])
def test_the_docs_examples_run_as_written(service, client, path, section, capsys):
    blocks = python_blocks(path)
    if section is not None:
        blocks = [b for b in blocks if "client.fork(" in b]
    assert len(blocks) == 1
    code = blocks[0].replace(ADDRESS, service.address)
    try:
        exec(compile(code, path, "exec"), {"__name__": "__main__"})
    finally:
        for model in ("forks-demo", "forks-demo-sgd", "my-net", "my-net-sgd"):
            with contextlib.suppress(NotFound):
                client.drop_model(model)
    said = capsys.readouterr().out
    if path == "docs/forks.md":
        assert said.splitlines() == ["forks-demo 20 sgd", "forks-demo-sgd", "['forks-demo']"]
    else:
        assert said.splitlines() == ["my-net 1", "my-net-sgd"]
