"""The Shard gRPC service: push, pull and load of one shard's slice. Decodes and encodes.

A push's frames go to the shard's pipeline (server/shard/pipeline.py: stage → decide → apply);
this module supplies the pipeline's remote leader (`RemoteLeader`: the Sequence RPC of the
model's leader shard) and serves `Sequence` to the other shards when it is the leader.
"""

from __future__ import annotations

import hmac
import logging
from collections.abc import Callable, Iterator
from typing import Any

import grpc
import torch

from optserve.common.codec import TensorAssembler, expect_all, torch_dtype
from optserve.common.errors import (
    FailedPrecondition,
    InvalidArgument,
    NotFound,
    OptserveError,
    ResourceExhausted,
    Unauthenticated,
    error_for_status,
    kind_of,
)
from optserve.common.wire import RawChunk, chunk_frames, header_frame, parse_frame, passthrough
from optserve.server.edge.auth import current_client, current_principal
from optserve.server.edge.limits import Allowance, Hold, Refused
from optserve.server.edge.rpc import stream_errors, unary_errors
from optserve.server.metrics import ShardMetrics
from optserve.server.shard.memory import mapped_empty
from optserve.server.shard.pipeline import (
    SEQUENCE_WAIT_S,
    LocalLeader,
    PushCall,
    PushPipeline,
    trainer_identity,
)
from optserve.server.shard.sequencer import Decision, GradStats, Sequencer
from optserve.server.shard.snapshots import PullSnapshots
from optserve.server.shard.state import ShardState
from optserve.v1 import shard_pb2, shard_pb2_grpc, tensor_pb2

log = logging.getLogger(__name__)

SERVICE_NAME = "optserve.v1.Shard"
SECRET_METADATA = "x-optserve-shard-secret"
# Every refused Sequence call hears the same: nothing about the model, the shard or the key.
SEQUENCE_DENIED = "Sequence is only for a model's own shards"


def shard_key(model_secret: str, index: int) -> str:
    """Shard `index`'s own key for Sequence: HMAC-SHA256 of its index under the model's secret
    (which only the leader holds). A shard can speak for itself, never for another shard."""
    return hmac.new(model_secret.encode(), f"shard:{index}".encode(), "sha256").hexdigest()


def decision_to_proto(decision: Decision) -> shard_pb2.SequenceDecision:
    error = decision.error
    return shard_pb2.SequenceDecision(
        error=str(error) if error is not None else "",
        error_code=error.code.value[0] if error is not None else 0,
        error_kind=kind_of(error) if error is not None else "",
        version=decision.version,
        members=list(decision.members),
        weights=list(decision.weights),
        lr_scale=decision.lr_scale,
        staleness=decision.staleness,
        lrs=dict(decision.lrs),
        verify=decision.verify,
    )


def _status_code(value: int) -> grpc.StatusCode:
    return next((c for c in grpc.StatusCode if c.value[0] == value), grpc.StatusCode.UNKNOWN)


def decision_from_proto(reply: shard_pb2.SequenceDecision) -> Decision:
    error = None
    if reply.error:
        error = error_for_status(_status_code(reply.error_code), reply.error, reply.error_kind)
    return Decision(
        version=reply.version,
        members=tuple(reply.members),
        weights=tuple(reply.weights),
        lr_scale=reply.lr_scale,
        staleness=reply.staleness,
        error=error,
        lrs=dict(reply.lrs),
        verify=reply.verify,
    )


