"""Layout: every element of every group is owned by exactly one shard."""

from __future__ import annotations

import pytest
import torch

from optserve.common.layout import flatten_group, plan_group, split_ranges, unflatten_group


@pytest.mark.parametrize(
    "shapes", [[(4, 5), (7,), (2, 3, 2, 2)], [(1,)], [(0,), (3,)], [(1000,), (1,)]]
)
@pytest.mark.parametrize("num_shards", [1, 2, 3, 7, 64])
def test_every_element_owned_exactly_once(shapes, num_shards):
    group = plan_group("default", [(f"p{i}", s, torch.float32) for i, s in enumerate(shapes)])
    slices = split_ranges([group], num_shards)
    owners = torch.zeros(group.numel, dtype=torch.int64)
    for s in slices:
        start, end = s.ranges["default"]
        assert 0 <= start <= end <= group.numel
        owners[start:end] += 1
    assert torch.equal(owners, torch.ones_like(owners))
    sizes = [s.length("default") for s in slices]
    assert max(sizes) - min(sizes) <= 1  # balanced
    assert [s.index for s in slices] == list(range(num_shards))


def test_ranges_are_balanced_across_several_groups():
    a = plan_group("a", [("x", (10,), torch.float32)])
    b = plan_group("b", [("y", (5,), torch.float32)])
    slices = split_ranges([a, b], 3)
    assert [dict(s.ranges) for s in slices] == [
        {"a": (0, 5), "b": (0, 0)},
        {"a": (5, 10), "b": (0, 0)},
        {"a": (10, 10), "b": (0, 5)},
    ]


def test_flatten_and_unflatten_round_trip():
    group = plan_group("g", [("w", (2, 3), torch.float32), ("b", (3,), torch.float32)])
    tensors = {"w": torch.arange(6.0).reshape(2, 3), "b": torch.tensor([7.0, 8.0, 9.0])}
    flat = flatten_group(group, tensors)
    assert torch.equal(flat, torch.cat([torch.arange(6.0), tensors["b"]]))
    back = unflatten_group(group, flat)
    assert all(torch.equal(back[k], v) for k, v in tensors.items())
    with pytest.raises(ValueError):
        unflatten_group(group, flat[:-1])


def test_zero_shards_is_refused():
    with pytest.raises(ValueError):
        split_ranges([plan_group("g", [("w", (3,), torch.float32)])], 0)
