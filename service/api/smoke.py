"""The smoke test: the specification's one-step training of the shipped configs, run as an
ordinary run through the real queue and a real worker, timed stage by stage.

``POST /smoke-test`` submits ``configs/train_config.yaml`` with
``service.config.presets.SMOKE_TEST_OVERRIDES`` (plus ``devices: 1`` and the sample data/tokenizer
``DATA_ROOT/sample/{train,val,tokenizer}``, which the worker seeds at start-up) and
``configs/model_config.yaml`` (or ``MOEJOBS_SMOKE_MODEL_CONFIG``), as a run with
``preset="smoke-test"`` whose ``write_checkpoints`` is false (no checkpoint is written). One at a
time: a second request while one is queued or running is a 409 naming it. The broker must answer
(a 503 naming it otherwise, and nothing is stored): a smoke test that waits for the reconciler
would say nothing about the stack.

``GET /smoke-test/{id}`` reports the stages, each with its duration:

=================  =====================================================================
``queued_wait``    submitted -> claimed by a worker (``created_at`` -> ``started_at``)
``startup``        -> the engine's ``configured`` event (imports, config check, pre-flight)
``data_tokenizer`` -> ``data_ready`` (tokenizer loaded, text tokenized into the cache)
``model_build``    -> ``model_built`` (model built, compiled, optimizer set up)
``first_step``     -> ``first_step`` (the first optimizer step done)
``finish``         -> the run finished (``finished_at``)
=================  =====================================================================

The engine's events come from ``RUNS_DIR/<id>/out/events.jsonl`` (``service.contract``; the
claimed attempt's, each kind's first), with aware UTC timestamps, so the API and the workers
need not share a clock's time zone. A run that failed or was cancelled fails at the first stage
it did not complete, with the run's failure message (which the runner takes from the engine's
``result.json``) or its last event's. A smoke test still queued while no worker that trains is
live fails at ``queued_wait``; reading its report changes nothing (the run stays queued): a
worker's reconciler cancels it (``worker.reconciler.reconcile``), so that it cannot start much
later by surprise. ``?wait=S`` blocks up to S seconds for a verdict.
"""

from __future__ import annotations

import asyncio
import time
import uuid
from datetime import datetime
from typing import Annotated

from fastapi import APIRouter, Query, Request, status
from sqlmodel import Session
from starlette.concurrency import run_in_threadpool

from service import reads
from service.api.deps import CeleryDep, DatabaseGate, GateDep, SettingsDep
from service.api.errors import ApiError, dependency_unavailable
from service.api.models import SmokeStage, SmokeTestPage, SmokeTestPublic, SmokeTestSummary
from service.api.openapi import errors
from service.config.issues import ConfigError
from service.config.merge import deep_merge
from service.config.parse import load_document
from service.config.presets import CONFIGS_DIR, SMOKE_TEST_OVERRIDES
from service.contract import EngineEvent, EventKind, read_events
from service.models import Run, RunStatus
from service.queue import check_broker, train_queue
from service.settings import Settings
from service.submission import RunCreate, Submitted, send_run, submit_run

router = APIRouter(tags=["smoke test"])

STAGES = ("queued_wait", "startup", "data_tokenizer", "model_build", "first_step", "finish")
#: The engine event that ends each stage between the claim and the finish.
STAGE_EVENTS = {
    "startup": EventKind.configured,
    "data_tokenizer": EventKind.data_ready,
    "model_build": EventKind.model_built,
    "first_step": EventKind.first_step,
}
SAMPLE = "sample"
#: Longest ``wait`` accepted, seconds.
MAX_WAIT_S = 600.0
_POLL_S = 0.5


def smoke_documents(settings: Settings) -> tuple[dict, dict]:
    """The smoke test's (train, model) documents, before validation."""
    train = load_document(CONFIGS_DIR / "train_config.yaml")
    model = load_document(settings.smoke_model_config or CONFIGS_DIR / "model_config.yaml")
    train = deep_merge(train, SMOKE_TEST_OVERRIDES)
    train = deep_merge(
        train,
        {
            "devices": 1,
            "tokenizer_dir": f"{SAMPLE}/tokenizer",
            "data": {
                "init_args": {
                    "train_data_path": f"{SAMPLE}/train",
                    "val_data_path": f"{SAMPLE}/val",
                }
            },
        },
    )
    return train, model


