"""The data plane half of `ParameterServerClient`: pushing gradient slices to and pulling
weight slices from every shard in parallel (a model's layout and the shard stubs: _stubs.py)."""

from __future__ import annotations

import threading
import uuid
from collections.abc import Callable, Iterable, Iterator, Mapping
from concurrent.futures import ThreadPoolExecutor
from typing import TYPE_CHECKING, Any, TypeVar, cast

import grpc
import torch

from optserve.client._auth import ChannelSecurity
from optserve.client._stubs import CHANNEL_OPTIONS, DataPlane, ModelInfo, ModelSettings, call
from optserve.common.codec import (
    GRADIENT_WIRE_DTYPES,
    TensorAssembler,
    count_nonfinite,
    dtype_name,
    expect_all,
)
from optserve.common.codec import wire_dtype as to_wire_dtype
from optserve.common.errors import (
    DeadlineExceeded,
    InvalidArgument,
    ModelRestored,
    OptserveError,
    Unavailable,
    from_rpc_error,
)
from optserve.common.layout import (
    ShardSlice,
    flatten_group,
    unflatten_group,
)
from optserve.common.wire import chunk_frames, header_frame
from optserve.v1 import shard_pb2

T = TypeVar("T")
# Threads for calls to shards: every shard of a model is called at once, so this bounds
# shards x concurrent calls through one client (the coordinator allows up to 256 shards).
CLIENT_THREADS = 512


