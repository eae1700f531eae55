"""From an HTTP request to a queued run: parse the body (JSON, YAML or multipart), validate the
configs, resolve their paths, estimate, admit it (``service.admission``), create the row,
enqueue. The routes call :func:`read_run_request` and :func:`submit_run` /
:func:`validate_run`; state changes go through ``service.runs``.
"""

from __future__ import annotations

import json
import logging
import uuid
from dataclasses import dataclass, field
from typing import Any

import yaml
from celery import Celery
from fastapi import Request
from pydantic import ValidationError
from sqlmodel import Session

from service import admission, reads
from service import runs as runs_service
from service.api.errors import ApiError, config_error, config_issue_locs, field_error, invalid
from service.api.models import RunCreate, document_problem
from service.checks import ServerPaths, check_run
from service.configs import (
    ConfigLoader,
    list_presets,
    load_preset,
    replaced_values,
    resolve_documents,
    unique_json_object,
)
from service.estimate import estimate
from service.models import Run
from service.queue import enqueue_prepare, enqueue_run
from service.schemas import ConfigError, Issue, Validated, validate_train_config
from service.settings import Settings

log = logging.getLogger("moejobs.api")

JSON_TYPES = ("application/json",)
YAML_TYPES = ("application/yaml", "application/x-yaml", "text/yaml", "text/x-yaml")
MULTIPART = "multipart/form-data"

#: Preset names only the server may use.
RESERVED_PRESETS = frozenset({reads.SMOKE_TEST_PRESET})


# -- parsing ------------------------------------------------------------------------------------


class _NoAliasLoader(ConfigLoader):
    """PyYAML's safe loader without anchors/aliases: a few hundred bytes of nested aliases
    expand to gigabytes once the document is serialised (the "billion laughs" document)."""

    def compose_node(self, parent: Any, index: Any) -> Any:  # type: ignore[override]
        if self.check_event(yaml.AliasEvent):
            event = self.peek_event()
            raise yaml.composer.ComposerError(
                None,
                None,
                "YAML aliases (*name) are not accepted by the API; write the value out",
                event.start_mark,
            )
        return super().compose_node(parent, index)


