"""Runs: submit, validate, list, inspect, follow, download, cancel, delete.

``POST /runs`` accepts the same envelope three ways:

- ``application/json``: ``{"name": ..., "preset": ..., "train_config": {...}, "model_config": {...}}``
- ``application/yaml``: the same document in YAML (no anchors/aliases);
- ``multipart/form-data``: files ``train_config`` and ``model_config`` (YAML, or JSON when the
  file name ends in ``.json``) and fields ``name`` and ``preset``.

Every invalid field is a 422 naming its full path (``["body", "train_config", "train",
"micro_batch_size"]``). ``POST /runs/validate`` runs the same checks, queues nothing and
answers **200** with ``{"valid": false, "errors": [...]}`` for invalid configs (the check
itself succeeded); a body that cannot be read at all (bad JSON, missing ``train_config``) is
still a 422.

Every route is ``async`` and does its database work in one ``DatabaseGate`` call (a session of
its own in a worker thread, closed before the answer is rendered), or two where it takes the
run as ``RunDep`` (``service.api.deps``) first; file work (logs, events, archives) happens
outside them, so no request holds a database connection while it reads a file.
"""

from __future__ import annotations

import shutil
import tempfile
import uuid
from datetime import UTC, datetime
from pathlib import Path
from typing import Annotated, Literal

import yaml
from fastapi import APIRouter, Header, Query, Request, Response, status
from fastapi.responses import PlainTextResponse, StreamingResponse
from sqlmodel import Session
from starlette.concurrency import run_in_threadpool

from service import artifacts, contract, reads
from service import runs as runs_service
from service.api.body import read_run_request
from service.api.deps import CeleryDep, GateDep, RunDep, SettingsDep, json_response
from service.api.errors import ApiError, invalid
from service.api.files import Generated, TarPlan, file_size, read_after, read_samples, tail_lines
from service.api.models import (
    CheckpointPublic,
    CheckpointSample,
    DownloadLink,
    EngineEventPublic,
    EventPublic,
    IssueOut,
    MetricPage,
    RouterPage,
    RunCreated,
    RunLabels,
    RunPage,
    RunPublic,
    ValidationReport,
    WebhookDeliveryPublic,
)
from service.api.openapi import errors
from service.api.series import downsample, to_csv
from service.api.signing import sign_path
from service.api.weights import SafetensorsPlan, UnconvertibleWeights
from service.config.fields import MAX_TAGS, check_name_text, check_tag
from service.models import MAX_STEP, Checkpoint, Run, RunStatus
from service.submission import InvalidSubmission, prepare_run, send_run, submit_run

router = APIRouter(tags=["runs"])

#: A valid ``POST /runs`` body for the docs (a 2-layer MoE; data and tokenizer paths under
#: DATA_ROOT, which need not exist yet: the run waits for them).
RUN_EXAMPLE = {
    "name": "tiny-moe",
    "train_config": {
        "devices": 1,
        "precision": "32-true",
        "tokenizer_dir": "tokenizers/mydata",
        "data": {
            "class_path": "TextFiles",
            "init_args": {"train_data_path": "mydata/train", "val_data_path": "mydata/val"},
        },
        "train": {
            "micro_batch_size": 2,
            "global_batch_size": 4,
            "max_seq_length": 32,
            "max_tokens": 2560,
            "lr_warmup_steps": 2,
            "save_interval": 5,
            "min_lr": 1e-4,
        },
        "eval": {"interval": 5, "max_iters": 2},
        "optimizer": {"class_path": "AdamW", "init_args": {"lr": 1e-3}},
        "optimization": {"compile": False},
    },
    "model_config": {
        "name": "tiny-moe",
        "block_size": 64,
        "n_layer": 2,
        "n_embd": 64,
        "n_head": 4,
        "n_query_groups": 2,
        "mlp_class_name": "LLaMAMoE",
        "n_expert": 4,
        "n_expert_per_token": 2,
        "moe_intermediate_size": 128,
        "vocab_size": 256,
        "padded_vocab_size": 256,
        "norm_class_name": "RMSNorm",
        "bias": False,
        "parallel_residual": False,
        "rotary_percentage": 1.0,
    },
}

