"""Who is who: the token table (tokens or their SHA-256 digests, each with a role and the
models it may use), the methods each role may call, and the edge's configuration (tokens, TLS,
per-client limits). `auth` enforces it on every call.
"""

from __future__ import annotations

import dataclasses
import fnmatch
import hashlib
import hmac
import json
import os
import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Literal

import grpc

from optserve.common.auth import TOKEN_CHARS
from optserve.common.errors import InvalidArgument

Role = Literal["trainer", "admin"]
ROLES: tuple[Role, ...] = ("trainer", "admin")

# The server's token table, as JSON text or as the path of a JSON file (never a command-line
# argument of the long-running server: those are visible to every user of the machine).
TOKENS_ENV = "OPTSERVE_TOKENS"
TOKENS_FILE_ENV = "OPTSERVE_TOKENS_FILE"
MIN_TOKEN_CHARS = 16
DIGEST = re.compile(r"[0-9a-f]{64}")
DEFAULT_MAX_STREAMS_PER_CLIENT = 64

# Methods a trainer token may call; every other guarded method needs an admin token.
TRAINER_METHODS = frozenset(
    {
        "/optserve.v1.Coordinator/DescribeModel",
        "/optserve.v1.Coordinator/ListModels",
        "/optserve.v1.Coordinator/ReportMetric",
        "/optserve.v1.Coordinator/Status",
        "/optserve.v1.Coordinator/ListCheckpoints",
        "/optserve.v1.Shard/Push",
        "/optserve.v1.Shard/Pull",
        "/optserve.v1.Shard/PushPull",
        # Server reflection only describes the API.
        "/grpc.reflection.v1alpha.ServerReflection/ServerReflectionInfo",
        "/grpc.reflection.v1.ServerReflection/ServerReflectionInfo",
    }
)
OPEN_METHODS = frozenset({"/grpc.health.v1.Health/Check", "/grpc.health.v1.Health/Watch"})
# Authenticated by the calling shard's own key (shard.service.shard_key), not by a token.
INTERNAL_METHODS = frozenset({"/optserve.v1.Shard/Sequence"})
# Rate limited per token and per address (control_calls_per_s): each one reaches the model's
# shards through the coordinator.
CONTROL_METHODS = frozenset(
    f"/optserve.v1.Coordinator/{name}"
    for name in ("ReportMetric", "SetOptimizer", "SetHyperparameters", "SetSchedule",
                 "Checkpoint", "Restore", "CreateModel", "DropModel", "Fork", "Promote")
)  # fmt: skip
# Each reads the shard's whole slice: held under max_pulls_per_client.
PULL_METHODS = frozenset({"/optserve.v1.Shard/Pull", "/optserve.v1.Shard/PushPull"})


