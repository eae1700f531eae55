"""The API's error format, its exception handlers and the middleware around every request.

Every error response has one JSON shape::

    {"code": "invalid_config",              # stable, machine-readable
     "message": "2 problems in the submitted configs",   # one readable line
     "errors": [{"loc": ["body", "train_config", "train", "micro_batch_size"],
                 "msg": "must be >= 1, got 0", "type": "invalid_config"}],  # when fields are at fault
     "error_id": "3f9c..."}                 # 500 only: quote it, it is in the server log

plus, where useful, extra keys (``run_id`` for conflicts). ``loc`` always starts with where the
value came from: ``body``, ``query``, ``path`` or ``header``.

A dependency that cannot serve is a **503** with ``Retry-After`` (seconds) and the extra key
``dependency`` (``"database"`` or ``"broker"``): ``database_unavailable`` (unreachable,
connection lost, locked: any route that reads or writes the database), ``database_busy`` (no
database slot came free in time, ``service.api.deps.DatabaseGate``) and ``broker_unavailable``
(a route that must hand work to the broker). Never a 500 for these.

Middleware (outermost first): :class:`ErrorMiddleware` turns any unhandled exception into a
500 in that format and logs the traceback with its ``error_id`` (no request ever returns a
traceback); :class:`AuthMiddleware` checks ``Authorization: Bearer <API_TOKEN>`` when a token
is set (exempt: :data:`PUBLIC_PATHS` and :data:`PUBLIC_PREFIXES`); :class:`BodyLimitMiddleware`
answers 413 for a body larger than the limit, whether announced by ``Content-Length`` or
streamed.
"""

from __future__ import annotations

import hmac
import json
import logging
import uuid
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import sqlalchemy as sa
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from service import runs as runs_service
from service.api.signing import signed_query_ok
from service.db import unavailable_reason
from service.submission import InvalidSubmission

log = logging.getLogger("moejobs.api")

#: Paths anyone may call without the token (probes, scrapers, the docs, the dashboard page,
#: which holds no data and asks for the token itself).
PUBLIC_PATHS = frozenset({"/healthz", "/readyz", "/metrics", "/docs", "/openapi.json", "/"})
#: Path prefixes anyone may call without the token (the docs' and the dashboard's assets).
PUBLIC_PREFIXES = ("/docs/", "/static/")

_CODES = {
    400: "bad_request",
    401: "unauthorized",
    403: "forbidden",
    404: "not_found",
    405: "method_not_allowed",
    406: "not_acceptable",
    409: "conflict",
    413: "body_too_large",
    415: "unsupported_media_type",
    422: "validation_error",
    429: "too_many_requests",
    500: "internal_error",
    503: "unavailable",
}


class ApiError(Exception):
    """An error the API answers with ``status`` and the uniform body. ``errors`` is a list of
    ``{"loc": [...], "msg": str, "type": str}``; ``extra`` keys are added to the body."""

    def __init__(
        self,
        status: int,
        message: str,
        *,
        code: str | None = None,
        errors: Sequence[Mapping[str, Any]] | None = None,
        headers: Mapping[str, str] | None = None,
        **extra: Any,
    ):
        super().__init__(message)
        self.status = status
        self.code = code or _CODES.get(status, "error")
        self.message = message
        self.errors = [dict(e) for e in errors] if errors is not None else None
        self.headers = dict(headers or {})
        self.extra = extra


def error_body(
    status: int,
    message: str,
    *,
    code: str | None = None,
    errors: Sequence[Mapping[str, Any]] | None = None,
    **extra: Any,
) -> dict[str, Any]:
    """The uniform error document (see the module docstring)."""
    body: dict[str, Any] = {"code": code or _CODES.get(status, "error"), "message": message}
    if errors is not None:
        body["errors"] = list(errors)
    body.update({k: v for k, v in extra.items() if v is not None})
    return body


def error_response(
    status: int, message: str, *, headers: Mapping[str, str] | None = None, **kwargs: Any
) -> JSONResponse:
    """A JSONResponse carrying :func:`error_body`."""
    return JSONResponse(
        error_body(status, message, **kwargs), status_code=status, headers=dict(headers or {})
    )


#: Seconds a client is told to wait (``Retry-After``) when a dependency does not answer.
UNAVAILABLE_RETRY_AFTER_S = 5
#: Seconds a client is told to wait when every database connection stayed busy.
BUSY_RETRY_AFTER_S = 1


def dependency_unavailable(
    dependency: str, reason: str, *, retry_after: int = UNAVAILABLE_RETRY_AFTER_S
) -> ApiError:
    """A 503 ``<dependency>_unavailable`` (``dependency`` is ``"database"`` or ``"broker"``)
    with ``Retry-After`` and ``"dependency"`` in the body; ``reason`` is one line."""
    return ApiError(
        503,
        f"the {dependency} is unavailable: {reason}; retry after {retry_after} s",
        code=f"{dependency}_unavailable",
        headers={"Retry-After": str(retry_after)},
        dependency=dependency,
    )


