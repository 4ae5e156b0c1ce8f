"""Regenerate the committed protobuf and gRPC code from protos/optserve/v1/*.proto.

Usage: python scripts/gen_protos.py [--out DIR]

The proto path equals the import path (protos/optserve/v1/x.proto -> optserve.v1.x_pb2), so protoc
runs with protos/ as its include root. Generated files are committed; tests/unit/test_protos.py
regenerates into a temporary folder and fails if the committed files differ.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

PROTO_ROOT = Path(__file__).resolve().parent.parent / "protos"
PROTO_PACKAGE = Path("optserve") / "v1"


def proto_files() -> list[Path]:
    return sorted((PROTO_ROOT / PROTO_PACKAGE).glob("*.proto"))


def generate(out_root: Path) -> list[Path]:
    """Run protoc over every .proto file, writing into out_root/optserve/v1/; return the outputs."""
    from grpc_tools import protoc

    out_root.mkdir(parents=True, exist_ok=True)
    (out_root / PROTO_PACKAGE).mkdir(parents=True, exist_ok=True)
    sources = [str(p.relative_to(PROTO_ROOT)) for p in proto_files()]
    args = [
        "grpc_tools.protoc",
        f"--proto_path={PROTO_ROOT}",
        f"--python_out={out_root}",
        f"--pyi_out={out_root}",
        f"--grpc_python_out={out_root}",
        *sources,
    ]
    if protoc.main(args) != 0:
        raise RuntimeError(f"protoc failed: {' '.join(args)}")
    return sorted(
        p
        for p in (out_root / PROTO_PACKAGE).iterdir()
        if p.name.endswith((".py", ".pyi")) and "_pb2" in p.name
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--out", type=Path, default=PROTO_ROOT, help="output root (default: protos/)"
    )
    args = parser.parse_args(argv)
    for path in generate(args.out):
        print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
