"""Every read of the run store: runs, their history, metrics, router telemetry, checkpoints,
workers and throughput records. The writes (the state machine) are ``service.runs``, which
reads through this module too.

Nothing here writes or commits; every function takes a ``sqlmodel.Session`` and reads in the
transaction the session has open (or begins one): end it with ``service.db.read_transaction``
or the next ``service.db.write_transaction``. Times are aware UTC datetimes; ``now``
parameters exist for tests.
"""

from __future__ import annotations

import base64
import binascii
import functools
import json
import uuid
from collections.abc import Iterable, Sequence
from datetime import datetime, timedelta
from types import SimpleNamespace
from typing import Any, Literal, overload

import sqlalchemy as sa
from sqlmodel import Session, col, select

from service.config.fields import check_path_text
from service.models import (
    MAX_STEP,
    METRIC_COLUMNS,
    TERMINAL_STATUSES,
    TRAINING_ROLES,
    Checkpoint,
    MetricPoint,
    RouterPoint,
    Run,
    RunEvent,
    RunStatus,
    Throughput,
    WebhookDelivery,
    Worker,
    WorkerRole,
    aware_now,
    table_of,
)

#: The preset value that marks a smoke-test run.
SMOKE_TEST_PRESET = "smoke-test"
#: Why a queued smoke test fails while no worker that trains is live: its report's message
#: (``service.api.smoke``) and, after "smoke test failed: ", its cancellation's
#: (``worker.reconciler``).
SMOKE_TEST_NO_WORKER = "no live worker: nothing can claim the smoke test (start `moejobs worker`)"

#: Sort keys accepted by :func:`list_runs` ("-" prefix for descending).
RUN_SORT_KEYS = ("created_at", "name", "status")

#: The run columns that hold whole config documents (large; a list page does not need them).
CONFIG_COLUMNS = ("submitted_train", "submitted_model", "resolved_train", "resolved_model")

#: The statuses a run can still leave (every one but ``TERMINAL_STATUSES``).
_LIVE = tuple(status for status in RunStatus if status not in TERMINAL_STATUSES)


# -- errors ------------------------------------------------------------------------------------


class RunError(Exception):
    """Base class of the errors of reading and changing runs: :class:`RunNotFound` here, the
    lifecycle errors of ``service.runs``."""


class RunNotFound(RunError, LookupError):
    """No run with this id (``.run_id``)."""

    def __init__(self, run_id: uuid.UUID):
        super().__init__(f"run {run_id} not found")
        self.run_id = run_id


# -- the database ------------------------------------------------------------------------------


def ping(session: Session) -> None:
    """``SELECT 1``: raises the driver's error when the database does not answer."""
    session.execute(sa.text("SELECT 1"))


# -- runs --------------------------------------------------------------------------------------


def summary_columns() -> list[sa.Column[Any]]:
    """The columns of ``runs`` but the config documents (:data:`CONFIG_COLUMNS`)."""
    return [c for c in table_of(Run).c if c.name not in CONFIG_COLUMNS]


@overload
def get_run(session: Session, run_id: uuid.UUID, *, configs: Literal[True] = True) -> Run: ...
@overload
def get_run(session: Session, run_id: uuid.UUID, *, configs: Literal[False]) -> sa.Row[Any]: ...
def get_run(session: Session, run_id: uuid.UUID, *, configs: bool = True) -> Run | sa.Row[Any]:
    """The run, read fresh. ``configs=False`` returns a read-only row without the config
    documents (as :func:`list_runs`). Raises RunNotFound."""
    run: Run | sa.Row[Any] | None
    if configs:
        run = session.exec(
            select(Run).where(col(Run.id) == run_id).execution_options(populate_existing=True)
        ).first()
    else:
        run = session.execute(sa.select(*summary_columns()).where(col(Run.id) == run_id)).first()
    if run is None:
        raise RunNotFound(run_id)
    return run


def require_run(session: Session, run_id: uuid.UUID) -> None:
    """Raise :class:`RunNotFound` unless run ``run_id`` exists (reads its key only,
    not the row's config documents)."""
    if session.execute(_require_run_statement(), {"run_id": run_id}).first() is None:
        raise RunNotFound(run_id)


@functools.cache
def _require_run_statement() -> sa.Select:
    return sa.select(col(Run.id)).where(col(Run.id) == sa.bindparam("run_id", type_=sa.Uuid()))


