"""Read-only queries the API needs beyond ``service.runs``' readers (which it also uses).

Nothing here writes or commits; every function takes a ``sqlmodel.Session``. Times are aware
UTC datetimes, ``now`` parameters exist for tests.
"""

from __future__ import annotations

import functools
import uuid
from collections.abc import Sequence
from datetime import datetime, timedelta
from types import SimpleNamespace

import sqlalchemy as sa
from sqlmodel import Session, select

from service.models import (
    METRIC_COLUMNS,
    TRAINING_ROLES,
    MetricPoint,
    RouterPoint,
    Run,
    RunStatus,
    Worker,
    utcnow,
)

#: The preset value that marks a smoke-test run.
SMOKE_TEST_PRESET = "smoke-test"

_LIVE = (RunStatus.queued, RunStatus.running)


def ping(session: Session) -> None:
    """``SELECT 1``: raises the driver's error when the database does not answer."""
    session.execute(sa.text("SELECT 1"))


def list_workers(session: Session) -> list[Worker]:
    """Every registered worker (live or not), by id."""
    return list(
        session.exec(select(Worker).order_by(Worker.id).execution_options(populate_existing=True))
    )


def count_live_workers(
    session: Session, stale_after_seconds: float, *, now: datetime | None = None
) -> int:
    """Workers that train runs (roles ``all`` and ``train``; not ``aux``) whose last heartbeat
    is at most ``stale_after_seconds`` old."""
    cutoff = (now or utcnow()) - timedelta(seconds=stale_after_seconds)
    return int(
        session.execute(
            sa.select(sa.func.count())
            .select_from(Worker)
            .where(Worker.heartbeat_at >= cutoff, Worker.role.in_(TRAINING_ROLES))
        ).scalar_one()
    )


def count_metric_points(session: Session) -> int:
    """Metric rows stored over all runs (what the workers have ingested)."""
    return int(session.execute(sa.select(sa.func.count()).select_from(MetricPoint)).scalar_one())


def active_smoke_test(session: Session) -> Run | None:
    """The oldest smoke-test run still queued or running, if any."""
    return session.exec(
        select(Run)
        .where(Run.preset == SMOKE_TEST_PRESET, Run.status.in_(_LIVE))
        .order_by(Run.created_at)
        .execution_options(populate_existing=True)
    ).first()


def active_runs(session: Session) -> list[Run]:
    """Runs that are queued or running (oldest first): the ones whose inputs must not vanish."""
    return list(
        session.exec(
            select(Run)
            .where(Run.status.in_(_LIVE))
            .order_by(Run.created_at)
            .execution_options(populate_existing=True)
        )
    )


def last_metric_step(session: Session, run_id) -> int | None:
    """The highest step stored for a run (None when it has no metric row yet)."""
    return session.execute(
        sa.select(sa.func.max(MetricPoint.step)).where(MetricPoint.run_id == run_id)
    ).scalar_one()


def latest_metrics(session: Session, run_ids: Sequence[uuid.UUID]) -> dict[uuid.UUID, sa.Row]:
    """The metric row of the highest step of each run in ``run_ids`` as a plain row
    (attributes ``run_id``, ``step`` and every ``METRIC_COLUMNS`` name; runs without rows are
    absent), in one query: per run, the highest step is read from the end of the primary-key
    index (run_id, step), then that row by its key; so the cost grows with the number of runs,
    not with their rows."""
    if not run_ids:
        return {}
    rows = session.execute(_latest_metrics_statement(), {"run_ids": list(run_ids)})
    return {row.run_id: row for row in rows}


@functools.cache
def _latest_metrics_statement() -> sa.Select:
    newest = (
        sa.select(MetricPoint.step)
        .where(MetricPoint.run_id == Run.id)
        .order_by(MetricPoint.step.desc())
        .limit(1)
        .scalar_subquery()
    )
    last = (
        sa.select(Run.id.label("run_id"), newest.label("step"))
        .where(Run.id.in_(sa.bindparam("run_ids", expanding=True)))
        .subquery()
    )
    return sa.select(
        MetricPoint.run_id, MetricPoint.step, *(getattr(MetricPoint, c) for c in METRIC_COLUMNS)
    ).join(last, sa.and_(MetricPoint.run_id == last.c.run_id, MetricPoint.step == last.c.step))