#: OpenAPI description of the three body forms of POST /runs and /runs/validate.
_RUN_BODY = {
    "requestBody": {
        "required": True,
        "content": {
            "application/json": {
                "schema": {"$ref": "#/components/schemas/RunCreate"},
                "example": RUN_EXAMPLE,
            },
            "application/yaml": {"schema": {"$ref": "#/components/schemas/RunCreate"}},
            "multipart/form-data": {
                "schema": {
                    "type": "object",
                    "required": ["name", "train_config", "model_config"],
                    "properties": {
                        "name": {"type": "string"},
                        "preset": {"type": "string"},
                        "note": {"type": "string"},
                        "tags": {"type": "array", "items": {"type": "string"}},
                        "train_config": {"type": "string", "format": "binary"},
                        "model_config": {"type": "string", "format": "binary"},
                    },
                }
            },
        },
    }
}

LOG_FILE = "train.log"


@router.post(
    "/runs",
    status_code=status.HTTP_201_CREATED,
    response_model=RunCreated,
    openapi_extra=_RUN_BODY,
    summary="Submit a run",
    responses=errors(409, 415, 422, 503),
)
async def create_run(
    request: Request,
    settings: SettingsDep,
    celery: CeleryDep,
    gate: GateDep,
    idempotency_key: Annotated[str | None, Header()] = None,
) -> Response:
    """Validate, store and enqueue a run (201). With ``Idempotency-Key`` a retry returns the
    first run (``created: false``) and the same key with another body is a 409. When the
    broker does not take the message the run is stored all the same (``enqueued: false`` and a
    warning): a worker's reconciler sends it later."""
    body = await read_run_request(request)
    submitted = await gate.run(
        submit_run, settings, celery, body, idempotency_key=idempotency_key, send=False
    )
    submitted = await run_in_threadpool(
        send_run, celery, submitted, prepare=settings.engine == "litgpt"
    )
    public = RunPublic.of(submitted.run)
    if not submitted.enqueued:  # said in this answer only: it is about the delivery, not the run
        public.warnings.append(
            IssueOut(
                loc=["body"],
                msg=(
                    "the broker did not take the run's message (see GET /readyz): the run stays queued "
                    f"and a worker's reconciler sends it again after MOEJOBS_QUEUED_STALE_SECONDS "
                    f"({settings.queued_stale_seconds:g} s)"
                ),
            )
        )
    created = RunCreated(
        **public.model_dump(), enqueued=submitted.enqueued, created=submitted.created
    )
    return Response(
        created.model_dump_json(),
        status_code=status.HTTP_201_CREATED,
        media_type="application/json",
    )


@router.post(
    "/runs/validate",
    response_model=ValidationReport,
    openapi_extra=_RUN_BODY,
    summary="Check a run without queueing it",
    responses=errors(415, 422, 503),
)
async def validate_run(request: Request, settings: SettingsDep, gate: GateDep) -> Response:
    """Errors, warnings and estimate of a submission; queues nothing. 200 with ``valid:
    false`` for invalid configs, 422 only for an unreadable body. ``name`` may be left out."""
    body = await read_run_request(request, default_name="validate")

    def work(session: Session) -> ValidationReport:
        try:
            prepared = prepare_run(session, settings, body, run_id=uuid.UUID(int=0))
        except InvalidSubmission as error:
            return ValidationReport(valid=False, errors=error.errors, warnings=[], estimate=None)
        return ValidationReport(
            valid=True,
            errors=[],
            warnings=prepared.warnings,
            estimate=prepared.estimate,
            resolved={
                "train_config": prepared.resolved_train,
                "model_config": prepared.resolved_model,
            },
        )

    return await gate.json(work)


def _run_public(session: Session, run_id: uuid.UUID) -> RunPublic:
    return RunPublic.of(*reads.run_with_latest_metrics(session, run_id))


