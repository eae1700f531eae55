"""Read-only queries the API needs beyond ``service.runs``' readers (which it also uses).

Nothing here writes or commits; every function takes a ``sqlmodel.Session``. Times are aware
UTC datetimes, ``now`` parameters exist for tests.
"""
from __future__ import annotations

from datetime import datetime, timedelta

import sqlalchemy as sa
from sqlmodel import Session, select

from service.models import MetricPoint, Run, RunStatus, Worker, utcnow

#: The preset value that marks a smoke-test run.
SMOKE_TEST_PRESET = "smoke-test"

_LIVE = (RunStatus.queued, RunStatus.running)


def ping(session: Session) -> None:
    """``SELECT 1``: raises the driver's error when the database does not answer."""
    session.execute(sa.text("SELECT 1"))


def list_workers(session: Session) -> list[Worker]:
    """Every registered worker (live or not), by id."""
    return list(session.exec(select(Worker).order_by(Worker.id)
                             .execution_options(populate_existing=True)))


def count_live_workers(session: Session, stale_after_seconds: float, *,
                       now: datetime | None = None) -> int:
    """Workers whose last heartbeat is at most ``stale_after_seconds`` old."""
    cutoff = (now or utcnow()) - timedelta(seconds=stale_after_seconds)
    return int(session.execute(
        sa.select(sa.func.count()).select_from(Worker).where(Worker.heartbeat_at >= cutoff)
    ).scalar_one())


def count_metric_points(session: Session) -> int:
    """Metric rows stored over all runs (what the workers have ingested)."""
    return int(session.execute(sa.select(sa.func.count()).select_from(MetricPoint)).scalar_one())


def active_smoke_test(session: Session) -> Run | None:
    """The oldest smoke-test run still queued or running, if any."""
    return session.exec(
        select(Run).where(Run.preset == SMOKE_TEST_PRESET, Run.status.in_(_LIVE))
        .order_by(Run.created_at).execution_options(populate_existing=True)
    ).first()


def active_runs(session: Session) -> list[Run]:
    """Runs that are queued or running (oldest first): the ones whose inputs must not vanish."""
    return list(session.exec(
        select(Run).where(Run.status.in_(_LIVE)).order_by(Run.created_at)
        .execution_options(populate_existing=True)
    ))


def last_metric_step(session: Session, run_id) -> int | None:
    """The highest step stored for a run (None when it has no metric row yet)."""
    return session.execute(
        sa.select(sa.func.max(MetricPoint.step)).where(MetricPoint.run_id == run_id)
    ).scalar_one()


def find_idempotent(session: Session, owner: str, key: str) -> Run | None:
    """The run ``owner`` created with Idempotency-Key ``key``, if any."""
    return session.exec(
        select(Run).where(Run.owner == owner, Run.idempotency_key == key)
        .execution_options(populate_existing=True)
    ).first()