def run_with_latest_metrics(
    session: Session, run_id: uuid.UUID
) -> tuple[sa.Row, SimpleNamespace | None]:
    """Run ``run_id`` without its config documents (as :func:`get_run` with ``configs=False``)
    and its newest metric row (as :func:`latest_metrics`; None before the first), in one
    statement: the API's most polled read. Raises :class:`RunNotFound`."""
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
    inner = table_of(MetricPoint).alias("newest")
    newest = (
        sa.select(inner.c.step)
        .where(inner.c.run_id == col(Run.id))
        .order_by(inner.c.step.desc())
        .limit(1)
        .correlate(Run)
        .scalar_subquery()
    )
    metric = [
        col(MetricPoint.step).label("m_step"),
        *(getattr(MetricPoint, c).label(f"m_{c}") for c in METRIC_COLUMNS),
    ]
    return (
        sa.select(*summary_columns(), *metric)
        .outerjoin(
            MetricPoint,
            sa.and_(col(MetricPoint.run_id) == col(Run.id), col(MetricPoint.step) == newest),
        )
        .where(col(Run.id) == sa.bindparam("run_id", type_=sa.Uuid()))
    )


def _encode_cursor(value: Any, run_id: uuid.UUID) -> str:
    raw = json.dumps([value.isoformat() if isinstance(value, datetime) else value, str(run_id)])
    return base64.urlsafe_b64encode(raw.encode()).decode().rstrip("=")


def _decode_cursor(cursor: str, key: str) -> tuple[Any, uuid.UUID]:
    try:
        padded = cursor + "=" * (-len(cursor) % 4)
        value, run_id = json.loads(base64.urlsafe_b64decode(padded.encode()))
        if key == "created_at":
            value = datetime.fromisoformat(value)
            if value.tzinfo is None:
                raise ValueError  # every stored time is aware
        elif key == "status":
            value = RunStatus(value)
        elif not isinstance(value, str):
            raise ValueError
        else:
            check_path_text(value)  # no database compares with a NUL or a lone surrogate
        return value, uuid.UUID(run_id)
    except (ValueError, TypeError, binascii.Error, json.JSONDecodeError):
        raise ValueError(f"invalid cursor {cursor!r}") from None


@overload
def list_runs(
    session: Session,
    *,
    status: RunStatus | str | None = None,
    owner: str | None = None,
    limit: int = 50,
    cursor: str | None = None,
    sort: str = "-created_at",
    tags: Sequence[str] = (),
    name: str | None = None,
    configs: Literal[True] = True,
) -> tuple[list[Run], str | None]: ...
@overload
def list_runs(
    session: Session,
    *,
    status: RunStatus | str | None = None,
    owner: str | None = None,
    limit: int = 50,
    cursor: str | None = None,
    sort: str = "-created_at",
    tags: Sequence[str] = (),
    name: str | None = None,
    configs: Literal[False],
) -> tuple[list[sa.Row[Any]], str | None]: ...
def list_runs(
    session: Session,
    *,
    status: RunStatus | str | None = None,
    owner: str | None = None,
    limit: int = 50,
    cursor: str | None = None,
    sort: str = "-created_at",
    tags: Sequence[str] = (),
    name: str | None = None,
    configs: bool = True,
) -> tuple[list[Run] | list[sa.Row[Any]], str | None]:
    """One page of runs and the cursor of the next page (None on the last page).
    ``configs=False`` returns read-only rows with every attribute of a run but the four config
    documents (:data:`CONFIG_COLUMNS`), without building ORM objects: what a listing needs.

    ``sort`` is one of :data:`RUN_SORT_KEYS`, "-" prefixed for descending; ties are broken by
    id, so keyset pagination is stable while runs are added. ``cursor`` must come from a
    previous call with the same ``sort`` (ValueError otherwise, as for an unknown sort key or
    ``limit`` outside 1..1000). Filters: ``status``, ``owner``; ``tags``: runs carrying every
    one of them (:func:`has_tag`); ``name``: runs whose name contains it, ignoring case
    (ASCII letters only on SQLite, whose ``lower`` folds no others)."""
    descending = sort.startswith("-")
    key = sort.lstrip("-")
    if key not in RUN_SORT_KEYS:
        raise ValueError(
            f"sort must be one of {', '.join(RUN_SORT_KEYS)} (optionally with '-'), got {sort!r}"
        )
    if not 1 <= limit <= 1000:
        raise ValueError(f"limit must be in 1..1000, got {limit}")
    column = getattr(Run, key)
    conditions: list[sa.ColumnElement[bool]] = []
    if status is not None:
        conditions.append(col(Run.status) == RunStatus(status))
    if owner is not None:
        conditions.append(col(Run.owner) == owner)
    conditions.extend(has_tag(session, tag) for tag in dict.fromkeys(tags))
    if name:
        conditions.append(col(Run.name).icontains(name, autoescape=True))
    if cursor is not None:
        value, after_id = _decode_cursor(cursor, key)
        if descending:
            conditions.append(
                sa.or_(column < value, sa.and_(column == value, col(Run.id) < after_id))
            )
        else:
            conditions.append(
                sa.or_(column > value, sa.and_(column == value, col(Run.id) > after_id))
            )
    order = (column.desc(), col(Run.id).desc()) if descending else (column.asc(), col(Run.id).asc())
    rows: list[Run] | list[sa.Row[Any]]
    if configs:
        stmt = select(Run).where(*conditions).order_by(*order).limit(limit + 1)
        rows = list(session.exec(stmt.execution_options(populate_existing=True)))
    else:
        summary = sa.select(*summary_columns()).where(*conditions).order_by(*order)
        rows = list(session.execute(summary.limit(limit + 1)))
    next_cursor = None
    if len(rows) > limit:
        rows = rows[:limit]
        last = rows[-1]
        value = getattr(last, key)
        next_cursor = _encode_cursor(
            value.value if isinstance(value, RunStatus) else value, last.id
        )
    return rows, next_cursor