@router.get("/runs", response_model=RunPage, summary="List runs", responses=errors(422, 503))
async def list_runs(
    gate: GateDep,
    status_: Annotated[RunStatus | None, Query(alias="status")] = None,
    limit: Annotated[int, Query(ge=1, le=1000)] = 50,
    cursor: Annotated[str | None, Query(max_length=500)] = None,
    sort: Annotated[
        str, Query(description=("created_at, name or status; '-' prefix for descending"))
    ] = "-created_at",
    tag: Annotated[
        list[str] | None,
        Query(max_length=MAX_TAGS, description="runs carrying this tag; repeat: all"),
    ] = None,
    name: Annotated[
        str | None,
        Query(max_length=200, description="runs whose name contains this (case-insensitive)"),
    ] = None,
) -> Response:
    """One page of runs and the cursor of the next (``next_cursor`` null on the last page).
    Pass the same ``sort`` and filters with a cursor. Filters: ``status``, ``tag`` (repeated:
    runs carrying every one), ``name`` (substring, ignoring case). Each run carries
    ``latest_metrics``, its newest metric row (one query for the whole page)."""
    if sort.lstrip("-") not in reads.RUN_SORT_KEYS:
        raise invalid(
            ["query", "sort"],
            f"unknown sort key {sort!r}; use one of "
            f"{', '.join(reads.RUN_SORT_KEYS)}, optionally prefixed with '-'",
        )
    for index, value in enumerate(tag or []):
        try:
            check_tag(value)
        except ValueError as error:
            raise invalid(["query", "tag", index], str(error)) from None
    if name is not None:
        try:
            check_name_text(name, "a name")
        except ValueError as error:
            raise invalid(["query", "name"], str(error)) from None

    def work(session: Session) -> RunPage:
        try:
            rows, next_cursor = reads.list_runs(
                session,
                status=status_,
                limit=limit,
                cursor=cursor,
                sort=sort,
                tags=tag or (),
                name=name,
                configs=False,
            )
        except ValueError as error:
            raise invalid(["query", "cursor"], str(error)) from None
        latest = reads.latest_metrics(session, [r.id for r in rows])
        return RunPage.model_validate(
            {
                "items": [RunPublic.fields(r, latest.get(r.id)) for r in rows],
                "next_cursor": next_cursor,
            }
        )

    return await gate.json(work)


@router.get(
    "/runs/{run_id}", response_model=RunPublic, summary="One run", responses=errors(404, 503)
)
async def get_run(run_id: uuid.UUID, gate: GateDep) -> Response:
    """The run, with ``latest_metrics`` (its newest metric row, null before the first)."""
    return await gate.json(_run_public, run_id)


@router.patch(
    "/runs/{run_id}",
    response_model=RunPublic,
    summary="Change a run's tags or note",
    responses=errors(404, 422, 503),
)
async def patch_run(run_id: uuid.UUID, labels: RunLabels, gate: GateDep) -> Response:
    """``{"tags": [...]}`` replaces the tags, ``{"add_tags": [...], "remove_tags": [...]}``
    changes them in place, ``{"note": "..."}`` sets the note (``null`` clears it); keys left
    out stay. Any status. 422 for an invalid tag or note (naming the field), for ``tags``
    with ``add_tags``/``remove_tags``, for ``add_tags`` that would give the run more than 32
    tags; 404 for an unknown run."""
    if labels.tags is not None and (labels.add_tags or labels.remove_tags):
        raise invalid(["body", "tags"], "give either tags (the whole list) or add_tags/remove_tags")
    note: object = labels.note if "note" in labels.model_fields_set else runs_service.KEEP

    def work(session: Session) -> RunPublic:
        try:
            runs_service.set_labels(
                session,
                run_id,
                tags=labels.tags,
                add_tags=labels.add_tags,
                remove_tags=labels.remove_tags,
                note=note,
            )
        except ValueError as error:  # the tags the run would have: too many
            raise invalid(["body", "add_tags"], str(error)) from None
        return _run_public(session, run_id)

    return await gate.json(work)


