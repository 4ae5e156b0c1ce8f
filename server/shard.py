"""A shard's slice of one model: flat fp32 masters per parameter group, optimizer state, version.

Pure state and math (no Ray, no gRPC): the shard actor owns one of these and its gRPC service
decodes requests into calls on it. Every method that mutates takes the lock and validates fully
before touching anything, so a refused push changes nothing.
"""

from __future__ import annotations

import threading
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch

from optserve.client.codec import GRADIENT_WIRE_DTYPES, Expected
from optserve.client.config import AdamConfig, SGDConfig, optimizer_config_json
from optserve.client.errors import InvalidArgument
from optserve.server.engine import Rule, State, build_rule


@dataclass
class GroupBuffer:
    name: str
    weights: torch.Tensor
    state: State


class ShardState:
    def __init__(
        self,
        model: str,
        index: int,
        weights: Mapping[str, torch.Tensor],
        optimizer: SGDConfig | AdamConfig,
        device: str | torch.device = "cpu",
    ) -> None:
        self.model = model
        self.index = index
        self.device = torch.device(device)
        self.version = 0
        self._lock = threading.Lock()
        self._config = optimizer
        self._rule: Rule = build_rule(optimizer)
        self._groups: dict[str, GroupBuffer] = {}
        for name, tensor in weights.items():
            flat = tensor.detach().reshape(-1).to(self.device, torch.float32, copy=True)
            self._groups[name] = GroupBuffer(name, flat, self._rule.init_state(flat))

    @property
    def optimizer(self) -> SGDConfig | AdamConfig:
        return self._config

    def expected_gradients(self) -> dict[str, Expected]:
        """What a push must carry: one flat tensor per group, of this shard's length."""
        return {
            name: Expected((g.weights.numel(),), GRADIENT_WIRE_DTYPES)
            for name, g in self._groups.items()
        }

    def apply_push(self, grads: Mapping[str, torch.Tensor], based_on: int) -> tuple[int, int]:
        """Apply one update from per-group gradients; return (new version, staleness)."""
        prepared = {}
        for name, group in self._groups.items():
            grad = grads[name].reshape(-1).to(self.device, torch.float32)
            if grad.numel() != group.weights.numel():
                raise InvalidArgument(
                    f"gradient for group {name!r} has {grad.numel()} elements; "
                    f"this shard holds {group.weights.numel()}"
                )
            bad = grad.numel() - int(torch.isfinite(grad).sum())
            if bad:
                raise InvalidArgument(
                    f"gradient for group {name!r} has {bad} NaN/Inf element(s); nothing was applied"
                )
            prepared[name] = grad
        with self._lock:
            if based_on > self.version:
                raise InvalidArgument(
                    f"gradient claims model version {based_on}, "
                    f"but model {self.model!r} is at version {self.version}"
                )
            lr = self._config.lr
            for name, group in self._groups.items():
                self._rule.apply(group.weights, prepared[name], group.state, lr)
            staleness = self.version - based_on
            self.version += 1
            return self.version, staleness

    def snapshot(self) -> tuple[int, dict[str, torch.Tensor]]:
        """A consistent copy of (version, per-group weights) on the CPU."""
        with self._lock:
            return self.version, {
                name: g.weights.detach().to("cpu", copy=True) for name, g in self._groups.items()
            }

    def state_snapshot(self) -> tuple[int, dict[str, State]]:
        """A consistent copy of every group's optimizer state (for tests and checkpoints)."""
        with self._lock:
            return self.version, {
                name: {
                    k: v.detach().to("cpu", copy=True) if isinstance(v, torch.Tensor) else v
                    for k, v in g.state.items()
                }
                for name, g in self._groups.items()
            }

    def info(self) -> dict[str, Any]:
        with self._lock:
            return {
                "model": self.model,
                "index": self.index,
                "version": self.version,
                "device": str(self.device),
                "optimizer": optimizer_config_json(self._config),
                "numel": {name: g.weights.numel() for name, g in self._groups.items()},
            }
