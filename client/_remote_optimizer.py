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
from optserve.client._local_sgd import LocalSGD, local_sgd
from optserve.client._param_groups import GroupMirror, shown
from optserve.client._resume import Resume
from optserve.client._stubs import ModelInfo
from optserve.common.allocator import keep_step_buffers
from optserve.common.codec import dtype_name
from optserve.common.config import RuleConfig, parse_mode_config, parse_optimizer_config
from optserve.common.errors import (
    AlreadyExists,
    FailedPrecondition,
    InvalidArgument,
    NotFound,
    PermissionDenied,
    PushRefused,
    Unavailable,
)
from optserve.common.results import MigrationReport, Status

log = logging.getLogger(__name__)
T = TypeVar("T")


def _mode(mode: str | Mapping[str, Any] | None, trainers: int | None) -> Any:
    """The mode config from RemoteOptimizer's `mode` ("sync", "async" or a config) and
    `trainers` (sync: pushes per round; under torchrun, $WORLD_SIZE by default)."""
    if mode is None and trainers is None:
        return None
    config: dict[str, Any] = dict(mode) if isinstance(mode, Mapping) else {"mode": mode or "sync"}
    if trainers is not None:
        config["trainers"] = trainers
    elif config.get("mode") == "sync" and "trainers" not in config and "WORLD_SIZE" in os.environ:
        config["trainers"] = int(os.environ["WORLD_SIZE"])
    return parse_mode_config(config)


def _default_trainer() -> str:
    """This trainer's name: under torchrun its RANK, else host:pid:random."""
    if "RANK" in os.environ and "WORLD_SIZE" in os.environ:
        return f"rank-{os.environ['RANK']}"
    return f"{socket.gethostname()[:64]}:{os.getpid()}:{uuid.uuid4().hex[:6]}"


def _schedule_json(schedule: Any) -> str:
    return schedule.model_dump_json() if hasattr(schedule, "model_dump_json") else str(schedule)


def _is_constant(schedule: Any) -> bool:
    if schedule is None:
        return True
    name = schedule.get("name") if isinstance(schedule, Mapping) else getattr(schedule, "name", "")
    return name in ("", "constant")


