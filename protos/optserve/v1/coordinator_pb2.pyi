from optserve.v1 import tensor_pb2 as _tensor_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class ParamSpec(_message.Message):
    __slots__ = ("name", "dtype", "shape")
    NAME_FIELD_NUMBER: _ClassVar[int]
    DTYPE_FIELD_NUMBER: _ClassVar[int]
    SHAPE_FIELD_NUMBER: _ClassVar[int]
    name: str
    dtype: _tensor_pb2.DType
    shape: _containers.RepeatedScalarFieldContainer[int]
    def __init__(self, name: _Optional[str] = ..., dtype: _Optional[_Union[_tensor_pb2.DType, str]] = ..., shape: _Optional[_Iterable[int]] = ...) -> None: ...

class ModelSpec(_message.Message):
    __slots__ = ("name", "params", "optimizer_json", "num_shards", "groups", "schedule_json", "mode_json", "checkpoint_json")
    NAME_FIELD_NUMBER: _ClassVar[int]
    PARAMS_FIELD_NUMBER: _ClassVar[int]
    OPTIMIZER_JSON_FIELD_NUMBER: _ClassVar[int]
    NUM_SHARDS_FIELD_NUMBER: _ClassVar[int]
    GROUPS_FIELD_NUMBER: _ClassVar[int]
    SCHEDULE_JSON_FIELD_NUMBER: _ClassVar[int]
    MODE_JSON_FIELD_NUMBER: _ClassVar[int]
    CHECKPOINT_JSON_FIELD_NUMBER: _ClassVar[int]
    name: str
    params: _containers.RepeatedCompositeFieldContainer[ParamSpec]
    optimizer_json: str
    num_shards: int
    groups: _containers.RepeatedCompositeFieldContainer[ParamGroupSpec]
    schedule_json: str
    mode_json: str
    checkpoint_json: str
    def __init__(self, name: _Optional[str] = ..., params: _Optional[_Iterable[_Union[ParamSpec, _Mapping]]] = ..., optimizer_json: _Optional[str] = ..., num_shards: _Optional[int] = ..., groups: _Optional[_Iterable[_Union[ParamGroupSpec, _Mapping]]] = ..., schedule_json: _Optional[str] = ..., mode_json: _Optional[str] = ..., checkpoint_json: _Optional[str] = ...) -> None: ...

class ParamGroupSpec(_message.Message):
    __slots__ = ("name", "params", "overrides_json")
    NAME_FIELD_NUMBER: _ClassVar[int]
    PARAMS_FIELD_NUMBER: _ClassVar[int]
    OVERRIDES_JSON_FIELD_NUMBER: _ClassVar[int]
    name: str
    params: _containers.RepeatedScalarFieldContainer[str]
    overrides_json: str
    def __init__(self, name: _Optional[str] = ..., params: _Optional[_Iterable[str]] = ..., overrides_json: _Optional[str] = ...) -> None: ...

class CreateModelRequest(_message.Message):
    __slots__ = ("spec",)
    SPEC_FIELD_NUMBER: _ClassVar[int]
    spec: ModelSpec
    def __init__(self, spec: _Optional[_Union[ModelSpec, _Mapping]] = ...) -> None: ...

class DescribeModelRequest(_message.Message):
    __slots__ = ("model",)
    MODEL_FIELD_NUMBER: _ClassVar[int]
    model: str
    def __init__(self, model: _Optional[str] = ...) -> None: ...

class GroupRange(_message.Message):
    __slots__ = ("group", "start", "end")
    GROUP_FIELD_NUMBER: _ClassVar[int]
    START_FIELD_NUMBER: _ClassVar[int]
    END_FIELD_NUMBER: _ClassVar[int]
    group: str
    start: int
    end: int
    def __init__(self, group: _Optional[str] = ..., start: _Optional[int] = ..., end: _Optional[int] = ...) -> None: ...

class ShardInfo(_message.Message):
    __slots__ = ("index", "address", "ranges")
    INDEX_FIELD_NUMBER: _ClassVar[int]
    ADDRESS_FIELD_NUMBER: _ClassVar[int]
    RANGES_FIELD_NUMBER: _ClassVar[int]
    index: int
    address: str
    ranges: _containers.RepeatedCompositeFieldContainer[GroupRange]
    def __init__(self, index: _Optional[int] = ..., address: _Optional[str] = ..., ranges: _Optional[_Iterable[_Union[GroupRange, _Mapping]]] = ...) -> None: ...

