"""Commit or not: the shards' verdicts on an update the leader asked them to verify.

A gradient whose norm is beyond anything training produces (sequencer.VERIFY_ABOVE_NORM), yet
finite, can still leave the optimizer state infinite: AdaGrad's sum after two pushes near
1e19, SGD's weights under a huge step. An infinite state freezes a model for good (Adam's
update over an infinite V is 0), silently. So such an update is decided with `verify`: each
shard computes it on copies of its slice (GroupEngine.stays_finite), reports whether every
weight and state element stays finite, and waits for the others. The update is applied only if
every shard found its slice finite; otherwise no shard applies it, its version passes as an
update that changes nothing, and its pushes are refused. A shard that does not report within
`timeout` counts as not finite (nobody has applied anything yet, so every shard agrees).

Pure logic with threads and a clock: no Ray, no gRPC.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from optserve.common.errors import InvalidArgument, OptserveError

# Verdicts kept for shards that ask again (a lost answer), newest last.
MAX_VERDICTS = 1_000
# How long the shards of one update wait for each other's verdicts.
VERDICT_WAIT_S = 60.0


def nonfinite_refusal(version: int) -> OptserveError:
    return InvalidArgument(
        f"the update that would make version {version} leaves non-finite values in the "
        "weights or the optimizer state (a gradient far beyond what training produces); "
        "nothing was applied and the version passes unchanged: pull, then push again"
    )


@dataclass
class _Verdict:
    opened: float
    shards: set[int] = field(default_factory=set)
    finite: bool | None = None  # None: still waiting for some shard


class Verdicts:
    def __init__(
        self,
        num_shards: int,
        on_refused: Callable[[int], None] = lambda version: None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        """`on_refused(version)` hears once of each update the verdicts refused."""
        self.num_shards = num_shards
        self._on_refused = on_refused
        self._clock = clock
        self._cv = threading.Condition()
        self._verdicts: dict[int, _Verdict] = {}

    def report(
        self, version: int, shard: int, finite: bool, timeout: float = VERDICT_WAIT_S
    ) -> OptserveError | None:
        """Shard `shard` found the update making `version` finite (or not) on its slice; block
        until every shard has reported, or one found it not finite, or `timeout` passed.
        Returns None (apply it) or the refusal (apply nothing): the same answer to every shard,
        however often it asks."""
        if not 0 <= shard < self.num_shards:
            raise InvalidArgument(f"shard {shard} is not one of this model's {self.num_shards}")
        deadline = self._clock() + timeout
        with self._cv:
            entry = self._verdicts.get(version)
            if entry is None:
                entry = self._verdicts[version] = _Verdict(self._clock())
                while len(self._verdicts) > MAX_VERDICTS:
                    del self._verdicts[next(iter(self._verdicts))]
            if entry.finite is None:
                entry.shards.add(shard)
                if not finite:
                    self._close(version, entry, False)
                elif len(entry.shards) == self.num_shards:
                    self._close(version, entry, True)
            while entry.finite is None:
                now = self._clock()
                if now >= deadline:
                    self._close(version, entry, False)
                    break
                self._cv.wait(timeout=min(deadline - now, 1.0))
            return None if entry.finite else nonfinite_refusal(version)

    def _close(self, version: int, entry: _Verdict, finite: bool) -> None:
        entry.finite = finite
        self._cv.notify_all()
        if not finite:
            self._on_refused(version)
