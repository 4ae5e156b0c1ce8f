"""A shard's slice of one model: one GroupEngine per parameter group, a schedule, a version.

Pure state and math (no Ray, no gRPC): the shard actor owns one of these and its gRPC service
decodes requests into calls on it. Every method that mutates takes the lock and validates fully
before touching anything, so a refused request changes nothing.
"""

from __future__ import annotations

import contextlib
import logging
import threading
from collections.abc import Iterator, Mapping, Sequence
from typing import Any, TypeVar

import torch

from optserve.common.codec import GRADIENT_WIRE_DTYPES, Expected
from optserve.common.config import (
    GradientPolicy,
    RuleConfig,
    parse_schedule_config,
)
from optserve.common.errors import (
    FailedPrecondition,
    InvalidArgument,
    ModelRestored,
    OptserveError,
    ResourceExhausted,
    Unavailable,
)
from optserve.server.engine.group import GroupEngine, Path
from optserve.server.engine.migration import MigrationReport, Policy
from optserve.server.engine.schedules import Schedule, build_schedule
from optserve.server.shard.gradients import checked_slice
from optserve.server.shard.memory import BufferPool
from optserve.server.shard.sequencer import Decision, GradStats
from optserve.server.shard.updates import Verdict, step_groups
from optserve.server.shard.views import GroupInit, GroupValues, StateViews

log = logging.getLogger(__name__)
T = TypeVar("T")
# How long a decided update waits for the updates before it to reach this shard.
APPLY_TIMEOUT_S = 300.0
# Versions whose update the shards' verdicts refused, kept for the rounds' other members.
MAX_REFUSED = 1_000


