"""The order of a model's updates, decided in one place so that every shard applies the same ones.

A trainer streams its gradient slices to all of a model's shards in parallel. Each shard validates
and stages its slice, then asks the model's leader (shard 0, which owns a `Sequencer`) what to do
with it. The leader decides only once every shard holds its slice of the push, so a push is
applied by all shards or by none, and it decides once for all of them:

* async: each push becomes the next version on arrival; with `max_staleness`, a push computed on
  a version more than that many updates old is refused (FAILED_PRECONDITION: pull, then push);
  with `staleness_lr="inverse"` its lr is scaled by 1 / (1 + staleness);
* sync: pushes computed on the current version join the open round; the round closes when each
  of `trainers` trainers has pushed, or `round_timeout_s` after its first push, and becomes one
  update that combines its pushes (mean or sum). A push for a closed round gets ABORTED.

A push that does not reach every shard within `stage_timeout_s` (its trainer died mid-push) is
abandoned: the shards that hold a slice of it drop it, and nothing is applied.

The mode's gradient policy is applied here too, because it needs the whole push: each shard
reports its slice's sum of squares and NaN/Inf count, and the leader decides once for all of
them: skip a non-finite push (its update changes nothing), refuse one above `max_push_norm`, or
scale it by `clip_norm / norm` (clip_grad_norm_'s coefficient) through the decision's weights.
An update whose gradient norm is beyond VERIFY_ABOVE_NORM is decided with `verify`: the shards
compute it on copies first and apply it only if it leaves every slice finite (shard/verdicts.py).

Pure logic with threads and a clock: no Ray, no gRPC.
"""

from __future__ import annotations

import collections
import logging
import math
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from optserve.common.config import AsyncMode, SyncMode
from optserve.common.errors import (
    FailedPrecondition,
    InvalidArgument,
    ModelRestored,
    OptserveError,
    RoundClosed,
    StalePush,
    Unavailable,
)
from optserve.server.shard.verdicts import VERDICT_WAIT_S, Verdicts

log = logging.getLogger(__name__)

# How long, and how many, decisions are kept for shards that ask again.
RETAIN_DECISIONS_S = 600.0
MAX_DECISIONS = 100_000
# A push whose gradient norm is above this is verified before it is applied (no training step
# produces one; one far above it can overflow the optimizer state while finite itself).
VERIFY_ABOVE_NORM = 1e12


@dataclass(frozen=True)
class GradStats:
    """One shard's slice of one push: sum of squares of its finite elements, NaN/Inf count."""

    sumsq: float = 0.0
    nonfinite: int = 0


@dataclass(frozen=True)
class Decision:
    """What every shard does with one push: apply `members` combined as `version`, or refuse.

    The update is the sum of each member's gradient times its weight (a clip is in the weight;
    a member of weight 0 was skipped by the gradient policy, and an update whose weights are
    all 0 changes nothing but the version), applied with each group's learning rate `lrs` (from
    the model's one schedule, on the leader) times `lr_scale` (staleness)."""

    version: int = 0
    members: tuple[str, ...] = ()
    weights: tuple[float, ...] = ()
    lr_scale: float = 1.0
    staleness: int = 0
    error: OptserveError | None = None
    lrs: Mapping[str, float] = field(default_factory=dict, hash=False)
    # Compute on copies first, apply only if every shard's slice stays finite (verdicts.py).
    verify: bool = False


@dataclass
class _Pending:
    based_on: int
    trainer: str
    first_seen: float
    staged: set[int] = field(default_factory=set)
    stats: dict[int, GradStats] = field(default_factory=dict)
    # The push's factor in its update once its gradient is judged: 0 skips it.
    factor: float = 1.0
    verify: bool = False