# -- the report -------------------------------------------------------------------------------


def engine_marks(run: Run, events: list[EngineEvent]) -> dict[EventKind, datetime]:
    """When each kind of engine event first happened in the run's current attempt (events
    without an attempt count too: an engine started outside a worker writes none)."""
    marks: dict[EventKind, datetime] = {}
    for event in events:
        if event.attempt not in (None, run.attempt):
            continue
        if event.event not in marks or event.at < marks[event.event]:
            marks[event.event] = event.at
    return marks


def _seconds(a: datetime | None, b: datetime | None) -> float | None:
    if a is None or b is None:
        return None
    return round(max(0.0, (b - a).total_seconds()), 3)


def build_report(
    run: Run, events: list[EngineEvent], *, live_workers: int, last_event: str | None = None
) -> SmokeTestPublic:
    """The verdict and stage timings of a smoke-test run from the run row and the engine's
    events (``contract.read_events`` of its out folder). Pure: the caller reads the inputs."""
    marks = engine_marks(run, events)
    times: list[datetime | None] = [run.created_at, run.started_at]
    times += [marks.get(STAGE_EVENTS[name]) for name in STAGES[1:-1]]
    succeeded = run.status == RunStatus.succeeded
    times.append(run.finished_at if succeeded else None)
    # times[i] is the start of stage i-1's successor: stage k runs from times[k] to times[k+1]
    # A run that succeeded went through every stage, timed or not (an engine that writes no
    # events leaves the inner stages without a duration).
    done = [succeeded or times[k + 1] is not None for k in range(len(STAGES))]
    failed_stage = None
    message = None
    verdict: str
    if succeeded:
        verdict = "passed"
    elif run.status in (RunStatus.failed, RunStatus.cancelled):
        verdict = "failed"
        failed_stage = next((STAGES[k] for k in range(len(STAGES)) if not done[k]), "finish")
        message = (
            run.failure_message
            or last_event
            or (
                f"the run was {run.status.value}"
                + (f" ({run.failure_reason.value})" if run.failure_reason else "")
            )
        )
    elif run.status == RunStatus.queued and live_workers == 0:
        verdict = "failed"
        failed_stage = "queued_wait"
        message = reads.SMOKE_TEST_NO_WORKER
    else:
        verdict = "pending" if run.status == RunStatus.queued else "running"
    stages = []
    for k, name in enumerate(STAGES):
        start, end = times[k], times[k + 1]
        if done[k]:
            state = "ok"
        elif name == failed_stage:
            state = "failed"
        elif verdict == "failed":
            state = "skipped"
        else:
            state = "pending"
        stages.append(SmokeStage(name=name, seconds=_seconds(start, end), status=state))
    total = _seconds(run.created_at, run.finished_at) if run.finished_at else None
    return SmokeTestPublic(
        id=run.id,
        status=verdict,
        run_status=run.status.value,
        stages=stages,
        failed_stage=failed_stage,
        message=message,
        total_seconds=total,
    )


def _report_work(
    session: Session, settings: Settings, run_id: uuid.UUID, engine_events: list[EngineEvent]
) -> SmokeTestPublic:
    run = reads.get_run(session, run_id)
    if run.preset != reads.SMOKE_TEST_PRESET:
        raise ApiError(404, f"{run_id} is not a smoke test", code="smoke_test_not_found")
    live = len(reads.live_workers(session, settings.worker_stale_seconds, role="trains"))
    events = reads.list_events(session, run_id)
    report = build_report(
        run, engine_events, live_workers=live, last_event=events[-1].message if events else None
    )
    return report


async def _report(gate: DatabaseGate, settings: Settings, run_id: uuid.UUID) -> SmokeTestPublic:
    """The report of smoke test ``run_id``: its events file read first (no database slot held
    for file work), then the run in one gate call. Reads only."""
    engine_events = await run_in_threadpool(read_events, settings.run_dir(run_id) / "out")
    return await gate.run(_report_work, settings, run_id, engine_events)


# -- routes -----------------------------------------------------------------------------------


