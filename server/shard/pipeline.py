"""One push through one shard: stage → decide → apply. No gRPC, no Ray.

Every shard of a model runs the same three steps for a push:

1. **stage** its slice of the gradient (`ShardState.stage`: shape, dtype, non-finite values
   counted; the slice waits in a pooled buffer);
2. **decide**: ask the model's leader (shard 0), which orders the push among all others and
   answers every shard with the same `Decision`: the version it produces, the pushes combined
   into it and their weights (clip and skip included), the learning rate of each group from the
   model's one schedule, and the staleness scale. The leader decides once; nothing re-decides;
3. **apply** exactly that decision (`ShardState.apply`), in version order.

A shard that refuses its slice (bad input, or a stream that broke off) tells the leader, which
refuses the push on every shard at once. A shard that loses the leader's answer cannot know
whether its peers applied the push, so it marks itself broken (the coordinator then restores
the model from its newest checkpoint).

`Leader` is what a shard asks: the leader shard's own `Sequencer` (`LocalLeader`) or, on the
other shards, the leader over the network (the gRPC service supplies that one).
"""

from __future__ import annotations

import hashlib
import logging
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import Protocol

import torch

from optserve.common.errors import (
    Aborted,
    DeadlineExceeded,
    InvalidArgument,
    OptserveError,
    Unavailable,
)
from optserve.server.shard.sequencer import Decision, GradStats, Sequencer
from optserve.server.shard.state import ShardState

log = logging.getLogger(__name__)
# The longest a push may wait for its decision: a sync round, or the other shards' slices.
SEQUENCE_WAIT_S = 24 * 3600.0
# The longest push_id and trainer name a push may carry (the server keeps both for a while).
MAX_PUSH_ID_CHARS = 64
MAX_TRAINER_CHARS = 128
# A token's name as the first part of its trainers' identities (longer ones are shortened).
MAX_TOKEN_PART_CHARS = 128
MAX_IDENTITY_CHARS = MAX_TOKEN_PART_CHARS + 1 + MAX_TRAINER_CHARS
# Tries of a non-leader shard to get its decision when the leader is briefly unreachable.
SEQUENCE_ATTEMPTS = 6


def trainer_identity(said: str, token: str | None) -> str:
    """Who a push comes from, as sync rounds and status count it: `said` is the trainer name
    the push carries, `token` the name of the trainer token it came with (None: no auth, or an
    admin token, which may speak for any trainer: it can drop the model anyway).

    With a token the identity is ``"<token>"``, or ``"<token>/<said>"`` when the push names
    itself: the name only tells apart processes of one token, and can never make a push count
    as another token's. A ``%`` or ``/`` in the token's name is written ``%25`` or ``%2F``, so
    the first ``/`` always ends the token's part; a part longer than MAX_TOKEN_PART_CHARS is
    cut and ends with ``~`` and 16 hex digits of its SHA-256.

    Every shard of a model derives the same identity from the same token, and non-leader shards
    send it to the leader (the Sequence call's header), so the leader counts what they saw."""
    if len(said) > MAX_TRAINER_CHARS:
        raise InvalidArgument(f"trainer has more than {MAX_TRAINER_CHARS} characters")
    if token is None:
        return said
    part = token.replace("%", "%25").replace("/", "%2F")
    if len(part) > MAX_TOKEN_PART_CHARS:
        digest = hashlib.sha256(token.encode()).hexdigest()[:16]
        part = f"{part[: MAX_TOKEN_PART_CHARS - 17]}~{digest}"
    return f"{part}/{said}" if said else part


@dataclass(frozen=True)
class PushCall:
    """What a push says about itself (its header), checked at the edge."""

    push_id: str
    based_on: int  # the model version its gradient was computed on
    trainer: str = ""
    peer: str = ""
    local_steps: int = 0  # local SGD: the trainer's inner steps so far (0: it pushes each step)


class Leader(Protocol):
    """The model's one decision point, as one shard sees it."""

    def decide(self, shard: int, push: PushCall, stats: GradStats) -> Decision: ...

    def refuse(self, shard: int, push: PushCall, error: OptserveError) -> None: ...

    def verdict(self, shard: int, version: int, finite: bool) -> OptserveError | None:
        """This shard computed the verified update making `version` on copies: whether its
        slice stays finite. Returns every shard's verdict: None (apply) or the refusal."""
        ...

    @property
    def remote(self) -> bool:
        """True when the answer travels over the network (and may be lost on the way)."""
        ...


class LocalLeader:
    """The leader shard asking its own sequencer."""

    remote = False

    def __init__(self, sequencer: Sequencer) -> None:
        self.sequencer = sequencer

    def decide(self, shard: int, push: PushCall, stats: GradStats) -> Decision:
        return self.sequencer.submit(
            push.push_id, shard, push.based_on, push.trainer, SEQUENCE_WAIT_S, stats
        )

    def refuse(self, shard: int, push: PushCall, error: OptserveError) -> None:
        self.sequencer.refuse(push.push_id, shard, error)

    def verdict(self, shard: int, version: int, finite: bool) -> OptserveError | None:
        return self.sequencer.verdict(version, shard, finite)


class PushObserver(Protocol):
    """What the pipeline reports (the shard's metrics)."""

    def arrived(self, trainer: str, peer: str, based_on: int, local_steps: int = 0) -> None: ...

    def decided(self, trainer: str, peer: str, staleness: int, applied: bool) -> None: ...

    def waited(self, seconds: float) -> None: ...


