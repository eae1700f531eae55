"""The middleware around every request of the API (``install_middleware`` adds it), outermost
first:

- :class:`SecurityHeadersMiddleware` puts :data:`SECURITY_HEADERS` on every answer (below);
- :class:`ErrorMiddleware` turns any unhandled exception into a 500 in the API's error format
  (``service.api.errors``) and logs the traceback with its ``error_id`` (no request ever
  returns a traceback);
- :class:`AuthMiddleware` checks ``Authorization: Bearer <API_TOKEN>`` when a token is set
  (exempt: :data:`PUBLIC_PATHS` and :data:`PUBLIC_PREFIXES`; signed archive links:
  ``service.api.signing``);
- :class:`BodyLimitMiddleware` answers 413 for a body larger than the limit, whether announced
  by ``Content-Length`` or streamed.

Security headers: every answer of the app (the dashboard, its assets, the API, ``/docs``, ``/openapi.json``,
errors, 401s, 404s, the 500s of :class:`ErrorMiddleware`) carries
:data:`SECURITY_HEADERS`:

* ``Content-Security-Policy`` (:data:`CONTENT_SECURITY_POLICY`): scripts, styles, fonts and
  fetches only from this server; images from it or ``data:`` URLs (Swagger UI's CSS draws its
  icons with them); no inline script, no ``eval``, no inline ``style="..."`` attribute or
  ``<style>`` element (styles set from a script through ``element.style`` are allowed by CSP);
  no plugins (``object-src 'none'``), no ``<base>`` (``base-uri 'none'``), forms post only here,
  and no page may frame ours (``frame-ancestors 'none'``). The dashboard and the Swagger UI
  page (``service.api.system``: its start-up code is the served ``/docs/init.js``, not inline)
  live within it.
* ``X-Content-Type-Options: nosniff``, ``X-Frame-Options: DENY`` (``frame-ancestors`` for old
  browsers), ``Referrer-Policy: no-referrer`` (signed download links carry their signature in
  the query: no page should pass that on).

A header the app already set is replaced (one policy for the whole server).
"""

from __future__ import annotations

import hmac
import json
import logging
import uuid
from collections.abc import Callable, Mapping
from typing import Any

from fastapi import FastAPI
from starlette.datastructures import MutableHeaders
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from service.api.errors import error_body
from service.api.signing import signed_query_ok
from service.settings import Settings

log = logging.getLogger("moejobs.api")

#: Paths anyone may call without the token (probes, scrapers, the docs, the dashboard page,
#: which holds no data and asks for the token itself).
PUBLIC_PATHS = frozenset({"/healthz", "/readyz", "/metrics", "/docs", "/openapi.json", "/"})
#: Path prefixes anyone may call without the token (the docs' and the dashboard's assets).
PUBLIC_PREFIXES = ("/docs/", "/static/")


#: The one Content-Security-Policy of every response (see the module docstring).
CONTENT_SECURITY_POLICY = "; ".join(
    (
        "default-src 'self'",
        "script-src 'self'",
        "style-src 'self'",
        "img-src 'self' data:",
        "font-src 'self'",
        "connect-src 'self'",
        "object-src 'none'",
        "base-uri 'none'",
        "form-action 'self'",
        "frame-ancestors 'none'",
    )
)

#: Headers added to every HTTP response.
SECURITY_HEADERS: dict[str, str] = {
    "Content-Security-Policy": CONTENT_SECURITY_POLICY,
    "X-Content-Type-Options": "nosniff",
    "X-Frame-Options": "DENY",
    "Referrer-Policy": "no-referrer",
}


class SecurityHeadersMiddleware:
    """Pure ASGI middleware: sets :data:`SECURITY_HEADERS` on the start of every HTTP response
    (replacing any the app set). Outermost, so errors and refusals from the other middleware
    carry them too."""

    def __init__(self, app: ASGIApp, headers: dict[str, str] | None = None):
        self.app = app
        self.headers = dict(SECURITY_HEADERS if headers is None else headers)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return

        async def send_with_headers(message: Message) -> None:
            if message["type"] == "http.response.start":
                headers = MutableHeaders(scope=message)
                for name, value in self.headers.items():
                    headers[name] = value
            await send(message)

        await self.app(scope, receive, send_with_headers)


async def _send_json(
    send: Send, status: int, body: dict[str, Any], headers: Mapping[str, str] | None = None
) -> None:
    payload = json.dumps(body).encode()
    raw_headers = [
        (b"content-type", b"application/json"),
        (b"content-length", str(len(payload)).encode()),
    ]
    raw_headers += [(k.lower().encode(), v.encode()) for k, v in (headers or {}).items()]
    await send({"type": "http.response.start", "status": status, "headers": raw_headers})
    await send({"type": "http.response.body", "body": payload})


class ErrorMiddleware:
    """Outermost: any exception that escapes the app becomes a logged 500 with an
    ``error_id`` (if the response had not started; otherwise the connection is closed after
    logging). Never re-raises, so the server prints no second traceback."""

    def __init__(self, app: ASGIApp):
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = False

        async def tracking_send(message: Message) -> None:
            nonlocal started
            if message["type"] == "http.response.start":
                started = True
            await send(message)

        try:
            await self.app(scope, receive, tracking_send)
        except Exception:
            error_id = uuid.uuid4().hex
            log.exception(
                "unhandled error %s in %s %s", error_id, scope.get("method"), scope.get("path")
            )
            if not started:
                await _send_json(
                    send,
                    500,
                    error_body(
                        500,
                        f"internal error; the server log has the details under error id {error_id}",
                        error_id=error_id,
                    ),
                )