class Transfers:
    """Pushes and pulls, straight to and from every shard of a model. Mixed into
    `ParameterServerClient`, which holds the connections, the layouts and the buffers."""

    # What they use, set by ParameterServerClient (declared for the type checker).
    timeout_s: float
    chunk_bytes: int
    _security: ChannelSecurity
    _lock: threading.Lock
    _shard_channels: dict[str, tuple[grpc.Channel, DataPlane]]
    _versions: dict[str, int]
    _pool: ThreadPoolExecutor | None
    _metadata: tuple[tuple[str, str], ...]
    _buffers: dict[tuple[str, torch.dtype], dict[str, torch.Tensor]]
    _settings: dict[str, ModelSettings]
    _layouts: dict[str, ModelInfo]

    if TYPE_CHECKING:

        def _with_layout(self, model: str, fn: Callable[[ModelInfo], T]) -> T: ...

        def _layout(self, model: str) -> ModelInfo: ...

        def _forget_layout(self, model: str) -> None: ...

    def push(
        self,
        model: str,
        grads: Mapping[str, torch.Tensor],
        *,
        version: int | None = None,
        wire_dtype: torch.dtype = torch.float32,
        trainer: str = "",
        local_steps: int = 0,
    ) -> int:
        """Push one gradient per parameter; return the model version of the update it is in.

        `version` is the model version the gradient was computed on (default: the version this
        client last pulled). Gradients may travel as float16 or bfloat16 (`wire_dtype`); the
        server keeps fp32 masters. Every shard of the model applies the push, or none does:
        a refused push (invalid, stale beyond `max_staleness`: FailedPrecondition, a closed
        sync round: Aborted) changes nothing. In sync mode the call returns once the round
        that includes the push is applied. `trainer` names the pusher (one push per trainer
        per sync round). `local_steps`: under local SGD, the pusher's inner steps so far (shown
        in status; the gradient is then a pseudo-gradient).
        """
        return self._push(
            model, grads, version, wire_dtype, trainer, None, local_steps=local_steps
        )[1]

    def push_and_pull(
        self,
        model: str,
        grads: Mapping[str, torch.Tensor],
        *,
        version: int | None = None,
        wire_dtype: torch.dtype = torch.float32,
        pull_dtype: torch.dtype = torch.float32,
        trainer: str = "",
        reuse_buffers: bool = False,
        local_steps: int = 0,
    ) -> tuple[dict[str, torch.Tensor], int]:
        """Push, and get the weights after the update back in the same round trip.

        Returns (weights, version): the weights' version is the push's or a later one.
        `reuse_buffers`: as for `pull`; `local_steps`: as for `push`.
        """
        weights, version = self._push(
            model, grads, version, wire_dtype, trainer, pull_dtype, reuse_buffers, local_steps
        )
        assert weights is not None
        return weights, version

    def _push(
        self,
        model: str,
        grads: Mapping[str, torch.Tensor],
        version: int | None,
        wire_dtype: torch.dtype,
        trainer: str,
        pull_dtype: torch.dtype | None,
        reuse_buffers: bool = False,
        local_steps: int = 0,
    ) -> tuple[dict[str, torch.Tensor] | None, int]:
        if wire_dtype not in GRADIENT_WIRE_DTYPES:
            raise InvalidArgument(
                f"wire_dtype must be float32, float16 or bfloat16, got {dtype_name(wire_dtype)}"
            )

        tried: list[str] = []

        def push_all(info: ModelInfo) -> tuple[dict[str, torch.Tensor] | None, int]:
            if tried and info.name != tried[0]:  # the name was promoted to a fork meanwhile:
                raise ModelRestored(  # this gradient is of the other run's weights
                    f"{model!r} now names model {info.name!r} (a promoted fork); nothing was "
                    "applied: pull its weights and push again"
                )
            tried.append(info.name)
            self._check_gradients(info, grads)
            based_on = self._versions.get(model, info.version) if version is None else version
            flats = {g.name: flatten_group(g, grads, wire_dtype) for g in info.groups}
            # A sync push waits for its round: give it the round's time on top of ours.
            deadline = self.timeout_s + float(getattr(info.mode, "round_timeout_s", 0.0))
            header = shard_pb2.PushHeader(
                model=info.name,  # the model the name resolves to (a promoted fork's alias)
                version=based_on,
                trainer=trainer,
                push_id=uuid.uuid4().hex,
                pull_dtype=to_wire_dtype(pull_dtype or torch.float32),
                local_steps=local_steps,
            )

            def requests(shard: ShardSlice) -> Iterator[bytes]:
                # Ready-made PushRequest frames: the data is copied once (common/wire.py).
                yield header_frame(header)
                for group, (start, end) in shard.ranges.items():
                    yield from chunk_frames(group, flats[group][start:end], self.chunk_bytes)

            if pull_dtype is None:

                def push_one(shard: ShardSlice) -> int:
                    push = self._data_plane(shard.address).push
                    reply = call(push, requests(shard), timeout=deadline, metadata=self._metadata)
                    return reply.version

                return None, max(self._each_shard(info, push_one))

            flat_out = self._receive_buffers(info, pull_dtype) if reuse_buffers else None

            def push_pull_one(shard: ShardSlice) -> tuple[int, dict[str, torch.Tensor], Any]:
                stream = self._data_plane(shard.address).push_pull(
                    requests(shard), timeout=deadline, metadata=self._metadata
                )
                return self._receive_weights(shard, stream, pull_dtype, flat_out)

            return self._join_weights(info, self._each_shard(info, push_pull_one), flat_out)

        weights, new_version = self._with_layout(model, push_all)
        if weights is not None:
            with self._lock:
                self._versions[model] = new_version
        return weights, new_version

    def pull(
        self, model: str, *, wire_dtype: torch.dtype = torch.float32, reuse_buffers: bool = False
    ) -> tuple[dict[str, torch.Tensor], int]:
        """The model's current weights (each in its parameter's dtype) and their version.

        With `reuse_buffers`, the weights are received into buffers this client keeps per model
        and reuses on its next call with `reuse_buffers` (no fresh memory per step, which is
        costly for large models): the returned tensors are then views of those buffers, valid
        until that next call; copy what you keep (RemoteOptimizer copies into the parameters).
        """

        def pull_all(info: ModelInfo) -> tuple[dict[str, torch.Tensor], int]:
            request = shard_pb2.PullRequest(model=info.name, dtype=to_wire_dtype(wire_dtype))
            flat_out = self._receive_buffers(info, wire_dtype) if reuse_buffers else None

            def pull_one(shard: ShardSlice) -> tuple[int, dict[str, torch.Tensor], Any]:
                stream = self._data_plane(shard.address).pull(
                    request, timeout=self.timeout_s, metadata=self._metadata
                )
                return self._receive_weights(shard, stream, wire_dtype, flat_out)

            return self._join_weights(info, self._each_shard(info, pull_one), flat_out)

        weights, version = self._with_layout(model, pull_all)
        with self._lock:
            self._versions[model] = version
        return weights, version

    def settings(self, model: str) -> ModelSettings | None:
        """The model's settings as its leader sent them with this client's last pull (or push
        and pull) of it: each group's lr for the next update, each group's optimizer config and
        the schedule. None before the first pull, or from a server that does not send them."""
        with self._lock:
            info = self._layouts.get(model)  # a promoted fork's alias: the fork's
            return self._settings.get(info.name if info is not None else model)

    def _receive_buffers(self, info: ModelInfo, dtype: torch.dtype) -> dict[str, torch.Tensor]:
        """One flat receive buffer per group for this model and wire dtype, kept and reused."""
        key = (info.name, dtype)
        with self._lock:
            buffers = self._buffers.get(key)
            if buffers is None or {g: b.numel() for g, b in buffers.items()} != {
                g.name: g.numel for g in info.groups
            }:
                buffers = {g.name: torch.empty(g.numel, dtype=dtype) for g in info.groups}
                self._buffers[key] = buffers
            return buffers

    @staticmethod
    def _receive_weights(
        shard: ShardSlice,
        stream: Iterable[shard_pb2.PullResponse],
        wire_dtype: torch.dtype,
        flat_out: Mapping[str, torch.Tensor] | None = None,
    ) -> tuple[int, dict[str, torch.Tensor], ModelSettings | None]:
        """One shard's weight slices, its version, and the model's settings if it is the
        leader (which sends them in its header)."""
        expected = expect_all(
            (g, (end - start,), (wire_dtype,)) for g, (start, end) in shard.ranges.items()
        )
        out = None
        if flat_out is not None:  # each shard's slices land in place in the group buffers
            out = {g: flat_out[g][start:end] for g, (start, end) in shard.ranges.items()}
        assembler = TensorAssembler(expected, what="weights", out=out)
        version = None
        settings = None
        try:
            # Read by parse_pull_response: PullHeaders, RawChunks, or the error in a frame.
            for reply in cast(Iterator[Any], stream):
                if isinstance(reply, OptserveError):
                    raise reply
                if isinstance(reply, shard_pb2.PullHeader):
                    version = reply.version
                    if reply.settings_json:
                        settings = ModelSettings.from_header(reply)
                else:
                    assembler.add(reply)
        except grpc.RpcError as exc:
            raise from_rpc_error(exc) from None
        if version is None:
            raise OptserveError(f"shard {shard.index} sent no version header")
        return version, assembler.finish(), settings

    def _join_weights(
        self,
        info: ModelInfo,
        results: list[tuple[int, dict[str, torch.Tensor], ModelSettings | None]],
        flat_out: Mapping[str, torch.Tensor] | None = None,
    ) -> tuple[dict[str, torch.Tensor], int]:
        """Per-parameter weights from every shard's slices; the version is the lowest seen.
        The settings the leader sent are kept (`settings`)."""
        told = [s for _, _, s in results if s is not None]
        if told:
            with self._lock:
                self._settings[info.name] = told[0]
        weights: dict[str, torch.Tensor] = {}
        for group in info.groups:
            pieces = [parts[group.name] for _, parts, _ in results if parts[group.name].numel()]
            buffer = flat_out[group.name] if flat_out is not None else None
            if buffer is not None and all(
                p.untyped_storage().data_ptr() == buffer.untyped_storage().data_ptr()
                for p in pieces
            ):
                flat = buffer  # the slices were written in place
            elif len(pieces) == 1:
                flat = pieces[0]
            else:
                flat = torch.cat(pieces) if pieces else torch.empty(0)
            views = unflatten_group(group, flat)
            for slot in group.params:
                weights[slot.name] = views[slot.name].to(slot.dtype)
        return weights, min(v for v, _, _ in results)

    @staticmethod
    def _check_gradients(info: ModelInfo, grads: Mapping[str, torch.Tensor]) -> None:
        if not isinstance(grads, Mapping):
            raise InvalidArgument(
                f"gradients must map parameter names to tensors, got {type(grads).__name__}"
            )
        names = {p.name for p in info.params}
        policy = getattr(info.mode, "gradients", None)
        rejects_nonfinite = policy is None or policy.nonfinite == "reject"
        unknown = sorted(set(grads) - names)
        if unknown:
            raise InvalidArgument(f"model {info.name!r} has no parameter(s) {unknown}")
        for slot in info.params:
            grad = grads.get(slot.name)
            if grad is None:
                raise InvalidArgument(f"missing gradient for parameter {slot.name!r}")
            if tuple(grad.shape) != slot.shape:
                raise InvalidArgument(
                    f"gradient for {slot.name!r} has shape {list(grad.shape)}; "
                    f"the parameter has shape {list(slot.shape)}"
                )
            if grad.dtype != slot.dtype:
                raise InvalidArgument(
                    f"gradient for {slot.name!r} has dtype {dtype_name(grad.dtype)}; "
                    f"the parameter has dtype {dtype_name(slot.dtype)}"
                )
            # Refused here, before any bytes move, when the server would refuse it anyway.
            if rejects_nonfinite and count_nonfinite(grad):
                raise InvalidArgument(f"gradient for {slot.name!r} contains NaN or Inf")

    def _data_plane(self, address: str) -> DataPlane:
        """The shard's Push, PushPull and Pull calls, speaking frames (common/wire.py)."""
        with self._lock:
            entry = self._shard_channels.get(address)
            if entry is None:
                channel = self._security.channel(address, CHANNEL_OPTIONS)
                entry = (channel, DataPlane.open(channel))
                self._shard_channels[address] = entry
            return entry[1]

    def _each_shard(self, info: ModelInfo, fn: Callable[[ShardSlice], T]) -> list[T]:
        """Run `fn` on every shard at once; results in shard order.

        All shards' calls must be in flight together (a push is decided only once every shard
        holds its slice), hence a thread per shard call. If calls fail, the error raised is
        the most telling one: a shard's own refusal rather than the others' timeouts."""
        if len(info.shards) == 1:
            return [fn(info.shards[0])]
        with self._lock:
            if self._pool is None:
                self._pool = ThreadPoolExecutor(
                    max_workers=CLIENT_THREADS, thread_name_prefix="optserve-client"
                )
            pool = self._pool
        futures = [pool.submit(fn, shard) for shard in info.shards]
        errors = [f.exception() for f in futures]
        failed = [e for e in errors if e is not None]
        if failed:
            vague = (Unavailable, DeadlineExceeded)
            telling = [e for e in failed if not isinstance(e, vague)]
            raise (telling or failed)[0]
        return [f.result() for f in futures]
