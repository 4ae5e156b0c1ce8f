"""The Shard gRPC service: push and pull of one shard's slice. Decodes and encodes; no math.

A push is staged here, ordered by the model's leader shard (server/shard/sequencer.py) and then
applied; every shard of the model gets the same decision, so they apply the same updates in the
same order. The leader serves `Sequence` to the other shards of its model.
"""

from __future__ import annotations

import hmac
import logging
import time
import uuid
from collections.abc import Callable, Iterator
from typing import Any

import grpc
import torch

from optserve.common.codec import TensorAssembler, expect_all, torch_dtype
from optserve.common.errors import (
    Aborted,
    DeadlineExceeded,
    FailedPrecondition,
    InvalidArgument,
    NotFound,
    OptserveError,
    PermissionDenied,
    Unauthenticated,
    Unavailable,
    error_for_status,
    kind_of,
)
from optserve.common.wire import RawChunk, chunk_frames, header_frame, parse_frame, passthrough
from optserve.server.edge.rpc import stream_errors, unary_errors
from optserve.server.metrics import ShardMetrics
from optserve.server.shard.memory import mapped_empty
from optserve.server.shard.sequencer import Decision, GradStats, Sequencer
from optserve.server.shard.state import ShardState
from optserve.v1 import shard_pb2, shard_pb2_grpc, tensor_pb2

log = logging.getLogger(__name__)

SERVICE_NAME = "optserve.v1.Shard"
# The longest a push may wait for its decision: a sync round, or the other shards' slices.
SEQUENCE_WAIT_S = 24 * 3600.0
# Tries of a non-leader shard to get its decision when the leader is briefly unreachable.
SEQUENCE_ATTEMPTS = 6
SECRET_METADATA = "x-optserve-shard-secret"


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
    )


