"""Render docs/api.md, the gRPC API reference, from protos/optserve/v1/*.proto.

Usage: python scripts/gen_api_docs.py [--check] [--out PATH]

protoc (grpcio-tools) compiles the protos with their comments (--include_source_info) into a
FileDescriptorSet; every service, RPC, message, field and enum is rendered from it in file order,
files sorted by name. The role each RPC needs comes from optserve.server.edge.auth's method sets and
the chunk and message limits from optserve.common.codec, so the page follows the code.

Before the reference, the page explains the protocol a client in any language follows ("Writing a
client"): the prose is scripts/api_protocol.md, whose {{placeholders}} this script fills with
facts read from the code (timeouts, limits, names, defaults: `Facts`), tables made from the code
(every error class and its status code, from optserve.common.errors; the update modes' JSON,
from optserve.common.config) and the status codes of every RPC (`RPC_STATUSES`, written here; a
new RPC or status code without an entry stops the render). The JSON answers of the control
plane (Status, the migration report, checkpoints) are rendered from their pydantic models in
optserve.common.results, field by field, so they cannot go stale.

The output has no timestamps: the same protos and code always give the same bytes. docs/api.md
is committed; tests/unit/test_api_docs.py fails if it differs from a fresh render, and so does
--check. A relative link on the page that names no file of the repository stops the render.
"""

from __future__ import annotations

import argparse
import ast
import difflib
import inspect
import re
import sys
import tempfile
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from google.protobuf import descriptor_pb2

ROOT = Path(__file__).resolve().parent.parent
PROTO_ROOT = ROOT / "protos"
PROTO_PACKAGE = Path("optserve") / "v1"
PACKAGE = "optserve.v1"
DOC = ROOT / "docs" / "api.md"
# The hand-written half of "Writing a client", with {{placeholders}} filled from the code.
PROTOCOL = Path(__file__).resolve().parent / "api_protocol.md"
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


def duration(seconds: float) -> str:
    """60.0 -> "60 s"; 600 -> "10 minutes (600 s)"; 86400 -> "24 hours (86,400 s)"."""
    for unit, size in (("hours", 3600), ("minutes", 60)):
        if seconds >= 2 * size and seconds % size == 0:
            return f"{seconds / size:g} {unit} ({seconds:,.0f} s)"
    return f"{seconds:g} s"


# --- Facts, from the code -----------------------------------------------------------------------


_BINARY_OPS: dict[type[ast.operator], Callable[[Any, Any], Any]] = {
    ast.Add: lambda a, b: a + b,
    ast.Sub: lambda a, b: a - b,
    ast.Mult: lambda a, b: a * b,
    ast.Div: lambda a, b: a / b,
    ast.LShift: lambda a, b: a << b,
}


def _literal(node: ast.expr) -> Any:
    if isinstance(node, ast.BinOp) and type(node.op) in _BINARY_OPS:
        return _BINARY_OPS[type(node.op)](_literal(node.left), _literal(node.right))
    return ast.literal_eval(node)


def module_constant(relative: str, name: str) -> Any:
    """A module-level constant of a source file of the repository, read without importing the
    module (those that import Ray are read this way): a literal, or arithmetic on literals."""
    tree = ast.parse((ROOT / relative).read_text(encoding="utf-8"))
    for node in tree.body:
        if isinstance(node, ast.Assign):
            targets, value = node.targets, node.value
        elif isinstance(node, ast.AnnAssign) and node.value is not None:
            targets, value = [node.target], node.value
        else:
            continue
        if any(isinstance(t, ast.Name) and t.id == name for t in targets):
            return _literal(value)
    raise LookupError(f"{relative} has no module-level constant {name}; update {__file__}")


def call_keywords(relative: str, callee: str) -> set[str]:
    """The keyword arguments given anywhere in a source file to calls of `callee`."""
    tree = ast.parse((ROOT / relative).read_text(encoding="utf-8"))
    found: set[str] = set()
    for node in ast.walk(tree):
        if (
            isinstance(node, ast.Call)
            and isinstance(node.func, ast.Name)
            and node.func.id == callee
        ):
            found.update(k.arg for k in node.keywords if k.arg)
    return found


def _default(fn: Callable[..., Any], parameter: str) -> Any:
    return inspect.signature(fn).parameters[parameter].default


