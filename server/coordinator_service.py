"""The Coordinator gRPC service (the front door): decodes requests into Coordinator calls."""

from __future__ import annotations

from collections.abc import Iterator

import grpc

from optserve.client.codec import TensorAssembler, expect_all, torch_dtype, wire_dtype
from optserve.client.config import parse_optimizer_config
from optserve.client.errors import InvalidArgument
from optserve.server.coordinator import Coordinator, ModelRecord, validate_params
from optserve.server.grpc_util import unary_errors
from optserve.v1 import coordinator_pb2, coordinator_pb2_grpc

SERVICE_NAME = "optserve.v1.Coordinator"


def model_info(record: ModelRecord, version: int) -> coordinator_pb2.ModelInfo:
    params = [
        coordinator_pb2.ParamSpec(name=p.name, dtype=wire_dtype(p.dtype), shape=list(p.shape))
        for g in record.groups
        for p in g.params
    ]
    groups = [
        coordinator_pb2.GroupInfo(name=g.name, params=[p.name for p in g.params])
        for g in record.groups
    ]
    shards = [
        coordinator_pb2.ShardInfo(
            index=s.index,
            address=s.address,
            ranges=[
                coordinator_pb2.GroupRange(group=g, start=a, end=b)
                for g, (a, b) in s.ranges.items()
            ],
        )
        for s in record.shards
    ]
    return coordinator_pb2.ModelInfo(
        name=record.name,
        params=params,
        groups=groups,
        shards=shards,
        version=version,
        optimizer_json=record.optimizer_json,
    )


class CoordinatorService(coordinator_pb2_grpc.CoordinatorServicer):
    def __init__(self, coordinator: Coordinator) -> None:
        self._coordinator = coordinator

    @unary_errors
    def CreateModel(
        self,
        request_iterator: Iterator[coordinator_pb2.CreateModelRequest],
        context: grpc.ServicerContext,
    ) -> coordinator_pb2.ModelInfo:
        first = next(request_iterator, None)
        if first is None or first.WhichOneof("payload") != "spec":
            raise InvalidArgument("a CreateModel stream must start with a ModelSpec")
        spec = first.spec
        params = [(p.name, tuple(p.shape), torch_dtype(p.dtype)) for p in spec.params]
        validate_params(spec.name, params, self._coordinator.limits)
        optimizer = parse_optimizer_config(spec.optimizer_json)
        self._coordinator.reserve(spec.name)
        try:
            assembler = TensorAssembler(
                expect_all((n, s, (d,)) for n, s, d in params), what="parameter"
            )
            for request in request_iterator:
                if request.WhichOneof("payload") != "chunk":
                    raise InvalidArgument("a CreateModel stream carries one ModelSpec, then chunks")
                assembler.add(request.chunk)
            initial = assembler.finish()
            record = self._coordinator.create_model(
                spec.name, params, initial, optimizer, spec.num_shards
            )
        finally:
            self._coordinator.release(spec.name)
        return model_info(record, 0)

    @unary_errors
    def DescribeModel(
        self, request: coordinator_pb2.DescribeModelRequest, context: grpc.ServicerContext
    ) -> coordinator_pb2.ModelInfo:
        record = self._coordinator.get(request.model)
        return model_info(record, self._coordinator.version(record))

    @unary_errors
    def ListModels(
        self, request: coordinator_pb2.ListModelsRequest, context: grpc.ServicerContext
    ) -> coordinator_pb2.ListModelsResponse:
        return coordinator_pb2.ListModelsResponse(models=self._coordinator.list_models())

    @unary_errors
    def DropModel(
        self, request: coordinator_pb2.DropModelRequest, context: grpc.ServicerContext
    ) -> coordinator_pb2.DropModelResponse:
        self._coordinator.drop_model(request.model)
        return coordinator_pb2.DropModelResponse()
