"""`RemoteOptimizer`: a torch.optim.Optimizer whose update happens on the optserve server."""

from __future__ import annotations

import logging
import os
import socket
import time
import uuid
from collections.abc import Callable, Iterable, Mapping
from typing import Any, TypeVar

import torch

from optserve.client._client import ParameterServerClient
from optserve.client._stubs import ModelInfo
from optserve.common.allocator import keep_step_buffers
from optserve.common.codec import dtype_name
from optserve.common.config import RuleConfig, parse_mode_config, parse_optimizer_config
from optserve.common.errors import (
    AlreadyExists,
    InvalidArgument,
    NotFound,
    PushRefused,
    Unavailable,
)
from optserve.common.results import MigrationReport, Status

log = logging.getLogger(__name__)
T = TypeVar("T")


def _mode(mode: str | Mapping[str, Any] | None, trainers: int | None) -> Any:
    """The mode config from RemoteOptimizer's `mode` ("sync", "async" or a config) and
    `trainers` (sync: pushes per round)."""
    if mode is None and trainers is None:
        return None
    config: dict[str, Any] = dict(mode) if isinstance(mode, Mapping) else {"mode": mode or "sync"}
    if trainers is not None:
        config["trainers"] = trainers
    return parse_mode_config(config)


class RemoteOptimizer(torch.optim.Optimizer):
    """Drop-in for a torch optimizer; the weights and all optimizer state live on the server.

    On construction it registers the model with the parameters' current values if the server
    does not have it yet; otherwise it loads the server's weights into the parameters.
    Parameters with ``requires_grad=False`` are left out (the server never moves them, as torch
    would not). Each `step()` pushes every parameter's `.grad` and loads the updated weights
    back. Unlike torch.optim, which skips a parameter whose `.grad` is None, a trainable
    parameter without a gradient contributes zeros: the server updates its flat buffer as a
    whole, so weight decay and accumulated momentum still move it.

    `mode="sync", trainers=N` makes each update the mean of one push from each of N trainers
    (`step()` returns once the round is applied); the default is async. A push the server
    refuses as stale or too late is dropped: `step()` loads the current weights instead and
    counts it in `dropped_pushes`.

    `token` is the bearer token for a server with authentication (default $OPTSERVE_TOKEN or
    the file named by $OPTSERVE_TOKEN_FILE); `tls_ca` a CA file (or PEM bytes) for a TLS server.

    `tune_allocator` (default on) has glibc keep the per-step message buffers for reuse
    (`optserve.common.allocator`): it changes the whole process's allocator thresholds, and
    saves a large model's steps tens of thousands of page faults each.

    Example::

        opt = RemoteOptimizer(net.named_parameters(), address="127.0.0.1:50051",
                              model="mnist-mlp", optimizer={"name": "adam", "lr": 1e-3})
        loss_fn(net(x), y).backward(); opt.step(); opt.zero_grad()
    """

    def __init__(
        self,
        named_parameters: Iterable[tuple[str, torch.nn.Parameter]],
        *,
        address: str | None = None,
        model: str,
        optimizer: str | Mapping[str, Any] | RuleConfig | None = None,
        schedule: str | Mapping[str, Any] | None = None,
        groups: Mapping[str, Mapping[str, Any]] | None = None,
        client: ParameterServerClient | None = None,
        wire_dtype: torch.dtype = torch.float32,
        trainer: str = "",
        mode: str | Mapping[str, Any] | None = None,
        trainers: int | None = None,
        recover_timeout_s: float = 300.0,
        token: str | None = None,
        tls_ca: str | bytes | None = None,
        tune_allocator: bool = True,
    ) -> None:
        if tune_allocator:
            keep_step_buffers()
        # Frozen parameters are left out, as torch leaves them alone: the server never moves them.
        named = [(n, p) for n, p in named_parameters if p.requires_grad]
        if not named:
            raise InvalidArgument("RemoteOptimizer got no trainable parameters")
        names = [n for n, _ in named]
        if len(set(names)) != len(names):
            raise InvalidArgument("parameter names must be unique")
        if client is None and address is None:
            raise InvalidArgument("RemoteOptimizer needs address=... (or client=...)")
        self._constructing = True
        super().__init__([p for _, p in named], defaults={})
        self._constructing = False
        self._named = named
        self._owns_client = client is None
        self.client = (
            client
            if client is not None
            else ParameterServerClient(address or "", token=token, tls_ca=tls_ca)
        )
        self.model = model
        self.wire_dtype = wire_dtype
        # A sync round takes one push per trainer, so every trainer needs its own name.
        self.trainer = trainer or f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:6]}"
        # Pushes the server refused (stale, too late for a sync round, the model restored or
        # briefly down): their gradients were dropped and the current weights loaded instead.
        self.dropped_pushes = 0
        # How long `step()` waits for a model that lost a shard to come back.
        self.recover_timeout_s = recover_timeout_s
        try:
            config = parse_optimizer_config(optimizer) if optimizer is not None else None
            mode_config = _mode(mode, trainers)
            self._create_options = {"schedule": schedule, "groups": groups, "mode": mode_config}
            info, created = self._attach(config)
            self._check_matches(info)
            self.version = info.version
            if not created:  # its creator may still be sending the initial values: wait
                self._wait_for_server()
        except BaseException:
            self.close()
            raise

    def _attach(self, config: RuleConfig | None) -> tuple[ModelInfo, bool]:
        try:
            info = self.client.describe_model(self.model)
        except NotFound:
            if config is None:
                raise NotFound(
                    f"model {self.model!r} does not exist; pass optimizer=... to create it"
                ) from None
            values = [(n, p.detach()) for n, p in self._named]
            try:
                info = self.client.create_model(self.model, values, config, **self._create_options)
                return info, True
            except AlreadyExists:  # another trainer created it first: join it
                info = self.client.describe_model(self.model)
        if config is not None and info.optimizer != config:
            log.warning(
                "model %r exists with optimizer %s; keeping it (asked for %s)",
                self.model,
                info.optimizer,
                config,
            )
        return info, False

    def _check_matches(self, info: ModelInfo) -> None:
        server = {p.name: p for p in info.params}
        local = dict(self._named)
        if set(server) != set(local):
            raise InvalidArgument(
                f"model {self.model!r} on the server has parameters {sorted(server)}, "
                f"these parameters are named {sorted(local)}"
            )
        for name, param in self._named:
            slot = server[name]
            if tuple(param.shape) != slot.shape or param.dtype != slot.dtype:
                raise InvalidArgument(
                    f"parameter {name!r} is {list(param.shape)} {dtype_name(param.dtype)} here "
                    f"but {list(slot.shape)} {dtype_name(slot.dtype)} on the server"
                )

    @torch.no_grad()
    def _load_from_server(self) -> None:
        weights, self.version = self.client.pull(self.model, reuse_buffers=True)
        for name, param in self._named:
            param.copy_(weights[name])

    @torch.no_grad()
    def step(self, closure: Callable[[], float] | None = None) -> float | None:  # type: ignore[override]
        """Push every parameter's gradient, then load the updated weights."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        grads = {
            name: p.grad if p.grad is not None else torch.zeros_like(p) for name, p in self._named
        }
        try:
            weights, self.version = self.client.push_and_pull(
                self.model,
                grads,
                version=self.version,
                wire_dtype=self.wire_dtype,
                trainer=self.trainer,
                reuse_buffers=True,  # copied into the parameters below
            )
        except PushRefused as exc:
            # Too stale (async max_staleness), too late for its sync round, or computed on a
            # version the model has left (it was restored): the server applied nothing.
            # Catch up with the current weights; this gradient is dropped.
            self.dropped_pushes += 1
            log.warning("push dropped, loading the current weights: %s", exc)
            self._load_from_server()
            return loss
        except Unavailable as exc:
            # A shard is down: the server brings the model back from its newest checkpoint.
            # Wait for it, then go on from the weights it comes back with.
            self.dropped_pushes += 1
            log.warning("the model is unavailable (%s); waiting for it to come back", exc)
            self._wait_for_server()
            return loss
        for name, param in self._named:
            param.copy_(weights[name])
        return loss

    def _wait_for_server(self) -> None:
        deadline = time.monotonic() + self.recover_timeout_s
        delay = 0.2
        while True:
            try:
                self._load_from_server()
                return
            except (Unavailable, NotFound) as exc:
                if time.monotonic() + delay > deadline:
                    raise Unavailable(
                        f"model {self.model!r} did not come back within "
                        f"{self.recover_timeout_s:.0f} s: {exc}"
                    ) from None
                time.sleep(delay)
                delay = min(delay * 2, 5.0)

    def pull(self) -> int:
        """Load the server's current weights into the parameters; return their version."""
        self._load_from_server()
        return self.version

    def set_optimizer(
        self, config: str | Mapping[str, Any] | RuleConfig, policy: str = "migrate"
    ) -> MigrationReport:
        """Swap the model's optimizer on the server; see ParameterServerClient.set_optimizer."""
        return self.client.set_optimizer(self.model, config, policy)

    def set_hyperparameters(self, **changes: Any) -> MigrationReport:
        """Change some hyperparameters of the current rule (its state is kept)."""
        return self.client.set_hyperparameters(self.model, **changes)

    def status(self) -> Status:
        """The run as the server sees it; see ParameterServerClient.status."""
        return self.client.status(self.model)

    def set_schedule(self, config: str | Mapping[str, Any] | None) -> int:
        return self.client.set_schedule(self.model, config)

    def report_metric(self, name: str, value: float, step: int | None = None) -> bool:
        """Report a metric (see ParameterServerClient.report_metric). While the server's
        coordinator is briefly away (restarting), this waits for it, up to
        `recover_timeout_s`, rather than failing the training loop."""
        return self._patiently(lambda: self.client.report_metric(self.model, name, value, step))

    def _patiently(self, call: Callable[[], T]) -> T:
        deadline = time.monotonic() + self.recover_timeout_s
        delay = 0.2
        while True:
            try:
                return call()
            except Unavailable:
                if time.monotonic() + delay > deadline:
                    raise
                log.warning("the server is unavailable; retrying in %.1f s", delay)
                time.sleep(delay)
                delay = min(delay * 2, 5.0)

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        if not getattr(self, "_constructing", False):
            raise InvalidArgument(
                "RemoteOptimizer's parameters are fixed when the model is registered"
            )
        super().add_param_group(param_group)

    def close(self) -> None:
        if self._owns_client:
            self.client.close()

    def __repr__(self) -> str:
        return f"RemoteOptimizer(model={self.model!r}, address={self.client.address!r})"
