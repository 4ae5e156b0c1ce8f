"""What the client commands share: finding the coordinator, a progress line, tables."""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import threading
from collections.abc import Iterator

# Where the client commands find the coordinator.
# Where the client commands find the coordinator.
ADDRESS_ENV = "OPTSERVE_ADDRESS"

DEFAULT_ADDRESS = "127.0.0.1:50051"


def command(
    sub: argparse._SubParsersAction,
    name: str,
    help: str,
    description: str,
    epilog: str,
    model_required: bool = True,
    model_option: bool = True,
) -> argparse.ArgumentParser:
    """A client command's parser, with the options every client command shares (where the
    coordinator is, the model unless not `model_option`, the deadline, the token and TLS)."""
    command = sub.add_parser(
        name, help=help, description=description, epilog=epilog,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )  # fmt: skip
    command.add_argument(
        "--address",
        default=os.environ.get(ADDRESS_ENV, DEFAULT_ADDRESS),
        help=f"coordinator host:port (default ${ADDRESS_ENV}, else {DEFAULT_ADDRESS})",
    )
    if model_option:
        command.add_argument(
            "--model",
            required=model_required,
            help="model name" if model_required else "model name (default: every model)",
        )
    command.add_argument("--timeout-s", type=float, default=120.0, help="RPC deadline")
    command.add_argument(
        "--token-file",
        default=None,
        help="file holding the token (default $OPTSERVE_TOKEN or $OPTSERVE_TOKEN_FILE)",
    )
    command.add_argument(
        "--tls-ca", default=None, help="PEM CA file: use TLS (default $OPTSERVE_TLS_CA)"
    )
    command.add_argument(
        "--tls-server-name",
        default=None,
        help="name the server certificate must carry, if not the address's host",
    )
    return command


def connect(args: argparse.Namespace):
    from optserve.client import ParameterServerClient

    token = None
    if args.token_file:
        with open(args.token_file, encoding="utf-8") as f:
            token = f.read()
    return ParameterServerClient(
        args.address,
        timeout_s=args.timeout_s,
        token=token,
        tls_ca=args.tls_ca,
        tls_server_name=args.tls_server_name,
    )


@contextlib.contextmanager
def progress(description: str) -> Iterator[None]:
    """A progress line with the elapsed time while a long call runs (on a terminal only: tqdm
    turns itself off when stderr is not one)."""
    from tqdm import tqdm

    done = threading.Event()
    bar = tqdm(desc=description, total=None, bar_format="{desc}: {elapsed}", disable=None,
               leave=False)  # fmt: skip

    def tick() -> None:
        while not done.wait(0.5):
            bar.refresh()

    ticker = threading.Thread(target=tick, daemon=True)
    ticker.start()
    try:
        yield
    finally:
        done.set()
        ticker.join()
        bar.close()


def print_json(value: object) -> None:
    """`value` as indented JSON; typed answers (`Status`, ...) as their dicts."""
    print(json.dumps(value, indent=2, default=_jsonable))


def _jsonable(value: object) -> object:
    to_dict = getattr(value, "to_dict", None)
    return to_dict() if callable(to_dict) else str(value)


def table(headers: list[str], rows: list[list[str]]) -> str:
    """Rows as aligned columns under a header line."""
    widths = [max(len(str(c)) for c in column) for column in zip(headers, *rows, strict=True)]
    lines = [headers, ["-" * w for w in widths], *rows]
    return "\n".join(
        "  ".join(str(c).ljust(w) for c, w in zip(line, widths, strict=True)).rstrip()
        for line in lines
    )


def ago(seconds: float) -> str:
    seconds = max(0.0, seconds)
    if seconds < 120:
        return f"{seconds:.0f}s ago"
    if seconds < 7200:
        return f"{seconds / 60:.0f}m ago"
    return f"{seconds / 3600:.1f}h ago"


def positive(text: str) -> int:
    value = int(text)
    if not 1 <= value <= 1_000_000:
        raise argparse.ArgumentTypeError(f"must be between 1 and 1000000, got {value}")
    return value