@dataclass(frozen=True)
class Facts:
    """What "Writing a client" states about the server, read from the code."""

    token_file_env: str
    tls_ca_env: str
    kind_metadata: str
    kinds: Mapping[str, str]  # error kind -> status code name
    max_details_chars: int
    stage_timeout_s: float
    retain_decisions_s: float
    max_decisions: int
    max_push_id_chars: int
    max_trainer_chars: int
    max_staged: int
    creation_wait_s: float
    initial_values_timeout_s: float
    max_models: int
    max_params: int
    max_shards: int
    max_groups: int
    shard_threads: int
    model_name: str
    max_param_name_chars: int
    max_param_dims: int
    default_group: str
    max_status_chars: int
    control_wait_s: float
    secret_metadata: str
    round_timeout_s: float
    gradient_dtypes: tuple[str, ...]
    pull_dtypes: tuple[str, ...]
    load_dtype: str

    @classmethod
    def load(cls) -> Facts:
        import torch

        from optserve.common import auth as client_auth
        from optserve.common import codec, errors, layout
        from optserve.common.config import SyncMode
        from optserve.server.coordinator import catalogue
        from optserve.server.edge import rpc
        from optserve.server.shard import pipeline, sequencer
        from optserve.server.shard.state import ShardState

        # The shards build their Sequencer with its default stage timeout; say so, or stop.
        passed = call_keywords("server/shard/actor.py", "Sequencer") & {"stage_timeout_s"}
        if passed:
            raise RuntimeError(
                "server/shard/actor.py now passes stage_timeout_s to Sequencer: read the value "
                f"it passes in {__file__} (Facts.load)"
            )
        limits = catalogue.Limits()
        wire = {int(v): tensor_name for v, tensor_name in _wire_names(codec).items()}
        return cls(
            token_file_env=client_auth.TOKEN_FILE_ENV,
            tls_ca_env=client_auth.TLS_CA_ENV,
            kind_metadata=errors.KIND_METADATA,
            kinds={kind: c.code.name for kind, c in errors._BY_KIND.items()},
            max_details_chars=rpc.MAX_DETAILS_CHARS,
            stage_timeout_s=_default(sequencer.Sequencer, "stage_timeout_s"),
            retain_decisions_s=sequencer.RETAIN_DECISIONS_S,
            max_decisions=sequencer.MAX_DECISIONS,
            max_push_id_chars=pipeline.MAX_PUSH_ID_CHARS,
            max_trainer_chars=pipeline.MAX_TRAINER_CHARS,
            max_staged=_default(ShardState, "max_staged"),
            creation_wait_s=limits.creation_wait_s,
            initial_values_timeout_s=limits.initial_values_timeout_s,
            max_models=limits.max_models,
            max_params=limits.max_params,
            max_shards=limits.max_shards,
            max_groups=limits.max_groups,
            shard_threads=module_constant("server/shard/actor.py", "SHARD_THREADS"),
            model_name=catalogue.MODEL_NAME.pattern,
            max_param_name_chars=catalogue.MAX_PARAM_NAME_CHARS,
            max_param_dims=catalogue.MAX_PARAM_DIMS,
            default_group=layout.DEFAULT_GROUP,
            max_status_chars=module_constant("server/coordinator/service.py", "MAX_STATUS_CHARS"),
            control_wait_s=module_constant("server/coordinator/control.py", "CONTROL_WAIT_S"),
            secret_metadata=module_constant("server/shard/service.py", "SECRET_METADATA"),
            round_timeout_s=SyncMode.model_fields["round_timeout_s"].default,
            gradient_dtypes=tuple(
                wire[int(codec.wire_dtype(d))]
                for d in codec.DTYPE_TO_WIRE
                if d in codec.GRADIENT_WIRE_DTYPES
            ),  # fmt: skip
            pull_dtypes=tuple(wire[int(v)] for v in codec.DTYPE_TO_WIRE.values()),
            load_dtype=wire[int(codec.wire_dtype(torch.float32))],
        )


def _wire_names(codec: Any) -> dict[int, str]:
    from optserve.v1 import tensor_pb2

    return {int(v): tensor_pb2.DType.Name(v) for v in codec.DTYPE_TO_WIRE.values()}


# --- Status codes -------------------------------------------------------------------------------

# What a client does on each status code, in general (the table of every RPC says more).
# Every code of optserve.common.errors needs an entry: a new one stops the render.
CODE_ADVICE = {
    "INVALID_ARGUMENT": "Fix the request; retrying it unchanged gets the same answer. Nothing "
    "was changed (a refused push was applied by no shard).",
    "NOT_FOUND": "The model (or checkpoint) does not exist, or a shard does not serve it: "
    "`DescribeModel` again for the current layout, or create the model.",
    "ALREADY_EXISTS": "Use the existing model (`DescribeModel`), or drop it first.",
    "FAILED_PRECONDITION": "The request is valid but the model's state refuses it: a stale "
    "push (pull, then push a fresh gradient with a new `push_id`), a second push of one "
    "trainer in a sync round, a shard that already has its values, a server without a "
    "checkpoint directory. Retrying unchanged does not help.",
    "ABORTED": "The push lost a race (its sync round closed, the model was restored): nothing "
    "was applied. Pull the current weights, compute a new gradient, push with a new `push_id`.",
    "RESOURCE_EXHAUSTED": "A size or count limit: make the request smaller (chunks, models), or "
    "retry after a short wait when it is a count of calls or pushes in flight.",
    "UNAUTHENTICATED": "Send a valid token: `authorization: Bearer <token>`.",
    "PERMISSION_DENIED": "The token's role or model patterns do not cover the call: use an admin "
    "token, or one whose `models` cover the model.",
    "UNAVAILABLE": "Transient: retry after a short wait (with back-off). A push that the shards "
    "answered `UNAVAILABLE` was applied nowhere: push again with a new `push_id`. When only "
    "the connection failed, the push may have been applied: pull and go on, or see "
    "[Sending a push again](#sending-a-push-again).",
    "DEADLINE_EXCEEDED": "The client's own deadline passed. A push may or may not have been "
    "applied: pull and go on, or see [Sending a push again](#sending-a-push-again).",
    "INTERNAL": "A server bug: the message says what broke. Report it; retrying may not help.",
    "UNKNOWN": "Treat as INTERNAL.",
}
# What a code means where its class in optserve.common.errors has no docstring to say it.
CODE_MEANING = {
    "DEADLINE_EXCEEDED": "The call's deadline passed before its answer.",
    "PERMISSION_DENIED": "The token may not make this call.",
    "UNAUTHENTICATED": "No token, or one the server does not know.",
}


def error_classes() -> list[type]:
    """The error classes of optserve.common.errors that carry a status code (or an error kind),
    in the order the module defines them."""
    from optserve.common import errors

    kinds = set(errors._BY_KIND.values())
    return [
        value
        for value in vars(errors).values()
        if isinstance(value, type)
        and issubclass(value, errors.OptserveError)
        and ("code" in vars(value) or value in kinds)
    ]


