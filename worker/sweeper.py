"""The worker's side of sweeps: every worker runs the sweep controller
(``service.sweeps.controller``) on the running sweeps every ``MOEJOBS_SWEEP_TICK_SECONDS``
(a thread of ``worker.registry.WorkerRuntime``) and on a trial's sweep as soon as the trial's
run has ended (``worker.tasks``). The controller's database lease makes any number of workers
(and the API) safe: one decides at a time, the others skip that sweep until the next pass.
"""

from __future__ import annotations

import logging
import uuid
from typing import Any

from service.db import Database
from service.settings import Settings

log = logging.getLogger("moejobs.sweeps")


def tick_all(settings: Settings, db: Database, celery_app: Any, worker_id: str) -> list[Any]:
    """One controller pass over every running sweep; returns the ``TickResult`` of each."""
    from service.sweeps.controller import tick_running

    with db.session() as session:
        return tick_running(session, settings, celery_app, holder=worker_id)


def tick_after_run(
    settings: Settings, db: Database, celery_app: Any, worker_id: str, sweep_id: uuid.UUID
) -> None:
    """Tick the sweep of a trial whose run just ended (a free slot, perhaps the last trial).
    Never raises: the periodic pass covers a failure."""
    from service.sweeps.controller import tick

    try:
        with db.session() as session:
            tick(session, settings, celery_app, sweep_id, holder=worker_id)
    except Exception:
        log.exception("sweep %s: tick after a trial ended failed; the next pass retries", sweep_id)