@router.get(
    "/runs/{run_id}/config",
    summary="The resolved configs as YAML",
    response_class=PlainTextResponse,
    responses={200: {"content": {"application/yaml": {}}}, **errors(404, 503)},
)
async def get_config(
    run_id: uuid.UUID,
    gate: GateDep,
    submitted: Annotated[
        bool, Query(description="the documents as submitted instead of resolved")
    ] = False,
) -> Response:
    """``{train_config: ..., model_config: ...}`` in YAML: what the engine runs (absolute paths,
    every default filled in), or with ``submitted=true`` what was sent."""

    def work(session: Session) -> dict:
        run = reads.get_run(session, run_id)
        return (
            {"train_config": run.submitted_train, "model_config": run.submitted_model}
            if submitted
            else {"train_config": run.resolved_train, "model_config": run.resolved_model}
        )

    doc = await gate.run(work)
    text = yaml.safe_dump(doc, sort_keys=False, allow_unicode=True)
    return Response(text, media_type="application/yaml")


def _wants_csv(request: Request, fmt: str | None) -> bool:
    if fmt is not None:
        return fmt == "csv"
    accept = request.headers.get("accept", "")
    return "text/csv" in accept.lower()


@router.get(
    "/runs/{run_id}/metrics",
    response_model=MetricPage,
    summary="Metric rows",
    responses={200: {"content": {"text/csv": {}}}, **errors(404, 503)},
)
async def get_metrics(
    run_id: uuid.UUID,
    request: Request,
    gate: GateDep,
    after_step: Annotated[int | None, Query(ge=-1, le=MAX_STEP)] = None,
    limit: Annotated[int, Query(ge=1, le=100_000)] = 10_000,
    max_points: Annotated[int | None, Query(ge=2, le=100_000)] = None,
    format: Annotated[str | None, Query(pattern="^(json|csv)$")] = None,
) -> Response:
    """Rows with ``step > after_step`` (at most ``limit``), by step; with ``max_points`` they are
    downsampled server-side (first, last and validation rows kept). JSON, or CSV (the
    metrics.csv header) with ``Accept: text/csv`` or ``format=csv``."""
    csv = _wants_csv(request, format)

    def work(session: Session) -> list:
        reads.require_run(session, run_id)
        return reads.metric_rows(session, run_id, after_step=after_step, limit=limit)

    def render(points: list) -> Response:
        total = len(points)
        last = points[-1].step if points else after_step
        shown = downsample(points, max_points) if max_points else points
        if csv:
            return Response(to_csv(shown), media_type="text/csv")
        page = MetricPage.model_validate(
            {
                "items": [p._mapping for p in shown],
                "next_after_step": last,
                "total": total,
                "downsampled": len(shown) < total,
            }
        )
        return json_response(page)

    return await gate.render(work, render)


@router.get(
    "/runs/{run_id}/router",
    response_model=RouterPage,
    responses=errors(404, 503),
    summary="MoE router telemetry (token fraction per layer and expert)",
)
async def get_router(
    run_id: uuid.UUID,
    gate: GateDep,
    after_step: Annotated[int | None, Query(ge=-1, le=MAX_STEP)] = None,
    limit: Annotated[int, Query(ge=1, le=1_000_000)] = 100_000,
) -> Response:
    """Rows ``{step, layer, expert, fraction}`` with ``step > after_step``, ordered by
    (step, layer, expert), at most ``limit``."""

    def work(session: Session) -> list:
        reads.require_run(session, run_id)
        return reads.router_rows(session, run_id, after_step=after_step, limit=limit)

    def render(points: list) -> Response:
        last = points[-1].step if points else after_step
        return json_response(
            RouterPage.model_validate(
                {"items": [p._mapping for p in points], "next_after_step": last}
            )
        )

    return await gate.render(work, render)


