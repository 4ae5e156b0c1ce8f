"""The Shard gRPC service: push and pull of one shard's slice. Decodes and encodes; no math."""

from __future__ import annotations

from collections.abc import Iterator

import grpc
import torch

from optserve.client.codec import TensorAssembler, encode_tensor, torch_dtype
from optserve.client.errors import InvalidArgument, NotFound
from optserve.server.grpc_util import stream_errors, unary_errors
from optserve.server.shard import ShardState
from optserve.v1 import shard_pb2, shard_pb2_grpc, tensor_pb2

SERVICE_NAME = "optserve.v1.Shard"


class ShardService(shard_pb2_grpc.ShardServicer):
    def __init__(self, state: ShardState) -> None:
        self._state = state

    def _check_model(self, model: str) -> None:
        if model != self._state.model:
            raise NotFound(
                f"model {model!r} is not served by this shard (it serves {self._state.model!r}); "
                "ask the coordinator for the model's layout"
            )

    @unary_errors
    def Push(
        self, request_iterator: Iterator[shard_pb2.PushRequest], context: grpc.ServicerContext
    ) -> shard_pb2.PushResponse:
        first = next(request_iterator, None)
        if first is None or first.WhichOneof("payload") != "header":
            raise InvalidArgument("a push stream must start with a PushHeader")
        header = first.header
        self._check_model(header.model)
        assembler = TensorAssembler(self._state.expected_gradients(), what="gradient")
        for request in request_iterator:
            if request.WhichOneof("payload") != "chunk":
                raise InvalidArgument("a push stream carries one PushHeader, then only chunks")
            assembler.add(request.chunk)
        grads = assembler.finish()
        version, staleness = self._state.apply_push(grads, header.version)
        return shard_pb2.PushResponse(version=version, staleness=staleness)

    @stream_errors
    def Pull(
        self, request: shard_pb2.PullRequest, context: grpc.ServicerContext
    ) -> Iterator[shard_pb2.PullResponse]:
        self._check_model(request.model)
        dtype = (
            torch.float32
            if request.dtype == tensor_pb2.DTYPE_UNSPECIFIED
            else torch_dtype(request.dtype)
        )
        version, weights = self._state.snapshot()
        yield shard_pb2.PullResponse(header=shard_pb2.PullHeader(version=version))
        for name, flat in weights.items():
            for chunk in encode_tensor(name, flat.to(dtype)):
                yield shard_pb2.PullResponse(chunk=chunk)