class GroupInfo(_message.Message):
    __slots__ = ("name", "params", "overrides_json", "optimizer_json", "lr")
    NAME_FIELD_NUMBER: _ClassVar[int]
    PARAMS_FIELD_NUMBER: _ClassVar[int]
    OVERRIDES_JSON_FIELD_NUMBER: _ClassVar[int]
    OPTIMIZER_JSON_FIELD_NUMBER: _ClassVar[int]
    LR_FIELD_NUMBER: _ClassVar[int]
    name: str
    params: _containers.RepeatedScalarFieldContainer[str]
    overrides_json: str
    optimizer_json: str
    lr: float
    def __init__(self, name: _Optional[str] = ..., params: _Optional[_Iterable[str]] = ..., overrides_json: _Optional[str] = ..., optimizer_json: _Optional[str] = ..., lr: _Optional[float] = ...) -> None: ...

class ModelInfo(_message.Message):
    __slots__ = ("name", "params", "groups", "shards", "version", "optimizer_json", "schedule_json", "mode_json", "initializing", "forked_from", "fork_version", "fork_checkpoint", "aliases")
    NAME_FIELD_NUMBER: _ClassVar[int]
    PARAMS_FIELD_NUMBER: _ClassVar[int]
    GROUPS_FIELD_NUMBER: _ClassVar[int]
    SHARDS_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    OPTIMIZER_JSON_FIELD_NUMBER: _ClassVar[int]
    SCHEDULE_JSON_FIELD_NUMBER: _ClassVar[int]
    MODE_JSON_FIELD_NUMBER: _ClassVar[int]
    INITIALIZING_FIELD_NUMBER: _ClassVar[int]
    FORKED_FROM_FIELD_NUMBER: _ClassVar[int]
    FORK_VERSION_FIELD_NUMBER: _ClassVar[int]
    FORK_CHECKPOINT_FIELD_NUMBER: _ClassVar[int]
    ALIASES_FIELD_NUMBER: _ClassVar[int]
    name: str
    params: _containers.RepeatedCompositeFieldContainer[ParamSpec]
    groups: _containers.RepeatedCompositeFieldContainer[GroupInfo]
    shards: _containers.RepeatedCompositeFieldContainer[ShardInfo]
    version: int
    optimizer_json: str
    schedule_json: str
    mode_json: str
    initializing: bool
    forked_from: str
    fork_version: int
    fork_checkpoint: str
    aliases: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, name: _Optional[str] = ..., params: _Optional[_Iterable[_Union[ParamSpec, _Mapping]]] = ..., groups: _Optional[_Iterable[_Union[GroupInfo, _Mapping]]] = ..., shards: _Optional[_Iterable[_Union[ShardInfo, _Mapping]]] = ..., version: _Optional[int] = ..., optimizer_json: _Optional[str] = ..., schedule_json: _Optional[str] = ..., mode_json: _Optional[str] = ..., initializing: _Optional[bool] = ..., forked_from: _Optional[str] = ..., fork_version: _Optional[int] = ..., fork_checkpoint: _Optional[str] = ..., aliases: _Optional[_Iterable[str]] = ...) -> None: ...

class ListModelsRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class ListModelsResponse(_message.Message):
    __slots__ = ("models",)
    MODELS_FIELD_NUMBER: _ClassVar[int]
    models: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, models: _Optional[_Iterable[str]] = ...) -> None: ...

class DropModelRequest(_message.Message):
    __slots__ = ("model",)
    MODEL_FIELD_NUMBER: _ClassVar[int]
    model: str
    def __init__(self, model: _Optional[str] = ...) -> None: ...