def run_with_latest_metrics(
    session: Session, run_id: uuid.UUID
) -> tuple[sa.Row, SimpleNamespace | None]:
    """Run ``run_id`` without its config documents (as ``service.runs.get_run(configs=False)``)
    and its newest metric row (as :func:`latest_metrics`; None before the first), in one
    statement: the API's most polled read. Raises ``service.runs.RunNotFound``."""
    from service.runs import RunNotFound

    row = session.execute(_run_with_latest_statement(), {"run_id": run_id}).first()
    if row is None:
        raise RunNotFound(run_id)
    if row.m_step is None:
        return row, None
    return row, SimpleNamespace(
        step=row.m_step, **{c: getattr(row, f"m_{c}") for c in METRIC_COLUMNS}
    )


@functools.cache
def _run_with_latest_statement() -> sa.Select:
    from service.runs import summary_columns

    inner = MetricPoint.__table__.alias("newest")
    newest = (
        sa.select(inner.c.step)
        .where(inner.c.run_id == Run.id)
        .order_by(inner.c.step.desc())
        .limit(1)
        .correlate(Run)
        .scalar_subquery()
    )
    metric = [
        MetricPoint.step.label("m_step"),
        *(getattr(MetricPoint, c).label(f"m_{c}") for c in METRIC_COLUMNS),
    ]
    return (
        sa.select(*summary_columns(), *metric)
        .outerjoin(MetricPoint, sa.and_(MetricPoint.run_id == Run.id, MetricPoint.step == newest))
        .where(Run.id == sa.bindparam("run_id", type_=sa.Uuid()))
    )


def require_run(session: Session, run_id: uuid.UUID) -> None:
    """Raise ``service.runs.RunNotFound`` unless run ``run_id`` exists (reads its key only,
    not the row's config documents)."""
    from service.runs import RunNotFound

    if session.execute(_require_run_statement(), {"run_id": run_id}).first() is None:
        raise RunNotFound(run_id)


@functools.cache
def _require_run_statement() -> sa.Select:
    return sa.select(Run.id).where(Run.id == sa.bindparam("run_id", type_=sa.Uuid()))


def metric_rows(
    session: Session, run_id: uuid.UUID, *, after_step: int | None = None, limit: int | None = None
) -> list[sa.Row]:
    """A run's metric rows by step as plain rows (attributes ``step`` and every
    ``METRIC_COLUMNS`` name), those with ``step > after_step``, at most ``limit``. What
    ``service.runs.list_metrics`` reads, without building an ORM object per row (the API's
    pages have thousands)."""
    stmt = sa.select(MetricPoint.step, *(getattr(MetricPoint, c) for c in METRIC_COLUMNS)).where(
        MetricPoint.run_id == run_id
    )
    if after_step is not None:
        stmt = stmt.where(MetricPoint.step > after_step)
    stmt = stmt.order_by(MetricPoint.step)
    if limit is not None:
        stmt = stmt.limit(limit)
    return list(session.execute(stmt))


def router_rows(
    session: Session, run_id: uuid.UUID, *, after_step: int | None = None, limit: int | None = None
) -> list[sa.Row]:
    """A run's router telemetry as plain rows ``(step, layer, expert, fraction)`` ordered by
    (step, layer, expert), those with ``step > after_step``, at most ``limit``."""
    stmt = sa.select(
        RouterPoint.step, RouterPoint.layer, RouterPoint.expert, RouterPoint.fraction
    ).where(RouterPoint.run_id == run_id)
    if after_step is not None:
        stmt = stmt.where(RouterPoint.step > after_step)
    stmt = stmt.order_by(RouterPoint.step, RouterPoint.layer, RouterPoint.expert)
    if limit is not None:
        stmt = stmt.limit(limit)
    return list(session.execute(stmt))


def find_idempotent(session: Session, owner: str, key: str) -> Run | None:
    """The run ``owner`` created with Idempotency-Key ``key``, if any."""
    return session.exec(
        select(Run)
        .where(Run.owner == owner, Run.idempotency_key == key)
        .execution_options(populate_existing=True)
    ).first()
