"""How a client proves who it is (a bearer token) and checks whom it talks to (TLS).

The token comes from the `token` argument, else $OPTSERVE_TOKEN, else the file named by
$OPTSERVE_TOKEN_FILE; it travels as ``authorization: Bearer <token>`` on every call, to the
coordinator and to every shard. TLS is on when a CA file is given (`tls_ca`, or
$OPTSERVE_TLS_CA), or with `tls=True` (the system's trust roots).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any

import grpc

from optserve.common.auth import TLS_CA_ENV, TOKEN_CHARS, TOKEN_ENV, TOKEN_FILE_ENV
from optserve.common.errors import InvalidArgument


def _read(path: str, what: str) -> bytes:
    try:
        with open(path, "rb") as f:
            return f.read()
    except OSError as exc:
        raise InvalidArgument(f"cannot read the {what} {path}: {exc}") from None


def resolve_token(token: str | None = None) -> str | None:
    """The token to send: `token`, else $OPTSERVE_TOKEN, else $OPTSERVE_TOKEN_FILE's content."""
    if token is None:
        token = os.environ.get(TOKEN_ENV) or None
    if token is None and os.environ.get(TOKEN_FILE_ENV):
        token = _read(os.environ[TOKEN_FILE_ENV], "token file").decode("utf-8", "replace")
    if token is None:
        return None
    token = token.strip()
    if not TOKEN_CHARS.fullmatch(token):
        raise InvalidArgument("a token is printable ASCII without spaces")
    return token


@dataclass(frozen=True)
class ChannelSecurity:
    """A client's token and TLS settings, used for every channel it opens."""

    token: str | None = None
    tls: bool = False
    root_certificates: bytes | None = None
    server_name: str | None = None

    @classmethod
    def resolve(
        cls,
        token: str | None = None,
        tls: bool | None = None,
        tls_ca: str | bytes | None = None,
        tls_server_name: str | None = None,
    ) -> ChannelSecurity:
        """`tls_ca`: a CA file's path or PEM bytes (default $OPTSERVE_TLS_CA); `tls` defaults
        to whether a CA is known; `tls_server_name` overrides the name the server's
        certificate must carry (when shards are reached by addresses it does not list)."""
        if tls_ca is None and os.environ.get(TLS_CA_ENV):
            tls_ca = os.environ[TLS_CA_ENV]
        roots = _read(tls_ca, "CA file") if isinstance(tls_ca, str) else tls_ca
        return cls(
            token=resolve_token(token),
            tls=bool(roots) if tls is None else tls,
            root_certificates=roots,
            server_name=tls_server_name,
        )

    @property
    def metadata(self) -> tuple[tuple[str, str], ...]:
        return (("authorization", f"Bearer {self.token}"),) if self.token else ()

    def channel(self, address: str, options: list[tuple[str, Any]]) -> grpc.Channel:
        if not self.tls:
            return grpc.insecure_channel(address, options=options)
        opts = list(options)
        if self.server_name:
            opts.append(("grpc.ssl_target_name_override", self.server_name))
        credentials = grpc.ssl_channel_credentials(root_certificates=self.root_certificates)
        return grpc.secure_channel(address, credentials, options=opts)
