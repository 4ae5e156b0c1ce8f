"""Starting, finding and stopping a model's shard actors on Ray.

Shard actors and their placement group are detached: their lives do not depend on the
coordinator's, so a coordinator that dies (killed, out of memory, restarted by Ray) costs the
trainers nothing, and the one that comes back finds them by name and adopts them. Detached
actors were chosen over a per-model supervisor actor because a supervisor is one more process
per model that can itself die and take the shards with it, and one more hop for every control
call; with detached actors Ray's own name registry is the record of what runs. The price is
that nothing stops them implicitly: `stop_shards` does it on drop, restore and shutdown (and
an embedded Ray takes everything with it when `optserve serve` exits).

Names, in Ray's "optserve" namespace:
`optserve-shard:<service>:<model>:<launch>:<index>` and `optserve-pg:<service>:<model>:<launch>`,
where `<service>` is the coordinator actor's name and `<launch>` names one set of shard actors
of the model (a restore starts a new one).
"""

from __future__ import annotations

import contextlib
import logging
import secrets
from collections import defaultdict
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, cast

import ray
from ray.util.placement_group import placement_group, remove_placement_group
from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

from optserve.common.config import RuleConfig
from optserve.common.errors import ResourceExhausted
from optserve.common.layout import GroupLayout, ShardSlice, split_ranges
from optserve.server.coordinator.catalogue import (
    ModelEntry,
    check_gradient_centralization,
    tensor_views,
)
from optserve.server.edge.tokens import EdgeConfig
from optserve.server.shard.actor import ShardActor
from optserve.server.shard.service import shard_key

log = logging.getLogger(__name__)

NAMESPACE = "optserve"
SHARD_PREFIX = "optserve-shard"
GROUP_PREFIX = "optserve-pg"
# Status and metrics scrapes ("observe") answer while a control call holds the shard's thread;
# collecting a checkpoint's report waits on its own thread, and so do the leader's pause and
# resume of updates (ShardActor); reported metrics have theirs too.
# (Ray's type stubs do not know `ray.remote`'s keyword-only form.)
_ShardActor: Any = cast(Any, ray.remote)(
    concurrency_groups={"observe": 2, "checkpoint": 1, "leader": 4, "metrics": 1}
)(ShardActor)


def shard_name(service: str, model: str, launch: str, index: int) -> str:
    return f"{SHARD_PREFIX}:{service}:{model}:{launch}:{index}"


def group_name(service: str, model: str, launch: str) -> str:
    return f"{GROUP_PREFIX}:{service}:{model}:{launch}"


@dataclass(frozen=True)
class Placement:
    """Where shard actors go: one placement-group bundle per shard.

    `gpus` per shard: None means one GPU per shard when the cluster has GPUs, none otherwise.
    `cpus` is what each shard reserves (a token amount by default: shards mostly wait on I/O
    between updates, and a laptop's embedded Ray should hold many). SPREAD puts shards on
    different nodes where it can; PACK, STRICT_SPREAD and STRICT_PACK are Ray's other choices.
    """

    cpus: float = 0.0
    gpus: float | None = None
    strategy: str = "SPREAD"
    timeout_s: float = 120.0

    def bundle(self) -> tuple[dict[str, float], str]:
        """The bundle for one shard, and the device its buffers live on."""
        gpus = self.gpus
        if gpus is None:
            gpus = 1.0 if ray.cluster_resources().get("GPU", 0) >= 1 else 0.0
        bundle = {"CPU": max(self.cpus, 0.001)}  # Ray refuses an all-zero bundle
        if gpus > 0:
            bundle["GPU"] = gpus
        return bundle, "cuda" if gpus > 0 else "cpu"


@dataclass
class ShardSet:
    """One launch of a model's shard actors."""

    actors: list[Any]
    placement_group: Any
    slices: list[ShardSlice]  # with the shards' addresses


@dataclass(frozen=True)
class ShardProcess:
    """How a launch's shards serve: where they bind, their edge, the service's metrics name."""

    host: str
    edge: EdgeConfig
    ray_service: str | None


