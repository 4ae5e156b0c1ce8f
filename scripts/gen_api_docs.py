"""Render docs/api.md, the gRPC API reference, from protos/optserve/v1/*.proto.

Usage: python scripts/gen_api_docs.py [--check] [--out PATH]

protoc (grpcio-tools) compiles the protos with their comments (--include_source_info) into a
FileDescriptorSet; every service, RPC, message, field and enum is rendered from it in file order,
files sorted by name. The role each RPC needs comes from optserve.server.edge.auth's method sets and
the chunk and message limits from optserve.common.codec, so the page follows the code. The output
has no timestamps: the same protos and code always give the same bytes. docs/api.md is committed;
tests/unit/test_api_docs.py fails if it differs from a fresh render, and so does --check.
"""

from __future__ import annotations

import argparse
import difflib
import re
import sys
import tempfile
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

from google.protobuf import descriptor_pb2

ROOT = Path(__file__).resolve().parent.parent
PROTO_ROOT = ROOT / "protos"
PROTO_PACKAGE = Path("optserve") / "v1"
PACKAGE = "optserve.v1"
DOC = ROOT / "docs" / "api.md"
REGENERATE = "python scripts/gen_api_docs.py"

# Field numbers of descriptor.proto, as they appear in SourceCodeInfo.Location.path.
FILE_PACKAGE, FILE_MESSAGE, FILE_ENUM, FILE_SERVICE, FILE_SYNTAX = 2, 4, 5, 6, 12
MESSAGE_FIELD, MESSAGE_NESTED, MESSAGE_ENUM, MESSAGE_ONEOF = 2, 3, 4, 8
ENUM_VALUE = 2
SERVICE_METHOD = 2

FieldProto = descriptor_pb2.FieldDescriptorProto


def proto_files() -> list[Path]:
    return sorted((PROTO_ROOT / PROTO_PACKAGE).glob("*.proto"))


def compile_protos() -> descriptor_pb2.FileDescriptorSet:
    """Run protoc over every .proto file; return the descriptors with their source comments."""
    from importlib import resources

    from grpc_tools import protoc

    sources = [str(p.relative_to(PROTO_ROOT)) for p in proto_files()]
    if not sources:
        raise RuntimeError(f"no .proto files under {PROTO_ROOT / PROTO_PACKAGE}")
    # grpc_tools ships the well-known types (google/protobuf/*.proto) for protos that import them.
    well_known = resources.files("grpc_tools") / "_proto"
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "descriptors.pb"
        args = [
            "grpc_tools.protoc",
            f"--proto_path={PROTO_ROOT}",
            f"--proto_path={well_known}",
            "--include_source_info",
            f"--descriptor_set_out={out}",
            *sources,
        ]
        if protoc.main(args) != 0:
            raise RuntimeError(f"protoc failed: {' '.join(args)}")
        return descriptor_pb2.FileDescriptorSet.FromString(out.read_bytes())


# --- Comments -----------------------------------------------------------------------------------


def _clean(comment: str) -> str:
    """A protoc comment without its one-space indent and surrounding blank lines."""
    lines = [line[1:] if line.startswith(" ") else line for line in comment.split("\n")]
    lines = [line.rstrip() for line in lines]
    while lines and not lines[0]:
        lines.pop(0)
    while lines and not lines[-1]:
        lines.pop()
    return "\n".join(lines)


class Comments:
    """The comments of one file, looked up by SourceCodeInfo path."""

    def __init__(self, file: descriptor_pb2.FileDescriptorProto) -> None:
        self._by_path = {tuple(loc.path): loc for loc in file.source_code_info.location}

    def leading(self, *path: int) -> str:
        """The leading and trailing comments of the element at `path`, as paragraphs."""
        loc = self._by_path.get(path)
        if loc is None:
            return ""
        parts = [_clean(loc.leading_comments), _clean(loc.trailing_comments)]
        return "\n\n".join(p for p in parts if p)

    def detached(self, *path: int) -> list[str]:
        """Comments before the element at `path` that a blank line separates from it."""
        loc = self._by_path.get(path)
        if loc is None:
            return []
        return [c for c in (_clean(d) for d in loc.leading_detached_comments) if c]


_CODE_SPAN = re.compile(r"(`+)(.+?)\1", re.S)


