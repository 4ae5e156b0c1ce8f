"""The `optserve` command line: one module per command (or family of client commands).

* `serve`: the server; `demo`: the main job, end to end;
* `status`: every model, or one in detail; `control`: `plot`, `set-optimizer`, `set-schedule`,
  `checkpoint`, `restore`; `compare`: a model beside its forks; `common`: what the client
  commands share.
"""

from __future__ import annotations

import argparse
import logging
import sys

from optserve.server.cli import compare, control, demo, serve, status


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="optserve",
        description="optserve: an optimizer-as-a-server parameter server on Ray.",
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    serve.add_parser(sub)
    demo.add_parser(sub)
    status.add_parser(sub)
    control.add_parsers(sub)
    compare.add_parser(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    args = build_parser().parse_args(argv)
    try:
        return int(args.func(args))
    except KeyboardInterrupt:
        return 130
    except Exception as exc:  # noqa: BLE001 - a CLI reports, it does not dump a traceback
        from optserve.common.errors import OptserveError

        if isinstance(exc, OptserveError):
            print(f"optserve: {exc.code.name}: {exc}", file=sys.stderr)
            return 2
        if isinstance(exc, OSError | RuntimeError):  # a file, a missing extra, ...
            print(f"optserve: {exc}", file=sys.stderr)
            return 1
        raise
