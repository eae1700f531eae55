"""Probes, workers, Prometheus metrics, JSON Schemas and the offline API docs.

- ``GET /healthz``: the process answers (no dependency checked).
- ``GET /readyz``: database (answers and is migrated to head), broker (a connection and a
  queue declaration), workers (at least one heartbeat within ``WORKER_STALE_SECONDS``);
  200 when all hold, else 503 naming what is down (with ``Retry-After``).
- ``GET /metrics``: Prometheus text format, read at scrape time (see :class:`StateCollector`).
- ``GET /docs``: Swagger UI whose assets come from the ``swagger-ui-bundle-v2`` package
  (``swagger_ui_bundle`` module), served under ``/docs/assets/``: no CDN; its start-up code is
  ``/docs/init.js`` (no inline script: see ``service.api.middleware``).
"""

from __future__ import annotations

import html
import json
import logging
import mimetypes
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from celery import Celery
from fastapi import APIRouter, Request
from fastapi.openapi.docs import swagger_ui_default_parameters
from fastapi.responses import FileResponse, HTMLResponse, JSONResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest
from prometheus_client.core import GaugeMetricFamily
from sqlmodel import Session
from starlette.concurrency import run_in_threadpool

from service import reads
from service.api.deps import CeleryDep, DatabaseGate, GateDep, SettingsDep
from service.api.errors import UNAVAILABLE_RETRY_AFTER_S, ApiError, error_body
from service.api.models import WorkerPublic
from service.api.openapi import errors
from service.config.model import model_config_json_schema
from service.config.train import train_config_json_schema
from service.queue import aux_queue, check_broker, queue_depth, train_queue
from service.settings import Settings

log = logging.getLogger("moejobs.api")

router = APIRouter(tags=["system"])
#: System routes that need the token when one is set (the probes and /metrics do not).
protected_router = APIRouter(tags=["system"])

#: Swagger UI files served under /docs/assets/ (nothing else from the package).
DOCS_ASSETS = frozenset(
    {
        "swagger-ui-bundle.js",
        "swagger-ui.css",
        "favicon-32x32.png",
        "oauth2-redirect.html",
        "swagger-ui-bundle.js.map",
        "swagger-ui.css.map",
    }
)


def _short(error: BaseException) -> str:
    return " ".join(f"{type(error).__name__}: {error}".split())[:500]


@router.get("/healthz", summary="Liveness")
def healthz() -> dict[str, str]:
    return {"status": "ok"}


def _database_state(session: Session) -> str | None:
    from alembic.runtime.migration import MigrationContext

    reads.ping(session)
    return MigrationContext.configure(session.connection()).get_current_revision()


async def check_database(gate: DatabaseGate, head_revision: str | None) -> str | None:
    """None when the database answers and is at ``head_revision``, else the reason."""
    try:
        revision = await gate.run(_database_state)
    except ApiError as error:  # no slot came free: busy, not down
        return error.message
    except Exception as error:
        return f"unreachable: {_short(error)}"
    if revision != head_revision:
        return (
            f"schema at revision {revision or 'none'}, the code needs "
            f"{head_revision}: run `moejobs migrate`"
        )
    return None


async def check_workers(gate: DatabaseGate, settings: Settings) -> tuple[str | None, int]:
    try:
        trainers = await gate.run(reads.live_workers, settings.worker_stale_seconds, role="trains")
    except Exception as error:
        detail = error.message if isinstance(error, ApiError) else _short(error)
        return f"unknown (database: {detail})", 0
    live = len(trainers)
    if live == 0:
        return (
            f"no worker heartbeat in the last {settings.worker_stale_seconds:g} s "
            f"(start `moejobs worker`)"
        ), 0
    return None, live


@router.get("/readyz", summary="Readiness: database, broker, workers", responses=errors(503))
async def readyz(
    request: Request, settings: SettingsDep, gate: GateDep, celery: CeleryDep
) -> JSONResponse:
    checks: dict[str, dict[str, Any]] = {}
    db_problem = await check_database(gate, request.app.state.head_revision)
    checks["database"] = {"ok": db_problem is None, **({"error": db_problem} if db_problem else {})}
    broker_problem = await run_in_threadpool(check_broker, celery, train_queue(settings))
    checks["broker"] = {
        "ok": broker_problem is None,
        **({"error": broker_problem} if broker_problem else {}),
    }
    worker_problem, live = await check_workers(gate, settings)
    checks["workers"] = {
        "ok": worker_problem is None,
        "live": live,
        **({"error": worker_problem} if worker_problem else {}),
    }
    down = [name for name, check in checks.items() if not check["ok"]]
    if down:
        detail = "; ".join(f"{name}: {checks[name]['error']}" for name in down)
        return JSONResponse(
            error_body(
                503,
                f"not ready: {', '.join(down)} down ({detail})",
                code="not_ready",
                down=down,
                checks=checks,
            ),
            status_code=503,
            headers={"Retry-After": str(UNAVAILABLE_RETRY_AFTER_S)},
        )
    return JSONResponse({"status": "ready", "checks": checks})


