"""The error answers in the OpenAPI document: the error body's schema and every status each
operation can return.

Routes name their own statuses with :func:`errors` (``responses=errors(404, 409, 503)``);
:func:`complete_error_responses` adds what the middleware and the framework answer for every
operation of a kind, and gives every 4xx/5xx answer the :class:`ErrorBody` schema:

- every operation: 500 (``middleware.ErrorMiddleware``: an unexpected error, with ``error_id``);
- operations that need the bearer token (``security`` set): 401 (no token) and 403 (a wrong
  token, or a bad signed link);
- operations with a request body: 400 (an unreadable ``Content-Length``) and 413 (a body over
  the limit, ``middleware.BodyLimitMiddleware``);
- operations with parameters or a body: 422 (a value the API refuses; FastAPI's own
  ``HTTPValidationError`` shape is replaced: the API never answers with it).
"""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ConfigDict, Field

#: Description of each error status in the document.
DESCRIPTIONS = {
    400: "Bad request: an unreadable Content-Length header",
    401: "No bearer token: this server needs 'Authorization: Bearer <token>'",
    403: "The bearer token (or the signed download link) is not valid",
    404: "Not found (the body's code says what: run_not_found, checkpoint_not_found, ...)",
    409: "Conflict with the current state (the body's code says which)",
    410: "Recorded but gone from disk",
    413: "The request body is larger than the limit",
    415: "Unsupported Content-Type",
    422: "A value the API refuses: 'errors' lists each field with its location",
    500: "Internal error: quote error_id, it is in the server log",
    503: "A dependency (database or broker) is unavailable or busy; see Retry-After",
}


class FieldError(BaseModel):
    """One refused value: where it came from (``body``/``query``/``path``/``header`` first)."""

    loc: list[str | int] = Field(
        description='Location, e.g. ["body", "train_config", "train", "micro_batch_size"]'
    )
    msg: str = Field(description="What is wrong and what is valid")
    type: str = Field(description="Machine-readable kind")


class ErrorBody(BaseModel):
    """Every error answer of the API (``service.api.errors``). Some carry extra keys:
    ``run_id`` (conflicts), ``dependency`` (503), ``limit_bytes`` (413), ``checks``/``down``
    (``/readyz``)."""

    model_config = ConfigDict(extra="allow")

    code: str = Field(description="Stable, machine-readable: invalid_config, run_not_found, ...")
    message: str = Field(description="One readable line")
    errors: list[FieldError] | None = Field(
        default=None, description="Each field at fault (422s and some 409s)"
    )
    error_id: str | None = Field(default=None, description="500 only: the server log's id")


def errors(*statuses: int) -> dict[int | str, dict[str, Any]]:
    """``responses=`` for a route: each status with its description and :class:`ErrorBody`."""
    return {
        status: {"model": ErrorBody, "description": DESCRIPTIONS.get(status, "Error")}
        for status in statuses
    }


_ERROR_REF = {"$ref": "#/components/schemas/ErrorBody"}


def complete_error_responses(schema: dict[str, Any]) -> dict[str, Any]:
    """Add the statuses of the module docstring to every operation of ``schema`` (an OpenAPI
    document from ``fastapi.openapi.utils.get_openapi``) and make every error answer's JSON
    schema :class:`ErrorBody`. Returns ``schema`` (changed in place)."""
    components = schema.setdefault("components", {}).setdefault("schemas", {})
    for model in (FieldError, ErrorBody):
        doc = model.model_json_schema(ref_template="#/components/schemas/{model}")
        components.update(doc.pop("$defs", {}))
        components[model.__name__] = doc
    for item in schema.get("paths", {}).values():
        for method, operation in item.items():
            if method not in ("get", "put", "post", "delete", "patch", "head", "options"):
                continue
            responses = operation.setdefault("responses", {})
            added = [500]
            if operation.get("security"):
                added += [401, 403]
            if "requestBody" in operation:
                added += [400, 413, 422]
            if operation.get("parameters"):
                added.append(422)
            for status in added:
                responses.setdefault(str(status), {"description": DESCRIPTIONS[status]})
            for status, answer in responses.items():
                if status[0] in "45":
                    if answer.get("description") in (None, "", "Validation Error"):
                        answer["description"] = DESCRIPTIONS.get(int(status), "Error")
                    answer["content"] = {"application/json": {"schema": dict(_ERROR_REF)}}
    for unused in ("HTTPValidationError", "ValidationError"):
        components.pop(unused, None)
    return schema
