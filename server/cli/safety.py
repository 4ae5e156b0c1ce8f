"""What `optserve serve` refuses before it starts anything: an exposed server without TLS or
without tokens (unless told `--insecure`), and a token table that still holds a placeholder.

Off loopback, a server without TLS sends every token and the shards' secret in clear, and one
without tokens lets anyone who reaches the port change or drop any model; both are allowed only
with an explicit `--insecure`. A token table copied from an example (`REPLACE-WITH-...`) would run
with a public admin token, so it is refused whatever the interface. No Ray, no gRPC: these checks
read the options and the environment only.
"""

from __future__ import annotations

import hashlib
import ipaddress
import json
import os
import re
import socket

from optserve.server.edge.tokens import TOKENS_ENV, TOKENS_FILE_ENV

# Tokens that appear in optserve's examples and deploy files, or that people type as stand-ins.
KNOWN_PLACEHOLDERS = frozenset(
    {
        "REPLACE-WITH-32-RANDOM-CHARACTERS",
        "REPLACE-WITH-ANOTHER-32-CHARACTERS",
        "<32+ random characters>",
        "<32 random characters>",
    }
)
# A token holding one of these words was not generated (case-insensitive).
PLACEHOLDER_WORDS = re.compile(r"replace|changeme|change-me|change_me|placeholder|your-?token")
WILDCARD_HOSTS = frozenset({"0.0.0.0", "::", "[::]", ""})


def is_loopback(host: str) -> bool:
    """Whether `host` is a loopback interface (127.0.0.0/8, ::1, localhost)."""
    if host.strip().lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def exposure_problems(host: str, tls: bool, auth: bool) -> list[str]:
    """What is unsafe about serving on `host` with these settings (empty on loopback)."""
    if is_loopback(host):
        return []
    problems = []
    if not tls:
        problems.append(
            f"--host {host} without TLS sends tokens, the shards' secret and the weights in "
            "clear: give --tls-cert and --tls-key"
        )
    if not auth:
        problems.append(
            f"--no-auth on {host} lets anyone who can reach the port change or drop any model: "
            "give a token table (--tokens-file)"
        )
    return problems


def check_exposure(host: str, tls: bool, auth: bool, insecure: bool) -> list[str]:
    """Refuse (SystemExit) an exposed, unprotected server unless `insecure`; return the
    warnings to print when it is allowed."""
    problems = exposure_problems(host, tls, auth)
    if problems and not insecure:
        raise SystemExit(
            "optserve serve: refusing to start off loopback unprotected:\n  "
            + "\n  ".join(problems)
            + "\n(or add --insecure to accept the risk, e.g. on a private network you trust)"
        )
    return [f"WARNING (--insecure): {problem}" for problem in problems]


def placeholder_names(text: str) -> list[str]:
    """The names of the entries of a JSON token table whose token is a placeholder: one of
    optserve's example tokens (or its digest), a token that names itself a placeholder
    (REPLACE..., CHANGEME...), or one character repeated. Text that is not a table: []."""
    try:
        entries = json.loads(text).get("tokens")
    except (ValueError, AttributeError):
        return []
    placeholder_digests = {hashlib.sha256(t.encode()).hexdigest() for t in KNOWN_PLACEHOLDERS}
    names = []
    for i, entry in enumerate(entries if isinstance(entries, list) else []):
        if not isinstance(entry, dict):
            continue
        token, digest = entry.get("token"), entry.get("sha256")
        placeholder = (isinstance(token, str) and is_placeholder_token(token)) or (
            isinstance(digest, str) and digest.lower() in placeholder_digests
        )
        if placeholder:
            names.append(str(entry.get("name", f"token {i}")))
    return names


def is_placeholder_token(token: str) -> bool:
    """A token that was not generated: an example one, a stand-in word, one repeated character."""
    return (
        token in KNOWN_PLACEHOLDERS
        or bool(PLACEHOLDER_WORDS.search(token.lower()))
        or len(set(token)) == 1
    )


def check_token_table(path: str | None) -> None:
    """Refuse (SystemExit) a token table (from `path`, else $OPTSERVE_TOKENS_FILE, else
    $OPTSERVE_TOKENS) that holds a placeholder token. An unreadable table is left to the
    table's own parser, which says why."""
    path = path or os.environ.get(TOKENS_FILE_ENV)
    try:
        if path:
            with open(path, encoding="utf-8") as f:
                text, source = f.read(), path
        else:
            text, source = os.environ.get(TOKENS_ENV, ""), f"${TOKENS_ENV}"
    except OSError:
        return
    names = placeholder_names(text)
    if names:
        raise SystemExit(
            f"optserve serve: the token table ({source}) still holds placeholder tokens "
            f"(entries {', '.join(names)}): put real tokens in it, e.g. from "
            "`python3 -c 'import secrets; print(secrets.token_urlsafe(32))'`, or their digests "
            'as "sha256" entries'
        )


def machine_address() -> str:
    """This machine's address on its default route (no packet is sent); 127.0.0.1 when it has
    none. What a wildcard --host advertises when Ray itself stays on loopback."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as probe:
        try:
            probe.connect(("10.255.255.255", 1))
            return str(probe.getsockname()[0])
        except OSError:
            return "127.0.0.1"