def _escape(text: str) -> str:
    """Markdown text with `<`, `>` and `&` outside code spans shown as written."""
    out, pos = [], 0
    for match in _CODE_SPAN.finditer(text):
        out.append(_escape_plain(text[pos : match.start()]))
        out.append(match.group(0))
        pos = match.end()
    out.append(_escape_plain(text[pos:]))
    return "".join(out)


def _escape_plain(text: str) -> str:
    return text.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")


def prose(text: str) -> list[str]:
    """A comment as Markdown paragraphs (its line breaks kept; blank lines separate paragraphs)."""
    return [_escape(text), ""] if text else []


def cell(text: str) -> str:
    """A comment as one Markdown table cell."""
    paragraphs = [" ".join(p.split()) for p in text.split("\n\n")]
    return "<br><br>".join(_escape(p).replace("|", "\\|") for p in paragraphs if p)


# --- Names and types ----------------------------------------------------------------------------


def anchor(full_name: str) -> str:
    return f'<a id="{full_name}"></a>'


def file_anchor(file: descriptor_pb2.FileDescriptorProto) -> str:
    return file.name.replace("/", "-")


def short(full_name: str) -> str:
    """`optserve.v1.Foo.Bar` -> `Foo.Bar`; names outside the package stay whole."""
    return full_name.removeprefix(f"{PACKAGE}.")


@dataclass
class Index:
    """Every message and enum compiled, by full name (without the leading dot)."""

    messages: dict[str, descriptor_pb2.DescriptorProto]
    enums: set[str]

    @classmethod
    def of(cls, files: Iterable[descriptor_pb2.FileDescriptorProto]) -> Index:
        messages: dict[str, descriptor_pb2.DescriptorProto] = {}
        enums: set[str] = set()

        def walk(prefix: str, message: descriptor_pb2.DescriptorProto) -> None:
            name = f"{prefix}.{message.name}"
            messages[name] = message
            enums.update(f"{name}.{e.name}" for e in message.enum_type)
            for nested in message.nested_type:
                walk(name, nested)

        for file in files:
            enums.update(f"{file.package}.{e.name}" for e in file.enum_type)
            for message in file.message_type:
                walk(file.package, message)
        return cls(messages, enums)

    def link(self, type_name: str) -> str:
        """A message or enum type as Markdown: a link where this page describes it."""
        name = type_name.lstrip(".")
        text = f"`{short(name)}`"
        if name.startswith(f"{PACKAGE}.") and (name in self.messages or name in self.enums):
            return f"[{text}](#{name})"
        return text

    def map_entry(self, field: FieldProto) -> descriptor_pb2.DescriptorProto | None:
        if field.label != FieldProto.LABEL_REPEATED or field.type != FieldProto.TYPE_MESSAGE:
            return None
        entry = self.messages.get(field.type_name.lstrip("."))
        return entry if entry is not None and entry.options.map_entry else None

    def value_type(self, field: FieldProto) -> str:
        if field.type in (FieldProto.TYPE_MESSAGE, FieldProto.TYPE_ENUM, FieldProto.TYPE_GROUP):
            return self.link(field.type_name)
        return f"`{FieldProto.Type.Name(field.type).removeprefix('TYPE_').lower()}`"

    def field_type(self, field: FieldProto, message: descriptor_pb2.DescriptorProto) -> str:
        entry = self.map_entry(field)
        if entry is not None:
            key, value = (self.value_type(f) for f in entry.field)
            return f"map&lt;{key}, {value}&gt;"
        text = self.value_type(field)
        if field.label == FieldProto.LABEL_REPEATED:
            return f"repeated {text}"
        if field.proto3_optional:
            return f"optional {text}"
        if field.HasField("oneof_index"):
            return f"{text} (oneof `{message.oneof_decl[field.oneof_index].name}`)"
        if field.label == FieldProto.LABEL_REQUIRED:
            return f"required {text}"
        return text


# --- Roles and limits, from the code ------------------------------------------------------------


