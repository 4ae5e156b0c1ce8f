"""The Shard gRPC service: push and pull of one shard's slice. Decodes and encodes; no math.

A push is staged here, ordered by the model's leader shard (server/sequencer.py) and then
applied; every shard of the model gets the same decision, so they apply the same updates in the
same order. The leader serves `Sequence` to the other shards of its model.
"""

from __future__ import annotations

import uuid
from collections.abc import Callable, Iterator
from typing import Any

import grpc
import torch

from optserve.client.codec import TensorAssembler, torch_dtype
from optserve.client.errors import InvalidArgument, NotFound, OptserveError, error_for_status
from optserve.client.wire import RawChunk, chunk_frames, header_frame, parse_frame, passthrough
from optserve.server.grpc_util import stream_errors, unary_errors
from optserve.server.sequencer import Decision, Sequencer
from optserve.server.shard import ShardState
from optserve.v1 import shard_pb2, shard_pb2_grpc, tensor_pb2

SERVICE_NAME = "optserve.v1.Shard"
# The longest a push may wait for its decision: a sync round, or the other shards' slices.
SEQUENCE_WAIT_S = 24 * 3600.0


def decision_to_proto(decision: Decision) -> shard_pb2.SequenceDecision:
    error = decision.error
    return shard_pb2.SequenceDecision(
        error=str(error) if error is not None else "",
        error_code=error.code.value[0] if error is not None else 0,
        version=decision.version,
        members=list(decision.members),
        weights=list(decision.weights),
        lr_scale=decision.lr_scale,
        staleness=decision.staleness,
    )


def decision_from_proto(reply: shard_pb2.SequenceDecision) -> Decision:
    error = None
    if reply.error:
        code = next((c for c in grpc.StatusCode if c.value[0] == reply.error_code), None)
        error = error_for_status(code or grpc.StatusCode.UNKNOWN, reply.error)
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
    ) -> None:
        self._state = state
        self.sequencer = sequencer
        self.leader = leader

    def _check_model(self, model: str) -> None:
        if model != self._state.model:
            raise NotFound(
                f"model {model!r} is not served by this shard (it serves {self._state.model!r}); "
                "ask the coordinator for the model's layout"
            )

    def _receive(self, request_iterator: Iterator[Any]):
        """A push stream, read by `parse_push_request`: a PushHeader, then RawChunks."""
        header = next(request_iterator, None)
        if isinstance(header, OptserveError):
            raise header
        if not isinstance(header, shard_pb2.PushHeader):
            raise InvalidArgument("a push stream must start with a PushHeader")
        self._check_model(header.model)
        assembler = TensorAssembler(self._state.expected_gradients(), what="gradient")
        for chunk in request_iterator:
            if isinstance(chunk, OptserveError):
                raise chunk
            if not isinstance(chunk, RawChunk):
                raise InvalidArgument("a push stream carries one PushHeader, then only chunks")
            assembler.add(chunk)
        return header, assembler.finish()

    def _push(
        self, request_iterator: Iterator[shard_pb2.PushRequest]
    ) -> tuple[Decision, int, shard_pb2.PushHeader]:
        header, grads = self._receive(request_iterator)
        push_id = header.push_id
        if not push_id:
            if self.sequencer is None or self.sequencer.num_shards != 1:
                raise InvalidArgument("a push to a model with several shards needs a push_id")
            push_id = uuid.uuid4().hex
        self._state.stage(push_id, grads)
        try:
            decision = self._sequence(push_id, header)
            if decision.error is not None:
                raise decision.error
            version = self._state.apply(decision)
        finally:
            self._state.discard(push_id)
        return decision, version, header

    def _sequence(self, push_id: str, header: shard_pb2.PushHeader) -> Decision:
        if self.sequencer is not None:
            return self.sequencer.submit(
                push_id, self._state.index, header.version, header.trainer, SEQUENCE_WAIT_S
            )
        if self.leader is None:
            raise OptserveError("this shard does not know its model's leader yet")
        request = shard_pb2.SequenceRequest(
            model=header.model, push_id=push_id, shard=self._state.index, header=header
        )
        return decision_from_proto(self.leader(request))

    @unary_errors
    def Push(
        self, request_iterator: Iterator[shard_pb2.PushRequest], context: grpc.ServicerContext
    ) -> shard_pb2.PushResponse:
        decision, version, _ = self._push(request_iterator)
        return shard_pb2.PushResponse(version=decision.version, staleness=decision.staleness)

    @stream_errors
    def PushPull(
        self, request_iterator: Iterator[shard_pb2.PushRequest], context: grpc.ServicerContext
    ) -> Iterator[shard_pb2.PullResponse]:
        _, _, header = self._push(request_iterator)
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

        def read(version: int, weights: dict[str, torch.Tensor]):
            if dtype == torch.float32 and all(w.device.type == "cpu" for w in weights.values()):
                # Writing the frames copies the bytes once: that copy is the snapshot.
                frames = [f for name, w in weights.items() for f in chunk_frames(name, w)]
                return version, frames
            return version, {name: w.to("cpu", dtype, copy=True) for name, w in weights.items()}

        version, body = self._state.read_weights(read)
        yield header_frame(shard_pb2.PullHeader(version=version))
        if isinstance(body, dict):
            body = (f for name, w in body.items() for f in chunk_frames(name, w))
        yield from body

    @unary_errors
    def Sequence(
        self, request: shard_pb2.SequenceRequest, context: grpc.ServicerContext
    ) -> shard_pb2.SequenceDecision:
        self._check_model(request.model)
        if self.sequencer is None:
            raise InvalidArgument(f"shard {self._state.index} is not its model's leader")
        decision = self.sequencer.submit(
            request.push_id, request.shard, request.header.version, request.header.trainer,
            SEQUENCE_WAIT_S,
        )  # fmt: skip
        return decision_to_proto(decision)


def parse_push_request(data: bytes) -> Any:
    """A PushRequest as a PushHeader or a RawChunk whose data is a view of `data`.

    A malformed message comes back as its InvalidArgument, raised by the handler: an exception
    in a deserializer would reach the client as INTERNAL instead."""
    try:
        return parse_frame(data, shard_pb2.PushHeader)
    except InvalidArgument as exc:
        return exc
    except Exception as exc:  # noqa: BLE001 - e.g. a header protobuf cannot parse
        return InvalidArgument(f"malformed push message: {exc}")


def add_shard_service(service: ShardService, server: grpc.Server) -> None:
    """Register the Shard service like `add_ShardServicer_to_server`, with the data plane's
    messages read and written as frames (client/wire.py): same bytes, far fewer copies."""
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
        "Sequence": grpc.unary_unary_rpc_method_handler(
            service.Sequence,
            request_deserializer=shard_pb2.SequenceRequest.FromString,
            response_serializer=shard_pb2.SequenceDecision.SerializeToString,
        ),
    }
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(SERVICE_NAME, handlers),))