class ShardService(shard_pb2_grpc.ShardServicer):
    """`sequencer` is set on the leader (shard 0); the others call `leader(request)` instead."""

    def __init__(
        self,
        state: ShardState,
        sequencer: Sequencer | None = None,
        leader: Callable[[shard_pb2.SequenceRequest], shard_pb2.SequenceDecision] | None = None,
        secret: str = "",
        metrics: ShardMetrics | None = None,
    ) -> None:
        self._state = state
        self.metrics = metrics or ShardMetrics(state.model, state.index)
        self.sequencer = sequencer
        self.leader = leader
        # Shared by a model's shards (from the coordinator): only they may call Sequence.
        self.secret = secret

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
    ) -> tuple[Decision, int, shard_pb2.PushHeader]:
        header = self._header(request_iterator)
        self.metrics.arrived(header.trainer, peer, header.version)  # the leader's: trainers
        push_id = header.push_id
        if not push_id:
            if self.sequencer is None or self.sequencer.num_shards != 1:
                raise InvalidArgument("a push to a model with several shards needs a push_id")
            push_id = uuid.uuid4().hex
        try:
            if header.pull_dtype != tensor_pb2.DTYPE_UNSPECIFIED:
                torch_dtype(header.pull_dtype)  # refused now, not after the update
            buffers = self._state.buffers.take()
            try:
                grads = self._gradients(request_iterator, buffers)
            except BaseException:
                self._state.buffers.give(buffers)
                raise
            epoch, stats = self._state.stage(push_id, grads, buffers)
        except OptserveError as exc:  # refuse the push on every shard now, not at a timeout
            self.metrics.decided(header.trainer, peer, 0, applied=False)
            self._refuse(push_id, header, exc)
            raise
        except Exception:  # the stream broke off (the trainer went away): the same, at once
            self._refuse(push_id, header, Aborted("the push stream broke off before its end"))
            raise
        staged_at = time.perf_counter()
        try:
            decision = self._sequence(push_id, header, stats)
        except OptserveError as exc:
            if self.sequencer is not None or not isinstance(exc, Unavailable | DeadlineExceeded):
                self._state.discard(push_id)  # refused before any decision: nothing applied
                self.metrics.decided(header.trainer, peer, 0, applied=False)
                raise
            # The leader may have decided this push and the other shards applied it.
            self._state.mark_broken(f"lost the leader's decision on push {push_id}: {exc}")
            raise Unavailable(
                f"shard {self._state.index} lost its leader ({exc}); the server brings the "
                "model back from its newest checkpoint: pull, then go on"
            ) from None
        self.metrics.round_wait_seconds.observe(time.perf_counter() - staged_at)
        applied = decision.error is None
        self.metrics.decided(header.trainer, peer, decision.staleness, applied)
        if not applied:
            self._state.discard(push_id)
            raise decision.error
        version = self._state.apply(decision, epoch=epoch)  # a failure marks the shard broken
        return decision, version, header

    def _sequence(self, push_id: str, header: shard_pb2.PushHeader, stats: GradStats) -> Decision:
        if self.sequencer is not None:
            return self.sequencer.submit(
                push_id, self._state.index, header.version, header.trainer, SEQUENCE_WAIT_S, stats
            )
        if self.leader is None:
            raise Unavailable("this shard does not know its model's leader yet")
        request = shard_pb2.SequenceRequest(
            model=header.model, push_id=push_id, shard=self._state.index, header=header,
            grad_sumsq=stats.sumsq, grad_nonfinite=stats.nonfinite,
        )  # fmt: skip
        # Asking again is safe: the leader answers a repeated question with the same decision.
        for attempt in range(SEQUENCE_ATTEMPTS):
            try:
                return decision_from_proto(self.leader(request))
            except (Unavailable, DeadlineExceeded):
                if attempt == SEQUENCE_ATTEMPTS - 1:
                    raise
                time.sleep(min(0.2 * 2**attempt, 5.0))
        raise AssertionError("unreachable")

    def _refuse(self, push_id: str, header: shard_pb2.PushHeader, error: OptserveError) -> None:
        """Best effort: tell the leader this shard refused its slice of the push."""
        try:
            if self.sequencer is not None:
                self.sequencer.refuse(push_id, self._state.index, error)
            elif self.leader is not None:
                self.leader(shard_pb2.SequenceRequest(
                    model=header.model, push_id=push_id, shard=self._state.index, header=header,
                    refuse=str(error)[:1000], refuse_code=error.code.value[0],
                    refuse_kind=kind_of(error),
                ))  # fmt: skip
        except Exception:  # noqa: BLE001 - the push then times out on the other shards
            log.warning("could not tell the leader that push %s was refused", push_id)

    @unary_errors
    def Push(
        self, request_iterator: Iterator[shard_pb2.PushRequest], context: grpc.ServicerContext
    ) -> shard_pb2.PushResponse:
        decision, version, _ = self._push(request_iterator, context.peer())
        return shard_pb2.PushResponse(version=decision.version, staleness=decision.staleness)

    @stream_errors
    def PushPull(
        self, request_iterator: Iterator[shard_pb2.PushRequest], context: grpc.ServicerContext
    ) -> Iterator[shard_pb2.PullResponse]:
        _, _, header = self._push(request_iterator, context.peer())
        yield from self._weights(header.pull_dtype)

    @stream_errors
    def Pull(
        self, request: shard_pb2.PullRequest, context: grpc.ServicerContext
    ) -> Iterator[shard_pb2.PullResponse]:
        self._check_model(request.model)
        yield from self._weights(request.dtype)

    def _weights(self, wire_dtype: int) -> Iterator[shard_pb2.PullResponse]:
        dtype = (
            torch.float32 if wire_dtype == tensor_pb2.DTYPE_UNSPECIFIED else torch_dtype(wire_dtype)
        )
        # fp32: a snapshot into a pooled buffer (a quick copy under the shard's lock into
        # memory reused pull after pull), then framed lazily as the stream goes out.
        pool = self._state.buffers if dtype == torch.float32 else None

        def read(version: int, weights: dict[str, torch.Tensor]):
            if pool is None:
                return version, {n: w.to("cpu", dtype, copy=True) for n, w in weights.items()}
            copies = pool.take()
            for name, w in weights.items():
                copies[name].copy_(w)
            return version, copies

        version, copies = self._state.read_weights(read)
        try:
            yield header_frame(shard_pb2.PullHeader(version=version))
            for name, w in copies.items():
                yield from chunk_frames(name, w)
        finally:
            if pool is not None:
                pool.give(copies)
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
        self._check_model(request.model)
        said = dict(context.invocation_metadata()).get(SECRET_METADATA, "")
        if not said:
            raise Unauthenticated("Sequence is for the model's own shards: no shard secret sent")
        if not self.secret or not hmac.compare_digest(str(said), self.secret):
            raise PermissionDenied("Sequence is for the model's own shards")
        if self.sequencer is None:
            raise InvalidArgument(f"shard {self._state.index} is not its model's leader")
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