def _first_sentence(doc: str | None) -> str:
    text = " ".join((doc or "").split())
    match = re.match(r"(.+?\.)(\s|$)", text)
    return match.group(1) if match else text


def render_error_table() -> Iterator[str]:
    """Every status code the server sends on purpose: the Python class it stands for, what it
    means, and what a client does."""
    import grpc

    from optserve.common import errors

    by_code: dict[str, list[type]] = {}
    for cls in error_classes():
        if cls.__name__ in errors._BY_KIND:
            continue
        by_code.setdefault(cls.code.name, []).append(cls)
    missing = sorted(set(by_code) - set(CODE_ADVICE))
    if missing:
        raise RuntimeError(f"status codes {missing} have no entry in CODE_ADVICE ({__file__})")
    yield "| Code | Number | Python client raises | Meaning | What a client does |"
    yield "| --- | --- | --- | --- | --- |"
    for code in sorted(by_code, key=lambda c: grpc.StatusCode[c].value[0]):
        classes = by_code[code]
        number = grpc.StatusCode[code].value[0]
        names = ", ".join(f"`{c.__name__}`" for c in classes)
        meaning = " ".join(_first_sentence(c.__doc__) for c in classes if c.__doc__)
        meaning = meaning or CODE_MEANING.get(code, "—")
        if code == "UNKNOWN":
            meaning = "Any status code without a class of its own (for example `CANCELLED`)."
        yield f"| `{code}` | {number} | {names} | {cell(meaning)} | {cell(CODE_ADVICE[code])} |"


def render_kind_table() -> Iterator[str]:
    from optserve.common import errors

    yield f"| `{errors.KIND_METADATA}` | Status code | Python client raises | Meaning |"
    yield "| --- | --- | --- | --- |"
    for kind, cls in errors._BY_KIND.items():
        bases = ", ".join(f"`{b.__name__}`" for b in cls.__bases__)
        yield (
            f"| `{kind}` | `{cls.code.name}` | `{cls.__name__}` (a {bases}) | "
            f"{cell(_first_sentence(cls.__doc__))} |"
        )


# Edge checks that every call passes, before its method runs (server/edge/auth.py).
def edge_statuses(policy: Policy) -> list[tuple[str, str, str]]:
    return [
        ("UNAUTHENTICATED", "No `authorization: Bearer <token>` metadata, or a token the server "
         "does not know (a token read with its trailing newline cannot even be sent: gRPC "
         "refuses a newline in metadata).",
         "Send a valid token."),
        ("PERMISSION_DENIED", "The token's role does not cover the method (a trainer token on an "
         "admin method), or its `models` patterns do not cover the model.",
         "Use a token that covers the call."),
        ("RESOURCE_EXHAUSTED", "The token (or the address) already holds all the calls, pulls "
         "or staged push bytes it may hold on this endpoint (`max_streams_per_client`: "
         f"{policy.max_streams_per_client} calls per token by default), or sends control calls "
         "faster than `control_calls_per_s`; the message names the limit. Or a message is over "
         f"{byte_size(policy.max_message_bytes)} (gRPC's own check).",
         "Wait for calls to finish, slow down; keep messages small."),
        ("INVALID_ARGUMENT", "A request message that does not parse.", "Fix the encoding."),
        ("UNAVAILABLE", "The endpoint is unreachable or shutting down, or a shard actor behind "
         "it died or did not answer (the server brings it back).", "Retry with back-off."),
        ("DEADLINE_EXCEEDED", "The client's deadline passed.", "Retry, or raise the deadline."),
        ("INTERNAL", "A bug in the server; the message names the method and the exception.",
         "Report it."),
    ]  # fmt: skip