def parse_yaml(text: str | bytes, loc: list[str | int]) -> Any:
    """Parse a YAML (or JSON) document; a 422 at ``loc`` with line and column on syntax errors."""
    try:
        return yaml.load(text, Loader=_NoAliasLoader)  # noqa: S506 - safe loader subclass
    except yaml.YAMLError as error:
        mark = getattr(error, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
        problem = getattr(error, "problem", None) or str(error)
        raise invalid(loc, f"invalid YAML{where}: {problem}", code="invalid_document") from None
    except RecursionError:
        raise invalid(loc, "the document is nested too deeply", code="invalid_document") from None
    except (
        ValueError,
        OverflowError,
    ) as error:  # a scalar no constructor takes (a 5,000-digit int)
        raise invalid(loc, f"invalid YAML: {error}", code="invalid_document") from None


def parse_json(data: bytes, loc: list[str | int]) -> Any:
    """Parse JSON; a 422 at ``loc`` on syntax errors."""
    try:
        return json.loads(data, object_pairs_hook=unique_json_object)
    except json.JSONDecodeError as error:
        raise invalid(
            loc,
            f"invalid JSON at line {error.lineno}, column {error.colno}: {error.msg}",
            code="invalid_document",
        ) from None
    except (RecursionError, UnicodeDecodeError) as error:
        raise invalid(
            loc, f"invalid JSON: {type(error).__name__}", code="invalid_document"
        ) from None
    except ValueError as error:  # a duplicate key
        raise invalid(loc, f"invalid JSON: {error}", code="invalid_document") from None


def media_type(request: Request) -> str:
    """The request's media type without parameters, lower case ('' when absent)."""
    return request.headers.get("content-type", "").split(";", 1)[0].strip().lower()


async def _read_upload(value: Any) -> tuple[bytes, str]:
    if hasattr(value, "read"):
        return await value.read(), (getattr(value, "filename", None) or "")
    return str(value).encode("utf-8"), ""


async def read_run_request(request: Request, *, default_name: str | None = None) -> RunCreate:
    """The ``POST /runs`` envelope from a JSON, YAML or multipart body (module docstring of
    ``service.api.runs``). ``default_name`` stands in for a missing ``name`` (``/runs/validate``
    needs none). Raises ApiError 415 for other media types, 422 for unparseable documents or a
    bad envelope (``loc`` starting with ``body``)."""
    kind = media_type(request)
    if kind == MULTIPART:
        form = await request.form()
        doc: dict[str, Any] = {}
        for key in form.keys():
            values = form.getlist(key)
            if key not in ("train_config", "model_config", "name", "preset"):
                raise invalid(
                    ["body", key],
                    "unknown form field; expected train_config, "
                    "model_config (files), name and preset",
                )
            if len(values) != 1:
                raise invalid(["body", key], "given more than once")
            value = values[0]
            if key in ("train_config", "model_config"):
                data, filename = await _read_upload(value)
                parsed = (
                    parse_json(data, ["body", key])
                    if filename.lower().endswith(".json")
                    else parse_yaml(data, ["body", key])
                )
                doc[key] = {} if parsed is None else parsed
            else:
                doc[key] = (
                    value
                    if isinstance(value, str)
                    else (await _read_upload(value))[0].decode("utf-8", "replace")
                )
    else:
        body = await request.body()
        if kind in YAML_TYPES:
            doc = parse_yaml(body, ["body"])
        elif kind in JSON_TYPES or kind == "":
            doc = parse_json(body, ["body"])
        else:
            raise ApiError(
                415,
                f"unsupported Content-Type {kind!r}: send application/json, "
                f"application/yaml or multipart/form-data",
            )
    if not isinstance(doc, dict):
        raise invalid(
            ["body"],
            f"the body must be a mapping with name, train_config and "
            f"model_config, got {type(doc).__name__}",
        )
    # An empty YAML section (all lines commented out) is null: treat it as an empty document.
    for key in ("train_config", "model_config"):
        if key in doc and doc[key] is None:
            doc[key] = {}
    if default_name is not None and doc.get("name") in (None, ""):
        doc["name"] = default_name
    for key in ("train_config", "model_config"):  # what no database could store
        problem = document_problem(doc[key]) if isinstance(doc.get(key), dict) else None
        if problem is not None:
            raise invalid(["body", key, *problem[0]], problem[1], code="invalid_config")
    try:
        return RunCreate.model_validate(doc)
    except ValidationError as error:
        errors = []
        for err in error.errors():
            msg = str(err.get("msg", "invalid")).removeprefix("Value error, ")
            if err.get("type") == "missing":
                msg = "required key is missing"
            elif err.get("type") == "extra_forbidden":
                msg = "unknown key; expected name, preset, train_config, model_config"
            errors.append(
                field_error(["body", *err.get("loc", ())], msg, str(err.get("type", "value_error")))
            )
        first = errors[0]
        message = (
            f"{'.'.join(str(p) for p in first['loc'])}: {first['msg']}"
            if len(errors) == 1
            else f"{len(errors)} problems in the request body"
        )
        raise ApiError(422, message, errors=errors) from None


# -- validation ---------------------------------------------------------------------------------


@dataclass
class Prepared:
    """A submission that passed every check: what :func:`service.runs.create_run` stores."""

    run_id: uuid.UUID
    request: RunCreate
    validated: Validated
    resolved_train: dict[str, Any]
    resolved_model: dict[str, Any]
    estimate: dict[str, Any]
    warnings: list[dict[str, Any]] = field(default_factory=list)


def _warning_dicts(issues: list[Issue]) -> list[dict[str, Any]]:
    return [{"loc": e["loc"], "msg": e["msg"]} for e in config_issue_locs(issues)]


def _train_issue_keys(train: Any) -> set[tuple[tuple, str]]:
    try:
        validate_train_config(train)
    except ConfigError as error:
        return {(tuple(i.loc), i.message) for i in error.errors}
    return set()


def prepare_run(
    session: Session,
    settings: Settings,
    request: RunCreate,
    *,
    run_id: uuid.UUID | None = None,
    allow_reserved_preset: bool = False,
    check_workers: bool = True,
) -> Prepared:
    """Merge the preset, validate, resolve paths and check the inputs
    (``service.checks.check_run``: unusable inputs are warnings here), estimate, and admit
    (``service.admission``: absurd plans always; the live workers' capacity unless
    ``check_workers`` is False). Raises ApiError 422 (``invalid_config`` with every field path,
    or ``unschedulable``)."""
    run_id = run_id or uuid.uuid4()
    preset = request.preset
    if preset is not None and not (allow_reserved_preset and preset in RESERVED_PRESETS):
        if preset not in list_presets():
            raise invalid(
                ["body", "preset"],
                f"unknown preset {preset!r}; available: {', '.join(list_presets()) or 'none'}",
            )
    assert settings.data_root is not None and settings.runs_dir is not None
    paths = ServerPaths(
        data_root=settings.data_root, runs_dir=settings.runs_dir, run_dir=settings.run_dir(run_id)
    )
    try:
        train, model = resolve_documents(
            None,
            None,
            preset if preset not in RESERVED_PRESETS else None,
            train_doc=request.train_config,
            model_doc=request.model_doc,
        )
        checked = check_run(train, model, paths)  # the command line's checks, paths under DATA_ROOT
    except ConfigError as error:
        keys = (
            _train_issue_keys(request.train_config)
            if any(i.loc and i.loc[0] == "model" for i in error.errors)
            else set()
        )
        raise config_error(error, train_issue_keys=keys) from None
    validated, resolved_train = checked.validated, checked.train
    warnings = _warning_dicts(checked.warnings)
    if preset is not None and preset not in RESERVED_PRESETS:
        warnings += _preset_warning(preset, request)
    est = estimate(validated.train, validated.model)
    estimate_doc = est.to_dict()
    absurd = admission.absurd_errors(validated, est)  # refused whatever the fleet and settings
    if absurd:
        raise _unschedulable(absurd)
    if check_workers:
        verdict = admission.admit(session, settings, validated, est)
        if verdict.refusals and not settings.allow_unschedulable:
            raise _unschedulable(verdict.refusals)
        warnings += [
            {"loc": p["loc"], "msg": p["msg"] + " (queued anyway: MOEJOBS_ALLOW_UNSCHEDULABLE)"}
            for p in verdict.refusals
        ]
        warnings += verdict.warnings
        estimate_doc["fleet"] = verdict.fleet
    return Prepared(
        run_id=run_id,
        request=request,
        validated=validated,
        resolved_train=resolved_train,
        resolved_model=validated.model.model_dump(mode="json"),
        estimate=estimate_doc,
        warnings=warnings,
    )


def _unschedulable(errors: list[dict[str, Any]]) -> ApiError:
    first = errors[0]["msg"]
    message = first if len(errors) == 1 else f"{len(errors)} problems; first: {first}"
    return ApiError(422, message, code="unschedulable", errors=errors)


def _preset_warning(preset: str, request: RunCreate) -> list[dict[str, Any]]:
    """One warning listing the submitted values the preset replaced (a preset is merged over
    the documents, as ``--preset`` is over the config files on the command line)."""
    doc = load_preset(preset)
    replaced = [
        ("train_config." + k, a, b)
        for k, a, b in replaced_values(request.train_config or {}, doc["train_config"])
    ] + [
        ("model_config." + k, a, b)
        for k, a, b in replaced_values(request.model_doc or {}, doc["model_config"])
    ]
    if not replaced:
        return []
    shown = ", ".join(f"{k} {a!r} -> {b!r}" for k, a, b in replaced[:8])
    more = f" and {len(replaced) - 8} more" if len(replaced) > 8 else ""
    return [
        {
            "loc": ["body", "preset"],
            "msg": f"preset {preset!r} replaced {len(replaced)} submitted value(s): {shown}{more} "
            f"(a preset overrides the documents; leave out `preset` to keep yours)",
        }
    ]


def _submitted_hash(request: RunCreate) -> str:
    return runs_service.request_hash(
        {
            "name": request.name,
            "preset": request.preset,
            "train_config": request.train_config,
            "model_config": request.model_doc,
        }
    )


@dataclass
class Submitted:
    run: Run
    created: bool
    enqueued: bool


IDEMPOTENCY_KEY_MAX = 255


def submit_run(
    session: Session,
    settings: Settings,
    celery: Celery,
    request: RunCreate,
    *,
    idempotency_key: str | None = None,
    owner: str = "local",
    allow_reserved_preset: bool = False,
    check_workers: bool = True,
    send: bool = True,
    write_checkpoints: bool = True,
) -> Submitted:
    """Validate and create the run, then enqueue it (after the commit). With
    ``idempotency_key``: a retry with the same body returns the first run (``created``
    False, nothing enqueued again), a different body is a 409 (``IdempotencyConflict``).
    With ``send=False`` nothing is enqueued (``enqueued`` False): call :func:`send_run`
    afterwards, outside the database work. ``write_checkpoints`` False: the run's training
    writes no checkpoint (the smoke test). Raises ApiError 422 as :func:`prepare_run`."""
    body_hash = _submitted_hash(request)
    if idempotency_key is not None:
        if not 1 <= len(idempotency_key) <= IDEMPOTENCY_KEY_MAX:
            raise invalid(
                ["header", "Idempotency-Key"], f"must be 1 to {IDEMPOTENCY_KEY_MAX} characters"
            )
        existing = reads.find_idempotent(session, owner, idempotency_key)
        if existing is not None:
            if existing.request_hash != body_hash:
                raise runs_service.IdempotencyConflict(idempotency_key, existing.id)
            return Submitted(run=existing, created=False, enqueued=True)
    prepared = prepare_run(
        session,
        settings,
        request,
        allow_reserved_preset=allow_reserved_preset,
        check_workers=check_workers,
    )
    run, created = runs_service.create_run(
        session,
        name=request.name,
        preset=request.preset,
        write_checkpoints=write_checkpoints,
        submitted_train=request.train_config,
        submitted_model=request.model_doc,
        resolved_train=prepared.resolved_train,
        resolved_model=prepared.resolved_model,
        estimate=prepared.estimate,
        warnings=prepared.warnings,
        owner=owner,
        idempotency_key=idempotency_key,
        body_hash=body_hash,
        run_id=prepared.run_id,
    )
    submitted = Submitted(run=run, created=created, enqueued=not created)
    return send_run(celery, submitted, prepare=settings.engine == "litgpt") if send else submitted


def send_run(celery: Celery, submitted: Submitted, *, prepare: bool = False) -> Submitted:
    """Send a newly created run's message to the broker (nothing for an idempotent replay);
    ``enqueued`` says whether the broker took it. Never raises for broker trouble: the run
    stays queued and a worker's reconciler sends it later. ``prepare`` first sends its data
    preparation to the aux queue, so that tokenizing starts at once, even while every
    training worker is busy (``worker.prepare``; the aux worker does nothing for a small or
    already tokenized corpus, and a lost message is sent again by the training worker)."""
    if not submitted.created:
        return Submitted(run=submitted.run, created=False, enqueued=True)
    if prepare:
        prep = enqueue_prepare(celery, submitted.run.id)
        if not prep.ok:
            log.info(
                "run %s: data preparation not sent (%s); the training worker sends it",
                submitted.run.id,
                prep.error,
            )
    result = enqueue_run(celery, submitted.run.id)
    if not result.ok:
        log.warning(
            "run %s is queued in the database but its message could not be sent "
            "(%s); the reconciler will send it",
            submitted.run.id,
            result.error,
        )
    return Submitted(run=submitted.run, created=True, enqueued=result.ok)