def token_digest(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


@dataclass(frozen=True)
class Principal:
    """An authenticated caller: the token's name, its role and the models it may touch."""

    name: str
    role: Role
    models: tuple[str, ...] | None = None  # fnmatch patterns; None: every model

    def may_call(self, method: str) -> bool:
        return self.role == "admin" or method in TRAINER_METHODS

    def covers(self, model: str) -> bool:
        return self.models is None or any(fnmatch.fnmatchcase(model, p) for p in self.models)


@dataclass(frozen=True)
class TokenTable:
    """SHA-256 digest of each token -> who it is."""

    principals: Mapping[str, Principal]

    @classmethod
    def parse(cls, text: str, source: str = "token table") -> TokenTable:
        """Read ``{"tokens": [{"name", "role", "token" | "sha256", "models"?}, ...]}``."""
        try:
            data = json.loads(text)
        except ValueError as exc:
            raise InvalidArgument(f"{source} is not valid JSON: {exc}") from None
        entries = data.get("tokens") if isinstance(data, dict) else None
        if not isinstance(entries, list) or not entries:
            raise InvalidArgument(f'{source} must be {{"tokens": [...]}} with at least one token')
        principals: dict[str, Principal] = {}
        names: set[str] = set()
        for i, entry in enumerate(entries):
            where = f"{source}, token {i}"
            if not isinstance(entry, dict):
                raise InvalidArgument(f"{where}: must be a JSON object")
            unknown = set(entry) - {"name", "role", "token", "sha256", "models"}
            if unknown:
                raise InvalidArgument(f"{where}: unknown keys {sorted(unknown)}")
            name, role = entry.get("name"), entry.get("role")
            if not isinstance(name, str) or not name or name in names:
                raise InvalidArgument(f"{where}: needs a unique non-empty 'name'")
            if role not in ROLES:
                raise InvalidArgument(f"{where} ({name}): 'role' must be one of {list(ROLES)}")
            digest = _entry_digest(entry, f"{where} ({name})")
            models = entry.get("models")
            if models is not None and (
                not isinstance(models, list)
                or not models
                or not all(isinstance(m, str) and m for m in models)
            ):
                raise InvalidArgument(f"{where} ({name}): 'models' must be a non-empty list")
            if digest in principals:
                raise InvalidArgument(f"{where} ({name}): the same token appears twice")
            names.add(name)
            principals[digest] = Principal(name, role, tuple(models) if models else None)
        return cls(principals)

    @classmethod
    def from_environment(cls, path: str | None = None) -> TokenTable | None:
        """The table from `path`, else $OPTSERVE_TOKENS_FILE, else $OPTSERVE_TOKENS; None if
        none is set."""
        path = path or os.environ.get(TOKENS_FILE_ENV)
        if path:
            try:
                with open(path, encoding="utf-8") as f:
                    return cls.parse(f.read(), source=path)
            except OSError as exc:
                raise InvalidArgument(f"cannot read the token file {path}: {exc}") from None
        text = os.environ.get(TOKENS_ENV)
        return cls.parse(text, source=f"${TOKENS_ENV}") if text else None

    @classmethod
    def single(cls, token: str, name: str = "admin", role: Role = "admin") -> TokenTable:
        """A table of one token (the embedded demo makes one up for its run)."""
        return cls({token_digest(token): Principal(name, role)})

    def authenticate(self, token: str) -> Principal | None:
        digest = token_digest(token)
        # Compare against every entry in constant time, so timing says nothing about which.
        found = None
        for known, principal in self.principals.items():
            if hmac.compare_digest(known, digest):
                found = principal
        return found


def _entry_digest(entry: Mapping[str, Any], where: str) -> str:
    token, digest = entry.get("token"), entry.get("sha256")
    if (token is None) == (digest is None):
        raise InvalidArgument(f"{where}: give exactly one of 'token' and 'sha256'")
    if token is not None:
        if not isinstance(token, str) or not TOKEN_CHARS.fullmatch(token):
            raise InvalidArgument(f"{where}: a token is printable ASCII without spaces")
        if len(token) < MIN_TOKEN_CHARS:
            raise InvalidArgument(f"{where}: a token needs at least {MIN_TOKEN_CHARS} characters")
        return token_digest(token)
    if not isinstance(digest, str) or not DIGEST.fullmatch(digest.lower()):
        raise InvalidArgument(f"{where}: 'sha256' must be 64 hex digits")
    return digest.lower()


_POSITIVE_LIMITS = (
    "max_streams_per_client", "max_streams_per_address", "max_coordinator_calls_per_client",
    "max_coordinator_calls_per_address", "max_pulls_per_client", "max_pulls_per_address",
    "max_staged_bytes_per_client", "max_staged_bytes_per_address", "control_calls_per_s",
    "keepalive_time_s", "keepalive_timeout_s", "max_connection_idle_s", "max_connection_age_s",
    "max_connection_age_grace_s", "stream_idle_s", "max_stream_io_s",
)  # fmt: skip


@dataclass(frozen=True)
class EdgeConfig:
    """What every endpoint of one optserve server enforces; passed to the coordinator actor and
    from it to every shard actor (so it holds token digests, never tokens).

    `tokens` None turns authentication off (only when asked for explicitly). `tls_cert` and
    `tls_key` (PEM) turn TLS on; `tls_ca` (PEM) is what shards trust when they call each other
    (default: the certificate itself, for a self-signed one)."""

    tokens: TokenTable | None = None
    tls_cert: bytes | None = None
    tls_key: bytes | None = None
    tls_ca: bytes | None = None
    # What one client may hold (server/edge/limits.py): "per_client" is per token (per address
    # with auth off), "per_address" per host whatever its tokens; never per connection.
    max_streams_per_client: int = DEFAULT_MAX_STREAMS_PER_CLIENT  # calls in flight, a shard
    max_streams_per_address: int = 256
    max_coordinator_calls_per_client: int = 32  # calls in flight, the coordinator
    max_coordinator_calls_per_address: int = 64
    max_pulls_per_client: int = 32  # Pull and PushPull streams in flight, a shard
    max_pulls_per_address: int = 128
    max_staged_bytes_per_client: int = 4 << 30  # pushes' fp32 slices staged on a shard
    max_staged_bytes_per_address: int = 16 << 30
    control_calls_per_s: float = 100.0  # per token, bursts of twice that; an address 4x
    # Connections and streams (server/edge/rpc.py): keepalive pings, idle and age limits, and
    # how long a stream may wait on its client (stream_idle_s) or move in all.
    keepalive_time_s: float = 60.0
    keepalive_timeout_s: float = 20.0
    max_connection_idle_s: float = 900.0
    max_connection_age_s: float = 3600.0
    # A push may wait a whole sync round (round_timeout_s, at most a day) on an old connection.
    max_connection_age_grace_s: float = 90_000.0
    stream_idle_s: float = 120.0
    max_stream_io_s: float = 3600.0

    def __post_init__(self) -> None:
        if (self.tls_cert is None) != (self.tls_key is None):
            raise InvalidArgument("TLS needs both a certificate and its key")
        for name in _POSITIVE_LIMITS:
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int | float) or not value > 0:
                raise InvalidArgument(f"{name} must be a positive number, got {value!r}")
        if self.max_coordinator_calls_per_address < self.max_coordinator_calls_per_client:
            raise InvalidArgument(
                "max_coordinator_calls_per_address must be at least "
                "max_coordinator_calls_per_client"
            )

    def fit_round(self, trainers: int, slice_bytes: int) -> EdgeConfig:
        """This config for a shard of a sync model of `trainers` trainers: one token (and one
        address) may always have a whole round's pushes staged and its pulls in flight (the
        ranks of one job often share a token). Calls in flight stay as configured."""
        if trainers <= 0:
            return self
        staged = trainers * slice_bytes
        return dataclasses.replace(
            self,
            max_pulls_per_client=max(self.max_pulls_per_client, trainers),
            max_pulls_per_address=max(self.max_pulls_per_address, trainers),
            max_staged_bytes_per_client=max(self.max_staged_bytes_per_client, staged),
            max_staged_bytes_per_address=max(self.max_staged_bytes_per_address, staged),
        )

    @property
    def coordinator_threads(self) -> int:
        """The coordinator's handler threads: above what one address may hold, so that one
        client can never take them all."""
        return self.max_coordinator_calls_per_address + max(
            16, self.max_coordinator_calls_per_client
        )

    @property
    def tls(self) -> bool:
        return self.tls_cert is not None

    def server_credentials(self) -> grpc.ServerCredentials:
        assert self.tls_cert is not None and self.tls_key is not None
        return grpc.ssl_server_credentials([(self.tls_key, self.tls_cert)])

    def peer_channel(self, address: str, options: list[tuple[str, Any]]) -> grpc.Channel:
        """A channel from one of this server's endpoints to another (shard to leader)."""
        if not self.tls:
            return grpc.insecure_channel(address, options=options)
        roots = self.tls_ca or self.tls_cert
        return grpc.secure_channel(address, grpc.ssl_channel_credentials(roots), options=options)


# The principal of the call a handler thread is serving (None when auth is off).