def launch_shards(
    entry: ModelEntry,
    layouts: Sequence[GroupLayout],
    configs: Mapping[str, RuleConfig],
    placement: Placement,
    bundle: Mapping[str, float],
    process: ShardProcess,
    history: Mapping[str, list[dict[str, Any]]] | None = None,
) -> ShardSet:
    """Start the shard actors of `entry`'s launch, empty (their values come from the model's
    creator or a checkpoint); return them once each serves."""
    slices = split_ranges(layouts, entry.num_shards)
    check_gradient_centralization(configs, layouts, slices)
    # Lets the model's shards, and only them, call Sequence: the leader holds it, each other
    # shard only its own key (shard_key), bound to its index.
    secret = secrets.token_hex(16)
    group = placement_group(
        [dict(bundle)] * entry.num_shards,
        strategy=placement.strategy,
        name=entry.placement_group,
        lifetime="detached",
    )
    actors: list[Any] = []
    try:
        _wait_placed(group, entry.num_shards, bundle, placement)
        for s in slices:
            actors.append(_start_shard(entry, s, layouts, configs, group, bundle, process, secret,
                                       history))  # fmt: skip
        addresses = ray.get([a.address.remote() for a in actors], timeout=300)
        # Shard 0 orders the model's pushes; the others ask it (server/shard/sequencer.py).
        ray.get([a.set_leader.remote(addresses[0]) for a in actors[1:]], timeout=60)
    except BaseException:
        for actor in actors:
            ray.kill(actor)
        remove_placement_group(group)
        raise
    with_addresses = [
        ShardSlice(s.index, s.ranges, address) for s, address in zip(slices, addresses, strict=True)
    ]
    return ShardSet(actors, group, with_addresses)


def _wait_placed(group: Any, num_shards: int, bundle: Mapping[str, float], placement: Placement):
    ready, _ = ray.wait([group.ready()], timeout=placement.timeout_s)
    if not ready:
        raise ResourceExhausted(
            f"the cluster cannot place {num_shards} shard(s) of {dict(bundle)} "
            f"({placement.strategy}) within {placement.timeout_s:.0f} s; it has "
            f"{ray.available_resources()} free"
        )


def _start_shard(
    entry: ModelEntry,
    s: ShardSlice,
    layouts: Sequence[GroupLayout],
    configs: Mapping[str, RuleConfig],
    group: Any,
    bundle: Mapping[str, float],
    process: ShardProcess,
    secret: str,
    history: Mapping[str, list[dict[str, Any]]] | None,
) -> Any:
    """One detached shard actor in its bundle of the model's placement group."""
    plan = {
        g.name: {
            "numel": b - a,
            "group_numel": g.numel,
            "range": [a, b],
            "optimizer": configs[g.name],
            "views": tensor_views(g, a, b),
        }
        for g in layouts
        for a, b in [s.ranges[g.name]]
    }
    return _ShardActor.options(
        name=shard_name(entry.service, entry.model, entry.launch, s.index),
        namespace=NAMESPACE,
        lifetime="detached",
        num_cpus=bundle["CPU"],
        num_gpus=bundle.get("GPU", 0),
        max_restarts=0,
        scheduling_strategy=PlacementGroupSchedulingStrategy(
            group, placement_group_bundle_index=s.index
        ),
    ).remote(
        entry.model, s.index, plan, entry.schedule, process.host, entry.num_shards, entry.mode,
        entry.device, secret if s.index == 0 else shard_key(secret, s.index), process.edge,
        process.ray_service,
        entry.as_dict(), dict(history or {}) if s.index == 0 else None,
    )  # fmt: skip


def stop_shards(actors: Sequence[Any], group: Any, grace_s: float) -> None:
    """Stop shard actors (gracefully where they answer) and remove their placement group."""
    actors = [a for a in actors if a is not None]
    try:
        ray.get([a.stop.remote(grace_s) for a in actors], timeout=grace_s + 30)
    except Exception:  # noqa: BLE001 - a dead shard needs no graceful stop
        log.warning("some shards did not stop gracefully", exc_info=True)
    for actor in actors:
        with contextlib.suppress(Exception):  # already gone
            ray.kill(actor)
    remove_group(group)


def remove_group(group: Any) -> None:
    if group is None:
        return
    try:
        remove_placement_group(group)
    except Exception:  # noqa: BLE001 - the cluster may be going away, or it is gone already
        log.warning("could not remove a placement group", exc_info=True)


def find_group(name: str) -> Any:
    """A detached placement group by name, or None."""
    try:
        return ray.util.get_placement_group(name)
    except Exception:  # noqa: BLE001 - none of that name
        return None


def running_shards(service: str) -> dict[str, dict[str, dict[int, Any]]]:
    """Every live shard actor of `service`: model -> launch -> index -> handle."""
    prefix = f"{SHARD_PREFIX}:{service}:"
    found: dict[str, dict[str, dict[int, Any]]] = defaultdict(lambda: defaultdict(dict))
    for named in ray.util.list_named_actors(all_namespaces=True):
        name = named["name"]
        if named.get("namespace") != NAMESPACE or not name.startswith(prefix):
            continue
        head, model, launch, index = name.rsplit(":", 3)
        if head != prefix[:-1] or not index.isdigit():
            continue
        try:
            handle = ray.get_actor(name, namespace=NAMESPACE)
        except ValueError:  # it died meanwhile
            continue
        found[model][launch][int(index)] = handle
    return {model: dict(launches) for model, launches in found.items()}
