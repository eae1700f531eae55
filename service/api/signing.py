"""Signed, expiring links: how a browser downloads a checkpoint archive from a server that
needs a bearer token.

A link (``<path>?expires=<unix seconds>&signature=<hex>``) cannot carry an ``Authorization``
header, and fetching the archive with the header would make the browser hold the whole tar in
memory before saving it. So an authenticated client asks for a link
(``POST /runs/{id}/checkpoints/{ref}/link``) and the browser then follows it like any download,
streaming to disk. The signature is HMAC-SHA256 (RFC 2104) keyed by the API token over the
exact path and the expiry time: it opens that one path, for GET, until it expires, and is void
once the token changes.
"""

from __future__ import annotations

import hashlib
import hmac
import time
from urllib.parse import parse_qs, urlencode

__all__ = ["sign_path", "signed_query_ok"]


def _mac(token: str, path: str, expires: int) -> str:
    return hmac.new(token.encode(), f"GET\n{path}\n{expires}".encode(), hashlib.sha256).hexdigest()


def sign_path(
    token: str, path: str, lifetime_s: float, *, now: float | None = None
) -> tuple[str, int]:
    """A signed link to ``path`` valid for ``lifetime_s`` seconds from ``now`` (default: the
    clock). Returns ``(url, expires)`` with ``expires`` in Unix seconds."""
    expires = int((time.time() if now is None else now) + lifetime_s)
    return (
        f"{path}?{urlencode({'expires': expires, 'signature': _mac(token, path, expires)})}",
        expires,
    )


def signed_query_ok(
    token: str, path: str, query_string: bytes | str, *, now: float | None = None
) -> bool:
    """Whether the request's query holds a valid, unexpired signature for exactly ``path``.
    Compared in constant time; anything malformed is simply not valid."""
    if isinstance(query_string, bytes):
        query_string = query_string.decode("latin-1")
    query = parse_qs(query_string)
    try:
        (expires_text,), (signature,) = query["expires"], query["signature"]
        expires = int(expires_text)
    except (KeyError, ValueError):
        return False
    if expires < (time.time() if now is None else now):
        return False
    return hmac.compare_digest(signature.encode("latin-1"), _mac(token, path, expires).encode())