@router.get(
    "/runs/{run_id}/checkpoints",
    response_model=list[CheckpointPublic],
    responses=errors(404, 503),
    summary="Recorded checkpoints",
)
async def list_checkpoints(run: RunDep, gate: GateDep) -> Response:
    """The run's recorded checkpoints, oldest first, each with its samples (null until the
    worker has made them)."""

    def work(session: Session) -> list[CheckpointPublic]:
        return [CheckpointPublic.of(c) for c in reads.list_checkpoints(session, run.id)]

    listed = await gate.run(work)
    return json_response(await run_in_threadpool(_with_samples, listed))


def _with_samples(checkpoints: list[CheckpointPublic]) -> list[CheckpointPublic]:
    """The checkpoints with their samples read from disk (outside any database session)."""
    for c in checkpoints:
        samples = read_samples(Path(c.path))
        if samples is not None:
            c.samples = [CheckpointSample(**s) for s in samples]
    return checkpoints


def _checkpoint(session: Session, run_id: uuid.UUID, ref: str) -> tuple[Run, Checkpoint]:
    """Run ``run_id`` (a 404 ``run_not_found`` when there is none) and its checkpoint ``ref``
    (a 404 ``checkpoint_not_found``), in the caller's one gate call. (Not :data:`RunDep`: its
    path parameter would come after ``ref`` in the OpenAPI document.)"""
    run = reads.get_run(session, run_id)
    # No checkpoint folder has a control character in its name (and PostgreSQL cannot compare
    # with a NUL): such a reference names none, without asking the database.
    checkpoint = reads.get_checkpoint(session, run_id, ref) if ref.isprintable() else None
    if checkpoint is None:
        raise ApiError(404, f"run {run_id} has no checkpoint {ref!r}", code="checkpoint_not_found")
    return run, checkpoint


@router.get(
    "/runs/{run_id}/checkpoints/{ref}",
    response_model=CheckpointPublic,
    responses=errors(404, 503),
    summary="One recorded checkpoint",
)
async def get_checkpoint(run_id: uuid.UUID, ref: str, gate: GateDep) -> Response:
    """Checkpoint ``ref`` (a step number, ``final`` or the folder name) with its samples."""
    _run, checkpoint = await gate.run(_checkpoint, run_id, ref)
    (public,) = await run_in_threadpool(_with_samples, [CheckpointPublic.of(checkpoint)])
    return json_response(public)


IncludeQuery = Annotated[
    Literal["all", "weights"] | None,
    Query(
        description="`all`: the whole folder, training state included (default with "
        "`format=pth`); `weights`: only what stock LitGPT loads (lit_model.pth or "
        "model.safetensors, model_config.yaml, tokenizer files), no optimizer state"
    ),
]
FormatQuery = Annotated[
    Literal["pth", "safetensors"],
    Query(
        description="`pth`: the weights as saved (lit_model.pth); `safetensors`: the same "
        "state dict, LitGPT key names, as model.safetensors (implies `include=weights`)"
    ),
]


def _archive_variant(include: str | None, fmt: str) -> tuple[bool, str]:
    """``(weights_only, file name suffix)`` of a download; ``include=all`` with
    ``format=safetensors`` is a 422 (the training state has no safetensors form)."""
    if fmt == "safetensors":
        if include == "all":
            raise invalid(
                ["query", "include"],
                "include=all cannot be combined with format=safetensors (the training state "
                "is torch-only); use include=weights or leave include out",
            )
        return True, "-safetensors"
    return (include == "weights"), ("-weights" if include == "weights" else "")


def _variant_query(include: str | None, fmt: str) -> str:
    """The query string that asks for the same download variant ('' for the default)."""
    pairs = ([("include", include)] if include else []) + (
        [("format", fmt)] if fmt != "pth" else []
    )
    return "&".join(f"{k}={v}" for k, v in pairs)


