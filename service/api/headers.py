"""Security headers on every response: :class:`SecurityHeadersMiddleware`.

Every answer of the app (the dashboard, its assets, the API, ``/docs``, ``/openapi.json``,
errors, 401s, 404s, the 500s of ``service.api.errors.ErrorMiddleware``) carries
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

from starlette.datastructures import MutableHeaders
from starlette.types import ASGIApp, Message, Receive, Scope, Send

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