def rpc_statuses(policy: Policy, f: Facts) -> dict[str, list[tuple[str, str, str]]]:
    """(code, cause, what a client does) for each method ("Service/Method"), beyond the edge's.
    Read from server/coordinator/*.py, server/shard/*.py and server/store/*.py; every method of
    the protos must have an entry, so a new RPC stops the render until it has one."""
    lookup = [
        ("NOT_FOUND", "No model of that name.", "Create it, or check the name."),
        ("UNAVAILABLE", f"The model is still being created after {duration(f.creation_wait_s)}, "
         "or it is down (a shard died and no checkpoint brought it back: `Status` says why).",
         "Retry later; see `Status`."),
    ]  # fmt: skip
    busy = (
        "UNAVAILABLE",
        f"Another control change or a checkpoint of the model held it for "
        f"{duration(f.control_wait_s)}; nothing was applied.",
        "Retry.",
    )
    bad_model = (
        "NOT_FOUND",
        "The header's (or request's) `model` is not the model this shard serves: the layout is "
        "stale (the model was dropped and created again, or restored onto new shards).",
        "`DescribeModel` again and use its shard addresses.",
    )
    not_ready = (
        "UNAVAILABLE",
        "The shard has not received its values yet (`Load`, or a restore in progress), or it "
        "no longer matches its peers (broken: the server restores the model from its newest "
        "checkpoint).",
        "Retry after a short wait; then pull.",
    )
    chunks = (
        "INVALID_ARGUMENT / RESOURCE_EXHAUSTED",
        "A chunk that breaks the rules of `TensorChunk`: unknown or missing group, wrong dtype, "
        "shape not `[end - start]`, out-of-order offset, overflow, a tensor sent twice; a "
        f"chunk's `data` over {byte_size(policy.max_chunk_bytes)} is RESOURCE_EXHAUSTED.",
        "Fix the stream; nothing was changed.",
    )
    grads = ", ".join(f"`{d}`" for d in f.gradient_dtypes)
    push = [
        ("INVALID_ARGUMENT", "The stream does not start with a `PushHeader`, or carries anything "
         "but chunks after it; an empty `push_id` on a model of several shards; a `push_id` "
         f"over {f.max_push_id_chars} or a `trainer` over {f.max_trainer_chars} characters; a "
         "`push_id` "
         "this shard still holds from an earlier call (and that earlier push is then refused "
         "on every shard too); the same `push_id` with a different `version` or `trainer` on "
         f"another shard; a gradient dtype other than {grads}; NaN/Inf in the gradient, or "
         "a sum of squares beyond float32 (elements near 1e19 or more, finite but fatal to the "
         "optimizer state), under the mode's `nonfinite: \"reject\"`; a gradient norm above "
         "`max_push_norm`; an unsupported `pull_dtype`. Refused on every shard; nothing applied.",
         "Fix the push; send it again with a new `push_id`."),
        chunks,
        bad_model,
        ("RESOURCE_EXHAUSTED", f"The shard already holds {f.max_staged} (or twice the sync "
         "round's trainers, if more) pushes waiting for their turn.",
         "Retry shortly with a new `push_id`."),
        ("FAILED_PRECONDITION", "Kind `StalePush`: async mode with `max_staleness`, and the "
         "push's `version` is more than that many updates old. Or sync mode: this `trainer` "
         "already pushed in the open round.",
         "Pull, compute a new gradient, push with a new `push_id`."),
        ("ABORTED", "Kind `RoundClosed`: sync mode, and the push's `version` is not the current "
         "one (its round closed without it). Kind `ModelRestored`: the push's `version` is "
         "ahead of the model's, or the model was restored while the push waited. Without a "
         "kind: the push's stream to another shard broke off before its end.",
         "Pull, compute a new gradient, push with a new `push_id`."),
        not_ready,
        ("UNAVAILABLE", f"Not every shard of the model received its slice of the push within "
         f"{duration(f.stage_timeout_s)} of the first (the pushes to the shards were not in "
         "flight together, or the trainer died mid-push): the push is abandoned on every shard. "
         "Also: a shard lost the leader's answer (the model is then restored from its newest "
         "checkpoint).",
         "Send the calls to all shards concurrently; push again with a new `push_id`; pull."),
        ("DEADLINE_EXCEEDED", "The client's deadline passed while the push waited (a sync round "
         f"waits up to its `round_timeout_s`, default {duration(f.round_timeout_s)}).",
         "Give sync pushes a deadline of your timeout plus `round_timeout_s`; pull and go on "
         "(the push may have been applied)."),
    ]  # fmt: skip
    pull = [
        bad_model,
        ("INVALID_ARGUMENT", "An unsupported `dtype`.", "Ask for one of " + ", ".join(
            f"`{d}`" for d in f.pull_dtypes) + " (or leave it unspecified: float32)."),
        not_ready,
    ]  # fmt: skip
    control = [
        ("INVALID_ARGUMENT", "An invalid config or change (unknown rule or hyperparameter, a "
         "value out of range, a JSON text that is not an object).", "Fix it; nothing changed."),
        *lookup,
        busy,
        ("FAILED_PRECONDITION", "The model did not stay at its version boundary for the whole "
         "change (a hold that lifted itself); nothing was kept.", "Retry."),
    ]  # fmt: skip
    store = ("FAILED_PRECONDITION", "The server has no checkpoint directory "
             "(`optserve serve --checkpoint-dir`).", "Start the server with one.")  # fmt: skip
    return {
        "Coordinator/CreateModel": [
            (
                "INVALID_ARGUMENT",
                "The stream is not exactly one `CreateModelRequest` with `spec` "
                "(initial values go to the shards: `Load`); an invalid model name "
                f"(`{f.model_name}`); "
                "no parameters; a parameter name that is empty, over "
                f"{f.max_param_name_chars} characters or repeated; a shape with more than "
                f"{f.max_param_dims} dims or a negative one; `ParamSpec.dtype` unspecified; an "
                "invalid `optimizer_json`, `schedule_json`, `mode_json`, `checkpoint_json` or "
                "group (unknown or repeated parameter, a `/` in its name, an override the rule "
                f"refuses); `num_shards` over {f.max_shards}; a sync mode whose `trainers` × "
                f"`num_shards` is over {f.shard_threads // 2}.",
                "Fix the spec; nothing was made.",
            ),
            (
                "ALREADY_EXISTS",
                "A model of that name exists, or is being created or restored.",
                "`DescribeModel` and use it, or `DropModel` it first.",
            ),
            (
                "RESOURCE_EXHAUSTED",
                f"The server holds {f.max_models} models (the default "
                f"limit); more than {f.max_params} parameters or {f.max_groups} groups; the "
                "model's fp32 masters exceed the server's size limit; the cluster cannot place "
                "the shards.",
                "Drop a model, make it smaller, or add resources.",
            ),
            (
                "ABORTED",
                "The name changed hands while the model was being created.",
                "`DescribeModel`, then decide.",
            ),
        ],
        "Coordinator/DescribeModel": lookup,
        "Coordinator/ListModels": [],
        "Coordinator/DropModel": [lookup[0]],
        "Coordinator/SetOptimizer": [
            *control[:1],
            (
                "INVALID_ARGUMENT",
                '`policy` other than `"migrate"`, `"reset"`, `"keep"` or empty; `"keep"` with '
                "another rule than the model's.",
                "Fix it.",
            ),
            *control[1:],
        ],
        "Coordinator/SetSchedule": control,
        "Coordinator/ReportMetric": [
            (
                "INVALID_ARGUMENT",
                "A metric name that is empty or over 128 characters; a value "
                "that is NaN or infinite.",
                "Fix it.",
            ),
            *lookup,
            ("UNAVAILABLE", "The model's leader shard is down.", "Retry."),
        ],
        "Coordinator/SetHyperparameters": [
            (
                "INVALID_ARGUMENT",
                "No change asked for; an unknown parameter group or hyperparameter; a value "
                'the rule refuses; `policy` other than `"migrate"`, `"reset"`, `"keep"` or '
                "empty. (A request whose values are all as they are already is answered at "
                "once, with `unchanged` in its report, and changes nothing.)",
                "Fix it.",
            ),
            *control,
        ],
        "Coordinator/Status": [
            *lookup,
            (
                "RESOURCE_EXHAUSTED",
                f"The status does not fit in {f.max_status_chars:,} "
                "characters even with its history halved until none is left (the server first "
                "sends fewer metrics and audit entries: `history` says how many).",
                "Ask for less `history`.",
            ),
        ],
        "Coordinator/Checkpoint": [
            store,
            ("INVALID_ARGUMENT", '`snapshot` other than `"pause"`, `"copy"` or empty.', "Fix it."),
            *lookup,
            busy,
            (
                "FAILED_PRECONDITION",
                "The shards wrote different versions or state, or a write "
                "did not finish; the checkpoint is not kept.",
                "Retry.",
            ),
        ],
        "Coordinator/ListCheckpoints": [
            store,
            ("INVALID_ARGUMENT", "An invalid model name.", "Fix it."),
        ],
        "Coordinator/Restore": [
            store,
            (
                "INVALID_ARGUMENT",
                "An invalid model name; `num_shards` out of range; `unless_current` without "
                "`checkpoint`.",
                "Fix it.",
            ),
            (
                "NOT_FOUND",
                "The model has no (complete) checkpoint, or none of that name.",
                "`ListCheckpoints`.",
            ),
            (
                "FAILED_PRECONDITION",
                "The checkpoint is damaged or does not match (without a "
                "name, each older one is tried first).",
                "Name another checkpoint.",
            ),
            (
                "ALREADY_EXISTS",
                "The model is absent and its name is being created meanwhile.",
                "Retry.",
            ),
            (
                "ABORTED",
                "The model changed (dropped, created, restored) while it was being restored.",
                "`DescribeModel`, then decide.",
            ),
            ("RESOURCE_EXHAUSTED", "The cluster cannot place the shards.", "Add resources."),
        ],
        "Coordinator/Fork": [
            (
                "INVALID_ARGUMENT",
                'An invalid fork name, an `at` that is neither "now" nor '
                '"checkpoint:<name>", an invalid optimizer config or policy.',
                "Fix it; nothing was changed.",
            ),
            (
                "NOT_FOUND",
                "No model of that name, or it has no checkpoint of that name.",
                "`ListModels`, `ListCheckpoints`.",
            ),
            (
                "ALREADY_EXISTS",
                "A model (or a promoted fork's alias) already has the fork's name.",
                "Choose another name.",
            ),
            (
                "RESOURCE_EXHAUSTED",
                "The server holds its limit of models, or cannot place the fork's shards.",
                "Drop a model first.",
            ),
            store,
        ],
        "Coordinator/Promote": [
            *lookup,
            (
                "FAILED_PRECONDITION",
                "The model is not a fork (it records no parent).",
                "Promote a model made by `Fork`.",
            ),
            (
                "ALREADY_EXISTS",
                "`keep_as` names a model that exists.",
                "Choose another name; nothing was changed.",
            ),
        ],
        "Shard/Push": push,
        "Shard/Pull": pull,
        "Shard/PushPull": [*push, *pull[1:2]],
        "Shard/Load": [
            (
                "INVALID_ARGUMENT",
                "The stream does not start with a `LoadHeader`, or carries "
                f"anything but chunks after it; a tensor that is not `{f.load_dtype}`; a group "
                "missing.",
                "Fix the stream.",
            ),
            chunks,
            bad_model,
            (
                "FAILED_PRECONDITION",
                "The shard already has its values (a shard takes them once).",
                "Nothing to do: the values are there.",
            ),
        ],
        "Shard/Sequence": [
            (
                "UNAUTHENTICATED",
                f"No `{f.secret_metadata}` metadata, a key that is not the "
                "calling shard's own (each shard's is bound to its index), or a shard that is not "
                "its model's leader: checked first, and always the same message.",
                "Clients never call it.",
            ),
        ],
    }