class Sequencer:
    def __init__(
        self,
        num_shards: int,
        mode: AsyncMode | SyncMode,
        version: int = 0,
        *,
        stage_timeout_s: float = 60.0,
        log_size: int = 10_000,
        clock: Callable[[], float] = time.monotonic,
        lrs: Callable[[int], Mapping[str, float]] | None = None,
    ) -> None:
        """`lrs(v)`: each group's learning rate for the update that makes version v (the
        model's one schedule; None: none, for tests of ordering alone)."""
        self.num_shards = num_shards
        self._lrs = lrs
        self.mode = mode
        self.stage_timeout_s = stage_timeout_s
        self._clock = clock
        self._cv = threading.Condition()
        self._version = version
        self._pending: dict[str, _Pending] = {}
        # push id -> (decision, shards that collected it, when decided)
        self._decided: dict[str, tuple[Decision, set[int], float]] = {}
        self._round: list[str] = []
        self._round_pending: dict[str, _Pending] = {}
        self._round_trainers: set[str] = set()
        self._round_opened = 0.0
        self._log: collections.deque[dict[str, Any]] = collections.deque(maxlen=log_size)
        # A control change (optimizer swap, new hyperparameters, schedule) in progress:
        # no update is decided while it is, so it lands between two versions on every shard.
        self._paused_by: str | None = None
        self._paused_until = 0.0
        self._deferred: list[tuple[str, _Pending]] = []
        # What the gradient policy did, for status.
        self._counters = {"skipped_nonfinite": 0, "zeroed_nonfinite": 0, "clipped": 0,
                          "refused_norm": 0, "verified": 0,
                          "refused_nonfinite_update": 0}  # fmt: skip
        self._verdicts = Verdicts(num_shards, self._refused_update, clock)

    @property
    def version(self) -> int:
        """The last version decided (shards may still be applying it)."""
        with self._cv:
            return self._version

    def counters(self) -> dict[str, int]:
        """Pushes the gradient policy skipped, zeroed, clipped or refused (by norm); updates
        verified, and refused for leaving non-finite values."""
        with self._cv:
            return dict(self._counters)

    def verdict(
        self, version: int, shard: int, finite: bool, timeout: float = VERDICT_WAIT_S
    ) -> OptserveError | None:
        """Shard `shard` verified the update making `version`: block until it is settled;
        None: apply it; an error: apply nothing (every shard gets the same answer)."""
        return self._verdicts.report(version, shard, finite, timeout)

    def _refused_update(self, version: int) -> None:
        with self._cv:
            self._counters["refused_nonfinite_update"] += 1
            for entry in reversed(self._log):
                if entry["version"] == version:
                    entry["refused"] = "non-finite update"
                    break
        log.warning("update %d would leave non-finite values: refused on every shard", version)

    def log(self) -> list[dict[str, Any]]:
        """The decided updates, oldest first: version, pushes, trainers, staleness, lr scale."""
        with self._cv:
            return list(self._log)

    def pause(self, op_id: str, timeout: float = 120.0, max_hold_s: float = 900.0) -> int:
        """Stop deciding updates until `resume(op_id)`; return the version boundary: every
        update decided so far is at or below it, and none above it is decided until resumed.

        Controls take turns (a second pause waits for the first to resume, up to `timeout`).
        A pause not resumed within `max_hold_s` (its caller died) lifts itself; that is longer
        than any shard waits to reach a change's boundary (APPLY_TIMEOUT_S)."""
        deadline = self._clock() + timeout
        with self._cv:
            while self._paused_by is not None:
                now = self._clock()
                self._expire(now)
                if self._paused_by is None:
                    break
                if now >= deadline:
                    raise Unavailable("another control change is in progress; try again")
                self._cv.wait(timeout=min(self._next_deadline(now), deadline) - now)
            self._paused_by = op_id
            self._paused_until = self._clock() + max_hold_s
            return self._version

    def paused_by(self) -> str | None:
        """The control change holding the updates, if one is (a pause that outlived its hold
        has lifted itself)."""
        with self._cv:
            self._expire(self._clock())
            return self._paused_by

    def resume(self, op_id: str) -> bool:
        """Let updates be decided again, starting with those that became ready meanwhile;
        False if `op_id` no longer held them (its pause had lifted itself)."""
        with self._cv:
            self._expire(self._clock())
            if self._paused_by != op_id:
                return False
            self._lift_pause()
            return True

    def _lift_pause(self) -> None:
        self._paused_by = None
        deferred, self._deferred = self._deferred, []
        for push_id, pending in deferred:
            self._ready(push_id, pending)
        self._cv.notify_all()

    def reset(self, version: int) -> None:
        """Start over at `version` (after a restore); pushes in flight are refused."""
        with self._cv:
            in_flight = list(self._pending) + self._round + [p for p, _ in self._deferred]
            for push_id in in_flight:
                self._decide(push_id, Decision(error=ModelRestored("the model was restored; pull")))
            self._deferred.clear()
            self._pending.clear()
            self._round.clear()
            self._round_pending.clear()
            self._round_trainers.clear()
            self._version = version
            self._cv.notify_all()

    def submit(
        self,
        push_id: str,
        shard: int,
        based_on: int,
        trainer: str = "",
        timeout: float = 300.0,
        stats: GradStats | None = None,
    ) -> Decision:
        """Shard `shard` holds its slice of push `push_id` (whose gradient it found to be
        `stats`); block until the push is decided."""
        if not push_id:
            raise InvalidArgument("a push to a model with several shards needs a push_id")
        if not 0 <= shard < self.num_shards:
            raise InvalidArgument(f"shard {shard} is not one of this model's {self.num_shards}")
        deadline = self._clock() + timeout
        with self._cv:
            if push_id in self._decided:  # e.g. abandoned before this slice arrived
                return self._collect(push_id, shard)
            pending = self._pending.get(push_id)
            if pending is None:
                pending = self._pending[push_id] = _Pending(based_on, trainer, self._clock())
            elif (pending.based_on, pending.trainer) != (based_on, trainer):
                del self._pending[push_id]  # refused on every shard, not left to time out
                self._decide(push_id, Decision(error=InvalidArgument(
                    f"push {push_id!r} reached the shards with different headers (version "
                    f"{pending.based_on} vs {based_on}, trainer {pending.trainer!r} vs "
                    f"{trainer!r}); nothing was applied")))  # fmt: skip
                return self._collect(push_id, shard)
            # A shard asking again (its first call's answer was lost) just waits again.
            pending.staged.add(shard)
            pending.stats.setdefault(shard, stats or GradStats())
            if len(pending.staged) == self.num_shards and push_id in self._pending:
                del self._pending[push_id]
                self._ready(push_id, pending)
            while push_id not in self._decided:
                now = self._clock()
                self._expire(now)
                if push_id in self._decided:
                    break
                if now >= deadline:
                    raise Unavailable(f"push {push_id!r} was not decided within {timeout} s")
                self._cv.wait(timeout=min(self._next_deadline(now), deadline) - now)
            return self._collect(push_id, shard)

    def refuse(self, push_id: str, shard: int, error: OptserveError) -> None:
        """Shard `shard` refused its slice of the push (invalid, too large): the push is
        refused everywhere at once, rather than when its stage times out."""
        with self._cv:
            if push_id in self._decided:
                return
            self._pending.pop(push_id, None)
            self._decide(push_id, Decision(error=type(error)(f"shard {shard} refused: {error}")))

    # ---- under the lock ------------------------------------------------------------------

    def _ready(self, push_id: str, pending: _Pending) -> None:
        """Every shard holds its slice: decide (async) or join the round (sync)."""
        if self._paused_by is not None:
            self._deferred.append((push_id, pending))
            return
        mode, version = self.mode, self._version
        if pending.based_on > version:  # e.g. the model was restored from a checkpoint
            self._decide(push_id, Decision(error=ModelRestored(
                f"gradient claims model version {pending.based_on}, but the model is at "
                f"version {version}; pull the current weights and push again")))  # fmt: skip
            return
        staleness = version - pending.based_on
        if isinstance(mode, AsyncMode):
            if mode.max_staleness is not None and staleness > mode.max_staleness:
                self._decide(push_id, Decision(staleness=staleness, error=StalePush(
                    f"push computed on version {pending.based_on} is {staleness} updates stale "
                    f"(max_staleness {mode.max_staleness}); pull the current weights (version "
                    f"{version}) and push again; nothing was applied")))  # fmt: skip
                return
            refusal = self._judge_gradient(pending)
            if refusal is not None:
                self._decide(push_id, Decision(staleness=staleness, error=refusal))
                return
            scale = 1.0 / (1 + staleness) if mode.staleness_lr == "inverse" else 1.0
            self._version += 1
            self._record([push_id], [pending], scale)
            decision = Decision(self._version, (push_id,), (pending.factor,), scale, staleness,
                                lrs=self._lrs_for(self._version),
                                verify=pending.verify)  # fmt: skip
            self._decide(push_id, decision)
            return
        if staleness > 0:
            self._decide(push_id, Decision(staleness=staleness, error=RoundClosed(
                f"the round for version {pending.based_on + 1} closed without this push; "
                f"pull the current weights (version {version}) and push again")))  # fmt: skip
            return
        if pending.trainer and pending.trainer in self._round_trainers:
            self._decide(push_id, Decision(error=FailedPrecondition(
                f"trainer {pending.trainer!r} already pushed in the round for version "
                f"{version + 1}")))  # fmt: skip
            return
        refusal = self._judge_gradient(pending)
        if refusal is not None:
            self._decide(push_id, Decision(error=refusal))
            return
        if not self._round:
            self._round_opened = self._clock()
        self._round.append(push_id)
        self._round_trainers.add(pending.trainer)
        self._round_pending[push_id] = pending
        if len(self._round) >= self.mode.trainers:  # type: ignore[union-attr]
            self._close_round()

    def _close_round(self) -> None:
        members = tuple(self._round)
        pendings = [self._round_pending.pop(m) for m in members]
        counted = sum(1 for p in pendings if p.factor > 0) or 1  # skipped pushes do not count
        weight = 1.0 / counted if self.mode.aggregate == "mean" else 1.0  # type: ignore[union-attr]
        weights = tuple(weight * p.factor for p in pendings)
        self._version += 1
        self._record(list(members), pendings, 1.0)
        lrs = self._lrs_for(self._version)
        verify = any(p.verify for p in pendings)
        for push_id in members:
            self._decide(push_id, Decision(self._version, members, weights, lrs=lrs,
                                           verify=verify))  # fmt: skip
        self._round.clear()
        self._round_trainers.clear()

    def _lrs_for(self, version: int) -> Mapping[str, float]:
        return dict(self._lrs(version)) if self._lrs is not None else {}

    def _judge_gradient(self, pending: _Pending) -> OptserveError | None:
        """Apply the gradient policy to a push every shard holds: set its factor (0: skip it;
        below 1: clipped), or return why it is refused."""
        policy = self.mode.gradients
        nonfinite = sum(s.nonfinite for s in pending.stats.values())
        if nonfinite and policy.nonfinite == "skip":
            pending.factor = 0.0
            self._counters["skipped_nonfinite"] += 1
            return None
        if nonfinite:
            self._counters["zeroed_nonfinite"] += 1
        norm = math.sqrt(sum(s.sumsq for s in pending.stats.values()))
        if policy.max_push_norm is not None and not norm <= policy.max_push_norm:
            self._counters["refused_norm"] += 1
            return InvalidArgument(
                f"the push's gradient norm {norm:.6g} exceeds max_push_norm "
                f"{policy.max_push_norm:g}; nothing was applied"
            )
        if policy.clip_norm is not None:
            # torch.nn.utils.clip_grad_norm_'s coefficient, clamped at 1 as it does.
            pending.factor = min(1.0, policy.clip_norm / (norm + 1e-6))
            if pending.factor < 1.0:
                self._counters["clipped"] += 1
        # Far beyond any training step (or its squares overflow): computed on copies first.
        pending.verify = pending.factor > 0 and not norm * pending.factor <= VERIFY_ABOVE_NORM
        self._counters["verified"] += pending.verify
        return None

    def _record(self, members: list[str], pendings: list[_Pending], scale: float) -> None:
        self._log.append({
            "version": self._version,
            "pushes": members,
            "trainers": [p.trainer for p in pendings],
            "based_on": [p.based_on for p in pendings],
            "factors": [p.factor for p in pendings],
            "lr_scale": scale,
            "time": time.time(),
        })  # fmt: skip

    def _decide(self, push_id: str, decision: Decision) -> None:
        self._decided[push_id] = (decision, set(), self._clock())
        while len(self._decided) > MAX_DECISIONS:  # oldest first (dicts keep insertion order)
            del self._decided[next(iter(self._decided))]
        self._cv.notify_all()

    def _collect(self, push_id: str, shard: int) -> Decision:
        """The decision, as often as a shard asks (a retry must get the same answer); kept for
        RETAIN_DECISIONS_S, and at most MAX_DECISIONS of them."""
        decision, collected, _ = self._decided[push_id]
        collected.add(shard)
        return decision

    def _expire(self, now: float) -> None:
        """Abandon pushes that did not reach every shard in time; close an overdue round."""
        for push_id, pending in list(self._pending.items()):
            if now - pending.first_seen >= self.stage_timeout_s:
                del self._pending[push_id]
                self._decide(push_id, Decision(error=Unavailable(
                    f"push {push_id!r} reached {len(pending.staged)} of {self.num_shards} "
                    f"shards within {self.stage_timeout_s} s; nothing was applied; push "
                    "again")))  # fmt: skip
        if self._paused_by is not None and now >= self._paused_until:
            log.warning("control change %s did not finish; updates resume", self._paused_by)
            self._lift_pause()
        if (
            self._round
            and self._paused_by is None
            and isinstance(self.mode, SyncMode)
            and now - self._round_opened >= self.mode.round_timeout_s
        ):
            self._close_round()
        while self._decided:
            oldest = next(iter(self._decided))
            if now - self._decided[oldest][2] < RETAIN_DECISIONS_S:
                break
            del self._decided[oldest]

    def _next_deadline(self, now: float) -> float:
        deadlines = [p.first_seen + self.stage_timeout_s for p in self._pending.values()]
        if self._paused_by is not None:
            deadlines.append(self._paused_until)
        if self._round and isinstance(self.mode, SyncMode):
            deadlines.append(self._round_opened + self.mode.round_timeout_s)
        return min([now + 1.0, *deadlines])