def has_tag(session: Session, tag: str) -> sa.ColumnElement[bool]:
    """A condition on ``runs``: its ``tags`` list holds ``tag``. PostgreSQL: jsonb containment
    (``tags @> '["tag"]'``); SQLite: an ``EXISTS`` over ``json_each(tags)``. Both compare
    whole tags, exactly (``lr`` does not match ``lr=3e-4``)."""
    if session.get_bind().dialect.name == "postgresql":
        wanted = sa.func.jsonb_build_array(sa.cast(sa.literal(tag), sa.Text))
        return col(Run.tags).op("@>", return_type=sa.Boolean)(wanted)
    each = sa.func.json_each(col(Run.tags)).table_valued("value").alias("tag")
    return sa.exists(sa.select(sa.literal(1)).select_from(each).where(each.c.value == tag))


def count_runs_by_status(session: Session) -> dict[RunStatus, int]:
    """Number of runs in each status (every status present, zeros included)."""
    counts = {status: 0 for status in RunStatus}
    for status, count in session.execute(
        sa.select(col(Run.status), sa.func.count()).group_by(col(Run.status))
    ):
        counts[RunStatus(status)] = count
    return counts


def active_smoke_test(session: Session) -> Run | None:
    """The oldest smoke-test run still queued or running, if any."""
    return session.exec(
        select(Run)
        .where(col(Run.preset) == SMOKE_TEST_PRESET, col(Run.status).in_(_LIVE))
        .order_by(col(Run.created_at))
        .execution_options(populate_existing=True)
    ).first()


def active_runs(session: Session) -> list[Run]:
    """Runs that are queued or running (oldest first): the ones whose inputs must not vanish."""
    return list(
        session.exec(
            select(Run)
            .where(col(Run.status).in_(_LIVE))
            .order_by(col(Run.created_at))
            .execution_options(populate_existing=True)
        )
    )


def find_idempotent(session: Session, owner: str, key: str) -> Run | None:
    """The run ``owner`` created with Idempotency-Key ``key``, if any."""
    return session.exec(
        select(Run)
        .where(col(Run.owner) == owner, col(Run.idempotency_key) == key)
        .execution_options(populate_existing=True)
    ).first()


def list_events(session: Session, run_id: uuid.UUID) -> list[RunEvent]:
    """A run's events in the order they happened."""
    return list(
        session.exec(
            select(RunEvent).where(col(RunEvent.run_id) == run_id).order_by(col(RunEvent.id))
        )
    )


def list_deliveries(
    session: Session, *, run_id: uuid.UUID | None = None, sweep_id: uuid.UUID | None = None
) -> list[WebhookDelivery]:
    """The webhook deliveries of a run or of a sweep (its own events), oldest first."""
    stmt = select(WebhookDelivery)
    if run_id is not None:
        stmt = stmt.where(col(WebhookDelivery.run_id) == run_id)
    if sweep_id is not None:
        stmt = stmt.where(col(WebhookDelivery.sweep_id) == sweep_id)
    order = (col(WebhookDelivery.created_at), col(WebhookDelivery.event), col(WebhookDelivery.url))
    return list(session.exec(stmt.order_by(*order)))