class RemoteLeader:
    """The model's leader as a non-leader shard asks it: its Sequence RPC."""

    remote = True

    def __init__(
        self, model: str, ask: Callable[[shard_pb2.SequenceRequest], shard_pb2.SequenceDecision]
    ) -> None:
        self.model = model
        self.ask = ask

    def _request(self, shard: int, push: PushCall, **fields: Any) -> shard_pb2.SequenceRequest:
        header = shard_pb2.PushHeader(
            model=self.model, push_id=push.push_id, version=push.based_on, trainer=push.trainer
        )
        return shard_pb2.SequenceRequest(
            model=self.model, push_id=push.push_id, shard=shard, header=header, **fields
        )

    def decide(self, shard: int, push: PushCall, stats: GradStats) -> Decision:
        request = self._request(shard, push, grad_sumsq=stats.sumsq, grad_nonfinite=stats.nonfinite)
        return decision_from_proto(self.ask(request))

    def verdict(self, shard: int, version: int, finite: bool) -> OptserveError | None:
        request = shard_pb2.SequenceRequest(
            model=self.model, shard=shard, verdict=True, verified_version=version, finite=finite
        )
        return decision_from_proto(self.ask(request)).error

    def refuse(self, shard: int, push: PushCall, error: OptserveError) -> None:
        self.ask(self._request(
            shard, push, refuse=str(error)[:1000], refuse_code=error.code.value[0],
            refuse_kind=kind_of(error),
        ))  # fmt: skip


def _identity(said: str) -> str:
    """Who the push this handler serves comes from (pipeline.trainer_identity): with auth on,
    its trainer token's name, and `said` (the push's trainer) only as a suffix after it."""
    principal = current_principal()
    if principal is None or principal.role == "admin":  # an admin may speak for anyone
        return trainer_identity(said, None)
    return trainer_identity(said, principal.name)


def _pull_dtype(wire_dtype: int) -> torch.dtype:
    """The dtype a pull asks its weights in (fp32 unless it says otherwise)."""
    return torch.float32 if wire_dtype == tensor_pb2.DTYPE_UNSPECIFIED else torch_dtype(wire_dtype)