def _bearer_ok(scope: Scope, token: str) -> bool:
    for name, value in scope.get("headers", ()):
        if name == b"authorization":
            text = value.decode("latin-1")
            scheme, _, given = text.partition(" ")
            if scheme.lower() == "bearer":
                return hmac.compare_digest(given.strip().encode(), token.encode())
    return False


class AuthMiddleware:
    """With a token configured (``token_getter()`` not None), every request outside
    :data:`PUBLIC_PATHS`/:data:`PUBLIC_PREFIXES` needs ``Authorization: Bearer <token>``;
    otherwise 401 (no token given) or 403 (a wrong one). Compared in constant time.
    A GET or HEAD of a path ending in ``/archive`` may instead carry a signed link's query
    (``service.api.signing``): a bad or expired signature is a 403."""

    def __init__(self, app: ASGIApp, token_getter: Callable[[], str | None]):
        self.app = app
        self.token_getter = token_getter

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        token = self.token_getter() if scope["type"] == "http" else None
        path = scope.get("path", "")
        if token is None or path in PUBLIC_PATHS or path.startswith(PUBLIC_PREFIXES):
            await self.app(scope, receive, send)
            return
        if _bearer_ok(scope, token):
            await self.app(scope, receive, send)
            return
        query = scope.get("query_string", b"")
        if (
            scope.get("method") in ("GET", "HEAD")
            and path.endswith("/archive")
            and b"signature=" in query
        ):
            if signed_query_ok(token, path, query):
                await self.app(scope, receive, send)
            else:
                await _send_json(
                    send,
                    403,
                    error_body(
                        403,
                        "the download link is not valid or has expired: ask for a new one "
                        "(POST .../link)",
                        code="invalid_link",
                    ),
                )
            return
        given = any(name == b"authorization" for name, _ in scope.get("headers", ()))
        if given:
            await _send_json(
                send, 403, error_body(403, "the bearer token is not valid", code="invalid_token")
            )
        else:
            await _send_json(
                send,
                401,
                error_body(
                    401,
                    "this server needs a bearer token: send 'Authorization: Bearer <token>' "
                    "(MOEJOBS_API_TOKEN)",
                    code="unauthorized",
                ),
                headers={"WWW-Authenticate": "Bearer"},
            )


class BodyTooLarge(StarletteHTTPException):
    """Raised from ``receive`` when a streamed body passes the limit (handled as a 413)."""


class BodyLimitMiddleware:
    """413 for request bodies over the limit: ``limit_for(path)`` bytes (the upload limit for
    dataset uploads, the request limit elsewhere). A ``Content-Length`` over the limit is
    refused before reading; a body without one (chunked) is counted while it streams and
    the read fails with a 413 at the first byte over the limit."""

    def __init__(self, app: ASGIApp, limit_for: Callable[[str], int]):
        self.app = app
        self.limit_for = limit_for

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        limit = self.limit_for(scope.get("path", ""))
        message = (
            f"request body is larger than the limit of {limit:,} bytes "
            f"(MOEJOBS_{'UPLOAD' if limit_is_upload(scope) else 'REQUEST_BODY'}_LIMIT_BYTES)"
        )
        for name, value in scope.get("headers", ()):
            if name == b"content-length":
                try:
                    length = int(value)
                except ValueError:
                    await _send_json(send, 400, error_body(400, "invalid Content-Length header"))
                    return
                if length > limit:
                    await _send_json(send, 413, error_body(413, message, limit_bytes=limit))
                    return
        seen = 0

        async def counting_receive() -> Message:
            nonlocal seen
            msg = await receive()
            if msg["type"] == "http.request":
                seen += len(msg.get("body", b""))
                if seen > limit:
                    raise BodyTooLarge(413, message)
            return msg

        await self.app(scope, counting_receive, send)


def limit_is_upload(scope: Scope) -> bool:
    """Whether the upload limit (not the request-body limit) applies to this request."""
    return scope.get("path", "").startswith("/datasets/")


def install_middleware(app: FastAPI, settings: Settings) -> None:
    """Add the middleware of the module docstring to ``app``, in its order: the body limits
    and the token come from ``settings`` when a request arrives."""

    def limit_for(path: str) -> int:
        return (
            settings.upload_limit_bytes
            if limit_is_upload({"path": path})
            else settings.request_body_limit_bytes
        )

    def token() -> str | None:
        return settings.api_token.get_secret_value() if settings.api_token is not None else None

    # Added innermost first: SecurityHeadersMiddleware ends up outermost (its headers are on
    # the 500s, 401s and 413s of the others too).
    app.add_middleware(BodyLimitMiddleware, limit_for=limit_for)
    app.add_middleware(AuthMiddleware, token_getter=token)
    app.add_middleware(ErrorMiddleware)
    app.add_middleware(SecurityHeadersMiddleware)
