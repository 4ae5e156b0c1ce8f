"""One HTTP GET for the tests of the metrics endpoint, with an optional bearer token."""

from __future__ import annotations

import urllib.error
import urllib.request


def get(url: str, token: str | None = None) -> tuple[int, str]:
    """(status, body) of GET `url`; an HTTP error's status and body too, not raised."""
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    try:
        with urllib.request.urlopen(urllib.request.Request(url, headers=headers), timeout=30) as r:
            return r.status, r.read().decode()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read().decode()
