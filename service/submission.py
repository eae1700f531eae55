"""The submission service: from a run request to a queued run. Check the request's envelope
(:func:`run_request`), merge the preset, validate the configs, resolve their paths, estimate,
admit (``service.admission``), create the row (``service.runs``), send its message.

No HTTP here: the routes (``service.api.runs``, ``service.api.smoke``) read the body
(``service.api.body``) and call :func:`submit_run` / :func:`prepare_run`; a refusal is an
:class:`InvalidSubmission`, which the API answers as a 422 with its ``code`` and ``errors``.
Locations in ``errors`` are request paths: ``["body", "train_config", "train",
"micro_batch_size"]``, ``["body", "model_config", "n_head"]``, ``["body", "preset"]``,
``["header", "Idempotency-Key"]``.
"""

from __future__ import annotations

import logging
import uuid
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from celery import Celery
from pydantic import BaseModel, ConfigDict, Field, ValidationError
from sqlmodel import Session

from service import admission, reads
from service import runs as runs_service
from service.checks import ServerPaths, check_run
from service.config.fields import NameText, Note, Tags
from service.config.issues import ConfigError, Issue, dotted
from service.config.merge import dotted_overrides, replaced_values, resolve_documents
from service.config.parse import document_problem
from service.config.presets import list_presets, load_preset
from service.config.validate import Validated
from service.estimate import estimate
from service.models import Run
from service.queue import enqueue_prepare, enqueue_run
from service.references import checkpoint_resolver
from service.settings import Settings
from service.webhooks import MAX_WEBHOOKS, RunWebhook

__all__ = [
    "RunCreate",
    "Tags",
    "Note",
    "InvalidSubmission",
    "RESERVED_PRESETS",
    "IDEMPOTENCY_KEY_MAX",
    "issue_loc",
    "run_request",
    "Prepared",
    "prepare_run",
    "Submitted",
    "submit_run",
    "send_run",
    "run_webhooks",
]

log = logging.getLogger("moejobs.api")

#: Preset names only the server may use.
RESERVED_PRESETS = frozenset({reads.SMOKE_TEST_PRESET})

#: Longest ``Idempotency-Key`` accepted (characters).
IDEMPOTENCY_KEY_MAX = 255


class RunCreate(BaseModel):
    """Body of ``POST /runs`` and ``POST /runs/validate``. The wire name ``model_config`` is
    kept (pydantic reserves it as an attribute, hence the alias)."""

    model_config = ConfigDict(extra="forbid", populate_by_name=True)

    name: NameText = Field(
        min_length=1,
        description="Human-readable run name: 1 to 200 characters, no control characters.",
    )
    preset: NameText | None = Field(
        default=None,
        description="Name of a preset from configs/presets/ merged over the two documents "
        "(files < preset).",
    )
    train_config: dict[str, Any] = Field(description="The train config document.")
    model_doc: dict[str, Any] = Field(
        alias="model_config",
        serialization_alias="model_config",
        description="The model config document.",
    )
    tags: Tags = Field(default_factory=list)
    note: Note | None = None
    webhooks: list[RunWebhook] = Field(
        default_factory=list,
        max_length=MAX_WEBHOOKS,
        description="Webhook subscriptions: at most 8 ``{url, events}``; each gets a signed "
        "POST when the run ends (README: Webhooks).",
    )


class InvalidSubmission(Exception):
    """A submission refused (the API answers 422): ``message`` is one line, ``code`` is
    ``validation_error`` (the request), ``invalid_config`` (a config document) or
    ``unschedulable`` (admission), ``errors`` lists ``{"loc": [...], "msg": str, "type": str}``
    with request paths."""

    def __init__(self, message: str, *, code: str, errors: Sequence[dict[str, Any]]):
        super().__init__(message)
        self.message = message
        self.code = code
        self.errors = [dict(e) for e in errors]


def _field(loc: Sequence[str | int], msg: str, type_: str) -> dict[str, Any]:
    return {"loc": list(loc), "msg": msg, "type": type_}