@dataclass(frozen=True)
class Policy:
    """Who may call what (optserve.server.edge.auth) and how large a message may be (codec)."""

    trainer: frozenset[str]
    open: frozenset[str]
    internal: frozenset[str]
    max_streams_per_client: int
    default_chunk_bytes: int
    max_chunk_bytes: int
    max_message_bytes: int
    token_env: str

    @classmethod
    def load(cls) -> Policy:
        from optserve.common import auth as client_auth
        from optserve.common import codec
        from optserve.server.edge import tokens as auth

        return cls(
            trainer=auth.TRAINER_METHODS,
            open=auth.OPEN_METHODS,
            internal=auth.INTERNAL_METHODS,
            max_streams_per_client=auth.DEFAULT_MAX_STREAMS_PER_CLIENT,
            default_chunk_bytes=codec.DEFAULT_CHUNK_BYTES,
            max_chunk_bytes=codec.MAX_CHUNK_BYTES,
            max_message_bytes=codec.MAX_MESSAGE_BYTES,
            token_env=client_auth.TOKEN_ENV,
        )

    def role(self, method: str) -> str:
        """The role a token needs to call `method` ("/package.Service/Method")."""
        if method in self.open:
            return "open (no token)"
        if method in self.internal:
            return "internal (shard secret)"
        if method in self.trainer:
            return "trainer or admin"
        return "admin"


def byte_size(n: int) -> str:
    for unit, shift in (("GiB", 30), ("MiB", 20), ("KiB", 10)):
        if n >= 1 << shift and n % (1 << (shift - 4)) == 0:
            value = n / (1 << shift)
            return f"{value:g} {unit} ({n:,} bytes)"
    return f"{n:,} bytes"


# --- Rendering ----------------------------------------------------------------------------------


STREAMING = {
    (False, False): "unary",
    (True, False): "client streaming",
    (False, True): "server streaming",
    (True, True): "bidirectional streaming",
}


def _method_path(file: descriptor_pb2.FileDescriptorProto, service: str, method: str) -> str:
    return f"/{file.package}.{service}/{method}"


def render_intro(
    files: list[descriptor_pb2.FileDescriptorProto], index: Index, policy: Policy
) -> Iterator[str]:
    ours = {
        _method_path(f, s.name, m.name): f"{s.name}/{m.name}"
        for f in files
        for s in f.service
        for m in s.method
    }
    trainer = [name for path, name in ours.items() if path in policy.trainer]
    internal = [name for path, name in ours.items() if path in policy.internal]
    others = sorted((policy.trainer | policy.open | policy.internal) - ours.keys())
    chunk = index.link(f".{PACKAGE}.TensorChunk")
    services = ", ".join(f"`{f.package}.{s.name}`" for f in files for s in f.service)
    yield from (
        f"# optserve gRPC API reference (`{PACKAGE}`)",
        "",
        f"<!-- Generated by `{REGENERATE}` from protos/optserve/v1/*.proto; do not edit. -->",
        "",
        f"Every service and message below is in the protobuf package `{PACKAGE}`; the `.proto` "
        "files ship in the `optserve.v1` Python package next to the generated code "
        "(`optserve.v1.<file>_pb2`, `optserve.v1.<file>_pb2_grpc`). The coordinator serves "
        "`Coordinator` (the control plane); each shard serves `Shard` (the data plane) on its "
        "own port, whose address `DescribeModel` answers.",
        "",
        "## Authentication",
        "",
        "Unless the server runs without a token table (`optserve serve --no-auth`), every call "
        "sends its token as the metadata `authorization: Bearer <token>` (the Python client: "
        f"`ParameterServerClient(token=...)`, or `${policy.token_env}`). A missing or unknown "
        "token gets `UNAUTHENTICATED`; a token whose role does not cover the method gets "
        "`PERMISSION_DENIED`, and so does a call about a model outside the token's `models` "
        "patterns (`ListModels` lists only the models a token covers). Each client connection "
        f"may have at most {policy.max_streams_per_client} calls in flight on one endpoint by "
        "default (`max_streams_per_client`); one more gets `RESOURCE_EXHAUSTED`.",
        "",
        "A token has the role `trainer` or `admin`. An admin token may call every method. A "
        "trainer token may call only these:",
        "",
    )
    yield from (f"- `{name}`" for name in trainer)
    yield ""
    if internal:
        yield (
            "Shards call "
            + ", ".join(f"`{name}`" for name in internal)
            + " on each other, authenticated by the model's shard secret instead of a token; "
            "clients never call " + ("it." if len(internal) == 1 else "them.")
        )
        yield ""
    yield from (
        "## Health checking and reflection",
        "",
        "Every endpoint (the coordinator and each shard) also serves standard gRPC health "
        "checking, `grpc.health.v1.Health`, with the overall status (the empty service name) and "
        f"each of its services' full names ({services}) reported `SERVING` while it runs and "
        "`NOT_SERVING` once it shuts down; and server "
        "reflection, so tools such as `grpcurl` and `grpc_cli` can list and call the services "
        "without the `.proto` files. Outside this package, the endpoints guard these methods:",
        "",
        "| Method | Role |",
        "| --- | --- |",
    )
    yield from (f"| `{method}` | {policy.role(method)} |" for method in others)
    yield from (
        "",
        "## Streams and message sizes",
        "",
        f"Tensors (parameters, gradients, weights) travel as streams of {chunk} messages: raw "
        "little-endian bytes with dtype and shape, cut into chunks; the rules are under "
        f"{chunk}. Senders cut chunks of {byte_size(policy.default_chunk_bytes)}; a receiver "
        f"refuses a chunk whose `data` is over {byte_size(policy.max_chunk_bytes)}, and both "
        f"sides refuse a gRPC message over {byte_size(policy.max_message_bytes)} (one chunk "
        "plus room for the other fields). A streaming request starts with one header message "
        "(`CreateModelRequest.spec`, `PushRequest.header`); a streamed response likewise "
        "(`PullResponse.header`). A stream that is cut short or malformed changes nothing.",
        "",
        "## Contents",
        "",
    )
    for file in files:
        yield f"- [`{file.name}`](#{file_anchor(file)})"
        groups = (
            ("services", [f"{file.package}.{s.name}" for s in file.service]),
            ("messages", [f"{file.package}.{m.name}" for m in file.message_type]),
            ("enums", [f"{file.package}.{e.name}" for e in file.enum_type]),
        )
        for label, names in groups:
            if names:
                yield f"  - {label}: " + ", ".join(f"[`{short(n)}`](#{n})" for n in names)
    yield ""


