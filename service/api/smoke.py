"""The smoke test: the specification's one-step training of the shipped configs, run as an
ordinary run through the real queue and a real worker, timed stage by stage.

``POST /smoke-test`` submits ``configs/train_config.yaml`` with
``service.configs.SMOKE_TEST_OVERRIDES`` (plus ``devices: 1`` and the sample data/tokenizer
``DATA_ROOT/sample/{train,val,tokenizer}``, which the worker seeds at start-up) and
``configs/model_config.yaml`` (or ``MOEJOBS_SMOKE_MODEL_CONFIG``), as a run with
``preset="smoke-test"`` (the runner writes no checkpoint for it). One at a time: a second
request while one is queued or running is a 409 naming it.

``GET /smoke-test/{id}`` reports the stages, each with its duration:

=================  =====================================================================
``queued_wait``    submitted -> claimed by a worker (run events)
``startup``        claimed -> the training process' first log line (imports, config check)
``data_tokenizer`` -> the engine's ``data: N training tokens ...`` line (tokenizer loaded,
                   text tokenized into the cache)
``model_build``    -> the engine's ``plan: N optimizer steps ...`` line (model built,
                   compiled, optimizer set up)
``first_step``     -> the first optimizer step done (``plan`` time + the first metric row's
                   ``elapsed_s``)
``finish``         -> the run finished (``finished_at``)
=================  =====================================================================

Log lines come from ``RUNS_DIR/<id>/train.log`` (the process output the runner keeps) or the
engine's own ``out/train.log``; their timestamps are the worker's local time, read in this
server's time zone (API and workers are expected to share one). A run that failed or was
cancelled fails at the first stage it did not complete, with the run's failure message (or
the log's last ``error:`` line). A smoke test still queued while no worker is live fails at
``queued_wait`` (and is cancelled, so it cannot start much later by surprise). ``?wait=S``
blocks up to S seconds for a verdict.
"""
from __future__ import annotations

import asyncio
import re
import time
import uuid
from dataclasses import dataclass
from datetime import datetime, timedelta
from pathlib import Path
from typing import Annotated

from celery import Celery
from fastapi import APIRouter, Depends, Query, Request, status
from starlette.concurrency import run_in_threadpool

from service import reads
from service import runs as runs_service
from service.api.deps import get_celery, get_settings
from service.api.errors import ApiError
from service.api.models import RunCreate, SmokeStage, SmokeTestPublic
from service.api.submission import submit_run
from service.configs import CONFIGS_DIR, SMOKE_TEST_OVERRIDES, deep_merge, load_document
from service.models import Run, RunStatus
from service.schemas import ConfigError
from service.settings import Settings

router = APIRouter(tags=["smoke test"])

SettingsDep = Annotated[Settings, Depends(get_settings)]
CeleryDep = Annotated[Celery, Depends(get_celery)]

STAGES = ("queued_wait", "startup", "data_tokenizer", "model_build", "first_step", "finish")
SAMPLE = "sample"
#: Longest ``wait`` accepted, seconds.
MAX_WAIT_S = 600.0
_POLL_S = 0.5

_LINE = re.compile(r"^(\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3}) (?:[A-Z]+) (.*)$")
_DATA = re.compile(r"\bdata: \d+ training tokens")
_PLAN = re.compile(r"\bplan: \d+ optimizer steps")
_ERROR = re.compile(r"^error: (.*)$")


def smoke_documents(settings: Settings) -> tuple[dict, dict]:
    """The smoke test's (train, model) documents, before validation."""
    train = load_document(CONFIGS_DIR / "train_config.yaml")
    model = load_document(settings.smoke_model_config or CONFIGS_DIR / "model_config.yaml")
    train = deep_merge(train, SMOKE_TEST_OVERRIDES)
    train = deep_merge(train, {
        "devices": 1,
        "tokenizer_dir": f"{SAMPLE}/tokenizer",
        "data": {"init_args": {"train_data_path": f"{SAMPLE}/train",
                               "val_data_path": f"{SAMPLE}/val"}},
    })
    return train, model


# -- the report -------------------------------------------------------------------------------


@dataclass
class _LogMarks:
    first: datetime | None = None
    data: datetime | None = None
    plan: datetime | None = None
    error: str | None = None


def _local_tz():
    return datetime.now().astimezone().tzinfo


def read_log_marks(run_dir: Path) -> _LogMarks:
    """Stage markers from the run's log files (module docstring)."""
    marks = _LogMarks()
    tz = _local_tz()
    for path in (run_dir / "train.log", run_dir / "out" / "train.log"):
        try:
            lines = path.read_text(encoding="utf-8", errors="replace").splitlines()
        except OSError:
            continue
        for line in lines:
            err = _ERROR.match(line)
            if err:
                marks.error = err.group(1)
            m = _LINE.match(line)
            if not m:
                continue
            try:
                at = datetime.strptime(m.group(1), "%Y-%m-%d %H:%M:%S,%f").replace(tzinfo=tz)
            except ValueError:
                continue
            rest = m.group(2)
            marks.first = at if marks.first is None else min(marks.first, at)
            if _DATA.search(rest) and (marks.data is None or at < marks.data):
                marks.data = at
            if _PLAN.search(rest) and (marks.plan is None or at < marks.plan):
                marks.plan = at
    return marks


def _first_step_elapsed(session, run_id: uuid.UUID) -> float | None:
    for point in runs_service.list_metrics(session, run_id, limit=5):
        if point.step >= 1 and point.elapsed_s is not None:
            return point.elapsed_s
    return None