def _invalid(
    loc: Sequence[str | int], msg: str, *, code: str = "validation_error"
) -> InvalidSubmission:
    """A refusal about one field."""
    return InvalidSubmission(f"{dotted(loc)}: {msg}", code=code, errors=[_field(loc, msg, code)])


def issue_loc(issue: Issue) -> list[str | int]:
    """Where ``issue`` is in a run request: ``["body", "train_config", *loc]`` for the train
    document, ``["body", "model_config", *loc]`` for the model document."""
    return ["body", f"{issue.document}_config", *issue.loc]


def _config_refusal(error: ConfigError, what: str = "the submitted configs") -> InvalidSubmission:
    """An ``invalid_config`` refusal listing every issue of ``error``."""
    errors = [_field(issue_loc(i), i.message, "invalid_config") for i in error.errors]
    count = len(errors)
    first = f"{dotted(errors[0]['loc'][1:])}: {errors[0]['msg']}" if errors else str(error)
    message = first if count == 1 else f"{count} problems in {what}; first: {first}"
    return InvalidSubmission(message, code="invalid_config", errors=errors)


# -- the request ----------------------------------------------------------------------------------


def run_request(doc: Any, *, default_name: str | None = None) -> RunCreate:
    """The ``POST /runs`` envelope from its parsed body (``doc``, a mapping with ``name``,
    ``preset``, ``train_config``, ``model_config``). ``default_name`` stands in for a missing
    ``name`` (``/runs/validate`` needs none); an empty document (null) counts as ``{}``. Raises
    :class:`InvalidSubmission` (``loc`` starting with ``body``) for a body that is not a
    mapping, a document no database could store (``service.config.parse.document_problem``)
    or a bad envelope."""
    if not isinstance(doc, dict):
        raise _invalid(
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
            raise _invalid(["body", key, *problem[0]], problem[1], code="invalid_config")
    try:
        return RunCreate.model_validate(doc)
    except ValidationError as error:
        errors = []
        for err in error.errors():
            msg = str(err.get("msg", "invalid")).removeprefix("Value error, ")
            if err.get("type") == "missing":
                msg = "required key is missing"
            elif err.get("type") == "extra_forbidden":
                msg = (
                    "unknown key; expected name, preset, train_config, model_config, tags, "
                    "note, webhooks"
                )
            errors.append(
                _field(["body", *err.get("loc", ())], msg, str(err.get("type", "value_error")))
            )
        first = errors[0]
        message = (
            f"{'.'.join(str(p) for p in first['loc'])}: {first['msg']}"
            if len(errors) == 1
            else f"{len(errors)} problems in the request body"
        )
        raise InvalidSubmission(message, code="validation_error", errors=errors) from None


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
    return [{"loc": issue_loc(i), "msg": i.message} for i in issues]


def prepare_run(
    session: Session,
    settings: Settings,
    request: RunCreate,
    *,
    run_id: uuid.UUID | None = None,
    allow_reserved_preset: bool = False,
    check_workers: bool = True,
    params: dict[str, Any] | None = None,
) -> Prepared:
    """Merge the preset and then ``params`` (a sweep trial's dotted paths, e.g.
    ``{"train_config.optimizer.init_args.lr": 1e-3}``: they win over the preset, as explicit
    flags do on the command line), validate, resolve paths and check the inputs
    (``service.checks.check_run``: unusable inputs are warnings here), estimate, and admit
    (``service.admission``: absurd plans always; the live workers' capacity unless
    ``check_workers`` is False). Raises :class:`InvalidSubmission` (``validation_error`` for an
    unknown preset, ``invalid_config`` with every field path, or ``unschedulable``)."""
    run_id = run_id or uuid.uuid4()
    if request.webhooks and settings.webhook_secret is None:
        raise _invalid(
            ["body", "webhooks"],
            "this server has no MOEJOBS_WEBHOOK_SECRET to sign webhook deliveries with; ask "
            "its operator to set one, or leave webhooks out",
        )
    preset = request.preset
    if preset is not None and not (allow_reserved_preset and preset in RESERVED_PRESETS):
        if preset not in list_presets():
            raise _invalid(
                ["body", "preset"],
                f"unknown preset {preset!r}; available: {', '.join(list_presets()) or 'none'}",
            )
    assert settings.data_root is not None and settings.runs_dir is not None
    paths = ServerPaths(
        data_root=settings.data_root,
        runs_dir=settings.runs_dir,
        run_dir=settings.run_dir(run_id),
        references=checkpoint_resolver(session),  # initial_checkpoint_dir: run:ID/final
    )
    train_params, model_params = dotted_overrides(params or {})
    try:
        train, model = resolve_documents(
            None,
            None,
            preset if preset not in RESERVED_PRESETS else None,
            train_overrides=train_params,
            model_overrides=model_params,
            train_doc=request.train_config,
            model_doc=request.model_doc,
        )
        checked = check_run(train, model, paths)  # the command line's checks, paths under DATA_ROOT
    except ConfigError as error:
        raise _config_refusal(error) from None
    validated, resolved_train = checked.validated, checked.train
    warnings = _warning_dicts(checked.warnings)
    if preset is not None and preset not in RESERVED_PRESETS:
        warnings += _preset_warning(preset, request)
    est = estimate(validated.train, validated.model, plan=validated.plan)
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


def _unschedulable(errors: list[dict[str, Any]]) -> InvalidSubmission:
    first = errors[0]["msg"]
    message = first if len(errors) == 1 else f"{len(errors)} problems; first: {first}"
    return InvalidSubmission(message, code="unschedulable", errors=errors)


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
    """The ``Idempotency-Key`` hash of the request: tags and note are part of it (a retry with
    other tags is another request: 409), counted only when given, so that a request without
    them hashes as it did before they existed. A later ``PATCH`` changes the run, not the
    request: a retry of the original request still returns the run."""
    document: dict[str, Any] = {
        "name": request.name,
        "preset": request.preset,
        "train_config": request.train_config,
        "model_config": request.model_doc,
    }
    if request.tags:
        document["tags"] = request.tags
    if request.note is not None:
        document["note"] = request.note
    if request.webhooks:
        document["webhooks"] = [h.model_dump() for h in request.webhooks]
    return runs_service.request_hash(document)


def run_webhooks(settings: Settings, request: RunCreate) -> list[dict[str, Any]]:
    """The subscriptions stored with a run: the request's, then each of the server's
    ``MOEJOBS_WEBHOOK_URLS`` (the terminal events) that the request does not name."""
    hooks = [h.model_dump() for h in request.webhooks]
    named = {h["url"] for h in hooks}
    hooks += [RunWebhook(url=url).model_dump() for url in settings.webhook_urls if url not in named]
    return hooks


@dataclass
class Submitted:
    """What :func:`submit_run` did: the run, whether this call created it (False: an
    idempotent replay) and whether its message reached the broker."""

    run: Run
    created: bool
    enqueued: bool


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
    sweep_id: uuid.UUID | None = None,
    sweep_params: dict[str, Any] | None = None,
) -> Submitted:
    """Validate and create the run, then enqueue it (after the commit). With
    ``idempotency_key``: a retry with the same body returns the first run (``created``
    False, nothing enqueued again), a different body is a 409 (``IdempotencyConflict``).
    With ``send=False`` nothing is enqueued (``enqueued`` False): call :func:`send_run`
    afterwards, outside the database work. ``write_checkpoints`` False: the run's training
    writes no checkpoint (the smoke test). ``sweep_id``/``sweep_params`` make it a sweep's
    trial (``service.sweeps.controller``): the parameters are merged over the preset
    (:func:`prepare_run`'s ``params``) and count in the request hash. Raises
    :class:`InvalidSubmission` as :func:`prepare_run`."""
    body_hash = _submitted_hash(request)
    if sweep_params:
        body_hash = runs_service.request_hash({"request": body_hash, "params": sweep_params})
    if idempotency_key is not None:
        if not 1 <= len(idempotency_key) <= IDEMPOTENCY_KEY_MAX:
            raise _invalid(
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
        params=sweep_params,
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
        tags=request.tags,
        note=request.note,
        sweep_id=sweep_id,
        sweep_params=sweep_params,
        actor="sweep" if sweep_id is not None else "api",
        webhooks=run_webhooks(settings, request),
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