def _plan_archive(folder: Path, root: str, weights_only: bool, fmt: str) -> TarPlan:
    """The tar of a checkpoint folder, whole or weights only; with ``fmt == "safetensors"``
    ``lit_model.pth`` is replaced by a ``model.safetensors`` converted while it streams."""
    if not weights_only:
        return TarPlan(folder, root)
    if fmt != "safetensors":
        return TarPlan(folder, root, only=contract.CHECKPOINT_LOADABLE)
    if not folder.is_dir():
        raise FileNotFoundError(str(folder))
    if not (folder / contract.CHECKPOINT_WEIGHTS).is_file():
        raise UnconvertibleWeights(f"the folder has no {contract.CHECKPOINT_WEIGHTS}")
    weights = SafetensorsPlan(folder / contract.CHECKPOINT_WEIGHTS)
    keep = set(contract.CHECKPOINT_LOADABLE) - {contract.CHECKPOINT_WEIGHTS}
    extra = Generated(contract.CHECKPOINT_SAFETENSORS, weights.length, lambda: iter(weights))
    return TarPlan(folder, root, only=keep, extra=[extra])


@router.get(
    "/runs/{run_id}/checkpoints/{ref}/archive",
    summary="Download a checkpoint (.tar)",
    response_class=StreamingResponse,
    responses={200: {"content": {"application/x-tar": {}}}, **errors(404, 409, 410, 422, 503)},
)
async def checkpoint_archive(
    run_id: uuid.UUID,
    ref: str,
    gate: GateDep,
    settings: SettingsDep,
    include: IncludeQuery = None,
    format: FormatQuery = "pth",  # noqa: A002 - the query parameter's public name
) -> StreamingResponse:
    """The checkpoint folder ``ref`` (a step number, ``final`` or the folder name) as an
    uncompressed tar streamed from disk, top-level folder ``<run id>-<checkpoint name>``:
    extract it and point ``litgpt generate`` at that folder. ``include=weights`` leaves the
    training state out; ``format=safetensors`` sends ``model.safetensors`` (converted from
    ``lit_model.pth`` while streaming, without torch: ``service.api.weights``) instead of
    ``lit_model.pth``, a 409 ``not_convertible`` when that file is not a plain state dict.
    With an object store and no local folder (the run trained on another machine, or
    ``RUNS_DIR`` is not shared) the tar is built from the store's objects as it streams
    (README: Object store); safetensors needs the folder on the API's disk (409 otherwise)."""
    weights_only, suffix = _archive_variant(include, format)
    run, checkpoint = await gate.run(_checkpoint, run_id, ref)
    folder = Path(checkpoint.path)
    run_dir = settings.run_dir(run.id).resolve()
    root = f"{run.id}-{checkpoint.name}"
    inside = folder.resolve().is_relative_to(run_dir)
    store = artifacts.store_for(settings)
    if store is not None and not (inside and folder.is_dir()):
        # Not on this machine's disk (another machine trained it): the store's copy, which
        # every recorded checkpoint has (worker/retention.py uploads before it records).
        prefix = artifacts.checkpoint_prefix(run.id, checkpoint.name)
        if format == "safetensors":
            raise ApiError(
                409,
                f"checkpoint {checkpoint.name} is only in the object store, and the safetensors "
                f"conversion reads it from the API's disk; download include=weights (the same "
                f"weights as lit_model.pth) instead",
                code="not_convertible",
            )
        only = contract.CHECKPOINT_LOADABLE if weights_only else None
        try:
            plan = await run_in_threadpool(
                TarPlan.from_store,
                store,
                prefix,
                root,
                checkpoint.created_at.timestamp(),
                only=only,
            )
        except FileNotFoundError:
            raise ApiError(
                410,
                f"checkpoint {checkpoint.name} is recorded but the object store has no "
                f"{prefix} (a manual deletion)",
                code="checkpoint_gone",
            ) from None
        except artifacts.StoreError as error:
            raise ApiError(503, str(error), code="store_unavailable") from None
        return _tar_response(plan, root + suffix)
    if not inside:
        raise ApiError(
            404,
            f"checkpoint {checkpoint.name} is recorded outside the run's folder",
            code="checkpoint_not_found",
        )
    try:
        plan = await run_in_threadpool(_plan_archive, folder, root, weights_only, format)
    except UnconvertibleWeights as exc:
        raise ApiError(
            409,
            f"checkpoint {checkpoint.name} cannot be converted to safetensors: {exc}",
            code="not_convertible",
        ) from None
    except FileNotFoundError:
        raise ApiError(
            410,
            f"checkpoint {checkpoint.name} is recorded but its folder {folder} "
            f"is gone (retention or a manual deletion)",
            code="checkpoint_gone",
        ) from None
    return _tar_response(plan, root + suffix)


