"""What a token is and where it is looked for: shared by the client, which sends it, and the
server's edge, which checks it."""

from __future__ import annotations

import re

TOKEN_ENV = "OPTSERVE_TOKEN"
TOKEN_FILE_ENV = "OPTSERVE_TOKEN_FILE"
TLS_CA_ENV = "OPTSERVE_TLS_CA"
TOKEN_CHARS = re.compile(r"[\x21-\x7e]+")  # printable ASCII without spaces: a metadata value