# -- reconciler queries ------------------------------------------------------------------------


def expired_runs(session: Session, *, now: datetime | None = None) -> list[Run]:
    """Running runs whose lease expired before ``now`` (their worker stopped heartbeating),
    oldest expiry first. Feed each to :func:`recover_expired_run`."""
    now = aware_now(now)
    return list(
        session.exec(
            select(Run)
            .where(col(Run.status) == RunStatus.running, col(Run.lease_expires_at) < now)
            .order_by(col(Run.lease_expires_at))
            .execution_options(populate_existing=True)
        )
    )


def stale_queued_runs(
    session: Session, older_than_seconds: float, *, now: datetime | None = None, limit: int = 100
) -> list[Run]:
    """Queued runs not claimed for ``older_than_seconds`` since they were (re-)queued or last
    enqueued (their broker message may be lost), oldest first. The reconciler re-enqueues
    each and calls :func:`mark_enqueued` (a duplicate message is harmless: claims are atomic)."""
    cutoff = aware_now(now) - timedelta(seconds=older_than_seconds)
    return list(
        session.exec(
            select(Run)
            .where(col(Run.status) == RunStatus.queued, col(Run.queued_at) < cutoff)
            .order_by(col(Run.queued_at))
            .limit(limit)
            .execution_options(populate_existing=True)
        )
    )


# -- metrics and router telemetry --------------------------------------------------------------


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
        sa.select(col(MetricPoint.step))
        .where(col(MetricPoint.run_id) == col(Run.id))
        .order_by(col(MetricPoint.step).desc())
        .limit(1)
        .scalar_subquery()
    )
    last = (
        sa.select(col(Run.id).label("run_id"), newest.label("step"))
        .where(col(Run.id).in_(sa.bindparam("run_ids", expanding=True)))
        .subquery()
    )
    return sa.select(
        col(MetricPoint.run_id),
        col(MetricPoint.step),
        *(getattr(MetricPoint, c) for c in METRIC_COLUMNS),
    ).join(
        last,
        sa.and_(col(MetricPoint.run_id) == last.c.run_id, col(MetricPoint.step) == last.c.step),
    )


def metric_rows(
    session: Session, run_id: uuid.UUID, *, after_step: int | None = None, limit: int | None = None
) -> list[sa.Row]:
    """A run's metric rows by step as plain rows (attributes ``step`` and every
    ``METRIC_COLUMNS`` name), those with ``step > after_step``, at most ``limit``. What
    :func:`list_metrics` reads, without building an ORM object per row (the API's
    pages have thousands)."""
    stmt = sa.select(
        col(MetricPoint.step), *(getattr(MetricPoint, c) for c in METRIC_COLUMNS)
    ).where(col(MetricPoint.run_id) == run_id)
    if after_step is not None:
        stmt = stmt.where(col(MetricPoint.step) > after_step)
    stmt = stmt.order_by(col(MetricPoint.step))
    if limit is not None:
        stmt = stmt.limit(limit)
    return list(session.execute(stmt))


def router_rows(
    session: Session, run_id: uuid.UUID, *, after_step: int | None = None, limit: int | None = None
) -> list[sa.Row]:
    """A run's router telemetry as plain rows ``(step, layer, expert, fraction)`` ordered by
    (step, layer, expert), those with ``step > after_step``, at most ``limit``."""
    stmt = sa.select(
        col(RouterPoint.step),
        col(RouterPoint.layer),
        col(RouterPoint.expert),
        col(RouterPoint.fraction),
    ).where(col(RouterPoint.run_id) == run_id)
    if after_step is not None:
        stmt = stmt.where(col(RouterPoint.step) > after_step)
    stmt = stmt.order_by(col(RouterPoint.step), col(RouterPoint.layer), col(RouterPoint.expert))
    if limit is not None:
        stmt = stmt.limit(limit)
    return list(session.execute(stmt))


def list_metrics(
    session: Session, run_id: uuid.UUID, *, after_step: int | None = None, limit: int | None = None
) -> list[MetricPoint]:
    """A run's metric points by step, those with ``step > after_step`` when given, at most
    ``limit``."""
    stmt = select(MetricPoint).where(col(MetricPoint.run_id) == run_id)
    if after_step is not None:
        stmt = stmt.where(col(MetricPoint.step) > after_step)
    stmt = stmt.order_by(col(MetricPoint.step))
    if limit is not None:
        stmt = stmt.limit(limit)
    return list(session.exec(stmt.execution_options(populate_existing=True)))