def field_error(loc: Sequence[str | int], msg: str, type_: str = "value_error") -> dict[str, Any]:
    """One entry of ``errors``."""
    return {"loc": list(loc), "msg": msg, "type": type_}


def invalid(loc: Sequence[str | int], msg: str, *, code: str = "validation_error") -> ApiError:
    """A 422 about one field."""
    return ApiError(422, f"{_dotted(loc)}: {msg}", code=code, errors=[field_error(loc, msg, code)])


def _dotted(loc: Sequence[str | int]) -> str:
    out = ""
    for part in loc:
        out += f"[{part}]" if isinstance(part, int) else ("." if out else "") + str(part)
    return out


def _pydantic_errors(exc: RequestValidationError) -> list[dict[str, Any]]:
    out = []
    for err in exc.errors():
        loc = [p for p in err.get("loc", ())]
        msg = str(err.get("msg", "invalid value"))
        if msg.startswith("Value error, "):
            msg = msg[len("Value error, ") :]
        out.append(field_error(loc, msg, str(err.get("type", "value_error"))))
    return out


def install_exception_handlers(app: FastAPI) -> None:
    """Register the handlers that give every known error the uniform body."""

    @app.exception_handler(ApiError)
    async def _api_error(_request: Request, exc: ApiError) -> JSONResponse:
        return error_response(
            exc.status,
            exc.message,
            code=exc.code,
            errors=exc.errors,
            headers=exc.headers,
            **exc.extra,
        )

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(_request: Request, exc: StarletteHTTPException) -> JSONResponse:
        message = exc.detail if isinstance(exc.detail, str) else json.dumps(exc.detail)
        return error_response(exc.status_code, message, headers=getattr(exc, "headers", None))

    @app.exception_handler(RequestValidationError)
    async def _validation_error(_request: Request, exc: RequestValidationError) -> JSONResponse:
        errors = _pydantic_errors(exc)
        first = f"{_dotted(errors[0]['loc'])}: {errors[0]['msg']}" if errors else "invalid request"
        message = first if len(errors) == 1 else f"{len(errors)} problems; first: {first}"
        return error_response(422, message, errors=errors)

    @app.exception_handler(sa.exc.SQLAlchemyError)
    async def _database_error(request: Request, exc: sa.exc.SQLAlchemyError) -> JSONResponse:
        reason = unavailable_reason(exc)
        if reason is None:
            raise exc  # a bug: ErrorMiddleware logs it and answers 500
        log.warning("%s %s: database unavailable: %s", request.method, request.url.path, reason)
        if isinstance(exc, sa.exc.TimeoutError):  # the pool's own wait ran out: busy, not down
            error = ApiError(
                503,
                f"the database is busy: {reason}; retry after {BUSY_RETRY_AFTER_S} s",
                code="database_busy",
                headers={"Retry-After": str(BUSY_RETRY_AFTER_S)},
                dependency="database",
            )
        else:
            error = dependency_unavailable("database", reason)
        return error_response(
            error.status, error.message, code=error.code, headers=error.headers, **error.extra
        )

    @app.exception_handler(InvalidSubmission)
    async def _invalid_submission(_request: Request, exc: InvalidSubmission) -> JSONResponse:
        return error_response(422, exc.message, code=exc.code, errors=exc.errors)

    @app.exception_handler(runs_service.RunNotFound)
    async def _not_found(_request: Request, exc: runs_service.RunNotFound) -> JSONResponse:
        return error_response(404, str(exc), code="run_not_found", run_id=str(exc.run_id))

    @app.exception_handler(runs_service.InvalidTransition)
    async def _transition(_request: Request, exc: runs_service.InvalidTransition) -> JSONResponse:
        return error_response(
            409,
            str(exc),
            code="invalid_transition",
            run_id=str(exc.run_id),
            run_status=exc.from_status.value,
        )

    @app.exception_handler(runs_service.RunActive)
    async def _active(_request: Request, exc: runs_service.RunActive) -> JSONResponse:
        return error_response(
            409, str(exc), code="run_active", run_id=str(exc.run_id), run_status=exc.status.value
        )

    @app.exception_handler(runs_service.IdempotencyConflict)
    async def _idempotency(
        _request: Request, exc: runs_service.IdempotencyConflict
    ) -> JSONResponse:
        return error_response(409, str(exc), code="idempotency_conflict", run_id=str(exc.run_id))


# -- middleware -------------------------------------------------------------------------------


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