def render_status_tables(
    files: list[descriptor_pb2.FileDescriptorProto], policy: Policy, facts: Facts
) -> Iterator[str]:
    import grpc

    methods = [f"{s.name}/{m.name}" for f in files for s in f.service for m in s.method]
    table = rpc_statuses(policy, facts)
    missing, extra = sorted(set(methods) - set(table)), sorted(set(table) - set(methods))
    if missing or extra:
        raise RuntimeError(
            f"rpc_statuses in {__file__} has no entry for {missing} and entries for methods "
            f"the protos do not have: {extra}"
        )
    rows = [("every method", c, w, a) for c, w, a in edge_statuses(policy)]
    rows += [(m, c, w, a) for m in methods for c, w, a in table[m]]
    for _, codes, _, _ in rows:
        for code in codes.split(" / "):
            if code not in grpc.StatusCode.__members__:
                raise RuntimeError(f"{code!r} is not a gRPC status code ({__file__})")
    yield "| Method | Code | When | What a client does |"
    yield "| --- | --- | --- | --- |"
    previous = None
    for method, code, when, action in rows:
        shown = "" if method == previous else (
            f"[`{method}`](#{PACKAGE}.{method.replace('/', '.')})" if "/" in method else
            f"**{method}**"
        )  # fmt: skip
        previous = method
        codes = " / ".join(f"`{c}`" for c in code.split(" / "))
        yield f"| {shown} | {codes} | {cell(when)} | {cell(action)} |"
    quiet = [m for m in methods if not table[m]]
    if quiet:
        yield ""
        yield "Only the codes of every method: " + ", ".join(f"`{m}`" for m in quiet) + "."


