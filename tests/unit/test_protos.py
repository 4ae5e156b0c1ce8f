"""The committed generated code is exactly what scripts/gen_protos.py produces now."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.helpers.scripts import load_script

ROOT = Path(__file__).resolve().parents[2]
COMMITTED = ROOT / "protos" / "optserve" / "v1"


def load_generator():
    return load_script("gen_protos")


def test_generated_code_is_committed_and_current(tmp_path):
    pytest.importorskip("grpc_tools")
    generated = load_generator().generate(tmp_path)
    assert generated, "protoc produced nothing"
    names = {p.name for p in generated}
    committed = {
        p.name for p in COMMITTED.iterdir() if "_pb2" in p.name and p.suffix in (".py", ".pyi")
    }
    assert names == committed, f"stale or missing generated files: {names ^ committed}"
    stale = [p.name for p in generated if p.read_bytes() != (COMMITTED / p.name).read_bytes()]
    assert not stale, f"regenerate with `python scripts/gen_protos.py`: {stale} differ"


def test_every_proto_has_generated_modules():
    for proto in COMMITTED.glob("*.proto"):
        assert (COMMITTED / f"{proto.stem}_pb2.py").exists()
        assert (COMMITTED / f"{proto.stem}_pb2_grpc.py").exists()
