"""Reading a run submission from an HTTP request: the media type, the body or the multipart
form, the documents parsed (``service.config.parse``), the envelope checked
(``service.submission.run_request``).
"""

from __future__ import annotations

from typing import Any

from fastapi import Request

from service.api.errors import ApiError, invalid
from service.config.parse import DocumentError, parse_json, parse_yaml
from service.submission import RunCreate, run_request

JSON_TYPES = ("application/json",)
YAML_TYPES = ("application/yaml", "application/x-yaml", "text/yaml", "text/x-yaml")
MULTIPART = "multipart/form-data"


def media_type(request: Request) -> str:
    """The request's media type without parameters, lower case ('' when absent)."""
    return request.headers.get("content-type", "").split(";", 1)[0].strip().lower()


def _parse(data: bytes, loc: list[str | int], *, json: bool) -> Any:
    """``data`` parsed as JSON or YAML; a 422 ``invalid_document`` at ``loc`` when it cannot be."""
    try:
        return parse_json(data) if json else parse_yaml(data)
    except DocumentError as error:
        raise invalid(loc, str(error), code="invalid_document") from None


async def _read_upload(value: Any) -> tuple[bytes, str]:
    if hasattr(value, "read"):
        return await value.read(), (getattr(value, "filename", None) or "")
    return str(value).encode("utf-8"), ""


async def read_run_request(request: Request, *, default_name: str | None = None) -> RunCreate:
    """The ``POST /runs`` envelope from a JSON, YAML or multipart body (module docstring of
    ``service.api.runs``). ``default_name`` stands in for a missing ``name`` (``/runs/validate``
    needs none). Raises ApiError 415 for other media types, 422 for unparseable documents;
    ``service.submission.InvalidSubmission`` (a 422) for a bad envelope (``loc`` starting with
    ``body``)."""
    kind = media_type(request)
    if kind == MULTIPART:
        form = await request.form()
        doc: dict[str, Any] = {}
        for key in form.keys():
            values = form.getlist(key)
            if key not in ("train_config", "model_config", "name", "preset", "note", "tags"):
                raise invalid(
                    ["body", key],
                    "unknown form field; expected train_config, "
                    "model_config (files), name, preset, note and tags (repeatable)",
                )
            if key == "tags":  # one field per tag
                doc[key] = [v if isinstance(v, str) else "" for v in values]
                continue
            if len(values) != 1:
                raise invalid(["body", key], "given more than once")
            value = values[0]
            if key in ("train_config", "model_config"):
                data, filename = await _read_upload(value)
                parsed = _parse(data, ["body", key], json=filename.lower().endswith(".json"))
                doc[key] = {} if parsed is None else parsed
            else:
                doc[key] = (
                    value
                    if isinstance(value, str)
                    else (await _read_upload(value))[0].decode("utf-8", "replace")
                )
        return run_request(doc, default_name=default_name)
    body = await request.body()
    if kind in YAML_TYPES:
        parsed = _parse(body, ["body"], json=False)
    elif kind in JSON_TYPES or kind == "":
        parsed = _parse(body, ["body"], json=True)
    else:
        raise ApiError(
            415,
            f"unsupported Content-Type {kind!r}: send application/json, "
            f"application/yaml or multipart/form-data",
        )
    return run_request(parsed, default_name=default_name)


async def read_document(request: Request) -> Any:
    """A JSON or YAML request body parsed (``POST /sweeps``): the same parsers and refusals
    as :func:`read_run_request` (415 for another media type, 422 ``invalid_document``), no
    multipart."""
    kind = media_type(request)
    body = await request.body()
    if kind in YAML_TYPES:
        return _parse(body, ["body"], json=False)
    if kind in JSON_TYPES or kind == "":
        return _parse(body, ["body"], json=True)
    raise ApiError(
        415, f"unsupported Content-Type {kind!r}: send application/json or application/yaml"
    )