class DropModelResponse(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class SetOptimizerRequest(_message.Message):
    __slots__ = ("model", "optimizer_json", "policy")
    MODEL_FIELD_NUMBER: _ClassVar[int]
    OPTIMIZER_JSON_FIELD_NUMBER: _ClassVar[int]
    POLICY_FIELD_NUMBER: _ClassVar[int]
    model: str
    optimizer_json: str
    policy: str
    def __init__(self, model: _Optional[str] = ..., optimizer_json: _Optional[str] = ..., policy: _Optional[str] = ...) -> None: ...

class SetOptimizerResponse(_message.Message):
    __slots__ = ("version", "report_json")
    VERSION_FIELD_NUMBER: _ClassVar[int]
    REPORT_JSON_FIELD_NUMBER: _ClassVar[int]
    version: int
    report_json: str
    def __init__(self, version: _Optional[int] = ..., report_json: _Optional[str] = ...) -> None: ...

class SetScheduleRequest(_message.Message):
    __slots__ = ("model", "schedule_json")
    MODEL_FIELD_NUMBER: _ClassVar[int]
    SCHEDULE_JSON_FIELD_NUMBER: _ClassVar[int]
    model: str
    schedule_json: str
    def __init__(self, model: _Optional[str] = ..., schedule_json: _Optional[str] = ...) -> None: ...

class SetScheduleResponse(_message.Message):
    __slots__ = ("version",)
    VERSION_FIELD_NUMBER: _ClassVar[int]
    version: int
    def __init__(self, version: _Optional[int] = ...) -> None: ...

class ReportMetricRequest(_message.Message):
    __slots__ = ("model", "name", "value", "step")
    MODEL_FIELD_NUMBER: _ClassVar[int]
    NAME_FIELD_NUMBER: _ClassVar[int]
    VALUE_FIELD_NUMBER: _ClassVar[int]
    STEP_FIELD_NUMBER: _ClassVar[int]
    model: str
    name: str
    value: float
    step: int
    def __init__(self, model: _Optional[str] = ..., name: _Optional[str] = ..., value: _Optional[float] = ..., step: _Optional[int] = ...) -> None: ...

class ReportMetricResponse(_message.Message):
    __slots__ = ("version", "lr_changed")
    VERSION_FIELD_NUMBER: _ClassVar[int]
    LR_CHANGED_FIELD_NUMBER: _ClassVar[int]
    version: int
    lr_changed: bool
    def __init__(self, version: _Optional[int] = ..., lr_changed: _Optional[bool] = ...) -> None: ...

class SetHyperparametersRequest(_message.Message):
    __slots__ = ("model", "changes_json", "group_changes_json", "policy")
    MODEL_FIELD_NUMBER: _ClassVar[int]
    CHANGES_JSON_FIELD_NUMBER: _ClassVar[int]
    GROUP_CHANGES_JSON_FIELD_NUMBER: _ClassVar[int]
    POLICY_FIELD_NUMBER: _ClassVar[int]
    model: str
    changes_json: str
    group_changes_json: str
    policy: str
    def __init__(self, model: _Optional[str] = ..., changes_json: _Optional[str] = ..., group_changes_json: _Optional[str] = ..., policy: _Optional[str] = ...) -> None: ...

class StatusRequest(_message.Message):
    __slots__ = ("model", "history")
    MODEL_FIELD_NUMBER: _ClassVar[int]
    HISTORY_FIELD_NUMBER: _ClassVar[int]
    model: str
    history: int
    def __init__(self, model: _Optional[str] = ..., history: _Optional[int] = ...) -> None: ...

class StatusResponse(_message.Message):
    __slots__ = ("status_json",)
    STATUS_JSON_FIELD_NUMBER: _ClassVar[int]
    status_json: str
    def __init__(self, status_json: _Optional[str] = ...) -> None: ...

class CheckpointRequest(_message.Message):
    __slots__ = ("model", "snapshot")
    MODEL_FIELD_NUMBER: _ClassVar[int]
    SNAPSHOT_FIELD_NUMBER: _ClassVar[int]
    model: str
    snapshot: str
    def __init__(self, model: _Optional[str] = ..., snapshot: _Optional[str] = ...) -> None: ...

class CheckpointResponse(_message.Message):
    __slots__ = ("name", "version", "uri", "bytes", "pause_s", "seconds")
    NAME_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    URI_FIELD_NUMBER: _ClassVar[int]
    BYTES_FIELD_NUMBER: _ClassVar[int]
    PAUSE_S_FIELD_NUMBER: _ClassVar[int]
    SECONDS_FIELD_NUMBER: _ClassVar[int]
    name: str
    version: int
    uri: str
    bytes: int
    pause_s: float
    seconds: float
    def __init__(self, name: _Optional[str] = ..., version: _Optional[int] = ..., uri: _Optional[str] = ..., bytes: _Optional[int] = ..., pause_s: _Optional[float] = ..., seconds: _Optional[float] = ...) -> None: ...

class ListCheckpointsRequest(_message.Message):
    __slots__ = ("model",)
    MODEL_FIELD_NUMBER: _ClassVar[int]
    model: str
    def __init__(self, model: _Optional[str] = ...) -> None: ...

class ListCheckpointsResponse(_message.Message):
    __slots__ = ("checkpoints_json",)
    CHECKPOINTS_JSON_FIELD_NUMBER: _ClassVar[int]
    checkpoints_json: str
    def __init__(self, checkpoints_json: _Optional[str] = ...) -> None: ...

class RestoreRequest(_message.Message):
    __slots__ = ("model", "checkpoint", "num_shards", "unless_current")
    MODEL_FIELD_NUMBER: _ClassVar[int]
    CHECKPOINT_FIELD_NUMBER: _ClassVar[int]
    NUM_SHARDS_FIELD_NUMBER: _ClassVar[int]
    UNLESS_CURRENT_FIELD_NUMBER: _ClassVar[int]
    model: str
    checkpoint: str
    num_shards: int
    unless_current: bool
    def __init__(self, model: _Optional[str] = ..., checkpoint: _Optional[str] = ..., num_shards: _Optional[int] = ..., unless_current: _Optional[bool] = ...) -> None: ...

class ForkRequest(_message.Message):
    __slots__ = ("model", "new_name", "at", "optimizer_json", "policy")
    MODEL_FIELD_NUMBER: _ClassVar[int]
    NEW_NAME_FIELD_NUMBER: _ClassVar[int]
    AT_FIELD_NUMBER: _ClassVar[int]
    OPTIMIZER_JSON_FIELD_NUMBER: _ClassVar[int]
    POLICY_FIELD_NUMBER: _ClassVar[int]
    model: str
    new_name: str
    at: str
    optimizer_json: str
    policy: str
    def __init__(self, model: _Optional[str] = ..., new_name: _Optional[str] = ..., at: _Optional[str] = ..., optimizer_json: _Optional[str] = ..., policy: _Optional[str] = ...) -> None: ...

class ForkResponse(_message.Message):
    __slots__ = ("model", "pause_s", "report_json")
    MODEL_FIELD_NUMBER: _ClassVar[int]
    PAUSE_S_FIELD_NUMBER: _ClassVar[int]
    REPORT_JSON_FIELD_NUMBER: _ClassVar[int]
    model: ModelInfo
    pause_s: float
    report_json: str
    def __init__(self, model: _Optional[_Union[ModelInfo, _Mapping]] = ..., pause_s: _Optional[float] = ..., report_json: _Optional[str] = ...) -> None: ...

class PromoteRequest(_message.Message):
    __slots__ = ("model", "keep_as")
    MODEL_FIELD_NUMBER: _ClassVar[int]
    KEEP_AS_FIELD_NUMBER: _ClassVar[int]
    model: str
    keep_as: str
    def __init__(self, model: _Optional[str] = ..., keep_as: _Optional[str] = ...) -> None: ...

class PromoteResponse(_message.Message):
    __slots__ = ("model", "main", "dropped", "kept_as")
    MODEL_FIELD_NUMBER: _ClassVar[int]
    MAIN_FIELD_NUMBER: _ClassVar[int]
    DROPPED_FIELD_NUMBER: _ClassVar[int]
    KEPT_AS_FIELD_NUMBER: _ClassVar[int]
    model: ModelInfo
    main: str
    dropped: bool
    kept_as: str
    def __init__(self, model: _Optional[_Union[ModelInfo, _Mapping]] = ..., main: _Optional[str] = ..., dropped: _Optional[bool] = ..., kept_as: _Optional[str] = ...) -> None: ...