@protected_router.get(
    "/workers",
    response_model=list[WorkerPublic],
    summary="Registered workers",
    responses=errors(503),
)
async def list_workers(gate: GateDep, settings: SettingsDep) -> Response:
    """Every registered worker; ``live`` when it heartbeated within WORKER_STALE_SECONDS."""

    def work(session: Session) -> list[WorkerPublic]:
        live_ids = {w.id for w in reads.live_workers(session, settings.worker_stale_seconds)}
        return [WorkerPublic.of(w, w.id in live_ids) for w in reads.list_workers(session)]

    return await gate.json(work)


@dataclass
class State:
    """What ``GET /metrics`` reports, read at scrape time. ``database`` is None when the
    database did not answer; ``queue_depths`` None when the broker did not."""

    database: dict[str, Any] | None
    queue_depths: dict[str, int] | None


#: Most running runs ``GET /metrics`` reports one by one (the oldest first beyond it are left
#: out; a fleet runs one per GPU slot, far fewer).
MAX_RUN_GAUGES = 1000


def _running(session: Session) -> list[dict[str, Any]]:
    """The running runs with their newest metric row (two queries): ``{id, name, step, loss,
    tokens_per_sec}``, None where not logged yet."""
    rows, _next = reads.list_runs(
        session, status="running", limit=MAX_RUN_GAUGES, sort="-created_at", configs=False
    )
    latest = reads.latest_metrics(session, [r.id for r in rows])
    out = []
    for run in rows:
        row = latest.get(run.id)
        out.append(
            {
                "id": str(run.id),
                "name": run.name,
                "step": None if row is None else row.step,
                "loss": None if row is None else row.loss,
                "tokens_per_sec": None if row is None else row.tokens_per_sec,
            }
        )
    return out


def _database_counts(session: Session, settings: Settings) -> dict[str, Any]:
    return {
        "runs": reads.count_runs_by_status(session),
        "live": len(reads.live_workers(session, settings.worker_stale_seconds, role="trains")),
        "registered": len(reads.list_workers(session)),
        "rows": reads.count_metric_points(session),
        "running": _running(session),
    }


def _queue_depths(celery: Celery, settings: Settings) -> dict[str, int] | None:
    depths = {}
    for queue in (train_queue(settings), aux_queue(settings)):
        n = queue_depth(celery, queue)
        if n is None:
            return None
        depths[queue] = n
    return depths


async def read_state(gate: DatabaseGate, celery: Celery, settings: Settings) -> State:
    """The database counts (through the gate) and the broker's queue depths."""
    try:
        counts = await gate.run(_database_counts, settings)
    except Exception as error:
        detail = error.message if isinstance(error, ApiError) else _short(error)
        log.warning("metrics: database unavailable: %s", detail)
        counts = None
    depths = await run_in_threadpool(_queue_depths, celery, settings)
    return State(database=counts, queue_depths=depths)


class StateCollector:
    """Prometheus collector of one :class:`State`: ``moejobs_runs{status}``,
    ``moejobs_queue_depth{queue}`` (messages waiting in the broker; absent when it cannot
    be read), ``moejobs_broker_up``, ``moejobs_workers_live``, ``moejobs_workers_registered``,
    ``moejobs_metric_rows`` (metric rows ingested and stored, all runs), ``moejobs_database_up``,
    and per running run (labels ``run_id``, ``name``; a run's series end when it stops
    running): ``moejobs_run_step``, ``moejobs_run_loss``, ``moejobs_run_tokens_per_sec`` (its
    newest metric row; absent before the first)."""

    def __init__(self, state: State):
        self.state = state

    def collect(self) -> Iterator[GaugeMetricFamily]:
        db = self.state.database
        db_up = GaugeMetricFamily("moejobs_database_up", "1 when the database answered this scrape")
        db_up.add_metric([], 0 if db is None else 1)
        yield db_up
        if db is not None:
            runs = GaugeMetricFamily("moejobs_runs", "Runs by status", labels=["status"])
            for status, count in db["runs"].items():
                runs.add_metric([status.value], count)
            yield runs
            live = GaugeMetricFamily(
                "moejobs_workers_live", "Workers with a heartbeat within WORKER_STALE_SECONDS"
            )
            live.add_metric([], db["live"])
            yield live
            registered = GaugeMetricFamily("moejobs_workers_registered", "Registered workers")
            registered.add_metric([], db["registered"])
            yield registered
            rows = GaugeMetricFamily(
                "moejobs_metric_rows",
                "Metric rows ingested from metrics.csv files and stored (all runs)",
            )
            rows.add_metric([], db["rows"])
            yield rows
            yield from _run_gauges(db["running"])
        depth = GaugeMetricFamily(
            "moejobs_queue_depth", "Messages waiting in the broker queue", labels=["queue"]
        )
        broker_up = GaugeMetricFamily("moejobs_broker_up", "1 when the broker answered this scrape")
        depths = self.state.queue_depths
        broker_up.add_metric([], 0 if depths is None else 1)
        for queue, n in (depths or {}).items():
            depth.add_metric([queue], n)
        yield broker_up
        yield depth


