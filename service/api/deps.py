"""FastAPI dependencies: the settings, the database gate and the Celery app built at start-up
(``service.main.create_app``'s lifespan puts them on ``app.state``), as the parameter types
routes declare: :data:`SettingsDep`, :data:`GateDep`, :data:`CeleryDep`, and :data:`RunDep`
(the path's run, or the API's 404 ``run_not_found``).

Every database access of a request goes through :class:`DatabaseGate`: one call in a worker
thread that opens its own session and closes it (its connection back in the pool) before the
thread returns, at most as many calls at once as the engine's pool holds connections. Why:
a synchronous route with a yield-dependency session holds a pooled connection from before the
handler until after FastAPI has serialised the answer in the thread pool *again*; with more
readers than connections, the threads that wait for a connection can starve the requests that
hold one of the thread they need to finish, and everything waits for the pool's 30 s timeout.
With the gate a request waits (asynchronously, holding no thread and no connection) for a slot,
and once it has one its connection is free at once.

The dependency functions are ``async``: FastAPI would run plain functions in the thread pool,
one hop per dependency and request.

:data:`RunDep` costs a gate call of its own, made before FastAPI checks the route's own
parameters (dependencies are solved first), and its ``run_id`` is listed after them in the
OpenAPI document. So it serves routes whose one parameter is the path's ``run_id``; a route
with query parameters or a second path parameter checks the run inside its own gate call
(``service.reads.require_run`` / ``get_run``), so that a bad query stays a 422 whether the run
exists or not, and its documented parameters keep their order.
"""

from __future__ import annotations

import functools
import logging
import uuid
from collections.abc import Callable, Sequence
from typing import Annotated, Any, Concatenate, ParamSpec, TypeVar, cast

import anyio
import anyio.to_thread
from celery import Celery
from fastapi import Depends, Request
from fastapi.responses import Response
from pydantic import BaseModel
from sqlmodel import Session

from service import reads
from service.api.errors import BUSY_RETRY_AFTER_S, ApiError
from service.db import Database
from service.models import Run
from service.settings import Settings

log = logging.getLogger("moejobs.api")

P = ParamSpec("P")
T = TypeVar("T")


class DatabaseGate:
    """Runs the API's database work: ``await gate.run(fn, *args)`` calls ``fn(session, *args)``
    in a worker thread with a new session, closed before the thread returns, and returns
    ``fn``'s result.

    At most ``capacity`` calls run at once (the engine's pool size plus its overflow, so a call
    never waits for a connection); the others wait for a slot in arrival order without holding
    a thread. A call that has no slot after ``wait_seconds`` raises :class:`ApiError` 503
    ``database_busy`` with ``Retry-After``. Errors of ``fn`` propagate unchanged (the app's
    exception handlers turn an unreachable database into a 503).
    """

    def __init__(self, db: Database, *, capacity: int, wait_seconds: float):
        if capacity < 1:
            raise ValueError(f"capacity must be >= 1, got {capacity}")
        self.db = db
        self.capacity = capacity
        self.wait_seconds = wait_seconds
        self._slots = anyio.CapacityLimiter(capacity)
        # Threads of the gate: every holder of a thread token holds a slot, so this never waits.
        self._threads = anyio.CapacityLimiter(capacity)

    def _call(
        self, fn: Callable[..., Any], args: tuple, kwargs: dict, render: Callable[[Any], Any] | None
    ) -> Any:
        with self.db.session() as session:
            result = fn(session, *args, **kwargs)
        return render(result) if render is not None else result

    async def _run(
        self, fn: Callable[..., Any], args: tuple, kwargs: dict, render: Callable[[Any], Any] | None
    ) -> Any:
        try:
            with anyio.fail_after(self.wait_seconds):
                await self._slots.acquire()
        except TimeoutError:
            log.warning(
                "database busy: no free slot of %d within %g s", self.capacity, self.wait_seconds
            )
            raise ApiError(
                503,
                f"the database is busy: none of the API's {self.capacity} database "
                f"connections came free within {self.wait_seconds:g} s (MOEJOBS_DB_WAIT_SECONDS); "
                f"retry after {BUSY_RETRY_AFTER_S} s",
                code="database_busy",
                headers={"Retry-After": str(BUSY_RETRY_AFTER_S)},
                dependency="database",
            ) from None
        try:
            return await anyio.to_thread.run_sync(
                functools.partial(self._call, fn, args, kwargs, render), limiter=self._threads
            )
        finally:
            self._slots.release()

    async def run(
        self, fn: Callable[Concatenate[Session, P], T], *args: P.args, **kwargs: P.kwargs
    ) -> T:
        """``fn(session, *args, **kwargs)`` in a worker thread (class docstring)."""
        return await self._run(fn, args, kwargs, None)

    async def render(
        self,
        fn: Callable[Concatenate[Session, P], Any],
        render: Callable[[Any], T],
        *args: P.args,
        **kwargs: P.kwargs,
    ) -> T:
        """``render(fn(session, *args, **kwargs))`` in one worker thread, ``render`` called
        after the session is closed (its connection back in the pool): for answers whose
        rendering costs more than their query."""
        return await self._run(fn, args, kwargs, render)

    async def json(
        self,
        fn: Callable[Concatenate[Session, P], BaseModel | Sequence[BaseModel]],
        *args: P.args,
        **kwargs: P.kwargs,
    ) -> Response:
        """Like :meth:`run` for a function returning a pydantic model (or a list of them):
        the answer is rendered as a JSON response in the same thread, after the session is
        closed (FastAPI's own validation and serialisation of the return value are skipped;
        the route's ``response_model`` still documents it)."""
        return await self._run(fn, args, kwargs, json_response)


def json_response(value: BaseModel | Sequence[BaseModel]) -> Response:
    """A 200 ``application/json`` response of a model or a list of models."""
    if isinstance(value, BaseModel):
        body = value.__pydantic_serializer__.to_json(value)
    else:
        body = b"[" + b",".join(item.__pydantic_serializer__.to_json(item) for item in value) + b"]"
    return Response(body, media_type="application/json")


async def get_settings(request: Request) -> Settings:
    """The settings the app was created with."""
    return request.app.state.settings


async def get_gate(request: Request) -> DatabaseGate:
    """The app's :class:`DatabaseGate`."""
    return request.app.state.gate


async def get_celery(request: Request) -> Celery:
    """The app's Celery app (``service.queue.make_celery``)."""
    return request.app.state.celery


SettingsDep = Annotated[Settings, Depends(get_settings)]
GateDep = Annotated[DatabaseGate, Depends(get_gate)]
CeleryDep = Annotated[Celery, Depends(get_celery)]


async def load_run(run_id: uuid.UUID, gate: GateDep) -> Run:
    """Run ``run_id`` of the path without its config documents (``service.reads.get_run``
    with ``configs=False``: a read-only row), in one gate call. Raises
    ``service.reads.RunNotFound``, which the API answers with its 404 ``run_not_found``."""
    # A read-only row with a Run's attributes but the config documents: handlers read it as one.
    return cast(Run, await gate.run(_run_summary, run_id))


def _run_summary(session: Session, run_id: uuid.UUID) -> Any:
    return reads.get_run(session, run_id, configs=False)


RunDep = Annotated[Run, Depends(load_run)]
