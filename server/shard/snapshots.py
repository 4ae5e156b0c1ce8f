"""What pulls read: one read-only snapshot of a shard's weights per (version, dtype), shared by
every pull stream that sends that version at the same time. No gRPC, no Ray.

A pull sends one version of the weights while updates go on, so it reads a copy, taken under
the shard's lock. Each stream used to take its own: N concurrent pulls (or N streams a client
opens and never reads) held N copies of the shard's slice. Here the first pull of a version
takes the snapshot, every pull of the same version and dtype that starts while it is still
being sent shares it (counted), and the last reader to finish hands it back: an fp32 snapshot
lies in a buffer of the shard's pool (`BufferPool`), which goes back to the pool for the next
push or pull, so a lone puller costs no fresh memory at all; a bf16/fp16 snapshot is freed.

So N concurrent pulls of one version hold one copy per dtype, and a stuck reader pins the copy
of the version it reads, not one per stream. Pulls of different versions (updates applied
between them) each have their own; bounding how many pulls one client holds open is the
edge's job.

A snapshot is keyed by the shard's epoch as well (a restore bumps it): a restored shard can
come back to a version number it had before, with other weights.
"""

from __future__ import annotations

import threading
from collections.abc import Mapping
from dataclasses import dataclass

import torch

from optserve.server.shard.memory import BufferPool

# (epoch, version, dtype): what makes two pulls send the same bytes.
SnapshotKey = tuple[int, int, torch.dtype]


@dataclass(eq=False)
class Snapshot:
    """One version of a shard's weights, on the CPU in the dtype pulls ask for. Read-only:
    every reader sends these tensors as they are."""

    key: SnapshotKey
    tensors: dict[str, torch.Tensor]
    pooled: bool  # its tensors are a buffer set of the shard's pool
    readers: int = 1

    @property
    def version(self) -> int:
        return self.key[1]


class PullSnapshots:
    """The snapshots pulls are reading now, one per key, with their readers counted.

    `share=False` gives every pull its own copy (how pulls worked before; bench/pull_flood.py
    measures against it)."""

    def __init__(self, pool: BufferPool, share: bool = True) -> None:
        self.pool = pool
        self.share = share
        self.taken = 0  # snapshots copied from the weights
        self.shared = 0  # pulls that read a snapshot another pull took
        self._live: dict[SnapshotKey, Snapshot] = {}
        self._lock = threading.Lock()

    def live(self) -> int:
        """Snapshots that pulls are reading now."""
        with self._lock:
            return len(self._live)

    def acquire(self, key: SnapshotKey, weights: Mapping[str, torch.Tensor]) -> Snapshot:
        """The snapshot of `weights` at `key`: a live one, or a copy taken now. The caller holds
        the shard's lock, so the weights do not change meanwhile and acquires do not race.
        Every acquire is followed by one `release` of what it returned."""
        with self._lock:
            found = self._live.get(key) if self.share else None
            if found is not None:
                found.readers += 1
                self.shared += 1
                return found
        snapshot = Snapshot(key, _copy(self.pool, key[2], weights), key[2] == torch.float32)
        with self._lock:
            self.taken += 1
            if self.share:
                self._live[key] = snapshot
        return snapshot

    def release(self, snapshot: Snapshot) -> None:
        """One reader is done with `snapshot`; the last one hands its memory back."""
        with self._lock:
            snapshot.readers -= 1
            if snapshot.readers > 0:
                return
            if self._live.get(snapshot.key) is snapshot:
                del self._live[snapshot.key]
        if snapshot.pooled:
            self.pool.give(snapshot.tensors)


def _copy(
    pool: BufferPool, dtype: torch.dtype, weights: Mapping[str, torch.Tensor]
) -> dict[str, torch.Tensor]:
    if dtype != torch.float32:
        return {name: w.to("cpu", dtype, copy=True) for name, w in weights.items()}
    copies = pool.take()  # memory reused pull after pull: no page faults
    try:
        for name, w in weights.items():
            copies[name].copy_(w)
    except BaseException:
        pool.give(copies)
        raise
    return copies
