"""The optserve client: what trainers import. Never imports server code.

* `ParameterServerClient`: create, describe, list and drop models; push gradients; pull weights
  (or both in one round trip); update modes `AsyncMode` and `SyncMode`.
* `RemoteOptimizer`: a torch.optim.Optimizer whose `step()` runs on the server.
* `OptserveError` and its subclasses: every failure, each with its gRPC status code;
  `PushRefused` (stale, round closed, model restored) means: nothing was applied, pull and go on.
* `Status`, `MigrationReport`, `CheckpointInfo`: the control plane's answers, typed (each has
  `to_dict()` for JSON).
"""

from optserve.client._client import ModelInfo, ParameterServerClient
from optserve.client._remote_optimizer import RemoteOptimizer
from optserve.common.config import (
    AdaBoundConfig,
    AdadeltaConfig,
    AdagradConfig,
    AdamConfig,
    AdamWConfig,
    AMSGradConfig,
    AsyncMode,
    GradientPolicy,
    LookaheadConfig,
    RAdamConfig,
    RangerConfig,
    RMSpropConfig,
    SGDConfig,
    SyncMode,
    parse_mode_config,
    parse_optimizer_config,
    parse_schedule_config,
)
from optserve.common.errors import (
    Aborted,
    AlreadyExists,
    DeadlineExceeded,
    FailedPrecondition,
    Internal,
    InvalidArgument,
    ModelRestored,
    NotFound,
    OptserveError,
    PermissionDenied,
    PushRefused,
    ResourceExhausted,
    RoundClosed,
    StalePush,
    Unauthenticated,
    Unavailable,
)
from optserve.common.results import CheckpointInfo, MigrationReport, Status

__all__ = [
    "AMSGradConfig",
    "Aborted",
    "AsyncMode",
    "CheckpointInfo",
    "AdaBoundConfig",
    "AdadeltaConfig",
    "AdagradConfig",
    "AdamConfig",
    "AdamWConfig",
    "LookaheadConfig",
    "MigrationReport",
    "RAdamConfig",
    "RMSpropConfig",
    "RangerConfig",
    "AlreadyExists",
    "DeadlineExceeded",
    "FailedPrecondition",
    "GradientPolicy",
    "Internal",
    "InvalidArgument",
    "ModelInfo",
    "ModelRestored",
    "NotFound",
    "OptserveError",
    "ParameterServerClient",
    "PermissionDenied",
    "PushRefused",
    "RemoteOptimizer",
    "ResourceExhausted",
    "RoundClosed",
    "SGDConfig",
    "StalePush",
    "Status",
    "SyncMode",
    "Unauthenticated",
    "Unavailable",
    "parse_mode_config",
    "parse_optimizer_config",
    "parse_schedule_config",
]
