"""The three-tensor model the integration tests train, its seeded data, the leader's log."""

from __future__ import annotations

import contextlib

import ray
import torch

from optserve.common.errors import NotFound

SHAPES = {"weight": (4, 5), "bias": (7,), "kernel": (2, 3, 2, 2)}


def initial_weights(seed=0):
    generator = torch.Generator().manual_seed(seed)
    return {name: torch.randn(shape, generator=generator) for name, shape in SHAPES.items()}


def gradient(trainer, step):
    """Trainer `trainer`'s gradient at its step `step` (seeded: a replay gets the same)."""
    generator = torch.Generator().manual_seed(1000 * trainer + step)
    return {name: torch.randn(shape, generator=generator) for name, shape in SHAPES.items()}


@contextlib.contextmanager
def dropped(client, *names):
    """Drop the models named (forks a test made) when the test ends, passed or not."""
    try:
        yield
    finally:
        for name in names:
            with contextlib.suppress(NotFound):
                client.drop_model(name)


def leader_log(service, model):
    """The model's leader shard's log of decided updates, oldest first."""
    shards = ray.get(service.actor.shard_actors.remote(model))
    return ray.get(shards[0].decisions.remote())


def checkpoint_engine(checkpoint_dir, model, name):
    """One GroupEngine per group holding a whole checkpoint (read the way a restoring shard
    reads it, onto one shard): what a replay from that checkpoint starts from."""
    from optserve.common.config import parse_optimizer_config
    from optserve.common.layout import split_ranges
    from optserve.server.coordinator.catalogue import layouts_of
    from optserve.server.coordinator.checkpoints import restore_plan
    from optserve.server.engine.group import GroupEngine
    from optserve.server.shard.checkpoint import ShardCheckpoints
    from optserve.server.shard.state import GroupInit, ShardState
    from optserve.server.store.manifest import Store

    store = Store(checkpoint_dir)
    ckpt = store.read(model, name)
    (whole,) = split_ranges(layouts_of(ckpt.params, ckpt.groups), 1)
    config = parse_optimizer_config(ckpt.optimizer)
    shard = ShardState(model, 0, {g: GroupInit(None, config, numel=b - a)
                                  for g, (a, b) in whole.ranges.items()})  # fmt: skip
    ShardCheckpoints(shard).restore(restore_plan(store, ckpt), whole.ranges)
    engines = {}
    for group, values in shard.state_dict()["groups"].items():
        engine = GroupEngine(group, values["weights"], config)
        engine.load_state_dict(values)
        engines[group] = engine
    return ckpt, engines
