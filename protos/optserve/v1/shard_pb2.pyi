from optserve.v1 import tensor_pb2 as _tensor_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class PushHeader(_message.Message):
    __slots__ = ("model", "version", "trainer", "push_id", "pull_dtype", "local_steps")
    MODEL_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    TRAINER_FIELD_NUMBER: _ClassVar[int]
    PUSH_ID_FIELD_NUMBER: _ClassVar[int]
    PULL_DTYPE_FIELD_NUMBER: _ClassVar[int]
    LOCAL_STEPS_FIELD_NUMBER: _ClassVar[int]
    model: str
    version: int
    trainer: str
    push_id: str
    pull_dtype: _tensor_pb2.DType
    local_steps: int
    def __init__(self, model: _Optional[str] = ..., version: _Optional[int] = ..., trainer: _Optional[str] = ..., push_id: _Optional[str] = ..., pull_dtype: _Optional[_Union[_tensor_pb2.DType, str]] = ..., local_steps: _Optional[int] = ...) -> None: ...

class PushRequest(_message.Message):
    __slots__ = ("header", "chunk")
    HEADER_FIELD_NUMBER: _ClassVar[int]
    CHUNK_FIELD_NUMBER: _ClassVar[int]
    header: PushHeader
    chunk: _tensor_pb2.TensorChunk
    def __init__(self, header: _Optional[_Union[PushHeader, _Mapping]] = ..., chunk: _Optional[_Union[_tensor_pb2.TensorChunk, _Mapping]] = ...) -> None: ...

class PushResponse(_message.Message):
    __slots__ = ("version", "staleness")
    VERSION_FIELD_NUMBER: _ClassVar[int]
    STALENESS_FIELD_NUMBER: _ClassVar[int]
    version: int
    staleness: int
    def __init__(self, version: _Optional[int] = ..., staleness: _Optional[int] = ...) -> None: ...

class PullRequest(_message.Message):
    __slots__ = ("model", "dtype")
    MODEL_FIELD_NUMBER: _ClassVar[int]
    DTYPE_FIELD_NUMBER: _ClassVar[int]
    model: str
    dtype: _tensor_pb2.DType
    def __init__(self, model: _Optional[str] = ..., dtype: _Optional[_Union[_tensor_pb2.DType, str]] = ...) -> None: ...

class PullHeader(_message.Message):
    __slots__ = ("version", "lrs", "settings_json")
    class LrsEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: float
        def __init__(self, key: _Optional[str] = ..., value: _Optional[float] = ...) -> None: ...
    VERSION_FIELD_NUMBER: _ClassVar[int]
    LRS_FIELD_NUMBER: _ClassVar[int]
    SETTINGS_JSON_FIELD_NUMBER: _ClassVar[int]
    version: int
    lrs: _containers.ScalarMap[str, float]
    settings_json: str
    def __init__(self, version: _Optional[int] = ..., lrs: _Optional[_Mapping[str, float]] = ..., settings_json: _Optional[str] = ...) -> None: ...

class PullResponse(_message.Message):
    __slots__ = ("header", "chunk")
    HEADER_FIELD_NUMBER: _ClassVar[int]
    CHUNK_FIELD_NUMBER: _ClassVar[int]
    header: PullHeader
    chunk: _tensor_pb2.TensorChunk
    def __init__(self, header: _Optional[_Union[PullHeader, _Mapping]] = ..., chunk: _Optional[_Union[_tensor_pb2.TensorChunk, _Mapping]] = ...) -> None: ...

class LoadHeader(_message.Message):
    __slots__ = ("model",)
    MODEL_FIELD_NUMBER: _ClassVar[int]
    model: str
    def __init__(self, model: _Optional[str] = ...) -> None: ...

class LoadRequest(_message.Message):
    __slots__ = ("header", "chunk")
    HEADER_FIELD_NUMBER: _ClassVar[int]
    CHUNK_FIELD_NUMBER: _ClassVar[int]
    header: LoadHeader
    chunk: _tensor_pb2.TensorChunk
    def __init__(self, header: _Optional[_Union[LoadHeader, _Mapping]] = ..., chunk: _Optional[_Union[_tensor_pb2.TensorChunk, _Mapping]] = ...) -> None: ...