def _tar_response(plan: TarPlan, name: str) -> StreamingResponse:
    """The streamed archive, downloaded as ``<name>.tar``."""
    return StreamingResponse(
        iter(plan),
        media_type="application/x-tar",
        headers={
            "Content-Length": str(plan.length),
            "Content-Disposition": f'attachment; filename="{name}.tar"',
        },
    )


@router.post(
    "/runs/{run_id}/checkpoints/{ref}/link",
    response_model=DownloadLink,
    responses=errors(404, 422, 503),
    summary="A signed download link for a checkpoint archive",
)
async def checkpoint_link(
    run_id: uuid.UUID,
    ref: str,
    gate: GateDep,
    settings: SettingsDep,
    include: IncludeQuery = None,
    format: FormatQuery = "pth",  # noqa: A002 - the query parameter's public name
) -> DownloadLink:
    """A URL that downloads the archive of checkpoint ``ref`` with a plain GET, for browsers
    (a link cannot send the ``Authorization`` header, and fetching with it would hold the whole
    tar in memory). With an API token the URL carries an HMAC signature of its path that
    expires after ``MOEJOBS_DOWNLOAD_LINK_SECONDS`` (``service.api.signing``); without one it is
    the archive's plain path. 404 when the run or checkpoint does not exist. ``include`` and
    ``format`` are those of the archive and travel in the link's query (the signature covers
    the path: each variant holds no more than the whole archive)."""
    _archive_variant(include, format)
    _run, checkpoint = await gate.run(_checkpoint, run_id, ref)
    path = CheckpointPublic.of(checkpoint).archive_url
    variant = _variant_query(include, format)
    if settings.api_token is None:
        return DownloadLink(url=f"{path}?{variant}" if variant else path, expires_at=None)
    url, expires = sign_path(
        settings.api_token.get_secret_value(), path, settings.download_link_seconds
    )
    url = f"{url}&{variant}" if variant else url
    return DownloadLink(url=url, expires_at=datetime.fromtimestamp(expires, UTC))


@router.get(
    "/runs/{run_id}/events",
    response_model=list[EventPublic],
    summary="Run history",
    responses=errors(404, 503),
)
async def list_events(run: RunDep, gate: GateDep) -> Response:
    """The run's status changes and notes (queued, claimed, requeued, finished...), oldest
    first, as the service recorded them. What the training process itself reported is
    ``GET /runs/{id}/engine-events``."""

    def work(session: Session) -> list[EventPublic]:
        return [EventPublic.of(e) for e in reads.list_events(session, run.id)]

    return await gate.json(work)


@router.get(
    "/runs/{run_id}/webhooks",
    response_model=list[WebhookDeliveryPublic],
    summary="Webhook deliveries of the run",
    responses=errors(404, 503),
)
async def list_webhooks(run: RunDep, gate: GateDep) -> Response:
    """The run's webhook deliveries (README: Webhooks), oldest first: event, receiver (without
    its query string), state, attempts, the last answer. Each attempt is also a line of
    ``GET /runs/{id}/events``."""

    def work(session: Session) -> list[WebhookDeliveryPublic]:
        return [WebhookDeliveryPublic.of(d) for d in reads.list_deliveries(session, run_id=run.id)]

    return await gate.json(work)