class ShardState(StateViews):
    def __init__(
        self,
        model: str,
        index: int,
        groups: Mapping[str, GroupInit],
        schedule: Any = None,
        device: str | torch.device = "cpu",
        path: Path = "fast",
        max_staged: int = 64,
        gradients: GradientPolicy | None = None,
    ) -> None:
        self.model = model
        # NaN/Inf handling and whether pushes need their norm (the leader decides on it).
        self.gradients = gradients or GradientPolicy()
        self.index = index
        self.device = torch.device(device)
        self.version = 0
        self._lock = threading.RLock()
        self._schedule_lock = threading.Lock()  # the schedule's state (plateau) and lrs
        # Signalled when the version moves; pushes wait on it to apply in version order.
        self._cv = threading.Condition(self._lock)
        self._staged: dict[str, dict[str, torch.Tensor]] = {}
        # The pooled CPU buffers each staged push holds (its gradient, or its CPU copy).
        self._holding: dict[str, dict[str, torch.Tensor]] = {}
        # Pushes held here at once (each a gradient slice); more are refused, not queued.
        self.max_staged = max_staged
        # Bumped by a restore: updates decided before it must not apply after it.
        self._epoch = 0
        # Why this shard can no longer be trusted to match the model's other shards, if so.
        self.broken: str | None = None
        self._refused: dict[int, OptserveError] = {}
        self._plans = dict(groups)
        self._path = path
        self.buffers = BufferPool({name: init.length for name, init in groups.items()})
        self._groups: dict[str, GroupEngine] = {}
        # False until the shard holds its values (all GroupInits with weights: at once);
        # `preparing` while its groups' kernels are chosen and compiled (before `ready`).
        self.ready = all(init.weights is not None for init in groups.values())
        self.preparing = False
        if self.ready:
            for name, init in groups.items():
                assert init.weights is not None
                flat = init.weights.detach().reshape(-1).to(self.device, torch.float32, copy=True)
                self._groups[name] = GroupEngine(name, flat, init.config, init.views, path,
                                                 group_numel=init.group_numel)  # fmt: skip
        self._schedule_config = parse_schedule_config(schedule)
        self._schedule: Schedule = build_schedule(self._schedule_config)
        self._settings_cache = None  # the configs a pull tells of, as JSON (views.settings)
        # Times each applied update (the shard's metrics; server/metrics.py UpdateTimer).
        self.update_timer: Any = None

    @property
    def numel(self) -> int:
        """Elements of this shard's slice, all groups together."""
        return sum(init.length for init in self._plans.values())

    def lengths(self) -> dict[str, int]:
        """Each group's slice length."""
        return {name: init.length for name, init in self._plans.items()}

    def expected_gradients(self) -> dict[str, Expected]:
        """What a push must carry: one flat tensor per group, of this shard's length."""
        return {name: Expected((n,), GRADIENT_WIRE_DTYPES) for name, n in self.lengths().items()}

    def config(self, group: str) -> RuleConfig:
        engine = self._groups.get(group)
        return engine.config if engine is not None else self._plans[group].config

    def lrs(self) -> dict[str, float]:
        """The lr each group's next update will use."""
        with self._lock:
            return {name: self.lr(name) for name in self._plans}

    def lr(self, group: str) -> float:
        """The lr the next update of `group` will use."""
        return self._schedule.lr(self.config(group).lr, self.version)

    def lrs_at(self, version: int) -> dict[str, float]:
        """Each group's lr for the update that makes `version`: the model's one schedule, on
        its leader, asked when the leader decides that update (the other shards apply it). Not
        under the shard's lock: the leader decides the next update while it applies this one
        (configs change only while the leader decides nothing)."""
        with self._schedule_lock:
            return {
                name: self._schedule.lr(self.config(name).lr, version - 1) for name in self._plans
            }

    def initialize(self, weights: Mapping[str, torch.Tensor]) -> None:
        """Take a new model's initial values (flat fp32, this shard's length, on its device:
        taken over, not copied); every group's rule starts fresh."""
        if set(weights) != set(self._plans):
            raise InvalidArgument(f"initial values need groups {sorted(self._plans)}")
        with self._cv:
            if self.ready or self.preparing:
                raise FailedPrecondition(
                    f"shard {self.index} of model {self.model!r} already has its values"
                )
            for name, init in self._plans.items():
                flat = weights[name].reshape(-1)
                if flat.numel() != init.length or flat.dtype != torch.float32:
                    raise InvalidArgument(f"initial values of group {name!r} do not fit")
            self.preparing = True
        try:  # not under the lock: a kernel may compile for seconds, and status reads on
            engines = {
                name: GroupEngine(name, weights[name].reshape(-1).to(self.device), init.config,
                                  init.views, self._path, group_numel=init.group_numel)
                for name, init in self._plans.items()
            }  # fmt: skip
        finally:
            with self._cv:
                self.preparing = False
        with self._cv:
            if self.ready:  # a restore landed meanwhile: it holds the newer values
                raise FailedPrecondition(
                    f"shard {self.index} of model {self.model!r} already has its values"
                )
            self._groups = engines
            self.ready = True
            self._cv.notify_all()

    def load(
        self,
        values: Mapping[str, GroupValues],
        version: int,
        schedule: Any,
        schedule_state: Mapping[str, Any],
    ) -> None:
        """Take a checkpoint's values (as a restore read them) at `version`."""
        if set(values) != set(self._plans):
            raise InvalidArgument(f"a checkpoint's values need groups {sorted(self._plans)}")
        schedule_config = parse_schedule_config(schedule)
        engines = {}
        self.preparing = True  # status: compiling kernels (outside the lock, as initialize)
        try:
            for name, init in self._plans.items():
                group = values[name]
                if group.weights.numel() != init.length:
                    raise InvalidArgument(f"values of group {name!r} have the wrong length")
                try:
                    engines[name] = GroupEngine(name, group.weights, group.config, init.views,
                                                self._path, state=group.state,
                                                group_numel=init.group_numel,
                                                kernel=group.kernel)  # fmt: skip
                except ValueError as exc:
                    raise FailedPrecondition(f"group {name!r}: {exc}") from None
        finally:
            self.preparing = False
        with self._cv:
            self._groups = engines
            self._schedule_config = schedule_config
            self._schedule = build_schedule(schedule_config)
            self._schedule.load_state_dict(dict(schedule_state))
            self.version = int(version)
            self._epoch += 1
            self._clear_staged()
            self.broken = None
            self.ready = True
            self._cv.notify_all()

    def stage(
        self,
        push_id: str,
        grads: Mapping[str, torch.Tensor],
        buffers: dict[str, torch.Tensor] | None = None,
    ) -> tuple[int, GradStats]:
        """Validate one push's gradient slices and keep them until the push is decided; return
        the epoch and what the gradient policy needs to know about the slices.

        The shard takes the tensors over (the update may modify them in place), and `buffers`
        (from `self.buffers`, which the gradients may already lie in) until the push is
        applied or refused."""
        try:
            return self._stage(push_id, grads, buffers)
        except BaseException:
            self.buffers.give(buffers)
            raise

    def _stage(
        self,
        push_id: str,
        grads: Mapping[str, torch.Tensor],
        buffers: dict[str, torch.Tensor] | None,
    ) -> tuple[int, GradStats]:
        policy = self.gradients
        prepared = {}
        sumsq, nonfinite = 0.0, 0
        with self._lock:
            self._check_sound()
        for name, length in self.lengths().items():
            pooled = buffers[name] if buffers is not None else None
            grad, bad, square = checked_slice(
                name, grads[name], length, policy, self.device, pooled
            )
            nonfinite += bad
            sumsq += square
            prepared[name] = grad
        with self._cv:
            self._check_sound()
            if push_id in self._staged:
                raise InvalidArgument(f"push id {push_id!r} was used twice; use a fresh id")
            if len(self._staged) >= self.max_staged:
                raise ResourceExhausted(
                    f"shard {self.index} of model {self.model!r} holds {len(self._staged)} "
                    "pushes waiting for their turn; retry shortly"
                )
            self._staged[push_id] = prepared
            if buffers is not None and self.device.type != "cpu":
                self.buffers.give(buffers)  # its contents are on the device now
            elif buffers is not None:
                self._holding[push_id] = buffers
            return self._epoch, GradStats(sumsq, nonfinite)

    def _unstage(self, push_id: str) -> dict[str, torch.Tensor] | None:
        """Take a push out of staging (the caller holds the lock); its pooled buffers go back
        once the caller is done with the tensors (`self.buffers.give`)."""
        return self._staged.pop(push_id, None)

    def _release(self, push_ids: Sequence[str]) -> None:
        for push_id in push_ids:
            self.buffers.give(self._holding.pop(push_id, None))

    def _clear_staged(self) -> None:
        self._staged.clear()
        self._release(list(self._holding))

    def _check_sound(self) -> None:
        if not self.ready:
            raise Unavailable(
                f"model {self.model!r} is still receiving its values (shard {self.index}: its "
                "initial values or a checkpoint); retry shortly"
            )
        if self.broken is not None:
            raise Unavailable(
                f"shard {self.index} of model {self.model!r} no longer matches the model's "
                f"other shards ({self.broken}); the server brings the model back from its "
                "newest checkpoint (or reports it lost without one): pull, then go on"
            )

    def mark_broken(self, reason: str) -> None:
        """This shard missed or half-applied an update its peers applied: refuse everything
        from now on rather than serve weights that mix two versions."""
        with self._cv:
            if self.broken is None:
                log.error("shard %d of model %s is broken: %s", self.index, self.model, reason)
                self.broken = reason
            self._clear_staged()
            self._cv.notify_all()

    def discard(self, push_id: str) -> None:
        with self._cv:
            self._unstage(push_id)
            self._release([push_id])

    def apply(
        self,
        decision: Decision,
        timeout: float = APPLY_TIMEOUT_S,
        epoch: int | None = None,
        verdict: Verdict | None = None,
    ) -> int:
        """Apply a decided update once this shard reaches the version before it; return the
        shard's version after it. Every member push of a sync round calls this with the same
        decision: the first applies the combined gradient, the others find it applied.
        `epoch` is what `stage` returned: a restore since then refuses the update.

        A decision with `verify` is first computed on copies; `verdict(finite)` tells the
        leader what this slice gave and returns the verdict of every shard: None, apply it; an
        error, apply nothing (the version passes unchanged) and raise it."""
        with self._cv:
            epoch = self._epoch if epoch is None else epoch  # `stage` said which
            ready = self._cv.wait_for(
                lambda: self.version >= decision.version - 1 or self.broken is not None, timeout
            )
            self._check_sound()
            if epoch != self._epoch:
                raise ModelRestored(
                    f"model {self.model!r} was restored meanwhile; pull and push again"
                )
            if not ready:
                self.mark_broken(f"never received the update before version {decision.version}")
                self._check_sound()
            if self.version >= decision.version:
                # Applied already (another member of its round, or a replayed push id): what
                # is still staged under its ids is not needed any more.
                for member in decision.members:
                    self._unstage(member)
                self._release(decision.members)
                refused = self._refused.get(decision.version)
                if refused is not None:
                    raise refused
                return self.version
            members = [self._unstage(m) for m in decision.members]
            refused = None
            try:
                present = [m for m in members if m is not None]
                if len(present) != len(members):
                    raise RuntimeError(f"a push of version {decision.version} is not here")
                # Weight 0: skipped by the gradient policy; none left: only the version moves.
                used = [(m, w) for m, w in zip(present, decision.weights, strict=True) if w != 0]
                timer = self.update_timer if used else None
                started = timer.begin(self.device) if timer is not None else None
                if used:
                    check = verdict if decision.verify else None
                    refused = step_groups(
                        self._groups, used, decision, self._pool_for_sums(), check
                    )
                if timer is not None:
                    timer.end(started)  # never raises
            except Exception as exc:  # the peers applied this update: this shard cannot follow
                self.mark_broken(f"update {decision.version} failed here: {exc!r}")
                self._check_sound()
            finally:
                self._release(decision.members)
            self.version += 1
            self._cv.notify_all()
            if refused is not None:  # for the round's other members too
                self._refused[decision.version] = refused
                while len(self._refused) > MAX_REFUSED:
                    del self._refused[next(iter(self._refused))]
                raise refused
            return self.version

    def _pool_for_sums(self) -> BufferPool | None:
        """Where a sync round's weighted sum goes: pooled buffers on the CPU."""
        return self.buffers if self.device.type == "cpu" else None

    @contextlib.contextmanager
    def _at(self, at_version: int | None) -> Iterator[None]:
        """Hold the lock at model version `at_version` (a control change's boundary): wait for
        the updates before it; none after it can be decided until the change is done."""
        with self._cv:
            self._check_sound()
            if at_version is not None:
                if not self._cv.wait_for(lambda: self.version >= at_version, APPLY_TIMEOUT_S):
                    self.mark_broken(f"never reached version {at_version} for a control change")
                    self._check_sound()
                if self.version != at_version:  # it applied updates its peers had not
                    self.mark_broken(f"passed version {at_version} before a control change")
                    self._check_sound()
            yield

    def set_optimizer(
        self, configs: Mapping[str, RuleConfig], policy: Policy, at_version: int | None = None
    ) -> dict[str, MigrationReport]:
        """Swap every group's rule (state moved by `policy`); return the per-group reports."""
        if set(configs) != set(self._groups):
            raise InvalidArgument(f"need a config for each group {sorted(self._groups)}")
        for name, engine in list(self._groups.items()):  # compile before taking the lock
            engine.warm(configs[name])
        with self._at(at_version):
            return {
                name: self._groups[name].set_optimizer(configs[name], policy)
                for name in self._groups
            }

    def set_schedule(self, schedule: Any, at_version: int | None = None) -> None:
        config = parse_schedule_config(schedule)
        with self._at(at_version):
            self._schedule_config = config
            self._schedule = build_schedule(config)

    def report_metric(self, name: str, value: float) -> bool:
        """Feed a reported metric to the model's schedule (on its leader: the updates it decides
        from now on use what the schedule says); True if it changed a group's lr (a plateau
        reduction smaller than the schedule's eps changes none)."""
        with self._schedule_lock:
            base_lrs = [self.config(group).lr for group in self._plans]
            return self._schedule.observe(name, value, base_lrs)

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        groups = state["groups"]
        if set(groups) != set(self._groups):
            raise InvalidArgument(
                f"state has groups {sorted(groups)}; this shard has {sorted(self._groups)}"
            )
        for name, g in groups.items():
            if g["weights"].numel() != self._groups[name].weights.numel():
                raise InvalidArgument(f"state for group {name!r} has the wrong length")
        schedule_config = parse_schedule_config(state["schedule"])
        with self._lock:
            for name, g in groups.items():
                engine = self._groups[name]
                engine.weights.copy_(g["weights"].reshape(-1))
                engine.load_state_dict(g)
            self._schedule_config = schedule_config
            self._schedule = build_schedule(schedule_config)
            self._schedule.load_state_dict(state.get("schedule_state", {}))
            self.version = int(state["version"])
            self._epoch += 1
            self._clear_staged()
            self.broken = None  # a restore makes every shard consistent again
            self._cv.notify_all()
