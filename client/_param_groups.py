"""`RemoteOptimizer.param_groups` as a mirror of the server: what the server told of each group
(its lr for the next update and its rule's hyperparameters) is written into the torch param
groups, and what a user or an lr scheduler changed there since is read back as the changes to
send. Pure logic: no gRPC, no torch."""

from __future__ import annotations

from collections.abc import Mapping, MutableMapping, Sequence
from typing import Any

# The config keys a param group does not show: the rule's name is not a hyperparameter.
_NOT_SHOWN = frozenset({"name"})


def shown(config: Mapping[str, Any], lr: float | None) -> dict[str, Any]:
    """A group's hyperparameters as a torch param group holds them: every key of the rule's
    config but its name (JSON lists, such as betas, as tuples), and `lr` the lr of the next
    update (the schedule applied) when the server said it."""
    out = {k: _as_torch(v) for k, v in config.items() if k not in _NOT_SHOWN}
    if lr is not None:
        out["lr"] = float(lr)
    return out


def _as_torch(value: Any) -> Any:
    return tuple(value) if isinstance(value, list) else value


def same(a: Any, b: Any) -> bool:
    """Equal as hyperparameters: a tuple equals the list of the same values, 1 equals 1.0."""
    if isinstance(a, list | tuple) and isinstance(b, list | tuple):
        return len(a) == len(b) and all(same(x, y) for x, y in zip(a, b, strict=True))
    return bool(a == b)


class GroupMirror:
    """What the server last told of each group, as written into the param groups."""

    def __init__(self) -> None:
        self.told: dict[str, dict[str, Any]] = {}

    def write(
        self,
        param_groups: Sequence[MutableMapping[str, Any]],
        settings: Mapping[str, dict[str, Any]],
    ) -> None:
        """Show `settings` ({group: hyperparameters}) in the param groups (each named by its
        "name" key); keys of a rule no longer in use (after a swap) are removed."""
        for group in param_groups:
            name = group["name"]
            new = settings.get(name)
            if new is None:
                continue
            for stale in set(self.told.get(name, {})) - set(new):
                group.pop(stale, None)
            group.update(new)
            self.told[name] = dict(new)

    def changes(self, param_groups: Sequence[Mapping[str, Any]]) -> dict[str, dict[str, Any]]:
        """{group: {key: value}}: the hyperparameters changed in the param groups since the
        server last told them (keys the server does not know, such as a scheduler's
        "initial_lr", are not hyperparameters and are left alone)."""
        out: dict[str, dict[str, Any]] = {}
        for group in param_groups:
            told = self.told.get(group["name"], {})
            diff = {k: group[k] for k in told if k in group and not same(group[k], told[k])}
            if diff:
                out[group["name"]] = diff
        return out

    def sent(self, changes: Mapping[str, Mapping[str, Any]]) -> None:
        """The server took `changes`: they are what it holds now."""
        for name, diff in changes.items():
            self.told.setdefault(name, {}).update(diff)
