"""The API's error format and its exception handlers.

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

The middleware that answers in this format before or around the routes (500s, 401/403s,
413s) is ``service.api.middleware``.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Mapping, Sequence
from typing import Any

import sqlalchemy as sa
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from service import reads
from service import runs as runs_service
from service.db import unavailable_reason
from service.submission import InvalidSubmission

log = logging.getLogger("moejobs.api")

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
            raise exc  # a bug: middleware.ErrorMiddleware logs it and answers 500
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

    @app.exception_handler(reads.RunNotFound)
    async def _not_found(_request: Request, exc: reads.RunNotFound) -> JSONResponse:
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

    @app.exception_handler(runs_service.RunInUse)
    async def _in_use(_request: Request, exc: runs_service.RunInUse) -> JSONResponse:
        return error_response(
            409,
            str(exc),
            code="run_in_use",
            run_id=str(exc.run_id),
            used_by=[str(u) for u in exc.users],
        )

    @app.exception_handler(runs_service.IdempotencyConflict)
    async def _idempotency(
        _request: Request, exc: runs_service.IdempotencyConflict
    ) -> JSONResponse:
        return error_response(409, str(exc), code="idempotency_conflict", run_id=str(exc.run_id))