class LoadResponse(_message.Message):
    __slots__ = ("version",)
    VERSION_FIELD_NUMBER: _ClassVar[int]
    version: int
    def __init__(self, version: _Optional[int] = ...) -> None: ...

class SequenceRequest(_message.Message):
    __slots__ = ("model", "push_id", "shard", "header", "refuse", "refuse_code", "refuse_kind", "grad_sumsq", "grad_nonfinite", "verdict", "verified_version", "finite")
    MODEL_FIELD_NUMBER: _ClassVar[int]
    PUSH_ID_FIELD_NUMBER: _ClassVar[int]
    SHARD_FIELD_NUMBER: _ClassVar[int]
    HEADER_FIELD_NUMBER: _ClassVar[int]
    REFUSE_FIELD_NUMBER: _ClassVar[int]
    REFUSE_CODE_FIELD_NUMBER: _ClassVar[int]
    REFUSE_KIND_FIELD_NUMBER: _ClassVar[int]
    GRAD_SUMSQ_FIELD_NUMBER: _ClassVar[int]
    GRAD_NONFINITE_FIELD_NUMBER: _ClassVar[int]
    VERDICT_FIELD_NUMBER: _ClassVar[int]
    VERIFIED_VERSION_FIELD_NUMBER: _ClassVar[int]
    FINITE_FIELD_NUMBER: _ClassVar[int]
    model: str
    push_id: str
    shard: int
    header: PushHeader
    refuse: str
    refuse_code: int
    refuse_kind: str
    grad_sumsq: float
    grad_nonfinite: int
    verdict: bool
    verified_version: int
    finite: bool
    def __init__(self, model: _Optional[str] = ..., push_id: _Optional[str] = ..., shard: _Optional[int] = ..., header: _Optional[_Union[PushHeader, _Mapping]] = ..., refuse: _Optional[str] = ..., refuse_code: _Optional[int] = ..., refuse_kind: _Optional[str] = ..., grad_sumsq: _Optional[float] = ..., grad_nonfinite: _Optional[int] = ..., verdict: _Optional[bool] = ..., verified_version: _Optional[int] = ..., finite: _Optional[bool] = ...) -> None: ...

class SequenceDecision(_message.Message):
    __slots__ = ("error", "error_code", "error_kind", "lrs", "version", "members", "weights", "lr_scale", "staleness", "verify")
    class LrsEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: float
        def __init__(self, key: _Optional[str] = ..., value: _Optional[float] = ...) -> None: ...
    ERROR_FIELD_NUMBER: _ClassVar[int]
    ERROR_CODE_FIELD_NUMBER: _ClassVar[int]
    ERROR_KIND_FIELD_NUMBER: _ClassVar[int]
    LRS_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    MEMBERS_FIELD_NUMBER: _ClassVar[int]
    WEIGHTS_FIELD_NUMBER: _ClassVar[int]
    LR_SCALE_FIELD_NUMBER: _ClassVar[int]
    STALENESS_FIELD_NUMBER: _ClassVar[int]
    VERIFY_FIELD_NUMBER: _ClassVar[int]
    error: str
    error_code: int
    error_kind: str
    lrs: _containers.ScalarMap[str, float]
    version: int
    members: _containers.RepeatedScalarFieldContainer[str]
    weights: _containers.RepeatedScalarFieldContainer[float]
    lr_scale: float
    staleness: int
    verify: bool
    def __init__(self, error: _Optional[str] = ..., error_code: _Optional[int] = ..., error_kind: _Optional[str] = ..., lrs: _Optional[_Mapping[str, float]] = ..., version: _Optional[int] = ..., members: _Optional[_Iterable[str]] = ..., weights: _Optional[_Iterable[float]] = ..., lr_scale: _Optional[float] = ..., staleness: _Optional[int] = ..., verify: _Optional[bool] = ...) -> None: ...
