"""The FastAPI application: :func:`create_app` builds it, :func:`serve` runs it with uvicorn.

At start-up (the lifespan) the app opens the database, refuses to start unless the schema is
at the newest migration (no ``create_all`` here: ``moejobs migrate`` owns the schema), creates
the data and runs folders and builds the Celery app (``service.queue``). Nothing connects at
import time, and neither torch nor ``worker`` is ever imported.

Error handling lives in ``service.api.errors`` (one JSON error format, no traceback ever sent to
a client), the middleware in ``service.api.middleware`` (a bearer token when ``API_TOKEN`` is
set, request-body limits, the security headers: a Content-Security-Policy...).

Run it::

    from service.main import serve
    serve(settings)                      # uvicorn on settings.host:settings.port

or ``uvicorn --factory service.main:create_app`` (settings from the MOEJOBS_* environment).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

from fastapi import FastAPI
from fastapi.openapi.utils import get_openapi
from fastapi.responses import FileResponse
from fastapi.staticfiles import StaticFiles
from starlette.responses import Response

from service.api import routers
from service.api.deps import DatabaseGate
from service.api.errors import install_exception_handlers
from service.api.middleware import install_middleware
from service.api.openapi import complete_error_responses
from service.db import Database, check_schema, head_revision, open_database, safe_url
from service.queue import make_celery
from service.settings import Settings, get_settings, sqlite_path
from service.submission import RunCreate

log = logging.getLogger("moejobs.api")

API_VERSION = "1"


#: The API's connection pool: this many connections kept, this many more when busy. Their sum
#: is how many requests work on the database at once (``service.api.deps.DatabaseGate``).
API_POOL_SIZE = 5
API_POOL_OVERFLOW = 10
#: Seconds a PostgreSQL connection attempt may take before the request answers 503.
PG_CONNECT_TIMEOUT_S = 5


def open_api_database(settings: Settings) -> tuple[Database, int]:
    """The API's :class:`Database` and how many connections its pool can lend at once.

    A file or PostgreSQL database gets a queue pool of :data:`API_POOL_SIZE` +
    :data:`API_POOL_OVERFLOW` connections whose checkout waits at most
    ``settings.db_wait_seconds`` (the gate normally leaves a connection free, so it does not
    wait); PostgreSQL connection attempts give up after :data:`PG_CONNECT_TIMEOUT_S`. An
    in-memory SQLite database (one connection) lends one."""
    url = settings.database_url or ""
    if url.startswith("sqlite") and sqlite_path(url) is None:
        return open_database(settings), 1
    kwargs: dict[str, Any] = {
        "pool_size": API_POOL_SIZE,
        "max_overflow": API_POOL_OVERFLOW,
        "pool_timeout": settings.db_wait_seconds,
    }
    if not url.startswith("sqlite"):
        kwargs["connect_args"] = {"connect_timeout": PG_CONNECT_TIMEOUT_S}
    return open_database(settings, **kwargs), API_POOL_SIZE + API_POOL_OVERFLOW


def create_app(settings: Settings | None = None) -> FastAPI:
    """The moejobs API for ``settings`` (default :func:`service.settings.get_settings`).

    The database, the Celery app and the metrics registry are built when the app starts
    (lifespan), not here; starting raises ``service.db.StartupError`` when the database is
    unreachable or its schema is not at head."""
    settings = settings or get_settings()

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        db, capacity = open_api_database(settings)
        try:
            check_schema(db, settings)
        except BaseException:
            db.dispose()
            raise
        settings.ensure_dirs()
        celery = make_celery(settings)
        app.state.db = db
        app.state.gate = DatabaseGate(db, capacity=capacity, wait_seconds=settings.db_wait_seconds)
        app.state.celery = celery
        app.state.head_revision = head_revision()
        app.state.smoke_lock = asyncio.Lock()
        log.info(
            "moejobs API ready: database %s, broker %s",
            safe_url(settings.database_url or ""),
            safe_url(settings.broker_url or ""),
        )
        try:
            yield
        finally:
            celery.close()
            db.dispose()

    app = FastAPI(
        title="moejobs",
        version=API_VERSION,
        description="Training jobs for LitGPT Mixture-of-Experts models: submit configs, follow "
        "metrics, download checkpoints. Errors share one JSON shape: {code, message, errors?}.",
        docs_url=None,  # served by service.api.system without a CDN
        redoc_url=None,
        lifespan=lifespan,
    )
    app.state.settings = settings
    install_exception_handlers(app)
    for router in routers():
        app.include_router(router)
    mount_dashboard(app)

    def openapi() -> dict[str, Any]:
        # The run-submission routes read their body themselves (JSON, YAML or multipart), so
        # FastAPI does not see RunCreate: add its schema for the $refs in their requestBody.
        if app.openapi_schema is None:
            schema = get_openapi(
                title=app.title, version=app.version, description=app.description, routes=app.routes
            )
            components = schema.setdefault("components", {}).setdefault("schemas", {})
            doc = RunCreate.model_json_schema(
                by_alias=True, ref_template="#/components/schemas/{model}"
            )
            components.update(doc.pop("$defs", {}))
            components["RunCreate"] = doc
            app.openapi_schema = complete_error_responses(schema)
        return app.openapi_schema

    app.openapi = openapi  # type: ignore[method-assign]

    install_middleware(app, settings)
    return app


#: The dashboard's files (index.html, app.js, app.css; no build step).
STATIC_DIR = Path(__file__).resolve().parent / "static"


class RevalidatedStaticFiles(StaticFiles):
    """StaticFiles whose answers say ``Cache-Control: no-cache``: a browser revalidates each
    file (ETag, a 304 when unchanged), so after an upgrade it never runs new ES modules of the
    dashboard with old ones it had cached."""

    def file_response(self, *args: Any, **kwargs: Any) -> Response:
        response = super().file_response(*args, **kwargs)
        response.headers["Cache-Control"] = "no-cache"
        return response


def mount_dashboard(app: FastAPI) -> None:
    """Serve the dashboard: ``GET /`` is ``service/static/index.html``, ``/static/*`` its assets.
    Both are public (the page asks for the token itself; the data it fetches needs it).
    Nothing is mounted when the folder is absent."""
    if not (STATIC_DIR / "index.html").is_file():
        return
    app.mount("/static", RevalidatedStaticFiles(directory=STATIC_DIR), name="static")

    @app.get("/", include_in_schema=False)
    def index() -> FileResponse:
        return FileResponse(
            STATIC_DIR / "index.html", media_type="text/html", headers={"Cache-Control": "no-cache"}
        )


def serve(settings: Settings | None = None, **uvicorn_options: Any) -> None:
    """Run the API with uvicorn on ``settings.host``:``settings.port`` until interrupted.
    ``uvicorn_options`` go to ``uvicorn.run`` (e.g. ``log_level="info"``). Raises
    ``service.db.StartupError`` (via uvicorn's lifespan) when the database is not ready."""
    import uvicorn

    settings = settings or get_settings()
    options: dict[str, Any] = {
        "host": settings.host,
        "port": settings.port,
        "log_level": "info",
        "lifespan": "on",
    }
    options.update(uvicorn_options)
    uvicorn.run(create_app(settings), **options)