def _seconds(a: datetime | None, b: datetime | None) -> float | None:
    if a is None or b is None:
        return None
    return round(max(0.0, (b - a).total_seconds()), 3)


def build_report(run: Run, marks: _LogMarks, first_step_elapsed: float | None, *,
                 live_workers: int, last_event: str | None = None) -> SmokeTestPublic:
    """The verdict and stage timings of a smoke-test run (pure: the caller reads the inputs)."""
    times: list[datetime | None] = [run.created_at, run.started_at]
    startup_end = marks.first or marks.data
    times.append(startup_end)
    times.append(marks.data)
    times.append(marks.plan)
    first_step = None
    if marks.plan is not None and first_step_elapsed is not None:
        first_step = marks.plan + timedelta(seconds=first_step_elapsed)
    times.append(first_step)
    succeeded = run.status == RunStatus.succeeded
    times.append(run.finished_at if succeeded else None)
    # times[i] is the start of stage i-1's successor: stage k runs from times[k] to times[k+1]
    done = [times[k + 1] is not None for k in range(len(STAGES))]
    failed_stage = None
    message = None
    verdict: str
    if succeeded:
        verdict = "passed"
    elif run.status in (RunStatus.failed, RunStatus.cancelled):
        verdict = "failed"
        failed_stage = next((STAGES[k] for k in range(len(STAGES)) if not done[k]), "finish")
        message = run.failure_message or marks.error or last_event or (
            f"the run was {run.status.value}" + (f" ({run.failure_reason.value})"
                                                 if run.failure_reason else ""))
    elif run.status == RunStatus.queued and live_workers == 0:
        verdict = "failed"
        failed_stage = "queued_wait"
        message = "no live worker: nothing can claim the smoke test (start `moejobs worker`)"
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
        stages.append(SmokeStage(name=name, seconds=_seconds(start, end) if done[k] else None,
                                 status=state))
    total = _seconds(run.created_at, run.finished_at) if run.finished_at else None
    return SmokeTestPublic(id=run.id, status=verdict, run_status=run.status.value, stages=stages,
                           failed_stage=failed_stage, message=message, total_seconds=total)


def _report(request: Request, settings: Settings, run_id: uuid.UUID) -> SmokeTestPublic:
    with request.app.state.db.session() as session:
        run = runs_service.get_run(session, run_id)
        if run.preset != reads.SMOKE_TEST_PRESET:
            raise ApiError(404, f"{run_id} is not a smoke test", code="smoke_test_not_found")
        elapsed = _first_step_elapsed(session, run_id)
        live = reads.count_live_workers(session, settings.worker_stale_seconds)
        events = runs_service.list_events(session, run_id)
        report = build_report(run, read_log_marks(settings.run_dir(run.id)), elapsed,
                              live_workers=live, last_event=events[-1].message if events else None)
        if report.status == "failed" and run.status == RunStatus.queued:
            # Nothing can run it now; cancel so it does not start by surprise later and a new
            # smoke test can be submitted.
            session.commit()
            cancelled = runs_service.request_cancel(
                session, run_id, f"smoke test failed: {report.message}", actor="api")
            report.run_status = cancelled.status.value
        return report


# -- routes -----------------------------------------------------------------------------------


@router.post("/smoke-test", status_code=status.HTTP_202_ACCEPTED, response_model=SmokeTestPublic,
             summary="Start the smoke test", responses={409: {"description": "one is running"}})
async def start_smoke_test(request: Request, settings: SettingsDep,
                           celery: CeleryDep) -> SmokeTestPublic:
    """Queue the smoke test (module docstring); 202 with its id. 409 with ``run_id`` while
    another smoke test is queued or running."""
    lock: asyncio.Lock = request.app.state.smoke_lock
    async with lock:  # one submission at a time in this process; the DB check covers the rest
        def work() -> uuid.UUID:
            with request.app.state.db.session() as session:
                active = reads.active_smoke_test(session)
                if active is not None:
                    raise ApiError(409, f"smoke test {active.id} is still {active.status.value}",
                                   code="smoke_test_running", run_id=str(active.id))
                try:
                    train, model = smoke_documents(settings)
                except ConfigError as error:
                    raise ApiError(500, f"the smoke test's configs cannot be read: {error}") from None
                body = RunCreate(name=f"smoke-test-{time.strftime('%Y%m%d-%H%M%S')}",
                                 preset=reads.SMOKE_TEST_PRESET, train_config=train,
                                 model_config=model)
                submitted = submit_run(session, settings, celery, body,
                                       allow_reserved_preset=True, check_workers=False)
                return submitted.run.id

        run_id = await run_in_threadpool(work)
    return await run_in_threadpool(_report, request, settings, run_id)


@router.get("/smoke-test/{run_id}", response_model=SmokeTestPublic, summary="Smoke-test verdict")
async def get_smoke_test(run_id: uuid.UUID, request: Request, settings: SettingsDep,
                         wait: Annotated[float, Query(ge=0, le=MAX_WAIT_S,
                                                      description="seconds to wait for a verdict")] = 0
                         ) -> SmokeTestPublic:
    """Pass/fail with each stage's duration and the failing stage. With ``wait`` the answer
    comes when the verdict is known (passed/failed) or after ``wait`` seconds."""
    deadline = time.monotonic() + wait
    while True:
        report = await run_in_threadpool(_report, request, settings, run_id)
        remaining = deadline - time.monotonic()
        if report.status in ("passed", "failed") or remaining <= 0:
            return report
        await asyncio.sleep(min(_POLL_S, remaining))