@router.post(
    "/smoke-test",
    status_code=status.HTTP_202_ACCEPTED,
    response_model=SmokeTestPublic,
    summary="Start the smoke test",
    responses=errors(409, 503),
)
async def start_smoke_test(
    request: Request, settings: SettingsDep, celery: CeleryDep, gate: GateDep
) -> SmokeTestPublic:
    """Queue the smoke test (module docstring); 202 with its id. 409 with ``run_id`` while
    another smoke test is queued or running."""
    lock: asyncio.Lock = request.app.state.smoke_lock
    async with lock:  # one submission at a time in this process; the DB check covers the rest

        def work(session: Session) -> Submitted:
            active = reads.active_smoke_test(session)
            if active is not None:
                raise ApiError(
                    409,
                    f"smoke test {active.id} is still {active.status.value}",
                    code="smoke_test_running",
                    run_id=str(active.id),
                )
            try:
                train, model = smoke_documents(settings)
            except ConfigError as error:
                raise ApiError(500, f"the smoke test's configs cannot be read: {error}") from None
            body = RunCreate(
                name=f"smoke-test-{time.strftime('%Y%m%d-%H%M%S')}",
                preset=reads.SMOKE_TEST_PRESET,
                train_config=train,
                model_doc=model,  # the field of the wire name model_config
            )
            return submit_run(
                session,
                settings,
                celery,
                body,
                allow_reserved_preset=True,
                check_workers=False,
                send=False,
                write_checkpoints=False,
            )

        problem = await run_in_threadpool(check_broker, celery, train_queue(settings))
        if problem is not None:
            raise dependency_unavailable("broker", f"{problem}; no smoke test was started")
        submitted = await gate.run(work)
        await run_in_threadpool(send_run, celery, submitted)
    return await _report(gate, settings, submitted.run.id)


@router.get(
    "/smoke-test/{run_id}",
    response_model=SmokeTestPublic,
    summary="Smoke-test verdict",
    responses=errors(404, 503),
)
async def get_smoke_test(
    run_id: uuid.UUID,
    gate: GateDep,
    settings: SettingsDep,
    wait: Annotated[
        float, Query(ge=0, le=MAX_WAIT_S, description="seconds to wait for a verdict")
    ] = 0,
) -> SmokeTestPublic:
    """Pass/fail with each stage's duration and the failing stage. With ``wait`` the answer
    comes when the verdict is known (passed/failed) or after ``wait`` seconds. Reading it
    changes nothing (a smoke test nothing can claim is cancelled by a worker's reconciler)."""
    deadline = time.monotonic() + wait
    while True:
        report = await _report(gate, settings, run_id)
        remaining = deadline - time.monotonic()
        if report.status in ("passed", "failed") or remaining <= 0:
            return report
        await asyncio.sleep(min(_POLL_S, remaining))


# -- the list (the dashboard's smoke-test page) -----------------------------------------------

#: Most smoke tests ``GET /smoke-tests`` answers.
MAX_LIST = 50


@router.get(
    "/smoke-tests",
    response_model=SmokeTestPage,
    summary="The server's newest smoke tests",
    responses=errors(422, 503),
)
async def list_smoke_tests(
    gate: GateDep,
    settings: SettingsDep,
    limit: Annotated[int, Query(ge=1, le=MAX_LIST, description="at most this many")] = 10,
) -> SmokeTestPage:
    """Every smoke test of this server, whoever started it, newest first: each one's report (as
    ``GET /smoke-test/{id}``) with its run's name and creation time. Reads only."""

    def work(session: Session) -> tuple[list[tuple[Run, str | None]], int]:
        found = reads.recent_smoke_tests(session, limit)
        live = len(reads.live_workers(session, settings.worker_stale_seconds, role="trains"))
        return found, live

    found, live = await gate.run(work)

    def read_all() -> list[list[EngineEvent]]:
        return [read_events(settings.run_dir(run.id) / "out") for run, _ in found]

    engine_events = await run_in_threadpool(read_all)
    items = []
    for (run, last_event), events in zip(found, engine_events, strict=True):
        report = build_report(run, events, live_workers=live, last_event=last_event)
        items.append(
            SmokeTestSummary(**report.model_dump(), name=run.name, created_at=run.created_at)
        )
    return SmokeTestPage(items=items)
