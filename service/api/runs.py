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
"""
from __future__ import annotations

import shutil
import uuid
from datetime import datetime, timezone
from pathlib import Path
from typing import Annotated

import yaml
from celery import Celery
from fastapi import APIRouter, Depends, Header, Query, Request, Response, status
from fastapi.responses import PlainTextResponse, StreamingResponse
from sqlmodel import Session
from starlette.concurrency import run_in_threadpool

from service import runs as runs_service
from service.api.deps import get_celery, get_session, get_settings
from service.api.errors import ApiError, invalid
from service.api.files import TarPlan, tail_lines
from service.api.models import (
    CheckpointPublic,
    DownloadLink,
    EventPublic,
    IssueOut,
    MetricPage,
    MetricRow,
    RouterPage,
    RouterRow,
    RunCreated,
    RunPage,
    RunPublic,
    ValidationReport,
)
from service.api.series import downsample, to_csv
from service.api.signing import sign_path
from service.api.submission import prepare_run, read_run_request, submit_run
from service.models import RunStatus
from service.settings import Settings

router = APIRouter(tags=["runs"])

SessionDep = Annotated[Session, Depends(get_session)]
SettingsDep = Annotated[Settings, Depends(get_settings)]
CeleryDep = Annotated[Celery, Depends(get_celery)]

#: OpenAPI description of the three body forms of POST /runs and /runs/validate.
_RUN_BODY = {
    "requestBody": {
        "required": True,
        "content": {
            "application/json": {"schema": {"$ref": "#/components/schemas/RunCreate"}},
            "application/yaml": {"schema": {"$ref": "#/components/schemas/RunCreate"}},
            "multipart/form-data": {"schema": {
                "type": "object",
                "required": ["name", "train_config", "model_config"],
                "properties": {
                    "name": {"type": "string"},
                    "preset": {"type": "string"},
                    "train_config": {"type": "string", "format": "binary"},
                    "model_config": {"type": "string", "format": "binary"},
                },
            }},
        },
    }
}

LOG_FILE = "train.log"


@router.post("/runs", status_code=status.HTTP_201_CREATED, response_model=RunCreated,
             openapi_extra=_RUN_BODY, summary="Submit a run",
             responses={409: {"description": "Idempotency-Key reused with another body"},
                        413: {"description": "Body too large"},
                        422: {"description": "Invalid config (every field path listed) or no "
                              "worker can run it"}})
async def create_run(request: Request, settings: SettingsDep, celery: CeleryDep,
                     idempotency_key: Annotated[str | None, Header()] = None) -> RunCreated:
    """Validate, store and enqueue a run (201). With ``Idempotency-Key`` a retry returns the
    first run (``created: false``) and the same key with another body is a 409."""
    body = await read_run_request(request)
    def work():
        with request.app.state.db.session() as session:
            return submit_run(session, settings, celery, body, idempotency_key=idempotency_key)

    submitted = await run_in_threadpool(work)
    public = RunPublic.of(submitted.run)
    if not submitted.enqueued:  # said in this answer only: it is about the delivery, not the run
        public.warnings.append(IssueOut(loc=["body"], msg=(
            "the broker did not take the run's message (see GET /readyz): the run stays queued "
            f"and a worker's reconciler sends it again after MOEJOBS_QUEUED_STALE_SECONDS "
            f"({settings.queued_stale_seconds:g} s)")))
    return RunCreated(**public.model_dump(), enqueued=submitted.enqueued,
                      created=submitted.created)


@router.post("/runs/validate", response_model=ValidationReport, openapi_extra=_RUN_BODY,
             summary="Check a run without queueing it")
async def validate_run(request: Request, settings: SettingsDep) -> ValidationReport:
    """Errors, warnings and estimate of a submission; queues nothing. 200 with ``valid:
    false`` for invalid configs, 422 only for an unreadable body. ``name`` may be left out."""
    body = await read_run_request(request, default_name="validate")
    def work() -> ValidationReport:
        with request.app.state.db.session() as session:
            try:
                prepared = prepare_run(session, settings, body, run_id=uuid.UUID(int=0))
            except ApiError as error:
                if error.status != 422 or error.errors is None:
                    raise
                return ValidationReport(valid=False, errors=error.errors, warnings=[],
                                        estimate=None)
        return ValidationReport(
            valid=True, errors=[], warnings=prepared.warnings, estimate=prepared.estimate,
            resolved={"train_config": prepared.resolved_train,
                      "model_config": prepared.resolved_model})

    return await run_in_threadpool(work)


@router.get("/runs", response_model=RunPage, summary="List runs")
def list_runs(session: SessionDep,
              status_: Annotated[RunStatus | None, Query(alias="status")] = None,
              limit: Annotated[int, Query(ge=1, le=1000)] = 50,
              cursor: Annotated[str | None, Query(max_length=500)] = None,
              sort: Annotated[str, Query(description="created_at, name or status; '-' prefix "
                                                     "for descending")] = "-created_at",
              ) -> RunPage:
    """One page of runs and the cursor of the next (``next_cursor`` null on the last page).
    Pass the same ``sort`` with a cursor."""
    if sort.lstrip("-") not in runs_service.RUN_SORT_KEYS:
        raise invalid(["query", "sort"], f"unknown sort key {sort!r}; use one of "
                      f"{', '.join(runs_service.RUN_SORT_KEYS)}, optionally prefixed with '-'")
    try:
        rows, next_cursor = runs_service.list_runs(session, status=status_, limit=limit,
                                                   cursor=cursor, sort=sort)
    except ValueError as error:
        raise invalid(["query", "cursor"], str(error)) from None
    return RunPage(items=[RunPublic.of(r) for r in rows], next_cursor=next_cursor)


@router.get("/runs/{run_id}", response_model=RunPublic, summary="One run")
def get_run(run_id: uuid.UUID, session: SessionDep) -> RunPublic:
    return RunPublic.of(runs_service.get_run(session, run_id))


@router.get("/runs/{run_id}/config", summary="The resolved configs as YAML",
            response_class=PlainTextResponse,
            responses={200: {"content": {"application/yaml": {}}}})
def get_config(run_id: uuid.UUID, session: SessionDep,
               submitted: Annotated[bool, Query(description="the documents as submitted "
                                                "instead of resolved")] = False) -> Response:
    """``{train_config: ..., model_config: ...}`` in YAML: what the engine runs (absolute paths,
    every default filled in), or with ``submitted=true`` what was sent."""
    run = runs_service.get_run(session, run_id)
    doc = ({"train_config": run.submitted_train, "model_config": run.submitted_model}
           if submitted else {"train_config": run.resolved_train,
                              "model_config": run.resolved_model})
    text = yaml.safe_dump(doc, sort_keys=False, allow_unicode=True)
    return Response(text, media_type="application/yaml")


def _wants_csv(request: Request, fmt: str | None) -> bool:
    if fmt is not None:
        return fmt == "csv"
    accept = request.headers.get("accept", "")
    return "text/csv" in accept.lower()


@router.get("/runs/{run_id}/metrics", response_model=MetricPage, summary="Metric rows",
            responses={200: {"content": {"text/csv": {}}}})
def get_metrics(run_id: uuid.UUID, request: Request, session: SessionDep,
                after_step: Annotated[int | None, Query(ge=-1, le=runs_service.MAX_STEP)] = None,
                limit: Annotated[int, Query(ge=1, le=100_000)] = 10_000,
                max_points: Annotated[int | None, Query(ge=2, le=100_000)] = None,
                format: Annotated[str | None, Query(pattern="^(json|csv)$")] = None) -> Response:
    """Rows with ``step > after_step`` (at most ``limit``), by step; with ``max_points`` they are
    downsampled server-side (first, last and validation rows kept). JSON, or CSV (the
    metrics.csv header) with ``Accept: text/csv`` or ``format=csv``."""
    runs_service.get_run(session, run_id)
    points = runs_service.list_metrics(session, run_id, after_step=after_step, limit=limit)
    total = len(points)
    last = points[-1].step if points else after_step
    shown = downsample(points, max_points) if max_points else points
    if _wants_csv(request, format):
        return Response(to_csv(shown), media_type="text/csv")
    page = MetricPage(items=[MetricRow.of(p) for p in shown], next_after_step=last, total=total,
                      downsampled=len(shown) < total)
    return Response(page.model_dump_json(), media_type="application/json")


@router.get("/runs/{run_id}/router", response_model=RouterPage,
            summary="MoE router telemetry (token fraction per layer and expert)")
def get_router(run_id: uuid.UUID, session: SessionDep,
               after_step: Annotated[int | None, Query(ge=-1, le=runs_service.MAX_STEP)] = None,
               limit: Annotated[int, Query(ge=1, le=1_000_000)] = 100_000) -> RouterPage:
    """Rows ``{step, layer, expert, fraction}`` with ``step > after_step``, ordered by
    (step, layer, expert), at most ``limit``."""
    runs_service.get_run(session, run_id)
    points = runs_service.list_router_points(session, run_id, after_step=after_step)[:limit]
    last = points[-1].step if points else after_step
    return RouterPage(items=[RouterRow.of(p) for p in points], next_after_step=last)


@router.get("/runs/{run_id}/checkpoints", response_model=list[CheckpointPublic],
            summary="Recorded checkpoints")
def list_checkpoints(run_id: uuid.UUID, session: SessionDep) -> list[CheckpointPublic]:
    runs_service.get_run(session, run_id)
    return [CheckpointPublic.of(c) for c in runs_service.list_checkpoints(session, run_id)]


@router.get("/runs/{run_id}/checkpoints/{ref}/archive", summary="Download a checkpoint (.tar)",
            response_class=StreamingResponse,
            responses={200: {"content": {"application/x-tar": {}}}})
def checkpoint_archive(run_id: uuid.UUID, ref: str, session: SessionDep,
                       settings: SettingsDep) -> StreamingResponse:
    """The checkpoint folder ``ref`` (a step number, ``final`` or the folder name) as an
    uncompressed tar streamed from disk, top-level folder ``<run id>-<checkpoint name>``:
    extract it and point ``litgpt generate`` at that folder."""
    run = runs_service.get_run(session, run_id)
    checkpoint = runs_service.get_checkpoint(session, run_id, ref)
    if checkpoint is None:
        raise ApiError(404, f"run {run_id} has no checkpoint {ref!r}", code="checkpoint_not_found")
    folder = Path(checkpoint.path)
    run_dir = settings.run_dir(run.id).resolve()
    if not folder.resolve().is_relative_to(run_dir):
        raise ApiError(404, f"checkpoint {checkpoint.name} is recorded outside the run's folder",
                       code="checkpoint_not_found")
    root = f"{run.id}-{checkpoint.name}"
    try:
        plan = TarPlan(folder, root)
    except FileNotFoundError:
        raise ApiError(410, f"checkpoint {checkpoint.name} is recorded but its folder {folder} "
                       f"is gone (retention or a manual deletion)", code="checkpoint_gone") from None
    return StreamingResponse(iter(plan), media_type="application/x-tar", headers={
        "Content-Length": str(plan.length),
        "Content-Disposition": f'attachment; filename="{root}.tar"',
    })


@router.post("/runs/{run_id}/checkpoints/{ref}/link", response_model=DownloadLink,
             summary="A signed download link for a checkpoint archive")
def checkpoint_link(run_id: uuid.UUID, ref: str, session: SessionDep,
                    settings: SettingsDep) -> DownloadLink:
    """A URL that downloads the archive of checkpoint ``ref`` with a plain GET, for browsers
    (a link cannot send the ``Authorization`` header, and fetching with it would hold the whole
    tar in memory). With an API token the URL carries an HMAC signature of its path that
    expires after ``MOEJOBS_DOWNLOAD_LINK_SECONDS`` (``service.api.signing``); without one it is
    the archive's plain path. 404 when the run or checkpoint does not exist."""
    runs_service.get_run(session, run_id)
    checkpoint = runs_service.get_checkpoint(session, run_id, ref)
    if checkpoint is None:
        raise ApiError(404, f"run {run_id} has no checkpoint {ref!r}", code="checkpoint_not_found")
    path = CheckpointPublic.of(checkpoint).archive_url
    if settings.api_token is None:
        return DownloadLink(url=path, expires_at=None)
    url, expires = sign_path(settings.api_token.get_secret_value(), path,
                             settings.download_link_seconds)
    return DownloadLink(url=url, expires_at=datetime.fromtimestamp(expires, timezone.utc))


