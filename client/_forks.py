"""Forks on the client: `ParameterServerClient.fork` and `.promote` (a mixin), and
`SwitchModel`, `RemoteOptimizer.switch_model` (through `Resume`). docs/forks.md tells it all."""

from __future__ import annotations

import threading
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

from optserve.client._stubs import ModelInfo, call
from optserve.common.config import RuleConfig, optimizer_config_json, parse_optimizer_config
from optserve.v1 import coordinator_pb2, coordinator_pb2_grpc


class ForkCalls:
    """fork and promote, for `ParameterServerClient`."""

    # What they use, set by ParameterServerClient (declared for the type checker).
    timeout_s: float
    _coordinator: coordinator_pb2_grpc.CoordinatorStub
    _metadata: tuple[tuple[str, str], ...]
    _lock: threading.Lock
    _layouts: dict[str, ModelInfo]

    def fork(
        self,
        model: str,
        new_name: str,
        at: str = "now",
        optimizer: str | Mapping[str, Any] | RuleConfig | None = None,
        policy: str = "migrate",
    ) -> ModelInfo:
        """Copy `model` at one version as a new model `new_name`: weights, all optimizer state,
        schedule and its state, update mode, param groups, metrics and audit history. `at` is
        "now" (a consistent checkpoint is taken: the parent's updates are held as long as a
        checkpoint holds them) or "checkpoint:<name>", one of the model's checkpoints. With
        `optimizer`, the copy's rule is swapped before its first update (`policy`: "migrate" or
        "reset", as `set_optimizer`). Returns the fork's layout; its `forked_from`,
        `fork_version` and `fork_checkpoint` tell where it came from. Admin only."""
        config = (
            "" if optimizer is None else optimizer_config_json(parse_optimizer_config(optimizer))
        )
        request = coordinator_pb2.ForkRequest(
            model=model, new_name=new_name, at=at, optimizer_json=config, policy=policy
        )
        reply = call(self._coordinator.Fork, request, timeout=self.timeout_s,
                     metadata=self._metadata)  # fmt: skip
        return self._keep(ModelInfo.from_proto(reply.model))

    def promote(self, fork: str, *, keep_as: str | None = None) -> ModelInfo:
        """Make `fork` its parent's main line: the parent's name resolves to the fork from now
        on (pushes, pulls, status, checkpoints; a trainer that pushes to the old name is told to
        pull, then goes on with the fork). The parent's run is dropped, or kept as a model named
        `keep_as`. Returns the fork's layout (its `aliases` hold the parent's name). Admin only."""
        request = coordinator_pb2.PromoteRequest(model=fork, keep_as=keep_as or "")
        reply = call(self._coordinator.Promote, request, timeout=self.timeout_s,
                     metadata=self._metadata)  # fmt: skip
        info = self._keep(ModelInfo.from_proto(reply.model))
        with self._lock:
            for name in [reply.main, *info.aliases]:  # their cached layouts are another run's
                self._layouts.pop(name, None)
        return info

    def _keep(self, info: ModelInfo) -> ModelInfo:
        with self._lock:
            self._layouts[info.name] = info
        return info


class SwitchModel:
    """`RemoteOptimizer.switch_model` (mixed in through `Resume`)."""

    # What it uses, set by RemoteOptimizer (declared for the type checker).
    client: Any
    model: str
    version: int

    if TYPE_CHECKING:

        def _check_matches(self, info: ModelInfo) -> None: ...

        def _group_params(self, info: ModelInfo) -> None: ...

        def _load_from_server(self) -> None: ...

    def switch_model(self, name: str) -> None:
        """Move this trainer to another model with the same parameters (a fork, or its parent:
        docs/forks.md): its parameters take that model's weights and settings now, and its next
        push goes there. A model whose parameters differ is refused and nothing changes."""
        info = self.client.describe_model(name)
        self._check_matches(info)
        self.model = name
        self._group_params(info)
        self.version = info.version
        self._load_from_server()