class PushPipeline:
    """Stage, decide, apply: one shard's part of every push to its model."""

    def __init__(
        self,
        state: ShardState,
        observer: PushObserver,
        sleep: Callable[[float], None] = time.sleep,
    ) -> None:
        self.state = state
        self.observer = observer
        self.leader: Leader | None = None
        self._sleep = sleep

    def push(
        self, push: PushCall, receive: Callable[[dict[str, torch.Tensor]], dict[str, torch.Tensor]]
    ) -> tuple[Decision, int]:
        """Run one push: `receive(buffers)` fills this shard's gradient slices (from the wire)
        into pooled buffers and returns them. Returns the decision and the shard's version
        after applying it; a refused push raises its error, and nothing is applied."""
        push = self._with_id(push)  # bounded before anything keeps them
        self.observer.arrived(push.trainer, push.peer, push.based_on, local_steps=push.local_steps)
        epoch, stats = self._stage(push, receive)
        staged_at = time.perf_counter()
        decision = self._decide(push, stats)
        self.observer.waited(time.perf_counter() - staged_at)
        applied = decision.error is None
        self.observer.decided(push.trainer, push.peer, decision.staleness, applied)
        if decision.error is not None:
            self.state.discard(push.push_id)
            raise decision.error
        # A failure marks the shard broken; a verified update the shards refused raises.
        version = self.state.apply(decision, epoch=epoch, verdict=self._verdict_of(decision))
        return decision, version

    def _verdict_of(self, decision: Decision) -> Callable[[bool], OptserveError | None]:
        def verdict(finite: bool) -> OptserveError | None:
            leader = self.leader
            if leader is None:
                raise Unavailable("this shard does not know its model's leader")
            for attempt in range(SEQUENCE_ATTEMPTS):  # asking again gets the same answer
                try:
                    return leader.verdict(self.state.index, decision.version, finite)
                except (Unavailable, DeadlineExceeded):
                    if not leader.remote or attempt == SEQUENCE_ATTEMPTS - 1:
                        raise
                    self._sleep(min(0.2 * 2**attempt, 5.0))
            raise AssertionError("unreachable")

        return verdict

    def _with_id(self, push: PushCall) -> PushCall:
        # Both are kept (decisions for RETAIN_DECISIONS_S, trainers in status): bounded.
        if len(push.push_id) > MAX_PUSH_ID_CHARS:
            raise InvalidArgument(f"push_id has more than {MAX_PUSH_ID_CHARS} characters")
        if len(push.trainer) > MAX_IDENTITY_CHARS:  # trainer_identity's bound
            raise InvalidArgument(f"trainer has more than {MAX_IDENTITY_CHARS} characters")
        if push.push_id:
            return push
        sequencer = getattr(self.leader, "sequencer", None)
        if sequencer is None or sequencer.num_shards != 1:
            raise InvalidArgument("a push to a model with several shards needs a push_id")
        return replace(push, push_id=uuid.uuid4().hex)

    def _stage(
        self, push: PushCall, receive: Callable[[dict[str, torch.Tensor]], dict[str, torch.Tensor]]
    ) -> tuple[int, GradStats]:
        try:
            buffers = self.state.buffers.take()
            try:
                grads = receive(buffers)
            except BaseException:
                self.state.buffers.give(buffers)
                raise
            return self.state.stage(push.push_id, grads, buffers)
        except Exception as exc:  # refuse the push on every shard now, not at a timeout
            self.observer.decided(push.trainer, push.peer, 0, applied=False)
            if not isinstance(exc, OptserveError):  # the stream broke off (trainer went away)
                exc = Aborted("the push stream broke off before its end")
            self._refuse(push, exc)
            raise

    def _decide(self, push: PushCall, stats: GradStats) -> Decision:
        leader = self.leader
        try:
            if leader is None:
                raise Unavailable("this shard does not know its model's leader yet")
            return self._ask(leader, push, stats)
        except OptserveError as exc:
            lost = leader is not None and leader.remote
            if not lost or not isinstance(exc, Unavailable | DeadlineExceeded):
                self.state.discard(push.push_id)  # refused before any decision: nothing applied
                self.observer.decided(push.trainer, push.peer, 0, applied=False)
                raise
            # The leader may have decided this push and the other shards applied it.
            self.state.mark_broken(f"lost the leader's decision on push {push.push_id}: {exc}")
            raise Unavailable(
                f"shard {self.state.index} lost its leader ({exc}); the server brings the "
                "model back from its newest checkpoint: pull, then go on"
            ) from None

    def _ask(self, leader: Leader, push: PushCall, stats: GradStats) -> Decision:
        if not leader.remote:
            return leader.decide(self.state.index, push, stats)
        # Asking again is safe: the leader answers a repeated question with the same decision.
        for attempt in range(SEQUENCE_ATTEMPTS):
            try:
                return leader.decide(self.state.index, push, stats)
            except (Unavailable, DeadlineExceeded):
                if attempt == SEQUENCE_ATTEMPTS - 1:
                    raise
                self._sleep(min(0.2 * 2**attempt, 5.0))
        raise AssertionError("unreachable")

    def _refuse(self, push: PushCall, error: OptserveError) -> None:
        """Best effort: tell the leader this shard refused its slice of the push."""
        if self.leader is None:
            return
        try:
            self.leader.refuse(self.state.index, push, error)
        except Exception:  # noqa: BLE001 - the push then times out on the other shards
            log.warning("could not tell the leader that push %s was refused", push.push_id)
