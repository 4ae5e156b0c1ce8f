"""How a model's parameters map onto flat buffers and shards (pure logic, shared by both sides).

Parameters belong to parameter groups; each group is one flat vector: its parameters flattened and
concatenated in order. Shard k owns one contiguous element range of every group. Ranges are cut so
that every shard gets a near-equal share of all elements (balanced by bytes, since every master
is fp32), and one large tensor may span several shards.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import torch

DEFAULT_GROUP = "default"


@dataclass(frozen=True)
class ParamSlot:
    """One parameter's place in its group's flat buffer: elements [offset, offset + numel)."""

    name: str
    shape: tuple[int, ...]
    dtype: torch.dtype
    offset: int

    @property
    def numel(self) -> int:
        return math.prod(self.shape)


@dataclass(frozen=True)
class GroupLayout:
    name: str
    params: tuple[ParamSlot, ...]

    @property
    def numel(self) -> int:
        return sum(p.numel for p in self.params)


@dataclass(frozen=True)
class ShardSlice:
    """The element range [start, end) of each group that shard `index` owns."""

    index: int
    ranges: Mapping[str, tuple[int, int]]
    address: str = ""

    def length(self, group: str) -> int:
        start, end = self.ranges[group]
        return end - start


def plan_group(name: str, params: Sequence[tuple[str, Sequence[int], torch.dtype]]) -> GroupLayout:
    """Lay out parameters (name, shape, dtype) back to back in one flat buffer, in order."""
    slots = []
    offset = 0
    for pname, shape, dtype in params:
        slot = ParamSlot(pname, tuple(int(d) for d in shape), dtype, offset)
        slots.append(slot)
        offset += slot.numel
    return GroupLayout(name, tuple(slots))


def split_ranges(groups: Sequence[GroupLayout], num_shards: int) -> list[ShardSlice]:
    """Cut the concatenation of all groups into `num_shards` near-equal contiguous pieces.

    Every element is owned by exactly one shard; a shard's range of a group may be empty.
    """
    if num_shards < 1:
        raise ValueError(f"num_shards must be at least 1, got {num_shards}")
    total = sum(g.numel for g in groups)
    bounds = [k * total // num_shards for k in range(num_shards + 1)]
    slices = []
    for k in range(num_shards):
        lo, hi = bounds[k], bounds[k + 1]
        ranges = {}
        group_start = 0
        for group in groups:
            group_end = group_start + group.numel
            start = min(max(lo, group_start), group_end) - group_start
            end = max(min(hi, group_end), group_start) - group_start
            ranges[group.name] = (start, max(start, end))
            group_start = group_end
        slices.append(ShardSlice(k, ranges))
    return slices


def flatten_group(
    group: GroupLayout, tensors: Mapping[str, torch.Tensor], dtype: torch.dtype | None = None
) -> torch.Tensor:
    """The group's flat vector from per-parameter tensors, on the CPU (a view, with no copy,
    when the group has one contiguous CPU tensor of the wanted dtype)."""
    if len(group.params) == 1:
        t = tensors[group.params[0].name].detach()
        if t.device.type == "cpu" and t.is_contiguous() and dtype in (None, t.dtype):
            return t.reshape(-1)
    parts = []
    for slot in group.params:
        t = tensors[slot.name].detach()
        if dtype is not None and t.dtype != dtype:
            t = t.to(dtype)
        parts.append(t.reshape(-1).cpu())
    if not parts:
        return torch.empty(0, dtype=dtype or torch.float32)
    return torch.cat(parts)


def unflatten_group(group: GroupLayout, flat: torch.Tensor) -> dict[str, torch.Tensor]:
    """Per-parameter views into a group's flat vector."""
    if flat.numel() != group.numel:
        raise ValueError(f"group {group.name!r} has {group.numel} elements, got {flat.numel()}")
    return {
        slot.name: flat[slot.offset : slot.offset + slot.numel].view(slot.shape)
        for slot in group.params
    }