# --- JSON shapes, from the pydantic models --------------------------------------------------------


def json_anchor(name: str) -> str:
    return f"json-{name}"


def field_comments(cls: type) -> dict[str, str]:
    """The `# comments` on and just above each field of a class body, by field name."""
    import io
    import textwrap
    import tokenize

    source = textwrap.dedent(inspect.getsource(cls))
    comments: dict[int, str] = {}
    for token in tokenize.generate_tokens(io.StringIO(source).readline):
        if token.type == tokenize.COMMENT:
            comments[token.start[0]] = token.string.lstrip("#").strip()
    lines = source.splitlines()
    out: dict[str, str] = {}
    (body,) = ast.parse(source).body
    assert isinstance(body, ast.ClassDef)
    for node in body.body:
        if not (isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name)):
            continue
        above, line = [], node.lineno - 1
        while line in comments and lines[line - 1].lstrip().startswith("#"):
            above.insert(0, comments[line])
            line -= 1
        own = [comments[n] for n in range(node.lineno, (node.end_lineno or node.lineno) + 1)
               if n in comments and "fmt:" not in comments[n]]  # fmt: skip
        text = " ".join([*above, *own])
        if text:
            out[node.target.id] = text
    return out


def _bounds(schema: Mapping[str, Any]) -> str:
    marks = (("minimum", "≥"), ("exclusiveMinimum", ">"), ("maximum", "≤"),
             ("exclusiveMaximum", "<"))  # fmt: skip
    found = [f"{sign} {schema[key]:g}" for key, sign in marks if key in schema]
    return f" ({', '.join(found)})" if found else ""


def json_type(schema: Mapping[str, Any]) -> tuple[str, bool]:
    """A JSON schema as Markdown text, and whether it admits null."""
    if "$ref" in schema:
        name = schema["$ref"].rsplit("/", 1)[-1]
        return f"[`{name}`](#{json_anchor(name)})", False
    if "anyOf" in schema:
        options = [o for o in schema["anyOf"] if o.get("type") != "null"]
        texts = [json_type(o)[0] for o in options]
        return " or ".join(texts), len(options) < len(schema["anyOf"])
    if "const" in schema:
        return f"`{_json(schema['const'])}`", False
    if "enum" in schema:
        return " or ".join(f"`{_json(v)}`" for v in schema["enum"]), False
    kind = schema.get("type")
    if kind == "array":
        items = schema.get("items")
        return (f"array of {json_type(items)[0]}" if items else "array"), False
    if kind == "object":
        values = schema.get("additionalProperties")
        if isinstance(values, Mapping) and values:
            return f"object: key → {json_type(values)[0]}", False
        return "object", False
    if kind in ("integer", "number", "string", "boolean"):
        return f"`{kind}`{_bounds(schema)}", False
    if not set(schema) - {"title", "default", "description"}:
        return "any JSON value", True
    raise RuntimeError(f"no rendering for the JSON schema {dict(schema)} ({__file__})")


def _json(value: Any) -> str:
    import json

    return json.dumps(value)


def _nested_models(cls: type) -> list[type]:
    """The pydantic models a model's fields hold, in field order, depth first, each once."""
    import typing

    from pydantic import BaseModel

    found: list[type] = []

    def walk(annotation: Any) -> None:
        if isinstance(annotation, type) and issubclass(annotation, BaseModel):
            if annotation not in found:
                found.append(annotation)
                for field in annotation.model_fields.values():
                    walk(field.annotation)
            return
        for arg in typing.get_args(annotation):
            walk(arg)

    walk(cls)
    return found


def render_json_model(cls: Any, note: str = "") -> Iterator[str]:
    """One pydantic model: its docstring, then each key's JSON type, presence, description."""
    schema = cls.model_json_schema()
    comments = field_comments(cls)
    yield from (f'<a id="{json_anchor(cls.__name__)}"></a>', f"#### JSON `{cls.__name__}`", "")
    yield from prose(inspect.cleandoc(cls.__doc__ or ""))
    if note:
        yield from prose(note)
    yield "| Key | Type | Required | Description |"
    yield "| --- | --- | --- | --- |"
    required = set(schema.get("required", ()))
    for name, field in cls.model_fields.items():
        key = field.serialization_alias or field.alias or name
        text, nullable = json_type(schema["properties"][key])
        if nullable and text != "any JSON value":
            text = f"`null` or {text}"
        default = None if key in required else field.get_default(call_default_factory=True)
        if key in required:
            needed = "yes"
        elif hasattr(type(default), "model_fields"):
            needed = "no (default: every key at its default)"
        else:
            needed = f"no (default `{_json(default)}`)"
        about = field.description or comments.get(name, "")
        yield f"| `{key}` | {text} | {needed} | {cell(about)} |"
    yield ""