def list_router_points(
    session: Session, run_id: uuid.UUID, *, after_step: int | None = None
) -> list[RouterPoint]:
    """A run's router points ordered by (step, layer, expert), those with ``step >
    after_step`` when given (the API reads plain rows: ``service.reads.router_rows``)."""
    stmt = select(RouterPoint).where(col(RouterPoint.run_id) == run_id)
    if after_step is not None:
        stmt = stmt.where(col(RouterPoint.step) > after_step)
    return list(
        session.exec(
            stmt.order_by(col(RouterPoint.step), col(RouterPoint.layer), col(RouterPoint.expert))
        )
    )


def get_runs(session: Session, run_ids: Sequence[uuid.UUID]) -> list[Run]:
    """The runs of ``run_ids`` (config documents included) in the order given, in one query.
    Raises :class:`RunNotFound` for the first id that has no run."""
    found = {
        run.id: run
        for run in session.exec(
            select(Run)
            .where(col(Run.id).in_(list(run_ids)))
            .execution_options(populate_existing=True)
        )
    }
    for run_id in run_ids:
        if run_id not in found:
            raise RunNotFound(run_id)
    return [found[run_id] for run_id in run_ids]


#: The metric columns :func:`best_metrics` reports, and whether lower or higher is better.
BEST_GOALS: dict[str, Literal["min", "max"]] = {
    "loss": "min",
    "val_loss": "min",
    "val_ppl": "min",
    "tokens_per_sec": "max",
    "mfu": "max",
}


def best_metrics(
    session: Session, run_ids: Sequence[uuid.UUID]
) -> dict[uuid.UUID, dict[str, tuple[float, int]]]:
    """Per run of ``run_ids``, per column of :data:`BEST_GOALS` that the run logged: its best
    value and the first step that reached it (``{run_id: {"loss": (2.61, 180)}}``). One
    query per column (a window function over the runs' rows: SQLite 3.25+, PostgreSQL)."""
    out: dict[uuid.UUID, dict[str, tuple[float, int]]] = {run_id: {} for run_id in run_ids}
    if not run_ids:
        return out
    for column, goal in BEST_GOALS.items():
        value = getattr(MetricPoint, column)
        ranked = (
            sa.select(
                col(MetricPoint.run_id),
                col(MetricPoint.step),
                value.label("value"),
                sa.func.row_number()
                .over(
                    partition_by=col(MetricPoint.run_id),
                    order_by=(
                        value.asc() if goal == "min" else value.desc(),
                        col(MetricPoint.step),
                    ),
                )
                .label("rank"),
            )
            .where(col(MetricPoint.run_id).in_(list(run_ids)), value.is_not(None))
            .subquery()
        )
        rows = session.execute(
            sa.select(ranked.c.run_id, ranked.c.step, ranked.c.value).where(ranked.c.rank == 1)
        )
        for row in rows:
            out[row.run_id][column] = (float(row.value), int(row.step))
    return out


def count_metric_points(session: Session) -> int:
    """Metric rows stored over all runs (what the workers have ingested)."""
    return int(session.execute(sa.select(sa.func.count()).select_from(MetricPoint)).scalar_one())


def measured_tokens_per_sec(session: Session, run_id: uuid.UUID) -> float | None:
    """Training tokens per second a run reached over its whole training: ``tokens /
    elapsed_s`` of its last metric row that has both (all ranks; compilation, evaluation and
    checkpoint writes included, so it predicts wall time). None without such a row."""
    point = session.exec(
        select(MetricPoint)
        .where(
            col(MetricPoint.run_id) == run_id,
            col(MetricPoint.tokens) > 0,
            col(MetricPoint.elapsed_s) > 0,
        )
        .order_by(col(MetricPoint.step).desc())
        .limit(1)
    ).first()
    if point is None or point.tokens is None or point.elapsed_s is None:
        return None  # (the query keeps rows that have both)
    return float(point.tokens) / float(point.elapsed_s)


# -- checkpoints -------------------------------------------------------------------------------


def list_checkpoints(session: Session, run_id: uuid.UUID) -> list[Checkpoint]:
    """A run's checkpoints: step-N folders by step, then ``final``."""
    return list(
        session.exec(
            select(Checkpoint)
            .where(col(Checkpoint.run_id) == run_id)
            .order_by((col(Checkpoint.name) == "final"), col(Checkpoint.step), col(Checkpoint.id))
            .execution_options(populate_existing=True)
        )
    )