class ShardService(shard_pb2_grpc.ShardServicer):
    """`sequencer` is set on the leader (shard 0); the others call `leader(request)` instead."""

    def __init__(
        self,
        state: ShardState,
        sequencer: Sequencer | None = None,
        leader: Callable[[shard_pb2.SequenceRequest], shard_pb2.SequenceDecision] | None = None,
        secret: str = "",
        metrics: ShardMetrics | None = None,
        staging: Allowance | None = None,
    ) -> None:
        self._state = state
        # Bytes of pushes each client has staged here (max_staged_bytes_per_client).
        self.staging = staging
        self.metrics = metrics or ShardMetrics(state.model, state.index)
        self.sequencer = sequencer
        # Stage, decide, apply (server/shard/pipeline.py); the leader decides every push.
        self.pipeline = PushPipeline(state, self.metrics)
        # What pulls read: one snapshot per version and dtype, shared while it is being sent.
        self.snapshots = PullSnapshots(state.buffers)
        if sequencer is not None:
            self.pipeline.leader = LocalLeader(sequencer)
        elif leader is not None:
            self.use_leader(leader)
        # The leader's: the model's secret, from which it checks each shard's own key (the
        # others hold only their key, sent with their Sequence calls).
        self.secret = secret

    def use_leader(
        self, ask: Callable[[shard_pb2.SequenceRequest], shard_pb2.SequenceDecision]
    ) -> None:
        """Ask the model's leader through `ask` (its Sequence RPC)."""
        self.pipeline.leader = RemoteLeader(self._state.model, ask)

    def _check_model(self, model: str) -> None:
        if model != self._state.model:
            raise NotFound(
                f"model {model!r} is not served by this shard (it serves {self._state.model!r}); "
                "ask the coordinator for the model's layout"
            )

    def _header(
        self, request_iterator: Iterator[Any], header_type: Any = shard_pb2.PushHeader
    ) -> Any:
        """The first message of a push or load stream (read by `parse_push_request` or
        `parse_load_request`): its header, for this shard's model."""
        header = next(request_iterator, None)
        if isinstance(header, OptserveError):
            raise header
        if not isinstance(header, header_type):
            kind = "push" if header_type is shard_pb2.PushHeader else "Load"
            raise InvalidArgument(f"a {kind} stream must start with a {header_type.__name__}")
        self._check_model(header.model)
        return header

    def _gradients(
        self, request_iterator: Iterator[Any], buffers: dict[str, torch.Tensor]
    ) -> dict[str, torch.Tensor]:
        """The rest of a push stream: RawChunks, assembled and checked (fp32 slices straight
        into `buffers`)."""
        expected = self._state.expected_gradients()
        assembler = TensorAssembler(expected, what="gradient", out=buffers)
        received = self.metrics.received_bytes
        for chunk in request_iterator:
            if isinstance(chunk, OptserveError):
                raise chunk
            if not isinstance(chunk, RawChunk):
                raise InvalidArgument("a push stream carries one PushHeader, then only chunks")
            received.inc(len(chunk.data))
            assembler.add(chunk)
        return assembler.finish()

    def _push(
        self, request_iterator: Iterator[Any], peer: str = ""
    ) -> tuple[Decision, int, torch.dtype]:
        """Run one push through the pipeline; also the dtype its pull half asks for."""
        header = self._header(request_iterator)
        pull_dtype = _pull_dtype(header.pull_dtype)  # a bad one is refused before any staging
        push = PushCall(
            header.push_id, header.version, _identity(header.trainer), peer, header.local_steps
        )
        held = Hold()

        def receive(buffers: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
            nonlocal held
            held = self._stage_allowance()  # refused here, the leader hears of it at once
            return self._gradients(request_iterator, buffers)

        try:
            decision, version = self.pipeline.push(push, receive)
        finally:
            held.release()  # decided (applied or refused) or discarded: nothing staged
        return decision, version, pull_dtype

    def _stage_allowance(self) -> Hold:
        """Charge the caller for the fp32 slice its push fills, or refuse the push."""
        client = current_client()
        if self.staging is None or client is None:
            return Hold()
        try:
            return self.staging.acquire(client, 4 * self._state.numel)
        except Refused as refused:
            raise ResourceExhausted(refused.message) from None

    @unary_errors
    def Push(
        self, request_iterator: Iterator[shard_pb2.PushRequest], context: grpc.ServicerContext
    ) -> shard_pb2.PushResponse:
        decision, version, _ = self._push(request_iterator, context.peer())
        return shard_pb2.PushResponse(version=decision.version, staleness=decision.staleness)

    @stream_errors
    def PushPull(
        self, request_iterator: Iterator[shard_pb2.PushRequest], context: grpc.ServicerContext
    ) -> Iterator[bytes]:
        _, _, dtype = self._push(request_iterator, context.peer())
        yield from self._weights(dtype)

    @stream_errors
    def Pull(
        self, request: shard_pb2.PullRequest, context: grpc.ServicerContext
    ) -> Iterator[bytes]:
        self._check_model(request.model)
        yield from self._weights(_pull_dtype(request.dtype))

    def _weights(self, dtype: torch.dtype) -> Iterator[bytes]:
        """The shard's weights as serialized PullResponse frames (a header, then chunks),
        framed lazily as the stream goes out from the version's one shared snapshot (taken by
        the first pull of the version, under the shard's lock: server/shard/snapshots.py)."""
        snapshot = self._state.pull_snapshot(self.snapshots, dtype)
        try:
            header = shard_pb2.PullHeader(version=snapshot.version)
            if self.sequencer is not None:  # the leader tells the model's settings
                lrs, header.settings_json = self._state.settings(snapshot.version)
                header.lrs.update(lrs)
            yield header_frame(header)
            for name, w in snapshot.tensors.items():
                yield from chunk_frames(name, w)
        finally:
            self.snapshots.release(snapshot)
        # Counted once the whole slice went out (a pull cancelled midway counts nothing).
        itemsize = torch.empty((), dtype=dtype).element_size()
        self.metrics.sent_bytes.inc(itemsize * self._state.numel)

    @unary_errors
    def Load(
        self, request_iterator: Iterator[Any], context: grpc.ServicerContext
    ) -> shard_pb2.LoadResponse:
        """A new model's initial values for this shard: received straight into the buffers
        that become its fp32 masters (no copy on a CPU shard)."""
        header = self._header(request_iterator, shard_pb2.LoadHeader)
        if self._state.ready:
            raise FailedPrecondition(
                f"shard {self._state.index} of model {header.model!r} already has its values"
            )
        lengths = self._state.lengths()
        out = {group: mapped_empty(n) for group, n in lengths.items()}
        assembler = TensorAssembler(
            expect_all((g, (n,), (torch.float32,)) for g, n in lengths.items()),
            what="initial value", out=out,
        )  # fmt: skip
        for chunk in request_iterator:
            if isinstance(chunk, OptserveError):
                raise chunk
            if not isinstance(chunk, RawChunk):
                raise InvalidArgument("a Load stream carries one LoadHeader, then only chunks")
            assembler.add(chunk)
        self._state.initialize(assembler.finish())
        return shard_pb2.LoadResponse(version=self._state.version)

    @unary_errors
    def Sequence(
        self, request: shard_pb2.SequenceRequest, context: grpc.ServicerContext
    ) -> shard_pb2.SequenceDecision:
        # The key first, before anything about the request is looked at or answered: a caller
        # without it learns nothing (not whether the model is here, nor which shard leads).
        said = dict(context.invocation_metadata()).get(SECRET_METADATA, "")
        said = said.decode(errors="replace") if isinstance(said, bytes) else str(said)
        if (
            self.sequencer is None
            or not self.secret
            or not said
            or not hmac.compare_digest(
                said.encode(), shard_key(self.secret, request.shard).encode()
            )
        ):
            raise Unauthenticated(SEQUENCE_DENIED)
        self._check_model(request.model)
        if request.verdict:
            refused = self.sequencer.verdict(
                request.verified_version, request.shard, request.finite
            )
            return decision_to_proto(Decision(error=refused))
        if request.refuse:
            code = _status_code(request.refuse_code)
            self.sequencer.refuse(
                request.push_id,
                request.shard,
                error_for_status(code, request.refuse, request.refuse_kind),
            )
        decision = self.sequencer.submit(
            request.push_id, request.shard, request.header.version, request.header.trainer,
            SEQUENCE_WAIT_S, GradStats(request.grad_sumsq, request.grad_nonfinite),
        )  # fmt: skip
        return decision_to_proto(decision)


def _frame_parser(header_type: Any, what: str) -> Callable[[bytes], Any]:
    """A deserializer of {header, chunk} messages: the header, or a RawChunk whose data is a
    view of the received bytes.

    A malformed message comes back as its InvalidArgument, raised by the handler: an exception
    in a deserializer would reach the client as INTERNAL instead."""

    def parse(data: bytes) -> Any:
        try:
            return parse_frame(data, header_type)
        except InvalidArgument as exc:
            return exc
        except Exception as exc:  # noqa: BLE001 - e.g. a header protobuf cannot parse
            return InvalidArgument(f"malformed {what} message: {exc}")

    return parse


parse_push_request = _frame_parser(shard_pb2.PushHeader, "push")
parse_load_request = _frame_parser(shard_pb2.LoadHeader, "load")


def add_shard_service(service: ShardService, server: grpc.Server) -> None:
    """Register the Shard service like `add_ShardServicer_to_server`, with the data plane's
    messages read and written as frames (common/wire.py): same bytes, far fewer copies."""
    handlers = {
        "Push": grpc.stream_unary_rpc_method_handler(
            service.Push,
            request_deserializer=parse_push_request,
            response_serializer=shard_pb2.PushResponse.SerializeToString,
        ),
        "Pull": grpc.unary_stream_rpc_method_handler(
            service.Pull,
            request_deserializer=shard_pb2.PullRequest.FromString,
            response_serializer=passthrough,
        ),
        "PushPull": grpc.stream_stream_rpc_method_handler(
            service.PushPull,
            request_deserializer=parse_push_request,
            response_serializer=passthrough,
        ),
        "Load": grpc.stream_unary_rpc_method_handler(
            service.Load,
            request_deserializer=parse_load_request,
            response_serializer=shard_pb2.LoadResponse.SerializeToString,
        ),
        "Sequence": grpc.unary_unary_rpc_method_handler(
            service.Sequence,
            request_deserializer=shard_pb2.SequenceRequest.FromString,
            response_serializer=shard_pb2.SequenceDecision.SerializeToString,
        ),
    }
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(SERVICE_NAME, handlers),))