@router.get("/runs/{run_id}/events", response_model=list[EventPublic], summary="Run history")
def list_events(run_id: uuid.UUID, session: SessionDep) -> list[EventPublic]:
    runs_service.get_run(session, run_id)
    return [EventPublic.of(e) for e in runs_service.list_events(session, run_id)]


@router.get("/runs/{run_id}/logs", response_class=PlainTextResponse, summary="Run log (tail)")
def get_logs(run_id: uuid.UUID, session: SessionDep, settings: SettingsDep,
             tail: Annotated[int, Query(ge=0, le=100_000)] = 200) -> PlainTextResponse:
    """The last ``tail`` lines of the run's log (the training process' output,
    ``RUNS_DIR/<id>/train.log``); empty before the run starts."""
    run = runs_service.get_run(session, run_id)
    return PlainTextResponse(tail_lines(settings.run_dir(run.id) / LOG_FILE, tail))


@router.post("/runs/{run_id}/cancel", response_model=RunPublic, summary="Cancel a run")
def cancel_run(run_id: uuid.UUID, session: SessionDep) -> RunPublic:
    """A queued run is cancelled at once; a running one is flagged and its worker stops it
    (status becomes ``cancelled`` when the process has exited). 409 for a finished run."""
    return RunPublic.of(runs_service.request_cancel(session, run_id))


@router.delete("/runs/{run_id}", status_code=status.HTTP_204_NO_CONTENT,
               summary="Delete a finished run, its rows and its files")
def delete_run(run_id: uuid.UUID, session: SessionDep, settings: SettingsDep) -> Response:
    """409 while the run is queued or running (cancel it first)."""
    run = runs_service.delete_run(session, run_id)
    shutil.rmtree(settings.run_dir(run.id), ignore_errors=True)
    return Response(status_code=status.HTTP_204_NO_CONTENT)