def get_checkpoint(
    session: Session, run_id: uuid.UUID, ref: int | Literal["final"] | str
) -> Checkpoint | None:
    """A checkpoint by ``"final"``, by step number (int or digits; the step-N folder, never
    ``final``), or by folder name. None when there is none."""
    stmt = select(Checkpoint).where(col(Checkpoint.run_id) == run_id)
    if isinstance(ref, int) or (isinstance(ref, str) and ref.isascii() and ref.isdigit()):
        if not 0 <= int(ref) <= MAX_STEP:
            return None  # no step column can hold it
        stmt = stmt.where(col(Checkpoint.step) == int(ref), col(Checkpoint.name) != "final")
    else:
        stmt = stmt.where(col(Checkpoint.name) == ref)
    return session.exec(stmt.order_by(col(Checkpoint.id))).first()


def checkpoint_at(session: Session, path: str) -> Checkpoint | None:
    """The recorded checkpoint whose folder is ``path`` (what a resolved
    ``initial_checkpoint_dir`` names), the oldest record when several name it; None when
    none does."""
    stmt = select(Checkpoint).where(col(Checkpoint.path) == path)
    return session.exec(stmt.order_by(col(Checkpoint.id))).first()


# -- workers and their speed -------------------------------------------------------------------


def list_workers(session: Session) -> list[Worker]:
    """Every registered worker (live or not), by id."""
    return list(
        session.exec(
            select(Worker).order_by(col(Worker.id)).execution_options(populate_existing=True)
        )
    )


def live_workers(
    session: Session,
    stale_after_seconds: float,
    *,
    now: datetime | None = None,
    role: str | None = None,
) -> list[Worker]:
    """Workers whose last heartbeat is at most ``stale_after_seconds`` old, by id.
    ``role``: ``"trains"`` keeps the workers that train runs (roles all and train), ``"aux"``
    those that take short CPU jobs (roles all and aux); None keeps every one."""
    cutoff = aware_now(now) - timedelta(seconds=stale_after_seconds)
    query = select(Worker).where(col(Worker.heartbeat_at) >= cutoff)
    if role == "trains":
        query = query.where(col(Worker.role).in_(TRAINING_ROLES))
    elif role == "aux":
        query = query.where(col(Worker.role).in_((WorkerRole.all.value, WorkerRole.aux.value)))
    elif role is not None:
        raise ValueError(f"role must be 'trains', 'aux' or None, not {role!r}")
    return list(
        session.exec(query.order_by(col(Worker.id)).execution_options(populate_existing=True))
    )


def worker_can_serve(worker: Worker, devices: int) -> bool:
    """Whether ``worker`` can run a config with ``devices`` devices (``devices: auto`` counts
    as 1): it trains at all (not an ``aux`` worker) and owns at least that many GPUs, or it is
    CPU-only and one device is asked."""
    if (worker.role or WorkerRole.all.value) not in TRAINING_ROLES:
        return False
    return worker.gpu_count >= devices or (worker.gpu_count == 0 and devices == 1)


def throughputs(session: Session, kinds: Iterable[str]) -> list[Throughput]:
    """Every :class:`Throughput` row of the worker ``kinds``."""
    wanted = sorted(set(kinds))
    if not wanted:
        return []
    return list(session.exec(select(Throughput).where(col(Throughput.worker_kind).in_(wanted))))


# -- smoke tests: the dashboard's list (issue 11) -----------------------------------------------


def recent_smoke_tests(session: Session, limit: int) -> list[tuple[Run, str | None]]:
    """The newest ``limit`` smoke-test runs (``preset`` :data:`SMOKE_TEST_PRESET`), newest first,
    each with its last event's message (None without events)."""
    smoke_runs = list(
        session.exec(
            select(Run)
            .where(col(Run.preset) == SMOKE_TEST_PRESET)
            .order_by(col(Run.created_at).desc(), col(Run.id).desc())
            .limit(limit)
            .execution_options(populate_existing=True)
        )
    )
    out: list[tuple[Run, str | None]] = []
    for run in smoke_runs:
        last = session.exec(
            select(RunEvent.message)
            .where(col(RunEvent.run_id) == run.id)
            .order_by(col(RunEvent.id).desc())
            .limit(1)
        ).first()
        out.append((run, last))
    return out