def render_service(
    file: descriptor_pb2.FileDescriptorProto,
    number: int,
    comments: Comments,
    index: Index,
    policy: Policy,
) -> Iterator[str]:
    service = file.service[number]
    full = f"{file.package}.{service.name}"
    yield from (anchor(full), f"### Service `{service.name}`", "")
    yield from prose(comments.leading(FILE_SERVICE, number))
    yield from (
        "| Method | Request | Response | Kind | Role |",
        "| --- | --- | --- | --- | --- |",
    )
    for method in service.method:
        kind = STREAMING[method.client_streaming, method.server_streaming]
        role = policy.role(_method_path(file, service.name, method.name))
        yield (
            f"| [`{method.name}`](#{full}.{method.name}) | {index.link(method.input_type)} | "
            f"{index.link(method.output_type)} | {kind} | {role} |"
        )
    yield ""
    for i, method in enumerate(service.method):
        kind = STREAMING[method.client_streaming, method.server_streaming]
        stream_in = "stream " if method.client_streaming else ""
        stream_out = "stream " if method.server_streaming else ""
        yield from (
            anchor(f"{full}.{method.name}"),
            f"#### `{service.name}.{method.name}`",
            "",
            "```proto",
            f"rpc {method.name}({stream_in}{short(method.input_type.lstrip('.'))}) "
            f"returns ({stream_out}{short(method.output_type.lstrip('.'))});",
            "```",
            "",
            f"- Full name: `{_method_path(file, service.name, method.name)}`",
            f"- Request: {index.link(method.input_type)}"
            + (" (a stream)" if method.client_streaming else ""),
            f"- Response: {index.link(method.output_type)}"
            + (" (a stream)" if method.server_streaming else ""),
            f"- Kind: {kind}",
            f"- Role: {policy.role(_method_path(file, service.name, method.name))}",
            "",
        )
        yield from prose(comments.leading(FILE_SERVICE, number, SERVICE_METHOD, i))


def render_message(
    message: descriptor_pb2.DescriptorProto,
    full: str,
    path: tuple[int, ...],
    comments: Comments,
    index: Index,
) -> Iterator[str]:
    if message.options.map_entry:
        return
    yield from (anchor(full), f"#### `{short(full)}`", "")
    yield from prose(comments.leading(*path))
    if message.field:
        yield "| Field | Number | Type | Description |"
        yield "| --- | --- | --- | --- |"
        for i, field in enumerate(message.field):
            about = cell(comments.leading(*path, MESSAGE_FIELD, i))
            yield (
                f"| `{field.name}` | {field.number} | {index.field_type(field, message)} | "
                f"{about} |"
            )
    else:
        yield "No fields."
    yield ""
    oneofs = [
        (i, o)
        for i, o in enumerate(message.oneof_decl)
        if not any(f.proto3_optional and f.oneof_index == i for f in message.field)
    ]
    for i, oneof in oneofs:
        members = [
            f"`{f.name}`"
            for f in message.field
            if f.HasField("oneof_index") and f.oneof_index == i and not f.proto3_optional
        ]
        yield f"At most one of {', '.join(members)} is set (oneof `{oneof.name}`)."
        about = comments.leading(*path, MESSAGE_ONEOF, i)
        yield ""
        yield from prose(about)
    for i, nested in enumerate(message.nested_type):
        yield from render_message(
            nested, f"{full}.{nested.name}", (*path, MESSAGE_NESTED, i), comments, index
        )
    for i, enum in enumerate(message.enum_type):
        yield from render_enum(enum, f"{full}.{enum.name}", (*path, MESSAGE_ENUM, i), comments)


