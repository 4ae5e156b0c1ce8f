"""One push to a one-shard model through the real pipeline (stage, the leader's decision,
apply), without gRPC or Ray: what a shard does with a push, for tests of the shard's state."""

from __future__ import annotations

import uuid
from collections.abc import Mapping

import torch

from optserve.common.config import parse_mode_config
from optserve.server.shard.pipeline import LocalLeader, PushCall, PushPipeline
from optserve.server.shard.sequencer import Sequencer
from optserve.server.shard.state import ShardState


class _Quiet:
    def arrived(self, trainer: str, peer: str, based_on: int, local_steps: int = 0) -> None:
        pass

    def decided(self, trainer: str, peer: str, staleness: int, applied: bool) -> None:
        pass

    def waited(self, seconds: float) -> None:
        pass


def push(state: ShardState, grads: Mapping[str, torch.Tensor], based_on: int) -> tuple[int, int]:
    """Apply one async push to `state` (the model's only shard, its own leader); return the
    new version and the push's staleness."""
    pipeline = PushPipeline(state, _Quiet())
    sequencer = Sequencer(1, parse_mode_config(None), version=state.version, lrs=state.lrs_at)
    pipeline.leader = LocalLeader(sequencer)
    decision, version = pipeline.push(
        PushCall(uuid.uuid4().hex, based_on), lambda buffers: dict(grads)
    )
    return version, decision.staleness