@router.get(
    "/runs/{run_id}/engine-events",
    response_model=list[EngineEventPublic],
    summary="What the training process reported (out/events.jsonl)",
    responses=errors(404, 503),
)
async def list_engine_events(
    run_id: uuid.UUID,
    gate: GateDep,
    settings: SettingsDep,
    attempt: Annotated[int | None, Query(ge=0, description="only this attempt's events")] = None,
) -> Response:
    """The engine's structured events, in the order written to ``RUNS_DIR/<id>/out/events.jsonl``
    (every attempt; ``attempt`` selects one): started, configured, data_progress, data_ready, model_built,
    first_step, checkpoint_written, stop_requested, fenced, finished, each with its UTC time.
    ``[]`` before the engine wrote any. 404 for an unknown run."""
    await gate.run(reads.require_run, run_id)
    out_dir = settings.run_dir(run_id) / "out"

    def read() -> Response:
        events = contract.read_events(out_dir, attempt=attempt)
        return json_response([EngineEventPublic.of(e) for e in events])

    return await run_in_threadpool(read)


@router.get(
    "/runs/{run_id}/logs",
    response_class=PlainTextResponse,
    summary="Run log (tail)",
    responses=errors(404, 503),
)
async def get_logs(
    run_id: uuid.UUID,
    gate: GateDep,
    settings: SettingsDep,
    tail: Annotated[int, Query(ge=0, le=100_000)] = 200,
    after_byte: Annotated[
        int | None,
        Query(ge=0, description="instead of the tail: the whole lines after this byte offset"),
    ] = None,
) -> PlainTextResponse:
    """The last ``tail`` lines of the run's log (the training process' output,
    ``RUNS_DIR/<id>/train.log``); empty before the run starts. With ``after_byte``: the whole
    lines written after that offset (at most 1 MiB), to follow the log. The ``X-Log-Offset``
    header is the offset to pass as ``after_byte`` next (the file's size with ``tail``).
    With an object store and no log on this machine's disk (another machine trains the run):
    the store's copy, synced every ``MOEJOBS_ARTIFACT_SYNC_SECONDS`` (downloaded whole on each
    call)."""
    await gate.run(reads.require_run, run_id)
    path = settings.run_dir(run_id) / LOG_FILE

    def read_from(path: Path) -> tuple[str, int]:
        if after_byte is not None:
            return read_after(path, after_byte)
        size = file_size(path)
        return tail_lines(path, tail, end=size), size

    def read() -> tuple[str, int]:
        if path.exists() or settings.artifact_url is None:
            return read_from(path)
        with tempfile.TemporaryDirectory(prefix="moejobs-log-") as tmp:
            copy = Path(tmp) / LOG_FILE
            if not artifacts.fetch_run_file(settings, run_id, LOG_FILE, copy):
                return read_from(path)  # neither: empty, as before the run starts
            return read_from(copy)

    text, offset = await run_in_threadpool(read)
    return PlainTextResponse(text, headers={"X-Log-Offset": str(offset)})


@router.post(
    "/runs/{run_id}/cancel",
    response_model=RunPublic,
    summary="Cancel a run",
    responses=errors(404, 409, 503),
)
async def cancel_run(run_id: uuid.UUID, gate: GateDep) -> Response:
    """A queued run is cancelled at once; a running one is flagged and its worker stops it
    (status becomes ``cancelled`` when the process has exited). 409 for a finished run."""

    def work(session: Session) -> RunPublic:
        runs_service.request_cancel(session, run_id)
        return _run_public(session, run_id)

    return await gate.json(work)


@router.delete(
    "/runs/{run_id}",
    status_code=status.HTTP_204_NO_CONTENT,
    responses=errors(404, 409, 503),
    summary="Delete a finished run, its rows and its files",
)
async def delete_run(run_id: uuid.UUID, gate: GateDep, settings: SettingsDep) -> Response:
    """409 while the run is queued or running (cancel it first). With an object store its
    objects (``runs/<run id>/``) are deleted too."""
    run = await gate.run(runs_service.delete_run, run_id)
    await run_in_threadpool(shutil.rmtree, settings.run_dir(run.id), ignore_errors=True)
    await run_in_threadpool(artifacts.delete_run_objects, settings, run.id)
    return Response(status_code=status.HTTP_204_NO_CONTENT)