def render_enum(
    enum: descriptor_pb2.EnumDescriptorProto,
    full: str,
    path: tuple[int, ...],
    comments: Comments,
) -> Iterator[str]:
    yield from (anchor(full), f"#### `{short(full)}`", "")
    yield from prose(comments.leading(*path))
    yield "| Name | Number | Description |"
    yield "| --- | --- | --- |"
    for i, value in enumerate(enum.value):
        about = cell(comments.leading(*path, ENUM_VALUE, i))
        yield f"| `{value.name}` | {value.number} | {about} |"
    yield ""


def render_file(
    file: descriptor_pb2.FileDescriptorProto, index: Index, policy: Policy
) -> Iterator[str]:
    comments = Comments(file)
    yield from (anchor(file_anchor(file)), f"## `{file.name}`", "")
    for path in ((FILE_SYNTAX,), (FILE_PACKAGE,)):
        for text in [*comments.detached(*path), comments.leading(*path)]:
            yield from prose(text)
    # Comments that stand alone between definitions are about the file as a whole.
    for tag, items in (
        (FILE_SERVICE, file.service),
        (FILE_MESSAGE, file.message_type),
        (FILE_ENUM, file.enum_type),
    ):
        for i in range(len(items)):
            for text in comments.detached(tag, i):
                yield from prose(text)
    for i in range(len(file.service)):
        yield from render_service(file, i, comments, index, policy)
    if file.message_type:
        yield from ("### Messages", "")
    for i, message in enumerate(file.message_type):
        full = f"{file.package}.{message.name}"
        yield from render_message(message, full, (FILE_MESSAGE, i), comments, index)
    if file.enum_type:
        yield from ("### Enums", "")
    for i, enum in enumerate(file.enum_type):
        yield from render_enum(enum, f"{file.package}.{enum.name}", (FILE_ENUM, i), comments)


def render(
    descriptors: descriptor_pb2.FileDescriptorSet | None = None, policy: Policy | None = None
) -> str:
    """The whole page, from freshly compiled protos unless `descriptors` is given."""
    descriptors = descriptors if descriptors is not None else compile_protos()
    policy = policy if policy is not None else Policy.load()
    files = sorted((f for f in descriptors.file if f.package == PACKAGE), key=lambda f: f.name)
    index = Index.of(descriptors.file)
    lines = list(render_intro(files, index, policy))
    for file in files:
        lines.extend(render_file(file, index, policy))
    while lines and not lines[-1]:
        lines.pop()
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--check",
        action="store_true",
        help="write nothing; exit 1 if the file differs from what would be written",
    )
    parser.add_argument("--out", type=Path, default=DOC, help="output file (default: docs/api.md)")
    args = parser.parse_args(argv)
    text = render()
    if args.check:
        try:
            current = args.out.read_text(encoding="utf-8")
        except FileNotFoundError:
            print(f"{args.out} does not exist; generate it with `{REGENERATE}`", file=sys.stderr)
            return 1
        if current != text:
            diff = list(
                difflib.unified_diff(
                    current.splitlines(),
                    text.splitlines(),
                    f"{args.out} (committed)",
                    f"{args.out} (from the protos)",
                    lineterm="",
                )
            )
            shown = diff[:60] + ([f"... ({len(diff) - 60} more diff lines)"] if diff[60:] else [])
            print("\n".join(shown), file=sys.stderr)
            print(
                f"{args.out} is out of date with protos/optserve/v1/*.proto; "
                f"regenerate it with `{REGENERATE}`",
                file=sys.stderr,
            )
            return 1
        print(f"{args.out} is up to date")
        return 0
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(text, encoding="utf-8", newline="\n")
    print(args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
