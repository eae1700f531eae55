"""Sweeps: create (JSON or YAML, as ``POST /runs``), validate, list, inspect, cancel, delete.

A sweep's trials are ordinary runs (``GET /runs/{id}``); this router shows them per sweep.
The controller (``service.sweeps.controller``) decides right after a create or a cancel here,
and then in every worker's periodic pass, so nothing of a sweep lives in this process.
"""

from __future__ import annotations

import uuid
from typing import Annotated

from fastapi import APIRouter, Query, Request, Response, status
from sqlmodel import Session

from service import reads
from service.api.body import read_document
from service.api.deps import CeleryDep, GateDep, SettingsDep
from service.api.errors import ApiError
from service.api.models import (
    SweepPage,
    SweepPublic,
    SweepSummary,
    SweepValidation,
    WebhookDeliveryPublic,
)
from service.api.openapi import errors
from service.submission import InvalidSubmission
from service.sweeps import controller
from service.sweeps.spec import check_sweep, sweep_request

router = APIRouter(tags=["sweeps"])

SWEEP_EXAMPLE = {
    "name": "lr-and-experts",
    "base": {"train_config": {"...": "as POST /runs"}, "model_config": {"...": "as POST /runs"}},
    "method": "grid",
    "metric": {"name": "val_loss", "goal": "minimize"},
    "parameters": {
        "train_config.optimizer.init_args.lr": {"values": [0.001, 0.003]},
        "model_config.n_expert": {"values": [4, 8]},
    },
    "max_concurrent": 2,
    "early_stopping": {"type": "median", "min_steps": 50},
    "seed": 0,
}
_BODY = {
    "requestBody": {
        "required": True,
        "content": {
            "application/json": {"schema": {"type": "object"}, "example": SWEEP_EXAMPLE},
            "application/yaml": {"schema": {"type": "object"}},
        },
    }
}


def _not_found(error: controller.SweepNotFound) -> ApiError:
    return ApiError(404, str(error), code="sweep_not_found", sweep_id=str(error.sweep_id))


def _view(session: Session, sweep_id: uuid.UUID) -> SweepPublic:
    try:
        return SweepPublic.of(controller.view_sweep(session, sweep_id))
    except controller.SweepNotFound as error:
        raise _not_found(error) from None


@router.post(
    "/sweeps",
    status_code=status.HTTP_201_CREATED,
    response_model=SweepPublic,
    openapi_extra=_BODY,
    summary="Create a sweep",
    responses=errors(415, 422, 503),
)
async def create_sweep(
    request: Request, settings: SettingsDep, celery: CeleryDep, gate: GateDep
) -> Response:
    """Check the sweep (422 naming each problem: the base configs, a metric the base never
    logs, an unknown path, every invalid grid point), store it and create its first trials
    (a grid lists all its points at once, their runs queued ``max_concurrent`` at a time)."""
    sweep = sweep_request(await read_document(request))

    def work(session: Session) -> SweepPublic:
        checked = check_sweep(session, settings, sweep)
        row = controller.create_sweep(session, checked)
        controller.tick(session, settings, celery, row.id, holder=controller.api_holder())
        return _view(session, row.id)

    public = await gate.run(work)
    return Response(
        public.model_dump_json(), status_code=status.HTTP_201_CREATED, media_type="application/json"
    )


@router.post(
    "/sweeps/validate",
    response_model=SweepValidation,
    openapi_extra=_BODY,
    summary="Check a sweep without creating it",
    responses=errors(415, 422, 503),
)
async def validate_sweep(request: Request, settings: SettingsDep, gate: GateDep) -> Response:
    """200 with ``valid: false`` and the errors when the sweep would be refused by a check
    that needs the server; 422 for a document that is not a sweep at all."""
    sweep = sweep_request(await read_document(request))

    def work(session: Session) -> SweepValidation:
        try:
            checked = check_sweep(session, settings, sweep)
        except InvalidSubmission as error:
            return SweepValidation(valid=False, errors=error.errors, warnings=[], points=[])
        return SweepValidation.model_validate(
            {"valid": True, "errors": [], "warnings": checked.warnings, "points": checked.points}
        )

    return await gate.json(work)


