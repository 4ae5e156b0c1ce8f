"""Token tables, principals and bearer tokens (server/edge/auth.py): pure logic, no server."""

from __future__ import annotations

import json

import pytest

from optserve.client._auth import ChannelSecurity, resolve_token
from optserve.common.errors import InvalidArgument
from optserve.server.edge.auth import bearer_token
from optserve.server.edge.tokens import TRAINER_METHODS, Principal, TokenTable, token_digest

TOKEN = "a-token-of-enough-length-1234"


def table(*entries):
    return TokenTable.parse(json.dumps({"tokens": list(entries)}))


def test_tokens_are_kept_as_digests_and_either_form_authenticates():
    t = table(
        {"name": "ops", "role": "admin", "token": TOKEN},
        {"name": "ci", "role": "trainer", "sha256": token_digest("another-token-0123456789")},
    )
    assert TOKEN not in repr(t)
    assert t.authenticate(TOKEN) == Principal("ops", "admin")
    assert t.authenticate("another-token-0123456789").role == "trainer"
    assert t.authenticate(TOKEN + "x") is None and t.authenticate("") is None


@pytest.mark.parametrize(
    "entries, message",
    [
        ([], "at least one token"),
        ([{"name": "a", "role": "root", "token": TOKEN}], "'role' must be one of"),
        ([{"name": "a", "role": "admin", "token": "short"}], "at least 16 characters"),
        ([{"name": "a", "role": "admin", "token": "with space 0123456789"}], "printable"),
        ([{"name": "a", "role": "admin"}], "exactly one of"),
        ([{"name": "a", "role": "admin", "token": TOKEN, "sha256": "00" * 32}], "exactly one"),
        ([{"name": "a", "role": "admin", "sha256": "xyz"}], "64 hex digits"),
        ([{"name": "a", "role": "admin", "token": TOKEN, "models": []}], "non-empty list"),
        ([{"name": "a", "role": "admin", "token": TOKEN, "extra": 1}], "unknown keys"),
        (
            [{"name": "a", "role": "admin", "token": TOKEN},
             {"name": "a", "role": "admin", "token": TOKEN + "2"}],
            "unique",
        ),
        (
            [{"name": "a", "role": "admin", "token": TOKEN},
             {"name": "b", "role": "trainer", "token": TOKEN}],
            "twice",
        ),
    ],
)  # fmt: skip
def test_a_bad_token_table_is_refused_with_the_reason(entries, message):
    with pytest.raises(InvalidArgument, match=message):
        table(*entries)
    with pytest.raises(InvalidArgument, match="not valid JSON"):
        TokenTable.parse("{")


def test_roles_and_model_scopes():
    trainer = Principal("t", "trainer", ("mnist-*", "exact"))
    assert trainer.may_call("/optserve.v1.Shard/Push")
    assert not trainer.may_call("/optserve.v1.Coordinator/DropModel")
    assert not trainer.may_call("/optserve.v1.Coordinator/SomethingNew")  # unknown: admin only
    assert Principal("a", "admin").may_call("/optserve.v1.Coordinator/DropModel")
    assert trainer.covers("mnist-1") and trainer.covers("exact")
    assert not trainer.covers("exactly") and not trainer.covers("other")
    assert Principal("a", "admin").covers("anything")
    assert all(m.startswith(("/optserve.v1.", "/grpc.reflection")) for m in TRAINER_METHODS)


def test_bearer_token_parsing():
    assert bearer_token([("authorization", f"Bearer {TOKEN}")]) == TOKEN
    assert bearer_token([("authorization", f"bearer  {TOKEN} ")]) == TOKEN
    assert bearer_token([("authorization", f"Basic {TOKEN}")]) == ""
    assert bearer_token([("x-other", "1")]) is None and bearer_token(None) is None


def test_the_table_comes_from_a_file_or_the_environment(tmp_path, monkeypatch):
    monkeypatch.delenv("OPTSERVE_TOKENS_FILE", raising=False)
    monkeypatch.delenv("OPTSERVE_TOKENS", raising=False)
    assert TokenTable.from_environment() is None
    text = json.dumps({"tokens": [{"name": "ops", "role": "admin", "token": TOKEN}]})
    monkeypatch.setenv("OPTSERVE_TOKENS", text)
    assert TokenTable.from_environment().authenticate(TOKEN).name == "ops"
    path = tmp_path / "tokens.json"
    path.write_text(text.replace("ops", "from-file"))
    monkeypatch.setenv("OPTSERVE_TOKENS_FILE", str(path))
    assert TokenTable.from_environment().authenticate(TOKEN).name == "from-file"
    with pytest.raises(InvalidArgument, match="cannot read"):
        TokenTable.from_environment(str(tmp_path / "missing.json"))


def test_client_token_resolution(tmp_path, monkeypatch):
    monkeypatch.delenv("OPTSERVE_TOKEN", raising=False)
    monkeypatch.delenv("OPTSERVE_TOKEN_FILE", raising=False)
    monkeypatch.delenv("OPTSERVE_TLS_CA", raising=False)
    assert resolve_token() is None and ChannelSecurity.resolve().metadata == ()
    path = tmp_path / "token"
    path.write_text(TOKEN + "\n")
    monkeypatch.setenv("OPTSERVE_TOKEN_FILE", str(path))
    assert resolve_token() == TOKEN
    monkeypatch.setenv("OPTSERVE_TOKEN", "from-env-0123456789")
    assert resolve_token() == "from-env-0123456789"
    assert resolve_token("explicit-0123456789") == "explicit-0123456789"
    security = ChannelSecurity.resolve("explicit-0123456789", tls_ca=b"PEM")
    assert security.tls and security.metadata == (("authorization", "Bearer explicit-0123456789"),)
    with pytest.raises(InvalidArgument, match="printable"):
        resolve_token("two words")
