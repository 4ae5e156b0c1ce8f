"""The test session's tokens: every server the session starts checks them (tests/conftest.py).

The session's clients, and the processes tests start, send ADMIN through $OPTSERVE_TOKEN;
tests that check roles and scopes pass another token explicitly.
"""

from __future__ import annotations

import json

import grpc

from optserve.server.edge.tokens import EdgeConfig, TokenTable

ADMIN = "test-admin-token-0123456789abcdef"
TRAINER = "test-trainer-token-0123456789abcdef"
# A trainer token and an admin token that may only touch models named "scoped-*".
SCOPED_TRAINER = "test-scoped-trainer-0123456789abcdef"
SCOPED_ADMIN = "test-scoped-admin-0123456789abcdef"

TOKENS_JSON = json.dumps(
    {
        "tokens": [
            {"name": "admin", "role": "admin", "token": ADMIN},
            {"name": "trainer", "role": "trainer", "token": TRAINER},
            {"name": "scoped-trainer", "role": "trainer", "token": SCOPED_TRAINER,
             "models": ["scoped-*"]},
            {"name": "scoped-admin", "role": "admin", "token": SCOPED_ADMIN,
             "models": ["scoped-*"]},
        ]
    }
)  # fmt: skip


def edge_config(**tls: bytes | None) -> EdgeConfig:
    return EdgeConfig(tokens=TokenTable.parse(TOKENS_JSON), **tls)


class _Token(
    grpc.UnaryUnaryClientInterceptor,
    grpc.UnaryStreamClientInterceptor,
    grpc.StreamUnaryClientInterceptor,
    grpc.StreamStreamClientInterceptor,
):
    """Adds `authorization: Bearer <token>` to every call of a raw channel."""

    def __init__(self, token: str) -> None:
        self.token = token

    def _details(self, details):
        metadata = [*(details.metadata or ()), ("authorization", f"Bearer {self.token}")]
        return details._replace(metadata=metadata)

    def intercept_unary_unary(self, continuation, details, request):
        return continuation(self._details(details), request)

    intercept_unary_stream = intercept_unary_unary

    def intercept_stream_unary(self, continuation, details, requests):
        return continuation(self._details(details), requests)

    intercept_stream_stream = intercept_stream_unary


def channel(address: str, token: str | None = ADMIN, **kwargs) -> grpc.Channel:
    """A plaintext channel whose calls carry `token` (None: no token)."""
    raw = grpc.insecure_channel(address, **kwargs)
    return raw if token is None else grpc.intercept_channel(raw, _Token(token))