class RemoteOptimizer(Resume, torch.optim.Optimizer):
    """Drop-in for a torch optimizer; the weights and all optimizer state live on the server.

    On construction it registers the model with the parameters' current values if the server
    does not have it yet; otherwise it loads the server's weights into the parameters.
    Parameters with ``requires_grad=False`` are left out (the server never moves them, as torch
    would not). Each `step()` pushes every parameter's `.grad` and loads the updated weights
    back. Unlike torch.optim, which skips a parameter whose `.grad` is None, a trainable
    parameter without a gradient contributes zeros: the server updates its flat buffer as a
    whole, so weight decay and accumulated momentum still move it.

    `param_groups` mirror the server: one group per server parameter group (its "name" key),
    each with `lr` (the lr of the next update, the server's schedule applied) and every
    hyperparameter of the rule (betas, eps, weight_decay, momentum, ...), refreshed by every
    `step()` and `pull()`. A change made there (by the user, or by a torch, Hugging Face or
    Lightning lr scheduler) is sent to the server by the next `step()`, before its push, as
    one audited control change (`set_hyperparameters` with policy "keep": the state stays as
    it is, as torch keeps it when a param group's value changes). A change of `lr` while the
    model has a server-side schedule is refused (FailedPrecondition) unless
    `override_schedule=True`, which drops the server's schedule (audited) and lets this
    trainer's lr rule from then on.

    `mode="sync", trainers=N` makes each update the mean of one push from each of N trainers
    (`step()` returns once the round is applied); the default is async. Under torchrun,
    `trainers` defaults to $WORLD_SIZE and the trainer's name to "rank-$RANK". A push the
    server refuses as stale or too late is dropped: `step()` loads the current weights
    instead and counts it in `dropped_pushes`.

    `state_dict()` is a small record (address, model, version, and the name of a server
    checkpoint written for it when the server has a checkpoint directory); `load_state_dict()`
    of it brings the model back to that checkpoint, so that a framework's checkpoint resumes
    weights and optimizer state of one version (docs/frameworks.md).

    `token` is the bearer token for a server with authentication (default $OPTSERVE_TOKEN or
    the file named by $OPTSERVE_TOKEN_FILE); `tls_ca` a CA file (or PEM bytes) for a TLS server.

    `local_steps=H` with `inner` (an optimizer config torch.optim runs, e.g. AdamW) is local
    SGD (DiLoCo, docs/frameworks.md): each `step()` is an inner step here, and every H-th pushes
    the pseudo-gradient (weights at the round's start minus now) to the server's rule, the
    outer optimizer, and loads the new weights. `inner_optimizer`'s state stays on the trainer.

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
        override_schedule: bool = False,
        local_steps: int = 1,
        inner: str | Mapping[str, Any] | RuleConfig | None = None,
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
        self._local: LocalSGD | None = local_sgd(named, local_steps, inner)
        self.inner_optimizer = self._local.optimizer if self._local is not None else None
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
        self.trainer = trainer or _default_trainer()
        # Pushes the server refused (stale, too late for a sync round, the model restored or
        # briefly down): their gradients were dropped and the current weights loaded instead.
        self.dropped_pushes = 0
        # How long `step()` waits for a model that lost a shard to come back.
        self.recover_timeout_s = recover_timeout_s
        # True: an lr set in param_groups replaces the server's schedule (else it is refused).
        self.override_schedule = override_schedule
        # Hyperparameter changes this trainer sent from its param groups.
        self.control_changes = 0
        self._mirror = GroupMirror()
        # The server checkpoint the last state_dict() wrote: (name, version).
        self._last_checkpoint: tuple[str, int] | None = None
        try:
            config = parse_optimizer_config(optimizer) if optimizer is not None else None
            mode_config = _mode(mode, trainers)
            self._create_options = {"schedule": schedule, "groups": groups, "mode": mode_config}
            info, created = self._attach(config)
            self._check_matches(info)
            self._group_params(info)
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

    def _group_params(self, info: ModelInfo) -> None:
        """One torch param group per server group, showing its settings as `info` has them."""
        by_name = dict(self._named)
        self.param_groups = [
            {"params": [by_name[p.name] for p in g.params], "name": g.name} for g in info.groups
        ]
        self._show(info)

    def _show(self, info: ModelInfo) -> None:
        """Show the settings `info` has in the param groups (in place: keys of the user's or a
        scheduler's own, such as "initial_lr", stay)."""
        # A group with its own overrides takes a client's changes as overrides of its own.
        self._overridden = {g for g, c in info.group_configs.items() if c.get("overrides")}
        self._schedule: Any = info.schedule
        model_wide = info.optimizer.model_dump(mode="json")
        told = {  # a group the shards did not describe yet: its config, its lr unscheduled
            g: shown(c["optimizer"], c["lr"])
            if c.get("optimizer")
            else shown({**model_wide, **c.get("overrides", {})}, None)
            for g, c in info.group_configs.items()
        }
        self._mirror.write(self.param_groups, told)
        self.defaults = shown(info.optimizer.model_dump(mode="json"), None)

    def _refresh(self) -> None:
        """Show in the param groups what the leader told with the last pull."""
        settings = self.client.settings(self.model)
        if settings is None:
            return
        self._schedule = settings.schedule
        self._mirror.write(
            self.param_groups,
            {g: shown(c, settings.lrs.get(g)) for g, c in settings.groups.items()},
        )

    @torch.no_grad()
    def _load_from_server(self) -> None:
        weights, self.version = self.client.pull(self.model, reuse_buffers=True)
        for name, param in self._named:
            param.copy_(weights[name])
        self._refresh()
        if self._local is not None:  # a new round starts from the global weights
            self._local.begin_round()

    def _send_changes(self) -> None:
        """Send what was changed in the param groups since the server last told them."""
        changes = self._mirror.changes(self.param_groups)
        if not changes:
            return
        if any("lr" in c for c in changes.values()) and not _is_constant(self._schedule):
            if not self.override_schedule:
                raise FailedPrecondition(
                    f"model {self.model!r} follows a server-side lr schedule "
                    f"({_schedule_json(self._schedule)}), and this trainer's param_groups "
                    "changed lr (by hand or by an lr scheduler): the two would fight. Drop the "
                    "server's schedule (set_schedule(None)), stop changing lr here, or pass "
                    "RemoteOptimizer(override_schedule=True) to let this lr replace the schedule"
                )
            log.warning(
                "model %r: this trainer's lr replaces the server's schedule %s "
                "(override_schedule=True)",
                self.model,
                _schedule_json(self._schedule),
            )
            self.client.set_schedule(self.model, None)
            self._schedule = None
        (group, diff), *more = changes.items()
        try:
            if not more and len(self.param_groups) == 1 and group not in self._overridden:
                self.client.set_hyperparameters(self.model, policy="keep", **diff)
            else:
                self.client.set_hyperparameters(self.model, groups=changes, policy="keep")
        except PermissionDenied as exc:
            raise PermissionDenied(
                f"{exc}. This trainer's param_groups changed {changes} (by hand or by an lr "
                "scheduler), and sending a change needs a token that may change "
                "hyperparameters (admin). With a trainer token, keep the lr constant here "
                "(HF Trainer: lr_scheduler_type='constant') and give the model a server-side "
                "schedule instead"
            ) from None
        self._mirror.sent(changes)
        self.control_changes += 1

    @torch.no_grad()
    def step(self, closure: Callable[[], float] | None = None) -> float | None:  # type: ignore[override]
        """Send the param groups' changes, if any; push every parameter's gradient; then load
        the updated weights and the server's settings. Under local SGD: one inner step, and on
        a round's last one all that with the round's pseudo-gradient."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        if self._local is not None:
            grads = self._local.step()
            if grads is None:  # not the round's last inner step
                return loss
        else:
            grads = {
                n: p.grad if p.grad is not None else torch.zeros_like(p) for n, p in self._named
            }
        self._send_changes()
        try:
            weights, self.version = self.client.push_and_pull(
                self.model,
                grads,
                version=self.version,
                wire_dtype=self.wire_dtype,
                trainer=self.trainer,
                reuse_buffers=True,  # copied into the parameters below
                local_steps=self._local.steps if self._local is not None else 0,
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
        self._refresh()
        if self._local is not None:
            self._local.begin_round()
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
        """Load the server's current weights and settings; return the weights' version."""
        self._load_from_server()
        return self.version

    # ---- control ----------------------------------------------------------------------------

    def set_optimizer(
        self, config: str | Mapping[str, Any] | RuleConfig, policy: str = "migrate"
    ) -> MigrationReport:
        """Swap the model's optimizer on the server; see ParameterServerClient.set_optimizer."""
        report = self.client.set_optimizer(self.model, config, policy)
        self._show(self.client.describe_model(self.model))
        return report

    def set_hyperparameters(self, **changes: Any) -> MigrationReport:
        """Change some hyperparameters of the current rule (its state is kept)."""
        report = self.client.set_hyperparameters(self.model, **changes)
        self._show(self.client.describe_model(self.model))
        return report

    def status(self) -> Status:
        """The run as the server sees it; see ParameterServerClient.status."""
        return self.client.status(self.model)

    def set_schedule(self, config: str | Mapping[str, Any] | None) -> int:
        version = self.client.set_schedule(self.model, config)
        self._show(self.client.describe_model(self.model))
        return version

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