def render_json_models(roots: Iterable[tuple[Any, str]]) -> Iterator[str]:
    """Each root model and the models inside it (after it), each once."""
    shown: set[type] = set()
    for root, note in roots:
        for cls in _nested_models(root):
            if cls not in shown:
                shown.add(cls)
                yield from render_json_model(cls, note if cls is root else "")


# --- Writing a client: the template ---------------------------------------------------------------

# The example model of "The layout" (and of examples/node): its groups in ModelInfo order, each
# with its parameters (name, shape) in flat order.
EXAMPLE_GROUPS = (("no_decay", (("bias", (2,)),)), ("default", (("weight", (2, 3)),)))
EXAMPLE_SHARDS = 2


def render_layout_example() -> Iterator[str]:
    """How the server lays the example model out on its shards (optserve.common.layout, which
    the coordinator plans with)."""
    import math

    import torch

    from optserve.common.layout import plan_group, split_ranges

    groups = [
        plan_group(name, [(p, shape, torch.float32) for p, shape in params])
        for name, params in EXAMPLE_GROUPS
    ]
    slices = split_ranges(groups, EXAMPLE_SHARDS)
    shards = " | ".join(f"Shard {s.index}" for s in slices)
    yield f"| Group | Flat vector | Elements | {shards} |"
    yield "| --- | --- | --- | " + " | ".join("---" for _ in slices) + " |"
    for group in groups:
        parts = ", ".join(
            f"`{p.name}` {list(p.shape)} at [{p.offset}, {p.offset + math.prod(p.shape)})"
            for p in group.params
        )
        ranges = []
        for s in slices:
            start, end = s.ranges[group.name]
            ranges.append(f"[{start}, {end})" + (" (empty)" if start == end else ""))
        yield f"| `{group.name}` | {parts} | {group.numel} | " + " | ".join(ranges) + " |"


_PLACEHOLDER = re.compile(r"\{\{\s*([a-z_]+)\s*\}\}")


def fill(template: str, values: Mapping[str, str]) -> str:
    """`template` with each {{name}} replaced; an unknown name, or a value never used, stops."""
    used: set[str] = set()

    def replace(match: re.Match[str]) -> str:
        name = match.group(1)
        if name not in values:
            raise KeyError(f"{PROTOCOL.name} uses {{{{{name}}}}}, which {__file__} does not fill")
        used.add(name)
        return values[name]

    text = _PLACEHOLDER.sub(replace, template)
    unused = sorted(set(values) - used)
    if unused:
        raise KeyError(f"{PROTOCOL.name} no longer uses {unused}: drop them from {__file__}")
    return text


def render_protocol(
    files: list[descriptor_pb2.FileDescriptorProto], policy: Policy, facts: Facts
) -> Iterator[str]:
    from optserve.common.config import AsyncMode, GradientPolicy, SyncMode
    from optserve.common.results import CheckpointInfo, MigrationReport, Status

    def lines(rows: Iterable[str]) -> str:
        return "\n".join(rows)

    values = {
        "token_env": policy.token_env,
        "token_file_env": facts.token_file_env,
        "tls_ca_env": facts.tls_ca_env,
        "max_message_bytes": byte_size(policy.max_message_bytes),
        "max_chunk_bytes": byte_size(policy.max_chunk_bytes),
        "default_chunk_bytes": byte_size(policy.default_chunk_bytes),
        "kind_metadata": facts.kind_metadata,
        "max_details_chars": f"{facts.max_details_chars:,}",
        "stage_timeout": duration(facts.stage_timeout_s),
        "retain_decisions": duration(facts.retain_decisions_s),
        "max_decisions": f"{facts.max_decisions:,}",
        "initial_values_timeout": duration(facts.initial_values_timeout_s),
        "model_name": facts.model_name,
        "max_param_name_chars": str(facts.max_param_name_chars),
        "max_param_dims": str(facts.max_param_dims),
        "max_shards": str(facts.max_shards),
        "default_group": facts.default_group,
        "round_timeout": duration(facts.round_timeout_s),
        "gradient_dtypes": ", ".join(f"`{d}`" for d in facts.gradient_dtypes),
        "pull_dtypes": ", ".join(f"`{d}`" for d in facts.pull_dtypes),
        "load_dtype": f"`{facts.load_dtype}`",
        "layout_example": lines(render_layout_example()),
        "error_table": lines(render_error_table()),
        "kind_table": lines(render_kind_table()),
        "status_table": lines(render_status_tables(files, policy, facts)),
        "mode_shapes": lines(
            render_json_models([(AsyncMode, ""), (SyncMode, ""), (GradientPolicy, "")])
        ),
        "answer_shapes": lines(
            render_json_models(
                [
                    (Status, "The answer of `Coordinator.Status` (`StatusResponse.status_json`)."),
                    (
                        MigrationReport,
                        "The answer of `SetOptimizer` and `SetHyperparameters`: "
                        "`SetOptimizerResponse.report_json` is this object without `version`, "
                        "which is the response's own `version` field.",
                    ),
                    (
                        CheckpointInfo,
                        "Each element of `ListCheckpointsResponse.checkpoints_json` "
                        "(a JSON array, oldest first): `name`, `version` and `time` are set; the "
                        "answer of `Checkpoint` has the other fields as its own fields.",
                    ),
                ]
            )
        ),  # fmt: skip
    }
    # The template's leading comment is for its editors, not for the page.
    template = re.sub(r"\A\s*<!--.*?-->\s*", "", PROTOCOL.read_text(encoding="utf-8"), flags=re.S)
    text = fill(template, values)
    yield from text.rstrip("\n").split("\n")
    yield ""