#: Per-run gauges: (metric name, key of ``_running``'s dicts, help).
RUN_GAUGES = (
    ("moejobs_run_step", "step", "Newest logged optimizer step of a running run"),
    ("moejobs_run_loss", "loss", "Training loss at the newest logged step of a running run"),
    (
        "moejobs_run_tokens_per_sec",
        "tokens_per_sec",
        "Training tokens per second at the newest logged step of a running run",
    ),
)


def _run_gauges(running: list[dict[str, Any]]) -> Iterator[GaugeMetricFamily]:
    for metric, key, help_text in RUN_GAUGES:
        family = GaugeMetricFamily(metric, help_text, labels=["run_id", "name"])
        for run in running:
            if run[key] is not None:
                family.add_metric([run["id"], run["name"]], run[key])
        yield family


@router.get(
    "/metrics",
    summary="Prometheus metrics",
    response_class=Response,
    responses={200: {"content": {"text/plain": {}}}},
)
async def metrics(settings: SettingsDep, gate: GateDep, celery: CeleryDep) -> Response:
    registry = CollectorRegistry(auto_describe=False)
    registry.register(StateCollector(await read_state(gate, celery, settings)))
    return Response(generate_latest(registry), media_type=CONTENT_TYPE_LATEST)


@protected_router.get("/schemas/train-config", summary="JSON Schema of the train config")
def train_schema() -> dict[str, Any]:
    return train_config_json_schema()


@protected_router.get("/schemas/model-config", summary="JSON Schema of the model config")
def model_schema() -> dict[str, Any]:
    return model_config_json_schema()


# -- docs without a CDN ---------------------------------------------------------------------------


def _assets_dir() -> Path | None:
    try:
        from swagger_ui_bundle import swagger_ui_path
    except ImportError:
        return None
    return Path(str(swagger_ui_path))


docs_router = APIRouter(include_in_schema=False)


#: Swagger UI's start-up code, served as ``/docs/init.js`` (the Content-Security-Policy of
#: ``service.api.middleware`` allows no inline script). Its options are the JSON in the page's
#: ``data-config`` attribute.
DOCS_INIT_JS = """\
(function () {
  'use strict';
  var holder = document.getElementById('swagger-ui');
  var config = JSON.parse(holder.getAttribute('data-config'));
  config.presets = [SwaggerUIBundle.presets.apis, SwaggerUIBundle.SwaggerUIStandalonePreset];
  window.ui = SwaggerUIBundle(config);
})();
"""


def docs_html(openapi_url: str, title: str) -> str:
    """The ``/docs`` page: Swagger UI from ``/docs/assets/``, started by ``/docs/init.js``
    with FastAPI's default options, ``url`` = ``openapi_url`` and no online validator (its
    badge would load an image from another host). No inline script or style."""
    config = {**swagger_ui_default_parameters, "url": openapi_url, "validatorUrl": None}
    return (
        '<!doctype html>\n<html lang="en">\n<head>\n<meta charset="utf-8">\n'
        '<meta name="viewport" content="width=device-width, initial-scale=1">\n'
        f"<title>{html.escape(title)}</title>\n"
        '<link rel="stylesheet" href="/docs/assets/swagger-ui.css">\n'
        '<link rel="icon" href="/docs/assets/favicon-32x32.png">\n</head>\n<body>\n'
        f'<div id="swagger-ui" data-config="{html.escape(json.dumps(config))}"></div>\n'
        '<script src="/docs/assets/swagger-ui-bundle.js"></script>\n'
        '<script src="/docs/init.js"></script>\n</body>\n</html>\n'
    )


@docs_router.get("/docs")
def docs(request: Request) -> HTMLResponse:
    if _assets_dir() is None:
        raise ApiError(
            503,
            "the API docs need the swagger-ui-bundle-v2 package "
            "(pip install swagger-ui-bundle-v2); the schema is at /openapi.json",
            code="docs_unavailable",
        )
    return HTMLResponse(
        docs_html(request.app.openapi_url or "/openapi.json", f"{request.app.title} - API docs")
    )


@docs_router.get("/docs/init.js")
def docs_init() -> Response:
    return Response(
        DOCS_INIT_JS, media_type="text/javascript", headers={"Cache-Control": "no-cache"}
    )


@docs_router.get("/docs/assets/{filename}")
def docs_asset(filename: str) -> FileResponse:
    folder = _assets_dir()
    if folder is None or filename not in DOCS_ASSETS or not (folder / filename).is_file():
        raise ApiError(404, f"no docs asset {filename!r}")
    media = mimetypes.guess_type(filename)[0] or "application/octet-stream"
    return FileResponse(
        folder / filename, media_type=media, headers={"Cache-Control": "public, max-age=86400"}
    )
