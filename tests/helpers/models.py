"""The three-tensor model the integration tests train, its seeded data, the leader's log."""

from __future__ import annotations

import ray
import torch

SHAPES = {"weight": (4, 5), "bias": (7,), "kernel": (2, 3, 2, 2)}


def initial_weights(seed=0):
    generator = torch.Generator().manual_seed(seed)
    return {name: torch.randn(shape, generator=generator) for name, shape in SHAPES.items()}


def gradient(trainer, step):
    """Trainer `trainer`'s gradient at its step `step` (seeded: a replay gets the same)."""
    generator = torch.Generator().manual_seed(1000 * trainer + step)
    return {name: torch.randn(shape, generator=generator) for name, shape in SHAPES.items()}


def leader_log(service, model):
    """The model's leader shard's log of decided updates, oldest first."""
    shards = ray.get(service.actor.shard_actors.remote(model))
    return ray.get(shards[0].decisions.remote())