# --- Links --------------------------------------------------------------------------------------

_LINK = re.compile(r"\]\(([^)#\s]+)(#[^)\s]*)?\)")


# Documents outside this repository (the design and the optimizer spec) that text may cite.
_ELSEWHERE = re.compile(r"\bDESIGN\b|optimizer[- ]spec|\bspec,? section \d|\bspec \d+\.\d+")


def cited_elsewhere(text: str) -> list[str]:
    """Lines of the page that cite documents a reader of this repository does not have."""
    return [line.strip() for line in text.splitlines() if _ELSEWHERE.search(line)]


def check_links(text: str, page: Path = DOC) -> None:
    """Every relative link of the page names a file or folder of the repository."""
    broken = []
    for match in _LINK.finditer(text):
        target = match.group(1)
        if re.match(r"[a-z]+:", target):
            continue
        if not (page.parent / target).resolve().exists():
            broken.append(target)
    if broken:
        raise RuntimeError(f"{page.name} would link to files that do not exist: {broken}")


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
    files: list[descriptor_pb2.FileDescriptorProto],
    index: Index,
    policy: Policy,
    facts: Facts,
    protocol_contents: Iterable[str] = (),
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
        "To compile the protos in another language, use the repository's `protos/` folder as the "
        "include root (`protoc --proto_path=protos`, or `includeDirs` of a loader): the files are "
        + ", ".join(f"`{f.name}`" for f in files)
        + f' and import each other by those paths (`import "{files[-1].name}"`). An '
        "installed `optserve` package holds the same files in its `optserve/v1` folder: there "
        "the include root is the folder that holds `optserve/` (`site-packages`). "
        "[Writing a client](#writing-a-client) is the protocol a client in any language "
        "follows; [`examples/node`](../examples/node/) is a complete Node.js client made from "
        "it.",
        "",
        "## Contents",
        "",
        "- [Authentication](#authentication)",
        "- [Health checking and reflection](#health-checking-and-reflection)",
        "- [Streams and message sizes](#streams-and-message-sizes)",
        *protocol_contents,
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
    yield from (
        "",
        "## Authentication",
        "",
        "Unless the server runs without a token table (`optserve serve --no-auth`), every call "
        "sends its token as the metadata `authorization: Bearer <token>` (the Python client: "
        f"`ParameterServerClient(token=...)`, or `${policy.token_env}`, or the file named by "
        f"`${facts.token_file_env}`). A token is printable ASCII without spaces: strip the "
        "whitespace around a token read from a file or the environment (a trailing newline "
        "above all), as the Python client does; a newline is not even allowed in gRPC metadata. "
        "A missing or unknown "
        "token gets `UNAUTHENTICATED`; a token whose role does not cover the method gets "
        "`PERMISSION_DENIED`, and so does a call about a model outside the token's `models` "
        "patterns (`ListModels` lists only the models a token covers). Each token may have at "
        f"most {policy.max_streams_per_client} calls in flight on one shard endpoint by "
        "default (`max_streams_per_client`), whatever connections it opens, and each address "
        "has an allowance of its own; pulls in flight, staged push bytes and the rate of "
        "control calls are bounded the same way. One more gets `RESOURCE_EXHAUSTED`. A stream "
        "that waits on its client for too long (`stream_idle_s`, 120 s by default) is "
        "cancelled (`CANCELLED`).",
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
            + " on each other, authenticated by the calling shard's own key instead of a token; "
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
        "(`CreateModelRequest.spec`, `PushRequest.header`, `LoadRequest.header`); a streamed "
        "response likewise "
        "(`PullResponse.header`). A stream that is cut short or malformed changes nothing.",
        "",
    )


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


def github_anchor(heading: str) -> str:
    """The anchor GitHub gives a heading: lower case, no punctuation, spaces as hyphens."""
    text = re.sub(r"[^\w\- ]", "", heading.strip().lower())
    return text.replace(" ", "-")


def contents_of(section: list[str]) -> list[str]:
    """Links to the `##` and `###` headings of the protocol section, as a nested list."""
    out = []
    for line in section:
        match = re.match(r"(##+) (.+)$", line)
        if match and len(match.group(1)) <= 3:
            indent = "  " * (len(match.group(1)) - 2)
            out.append(f"{indent}- [{match.group(2)}](#{github_anchor(match.group(2))})")
    return out


def render(
    descriptors: descriptor_pb2.FileDescriptorSet | None = None,
    policy: Policy | None = None,
    facts: Facts | None = None,
) -> str:
    """The whole page, from freshly compiled protos unless `descriptors` is given."""
    descriptors = descriptors if descriptors is not None else compile_protos()
    policy = policy if policy is not None else Policy.load()
    facts = facts if facts is not None else Facts.load()
    files = sorted((f for f in descriptors.file if f.package == PACKAGE), key=lambda f: f.name)
    index = Index.of(descriptors.file)
    protocol = list(render_protocol(files, policy, facts))
    lines = list(render_intro(files, index, policy, facts, contents_of(protocol)))
    lines.extend(protocol)
    for file in files:
        lines.extend(render_file(file, index, policy))
    while lines and not lines[-1]:
        lines.pop()
    text = "\n".join(lines) + "\n"
    check_links(text)
    return text


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
    for line in cited_elsewhere(text):  # from the protos' comments: say so, do not stop
        print(f"warning: the page cites a document not in the repository: {line[:160]}",
              file=sys.stderr)  # fmt: skip
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
