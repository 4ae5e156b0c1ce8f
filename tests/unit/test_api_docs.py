"""docs/api.md is exactly what scripts/gen_api_docs.py renders from the protos now, and it names
every RPC, message, field and enum that the compiled (committed) descriptors have."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from optserve.v1 import coordinator_pb2, shard_pb2, tensor_pb2
from tests.helpers.scripts import load_script

ROOT = Path(__file__).resolve().parents[2]
DOC = ROOT / "docs" / "api.md"
MODULES = (coordinator_pb2, shard_pb2, tensor_pb2)


def load_generator():
    return load_script("gen_api_docs")


def test_api_docs_are_committed_and_current():
    pytest.importorskip(
        "grpc_tools", reason="grpcio-tools is not installed (pip install -e '.[test]')"
    )
    fresh = load_generator().render()
    assert DOC.exists(), "docs/api.md is missing: generate it with `python scripts/gen_api_docs.py`"
    assert DOC.read_text(encoding="utf-8") == fresh, (
        "docs/api.md is out of date with protos/optserve/v1/*.proto: "
        "regenerate it with `python scripts/gen_api_docs.py`"
    )


def _messages(descriptors):
    """Every message descriptor, nested ones included, except the entries of map fields."""
    for message in descriptors:
        if not message.GetOptions().map_entry:
            yield message
            yield from _messages(message.nested_types)


def test_api_docs_name_every_rpc_message_and_enum():
    text = DOC.read_text(encoding="utf-8")
    headings = {m.group(1) for m in re.finditer(r"^#+ .*?`([^`]+)`\s*$", text, flags=re.MULTILINE)}
    missing = []
    for module in MODULES:
        file = module.DESCRIPTOR
        for service in file.services_by_name.values():
            if service.name not in headings:
                missing.append(f"service {service.full_name}")
            for method in service.methods:
                if f"{service.name}.{method.name}" not in headings:
                    missing.append(f"rpc {method.full_name}")
                if f"`/{service.full_name}/{method.name}`" not in text:
                    missing.append(f"method path /{service.full_name}/{method.name}")
        for message in _messages(file.message_types_by_name.values()):
            name = message.full_name.removeprefix(f"{file.package}.")
            if name not in headings:
                missing.append(f"message {message.full_name}")
            missing.extend(
                f"field {message.full_name}.{field.name}"
                for field in message.fields
                if f"| `{field.name}` | {field.number} |" not in text
            )
        enums = [*file.enum_types_by_name.values()]
        enums += [e for m in _messages(file.message_types_by_name.values()) for e in m.enum_types]
        for enum in enums:
            if enum.full_name.removeprefix(f"{file.package}.") not in headings:
                missing.append(f"enum {enum.full_name}")
            missing.extend(
                f"enum value {value.name}"
                for value in enum.values
                if f"| `{value.name}` | {value.number} |" not in text
            )
    assert not missing, (
        f"docs/api.md does not describe {missing}: regenerate it with "
        "`python scripts/gen_api_docs.py`"
    )
