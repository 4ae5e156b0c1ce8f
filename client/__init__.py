"""The optserve client: what trainers import. Never imports server code.

* `ParameterServerClient`: create, describe, list and drop models; push gradients; pull weights.
* `RemoteOptimizer`: a torch.optim.Optimizer whose `step()` runs on the server.
* `OptserveError` and its subclasses: every failure, each with its gRPC status code.
"""

from optserve.client.client import ModelInfo, ParameterServerClient
from optserve.client.config import (
    AdaBoundConfig,
    AdadeltaConfig,
    AdagradConfig,
    AdamConfig,
    AdamWConfig,
    AMSGradConfig,
    LookaheadConfig,
    RAdamConfig,
    RangerConfig,
    RMSpropConfig,
    SGDConfig,
    parse_optimizer_config,
    parse_schedule_config,
)
from optserve.client.errors import (
    Aborted,
    AlreadyExists,
    DeadlineExceeded,
    FailedPrecondition,
    Internal,
    InvalidArgument,
    NotFound,
    OptserveError,
    PermissionDenied,
    ResourceExhausted,
    Unauthenticated,
    Unavailable,
)
from optserve.client.remote_optimizer import RemoteOptimizer

__all__ = [
    "AMSGradConfig",
    "Aborted",
    "AdaBoundConfig",
    "AdadeltaConfig",
    "AdagradConfig",
    "AdamConfig",
    "AdamWConfig",
    "LookaheadConfig",
    "RAdamConfig",
    "RMSpropConfig",
    "RangerConfig",
    "AlreadyExists",
    "DeadlineExceeded",
    "FailedPrecondition",
    "Internal",
    "InvalidArgument",
    "ModelInfo",
    "NotFound",
    "OptserveError",
    "ParameterServerClient",
    "PermissionDenied",
    "RemoteOptimizer",
    "ResourceExhausted",
    "SGDConfig",
    "Unauthenticated",
    "Unavailable",
    "parse_optimizer_config",
    "parse_schedule_config",
]