@router.get("/sweeps", response_model=SweepPage, summary="List sweeps", responses=errors(503))
async def list_sweeps(gate: GateDep, limit: Annotated[int, Query(ge=1, le=1000)] = 100) -> Response:
    """The newest sweeps first, without their trials (counts and best trial only)."""

    def work(session: Session) -> SweepPage:
        views = controller.list_sweeps(session, limit=limit)
        return SweepPage(items=[SweepSummary.of(v) for v in views])

    return await gate.json(work)


@router.get(
    "/sweeps/{sweep_id}",
    response_model=SweepPublic,
    summary="One sweep",
    responses=errors(404, 503),
)
async def get_sweep(sweep_id: uuid.UUID, gate: GateDep) -> Response:
    """The sweep, its document, every trial (parameters, status, final and best metric value,
    run id) and its best trial."""
    return await gate.json(_view, sweep_id)


@router.get(
    "/sweeps/{sweep_id}/webhooks",
    response_model=list[WebhookDeliveryPublic],
    summary="Webhook deliveries of the sweep's end",
    responses=errors(404, 503),
)
async def list_sweep_webhooks(sweep_id: uuid.UUID, gate: GateDep) -> Response:
    """The deliveries of the sweep's own end (README: Webhooks), oldest first; its trials'
    are each run's ``GET /runs/{id}/webhooks``."""

    def work(session: Session) -> list[WebhookDeliveryPublic]:
        _view(session, sweep_id)  # 404 for an unknown sweep
        rows = reads.list_deliveries(session, sweep_id=sweep_id)
        return [WebhookDeliveryPublic.of(d) for d in rows if d.run_id is None]

    return await gate.json(work)


@router.post(
    "/sweeps/{sweep_id}/cancel",
    response_model=SweepPublic,
    summary="Cancel a sweep",
    responses=errors(404, 503),
)
async def cancel_sweep(
    sweep_id: uuid.UUID, settings: SettingsDep, celery: CeleryDep, gate: GateDep
) -> Response:
    """No more trials; queued trials are cancelled at once, running ones stop at a step
    boundary with a checkpoint (``cancel_reason: sweep_cancelled``); the sweep is
    ``cancelled`` once none runs. An ended sweep is left as it is."""

    def work(session: Session) -> SweepPublic:
        try:
            controller.request_cancel(session, sweep_id)
        except controller.SweepNotFound as error:
            raise _not_found(error) from None
        controller.tick(session, settings, celery, sweep_id, holder=controller.api_holder())
        return _view(session, sweep_id)

    return await gate.json(work)


@router.delete(
    "/sweeps/{sweep_id}",
    status_code=status.HTTP_204_NO_CONTENT,
    summary="Delete an ended sweep (its runs stay)",
    responses=errors(404, 409, 503),
)
async def delete_sweep(sweep_id: uuid.UUID, gate: GateDep) -> Response:
    """Deletes the sweep and its trial records; 409 while it runs (cancel it first). Its runs
    are kept as ordinary runs (``sweep_id`` null, ``sweep_params`` kept): delete them with
    ``DELETE /runs/{id}``."""

    def work(session: Session) -> None:
        try:
            controller.delete_sweep(session, sweep_id)
        except controller.SweepNotFound as error:
            raise _not_found(error) from None
        except controller.SweepActive as error:
            raise ApiError(
                409, str(error), code="sweep_active", sweep_id=str(sweep_id), sweep_status="running"
            ) from None

    await gate.run(work)
    return Response(status_code=status.HTTP_204_NO_CONTENT)


__all__ = ["router"]
