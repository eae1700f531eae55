"""The run lifecycle: the only module that writes run state and commits it.

Every function takes a ``sqlmodel.Session`` (from ``service.db``), does one unit of work in its
own write transaction (:func:`service.db.write_transaction`: BEGIN IMMEDIATE on SQLite) and
commits before returning. The reads are ``service.reads``, which also defines ``RunError``
(the base of this module's errors) and ``RunNotFound``.

State machine (``ALLOWED_TRANSITIONS``)::

    queued  -> running (claim_run only) | cancelled | failed
    running -> succeeded | failed | cancelled | queued (re-queued: lost worker, shutdown)
    succeeded, failed, cancelled: terminal, nothing leaves them

One private function, ``_move``, writes ``runs.status``; it does so with a compare-and-set
``UPDATE runs SET status=... WHERE id=... AND status IN (...) RETURNING ...`` and writes the
matching ``run_events`` row in the same transaction. Everything that changes status
(:func:`claim_run`, :func:`transition`, :func:`request_cancel`, :func:`retry_or_fail`) goes
through it.

Fencing: ``runs.attempt`` counts claims. A worker passes the attempt it claimed as ``attempt=``
to heartbeat/record/transition calls; when the run is no longer running that attempt (its lease
expired and the run was re-queued or finished), the call raises :class:`LeaseLost` and writes
nothing, so a worker that lost its run can never write to it again.

Times are aware UTC datetimes; ``now`` parameters exist for tests and default to the clock.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import uuid
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any, cast

import sqlalchemy as sa
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.exc import IntegrityError
from sqlmodel import Session, col, select

from service import contract, webhooks
from service.config.fields import check_note, check_tags
from service.db import read_transaction, write_transaction
from service.models import (
    MAX_STEP,
    METRIC_COLUMNS,
    TERMINAL_STATUSES,
    CancelReason,
    Checkpoint,
    DeliveryState,
    FailureReason,
    MetricPoint,
    RouterPoint,
    Run,
    RunEvent,
    RunProvenance,
    RunStatus,
    Throughput,
    WebhookDelivery,
    Worker,
    WorkerRole,
    aware_now,
    table_of,
)
from service.reads import (
    RunError,
    RunNotFound,
    active_runs,
    find_idempotent,
    get_run,
    measured_tokens_per_sec,
)

log = logging.getLogger(__name__)

S = RunStatus

#: Which statuses each status may move to. ``running`` is entered only by :func:`claim_run`.
ALLOWED_TRANSITIONS: dict[RunStatus, frozenset[RunStatus]] = {
    S.queued: frozenset({S.running, S.cancelled, S.failed}),
    S.running: frozenset({S.succeeded, S.failed, S.cancelled, S.queued}),
    S.succeeded: frozenset(),
    S.failed: frozenset(),
    S.cancelled: frozenset(),
}

#: Failure reasons worth another attempt (the cause was outside the run); the others are
#: permanent: the same config on the same data would fail the same way.
RETRYABLE_REASONS = contract.RETRYABLE_REASONS

#: Rows per INSERT statement when ingesting metric/router points (11 parameters a metric row:
#: 5,500 a statement, well under SQLite's 32,766 and PostgreSQL's 65,535 limits).
BATCH_SIZE = 500


# -- errors -------------------------------------------------------------------------------------


class InvalidTransition(RunError):
    """The move is not allowed from the run's current status (``.from_status`` ->
    ``.to_status``), e.g. anything out of a terminal status."""

    def __init__(
        self, run_id: uuid.UUID, from_status: RunStatus, to_status: RunStatus, detail: str = ""
    ):
        text = f"run {run_id}: cannot go from {from_status.value} to {to_status.value}"
        super().__init__(f"{text}: {detail}" if detail else text)
        self.run_id, self.from_status, self.to_status = run_id, from_status, to_status


class RunActive(RunError):
    """The operation needs a finished run (e.g. delete) and this one is queued or running."""

    def __init__(self, run_id: uuid.UUID, status: RunStatus):
        super().__init__(f"run {run_id} is {status.value}: cancel it and wait until it finishes")
        self.run_id, self.status = run_id, status


class RunInUse(RunError):
    """The run cannot be deleted: queued or running runs start from one of its checkpoints
    (``initial_checkpoint_dir``, e.g. resolved from ``run:ID/final``). ``.users`` their ids."""

    def __init__(self, run_id: uuid.UUID, users: Sequence[uuid.UUID]):
        shown = ", ".join(str(u) for u in users[:5]) + (" ..." if len(users) > 5 else "")
        super().__init__(
            f"run {run_id} has checkpoints that queued or running runs start from "
            f"(initial_checkpoint_dir): {shown}; cancel them or wait until they finish"
        )
        self.run_id, self.users = run_id, list(users)


class IdempotencyConflict(RunError):
    """The idempotency key was already used by this owner for a different request body.
    ``.run_id`` is the run created by the first request (the API answers 409)."""

    def __init__(self, key: str, run_id: uuid.UUID):
        super().__init__(
            f"idempotency key {key!r} was already used for a different request (run {run_id})"
        )
        self.key, self.run_id = key, run_id


class LeaseLost(RunError):
    """The caller's attempt is no longer the run's live attempt (lease expired and the run was
    re-queued, claimed again, or finished). The worker must stop its training process and
    write nothing more for this run."""

    def __init__(self, run_id: uuid.UUID, attempt: int, detail: str = ""):
        super().__init__(
            f"run {run_id}: attempt {attempt} no longer holds the run {detail}".strip()
        )
        self.run_id, self.attempt = run_id, attempt


# -- helpers ------------------------------------------------------------------------------------


def request_hash(document: Any) -> str:
    """sha256 hex digest of ``document`` as canonical JSON (sorted keys, no whitespace), so
    that equal documents hash equal whatever their key order or wire format."""
    text = json.dumps(
        document, sort_keys=True, separators=(",", ":"), ensure_ascii=False, default=str
    )
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def _dialect(session: Session) -> str:
    return session.get_bind().dialect.name


def _insert(session: Session, table: sa.Table) -> postgresql.Insert | sqlite.Insert:
    """A dialect INSERT that supports ON CONFLICT (PostgreSQL and SQLite)."""
    name = _dialect(session)
    if name == "postgresql":
        return postgresql.insert(table)
    if name == "sqlite":
        return sqlite.insert(table)
    raise NotImplementedError(f"database dialect {name!r} is not supported")


def _locked_run(
    session: Session, run_id: uuid.UUID, *, shared: bool = False, deleting: bool = False
) -> Run:
    """The run, read fresh and row-locked on PostgreSQL until the transaction ends; SQLite's
    BEGIN IMMEDIATE already serialises writers. Raises RunNotFound.

    Lock modes: FOR NO KEY UPDATE by default (blocks other status writers, but not the
    KEY SHARE locks that foreign-key checks take, e.g. a worker heartbeat naming this run,
    which would otherwise deadlock with the worker-row update in ``_move``); FOR SHARE with
    ``shared`` (ingestion: status cannot change underneath); FOR UPDATE with ``deleting``."""
    if deleting:
        stmt = select(Run).where(col(Run.id) == run_id).with_for_update()
    elif shared:
        stmt = select(Run).where(col(Run.id) == run_id).with_for_update(read=True)
    else:
        stmt = select(Run).where(col(Run.id) == run_id).with_for_update(key_share=True)
    stmt = stmt.execution_options(populate_existing=True)
    run = session.exec(stmt).first()
    if run is None:
        raise RunNotFound(run_id)
    return run


def _check_fence(run: Run, attempt: int | None) -> None:
    if attempt is not None and (run.status != S.running or run.attempt != attempt):
        raise LeaseLost(run.id, attempt, f"(run is {run.status.value}, attempt {run.attempt})")


def _add_event(
    session: Session,
    run: Run,
    from_status: RunStatus | None,
    to_status: RunStatus,
    message: str,
    *,
    at: datetime,
    reason: FailureReason | None = None,
    actor: str | None = None,
) -> None:
    session.add(
        RunEvent(
            run_id=run.id,
            at=at,
            from_status=from_status,
            to_status=to_status,
            reason=reason,
            message=message,
            actor=actor,
            attempt=run.attempt,
        )
    )


def _move(
    session: Session,
    run_id: uuid.UUID,
    to_status: RunStatus,
    *,
    from_status: RunStatus,
    message: str,
    now: datetime,
    reason: FailureReason | None = None,
    actor: str | None = None,
    attempt: int | None = None,
    values: Mapping[str, Any] | None = None,
    where: Sequence[Any] = (),
    event_reason: FailureReason | None = None,
) -> Run | None:
    """THE status writer. Compare-and-set ``status`` from ``from_status`` to ``to_status``
    (plus ``values``, extra ``where`` clauses and the fence ``attempt``) and write the event,
    inside the caller's write transaction. ``reason`` is the failure reason of a failed run;
    ``event_reason`` the cause written on the event only (a failure that re-queued the run).
    Returns the updated run, or None when no row matched (another writer got there first).
    Callers check the finer rules first."""
    assert to_status in ALLOWED_TRANSITIONS[from_status], (from_status, to_status)
    update_values: dict[str, Any] = {"status": to_status, "updated_at": now}
    if to_status == S.queued:
        update_values.update(
            worker_id=None, heartbeat_at=None, lease_expires_at=None, queued_at=now
        )
    if to_status in TERMINAL_STATUSES:
        update_values.update(finished_at=now, lease_expires_at=None)
    if to_status == S.failed:
        if reason is None:
            raise ValueError("a failed run needs a failure reason")
        update_values["failure_reason"] = reason
    elif reason is not None:
        raise ValueError(f"a failure reason only goes with failed, not {to_status.value}")
    update_values.update(values or {})
    conditions = [col(Run.id) == run_id, col(Run.status) == from_status, *where]
    if attempt is not None:
        conditions.append(col(Run.attempt) == attempt)
    stmt = (
        sa.update(Run)
        .where(*conditions)
        .values(**update_values)
        .returning(Run)
        .execution_options(populate_existing=True, synchronize_session=False)
    )
    run = session.execute(stmt).scalars().first()
    if run is None:
        return None
    _add_event(
        session,
        run,
        from_status,
        to_status,
        message,
        at=now,
        reason=reason or event_reason,
        actor=actor,
    )
    if to_status == S.queued or to_status in TERMINAL_STATUSES:
        session.execute(
            sa.update(Worker)
            .where(col(Worker.current_run_id) == run_id)
            .values(current_run_id=None)
        )
    if to_status in TERMINAL_STATUSES and run.webhooks:
        add_deliveries(
            session,
            run.webhooks,
            to_status.value,
            event=f"run.{to_status.value}",
            dedupe_key=f"run:{run.id}:end",
            data={"run": _hook_run(run)},
            run_id=run.id,
            now=now,
        )
    return run


# -- webhooks: the outbox ---------------------------------------------------------------------


def _hook_run(run: Run) -> dict[str, Any]:
    """What a run's webhook body says about it."""
    return {
        "id": str(run.id),
        "name": run.name,
        "status": run.status.value,
        "failure_reason": run.failure_reason.value if run.failure_reason else None,
        "cancel_reason": run.cancel_reason.value if run.cancel_reason else None,
        "attempt": run.attempt,
        "finished_at": run.finished_at.isoformat() if run.finished_at else None,
        "sweep_id": str(run.sweep_id) if run.sweep_id else None,
        "tags": list(run.tags or []),
    }


def add_deliveries(
    session: Session,
    hooks: Sequence[Mapping[str, Any]],
    kind: str,
    *,
    event: str,
    dedupe_key: str,
    data: Mapping[str, Any],
    run_id: uuid.UUID | None = None,
    sweep_id: uuid.UUID | None = None,
    now: datetime,
) -> int:
    """Inside the caller's transaction: record one webhook delivery of ``event`` (body
    :func:`service.webhooks.body_text` of ``data``) for every subscription in ``hooks`` whose
    ``events`` name ``kind`` (``succeeded``, ``checkpoint``, ``finished``...), due now.
    Recording the same ``dedupe_key`` for a URL again stores nothing (ON CONFLICT DO
    NOTHING). Returns how many rows were inserted."""
    urls = list(dict.fromkeys(str(h["url"]) for h in hooks if kind in (h.get("events") or ())))
    if not urls:
        return 0
    rows = []
    for url in urls:
        delivery_id = uuid.uuid4()
        rows.append(
            {
                "id": delivery_id,
                "run_id": run_id,
                "sweep_id": sweep_id,
                "event": event,
                "url": url,
                "dedupe_key": dedupe_key,
                "body": webhooks.body_text(delivery_id, event, dict(data)),
                "state": DeliveryState.pending,
                "attempts": 0,
                "next_attempt_at": now,
                "created_at": now,
            }
        )
    table = table_of(WebhookDelivery)
    stmt = (
        _insert(session, table)
        .values(rows)
        .on_conflict_do_nothing(index_elements=["dedupe_key", "url"])
        .returning(table.c.id)
    )
    return len(session.execute(stmt).all())


@dataclass(frozen=True)
class DueDelivery:
    """A delivery a sender claimed (:func:`claim_deliveries`): what to send where."""

    id: uuid.UUID
    event: str
    url: str
    body: str
    attempts: int
    run_id: uuid.UUID | None
    sweep_id: uuid.UUID | None


def claim_deliveries(
    session: Session,
    holder: str,
    *,
    limit: int = 20,
    lease_seconds: float = webhooks.LEASE_SECONDS,
    now: datetime | None = None,
) -> list[DueDelivery]:
    """Take up to ``limit`` pending deliveries that are due (``next_attempt_at <= now``) and
    not leased by another sender: each with a conditional UPDATE that sets ``lease_holder``
    and ``lease_until = now + lease_seconds``, so two senders never take the same attempt
    (the loser's UPDATE matches no row). Oldest due first."""
    now = aware_now(now)
    free = sa.or_(
        col(WebhookDelivery.lease_until).is_(None), col(WebhookDelivery.lease_until) < now
    )
    pending = col(WebhookDelivery.state) == DeliveryState.pending
    claimed: list[DueDelivery] = []
    with write_transaction(session):
        ids = session.exec(
            select(WebhookDelivery.id)
            .where(pending, col(WebhookDelivery.next_attempt_at) <= now, free)
            .order_by(col(WebhookDelivery.next_attempt_at))
            .limit(limit)
        ).all()
        for delivery_id in ids:
            row = (
                session.execute(
                    sa.update(WebhookDelivery)
                    .where(col(WebhookDelivery.id) == delivery_id, pending, free)
                    .values(lease_holder=holder, lease_until=now + timedelta(seconds=lease_seconds))
                    .returning(WebhookDelivery)
                    .execution_options(populate_existing=True, synchronize_session=False)
                )
                .scalars()
                .first()
            )
            if row is not None:
                claimed.append(
                    DueDelivery(
                        id=row.id,
                        event=row.event,
                        url=row.url,
                        body=row.body,
                        attempts=row.attempts,
                        run_id=row.run_id,
                        sweep_id=row.sweep_id,
                    )
                )
    return claimed


def record_delivery(
    session: Session,
    delivery_id: uuid.UUID,
    holder: str,
    *,
    status_code: int | None,
    error: str | None,
    max_attempts: int,
    now: datetime | None = None,
) -> WebhookDelivery | None:
    """Record one attempt of a delivery ``holder`` claimed: a 2xx ``status_code`` (and no
    ``error``) delivers it; otherwise it is due again after
    :func:`service.webhooks.backoff_seconds`, or given up (``failed``) after
    ``max_attempts`` attempts. Frees the lease and writes a line in the run's history
    (``status -> status``, actor ``webhooks``). Returns the row, or None when ``holder`` no
    longer holds it (its lease expired and another sender took it: nothing is written)."""
    now = aware_now(now)
    with write_transaction(session):
        row = session.exec(
            select(WebhookDelivery)
            .where(
                col(WebhookDelivery.id) == delivery_id,
                col(WebhookDelivery.lease_holder) == holder,
                col(WebhookDelivery.state) == DeliveryState.pending,
            )
            .with_for_update()
            .execution_options(populate_existing=True)
        ).first()
        if row is None:
            return None
        attempts = row.attempts + 1
        ok = error is None and status_code is not None and 200 <= status_code < 300
        answer = f"HTTP {status_code}" if status_code is not None else (error or "no answer")
        target = f"webhook {row.event} to {webhooks.shown_url(row.url)}"
        if ok:
            row.state, row.delivered_at = DeliveryState.delivered, now
            message = f"{target}: delivered ({answer}, attempt {attempts})"
        elif attempts >= max_attempts:
            row.state = DeliveryState.failed
            plural = "s" if attempts != 1 else ""
            message = f"{target}: given up after {attempts} attempt{plural} (last: {answer})"
        else:
            delay = webhooks.backoff_seconds(attempts)
            row.next_attempt_at = now + timedelta(seconds=delay)
            message = (
                f"{target}: attempt {attempts} of {max_attempts} failed ({answer}); "
                f"next in {delay:.0f} s"
            )
        row.attempts = attempts
        row.lease_holder, row.lease_until = None, None
        row.last_status_code = status_code
        row.last_error = None if ok else (error or answer)[:1000]
        session.add(row)
        if row.run_id is not None:
            run = session.get(Run, row.run_id)
            if run is not None:
                _add_event(session, run, run.status, run.status, message, at=now, actor="webhooks")
        session.flush()
        return row


# -- creation -----------------------------------------------------------------------------------


def create_run(
    session: Session,
    *,
    name: str,
    submitted_train: dict[str, Any],
    submitted_model: dict[str, Any],
    resolved_train: dict[str, Any],
    resolved_model: dict[str, Any],
    estimate: dict[str, Any] | None = None,
    warnings: Sequence[Any] = (),
    preset: str | None = None,
    write_checkpoints: bool = True,
    owner: str = "local",
    idempotency_key: str | None = None,
    body_hash: str | None = None,
    run_id: uuid.UUID | None = None,
    tags: Sequence[str] = (),
    note: str | None = None,
    actor: str | None = "api",
    now: datetime | None = None,
    sweep_id: uuid.UUID | None = None,
    sweep_params: dict[str, Any] | None = None,
    webhooks: Sequence[Mapping[str, Any]] = (),
) -> tuple[Run, bool]:
    """Insert a queued run and its creation event (NULL -> queued); returns ``(run, created)``.

    ``run_id`` lets the caller pick the id first (the resolved config's ``out_dir`` is
    ``RUNS_DIR/<id>``); default a new uuid4. Configs are stored as given (JSON documents).
    ``write_checkpoints`` False makes the worker run the training without checkpoints (the
    smoke test; ``worker.runner``). ``tags`` and ``note`` are checked (:func:`check_tags`,
    :func:`check_note`: ValueError) and stored; :func:`set_labels` changes them later.
    ``sweep_id``/``sweep_params``: the run is that sweep's trial with those parameters
    (``service.sweeps``). ``webhooks``: subscriptions ``[{url, events}]`` already checked
    (``service.webhooks.RunWebhook``); the run's terminal move records their deliveries.

    Idempotency (per ``owner``): when ``idempotency_key`` was used before with the same
    ``body_hash``, nothing is inserted and ``(first run, False)`` is returned; with a different
    hash, :class:`IdempotencyConflict` is raised. ``body_hash`` defaults to
    :func:`request_hash` of ``{name, preset, train_config, model_config}``. Safe under
    concurrent retries (the unique constraint decides; the loser reads the winner's run).
    Enqueueing the run is the caller's job, after this returns (the row is committed).
    """
    now = aware_now(now)
    tags = check_tags(tags)
    note = None if note is None else check_note(note)
    if idempotency_key is not None and body_hash is None:
        body_hash = request_hash(
            {
                "name": name,
                "preset": preset,
                "train_config": submitted_train,
                "model_config": submitted_model,
            }
        )
    for _ in range(2):
        try:
            with write_transaction(session):
                if idempotency_key is not None:
                    existing = find_idempotent(session, owner, idempotency_key)
                    if existing is not None:
                        if existing.request_hash != body_hash:
                            raise IdempotencyConflict(idempotency_key, existing.id)
                        return existing, False
                run = Run(
                    id=run_id or uuid.uuid4(),
                    name=name,
                    owner=owner,
                    status=S.queued,
                    preset=preset,
                    write_checkpoints=write_checkpoints,
                    submitted_train=submitted_train,
                    submitted_model=submitted_model,
                    resolved_train=resolved_train,
                    resolved_model=resolved_model,
                    estimate=estimate,
                    warnings=list(warnings),
                    tags=tags,
                    note=note,
                    idempotency_key=idempotency_key,
                    request_hash=body_hash,
                    sweep_id=sweep_id,
                    sweep_params=sweep_params,
                    webhooks=[dict(h) for h in webhooks],
                    created_at=now,
                    queued_at=now,
                    updated_at=now,
                )
                session.add(run)
                session.flush()
                _add_event(session, run, None, S.queued, "submitted", at=now, actor=actor)
                return run, True
        except IntegrityError as error:
            # A concurrent request with the same key committed first (PostgreSQL; on SQLite
            # BEGIN IMMEDIATE serialises the two). Read its run on the next pass.
            if idempotency_key is None or "idempotency_key" not in str(error.orig):
                raise
    raise RuntimeError("unreachable: idempotent insert retried")  # pragma: no cover


# -- status changes -----------------------------------------------------------------------------


def claim_run(
    session: Session,
    run_id: uuid.UUID,
    worker_id: str,
    lease_seconds: float,
    *,
    now: datetime | None = None,
) -> Run | None:
    """Atomically take a queued run for ``worker_id``: ``UPDATE ... WHERE status='queued' AND
    NOT cancel_requested RETURNING``. On success the run is running, ``attempt`` is one more
    (the fencing token to pass back), the lease runs ``lease_seconds`` from ``now``, an event
    queued -> running is written and the worker row (if registered) points at the run.
    Returns None when the run is not queued (already claimed by a duplicate delivery,
    cancelled, finished) or does not exist: a second claim is a no-op."""
    now = aware_now(now)
    with write_transaction(session):
        run = _move(
            session,
            run_id,
            S.running,
            from_status=S.queued,
            message=f"claimed by worker {worker_id}",
            now=now,
            actor=f"worker:{worker_id}",
            where=[col(Run.cancel_requested).is_(False)],
            values={
                "worker_id": worker_id,
                "attempt": col(Run.attempt) + 1,
                "started_at": now,
                "heartbeat_at": now,
                "lease_expires_at": now + timedelta(seconds=lease_seconds),
            },
        )
        if run is not None:
            session.execute(
                sa.update(Worker)
                .where(col(Worker.id) == worker_id)
                .values(current_run_id=run_id, heartbeat_at=now)
            )
        return run


def transition(
    session: Session,
    run_id: uuid.UUID,
    to_status: RunStatus | str,
    message: str = "",
    *,
    reason: FailureReason | str | None = None,
    failure_message: str | None = None,
    exit_code: int | None = None,
    attempt: int | None = None,
    actor: str | None = None,
    now: datetime | None = None,
) -> Run:
    """Move a run to ``to_status`` and write the event row; the one public way to change
    status (except :func:`claim_run`, which enters running). Returns the updated run.

    - ``failed`` needs ``reason`` (a :class:`FailureReason`); ``failure_message`` defaults to
      ``message``. ``reason`` with any other status is a ``ValueError``.
    - terminal statuses set ``finished_at`` and drop the lease; ``queued`` (re-queue) clears
      the worker and lease and resets ``queued_at``; a run with a cancel request cannot be
      re-queued (move it to cancelled).
    - ``attempt`` (fencing): the run must be running that attempt, else :class:`LeaseLost`.

    Raises RunNotFound, InvalidTransition (not allowed from the current status, including
    everything out of a terminal status and any move to running), LeaseLost, ValueError.
    """
    to_status = RunStatus(to_status)
    reason = FailureReason(reason) if reason is not None else None
    now = aware_now(now)
    with write_transaction(session):
        run = _locked_run(session, run_id)
        _check_fence(run, attempt)
        current = run.status
        if to_status == S.running:
            raise InvalidTransition(run_id, current, to_status, "only claim_run starts a run")
        if to_status not in ALLOWED_TRANSITIONS[current]:
            raise InvalidTransition(run_id, current, to_status)
        if to_status == S.queued and run.cancel_requested:
            raise InvalidTransition(run_id, current, to_status, "cancel was requested")
        values: dict[str, Any] = {}
        if exit_code is not None:
            values["exit_code"] = exit_code
        if to_status == S.failed:
            values["failure_message"] = failure_message if failure_message is not None else message
            values["failures"] = col(Run.failures) + 1
        moved = _move(
            session,
            run_id,
            to_status,
            from_status=current,
            message=message,
            now=now,
            reason=reason,
            actor=actor,
            attempt=attempt,
            values=values,
        )
        assert moved is not None, "row is locked: the compare-and-set cannot miss"
        if to_status == S.succeeded:
            try:  # calibration is a by-product: it must never undo a run's success
                with session.begin_nested():
                    _record_throughput(session, moved, now)
            except sa.exc.SQLAlchemyError as exc:
                log.warning(
                    "run %s succeeded, but its speed could not be recorded for calibration (%s)",
                    run_id,
                    exc.__class__.__name__,
                    exc_info=True,
                )
        return moved


def request_cancel(
    session: Session,
    run_id: uuid.UUID,
    message: str = "cancel requested",
    *,
    actor: str | None = "api",
    now: datetime | None = None,
    reason: CancelReason = CancelReason.requested,
) -> Run:
    """Ask for a run to stop. A queued run is cancelled at once (queued -> cancelled; a
    later delivery of its message claims nothing). A running run gets ``cancel_requested``
    set and a running -> running event; its worker sees the flag on its next heartbeat,
    stops the training process and moves it to cancelled. Cancelling a cancelled run, or
    asking twice, changes nothing. ``reason`` is recorded as the run's ``cancel_reason``
    (``pruned`` and ``sweep_cancelled`` come from a sweep). Raises RunNotFound,
    InvalidTransition for succeeded or failed runs."""
    now = aware_now(now)
    with write_transaction(session):
        run = _locked_run(session, run_id)
        if run.status == S.cancelled or (run.status == S.running and run.cancel_requested):
            return run
        if run.status in TERMINAL_STATUSES:
            raise InvalidTransition(run_id, run.status, S.cancelled, "the run already finished")
        flag = {"cancel_requested": True, "cancel_requested_at": now, "cancel_reason": reason}
        if run.status == S.queued:
            moved = _move(
                session,
                run_id,
                S.cancelled,
                from_status=S.queued,
                message=message,
                now=now,
                actor=actor,
                values=flag,
            )
            assert moved is not None
            return moved
        result = (
            session.execute(
                sa.update(Run)
                .where(col(Run.id) == run_id, col(Run.status) == S.running)
                .values(updated_at=now, **flag)
                .returning(Run)
                .execution_options(populate_existing=True, synchronize_session=False)
            )
            .scalars()
            .one()
        )
        _add_event(session, result, S.running, S.running, message, at=now, actor=actor)
        return result


def add_note(
    session: Session,
    run_id: uuid.UUID,
    message: str,
    *,
    actor: str | None = None,
    status: RunStatus = RunStatus.queued,
    now: datetime | None = None,
) -> bool:
    """Write a history line without a transition (``status`` -> ``status``) while the run is
    in ``status`` (e.g. a queued run's data preparation). Returns False, writing nothing, when
    the run is in another status. Raises RunNotFound."""
    now = aware_now(now)
    with write_transaction(session):
        run = _locked_run(session, run_id)
        if run.status != status:
            return False
        _add_event(session, run, status, status, message, at=now, actor=actor)
        return True


#: ``note=`` default of :func:`set_labels`: leave the note as it is.
KEEP = object()


def set_labels(
    session: Session,
    run_id: uuid.UUID,
    *,
    tags: Sequence[str] | None = None,
    add_tags: Sequence[str] = (),
    remove_tags: Sequence[str] = (),
    note: str | None | object = KEEP,
    now: datetime | None = None,
) -> Run:
    """Change a run's tags and note, in any status (they describe the run, not its state).
    ``tags`` replaces the list; otherwise ``add_tags`` are appended (those it lacks) and
    ``remove_tags`` removed, under the row lock, so two concurrent changes both count.
    ``note``: a string replaces it, None clears it, :data:`KEEP` leaves it. Bumps
    ``updated_at``; writes no event. Raises RunNotFound, ValueError (:func:`check_tags`,
    :func:`check_note`; ``tags`` together with ``add_tags``/``remove_tags``)."""
    if tags is not None and (add_tags or remove_tags):
        raise ValueError("give either tags (the whole list) or add_tags/remove_tags")
    now = aware_now(now)
    new_tags = None if tags is None else check_tags(tags)
    added, removed = check_tags(add_tags), set(check_tags(remove_tags))
    if note is not KEEP and note is not None:
        note = check_note(cast(str, note))
    with write_transaction(session):
        run = _locked_run(session, run_id)
        if new_tags is None:
            kept = [t for t in (run.tags or []) if t not in removed]
            new_tags = check_tags([*kept, *(t for t in added if t not in removed)])
        values: dict[str, Any] = {"tags": new_tags, "updated_at": now}
        if note is not KEEP:
            values["note"] = note
        return (
            session.execute(
                sa.update(Run)
                .where(col(Run.id) == run_id)
                .values(**values)
                .returning(Run)
                .execution_options(populate_existing=True, synchronize_session=False)
            )
            .scalars()
            .one()
        )


def retry_or_fail(
    session: Session,
    run_id: uuid.UUID,
    reason: FailureReason | str,
    message: str,
    *,
    max_attempts: int,
    attempt: int | None = None,
    actor: str | None = None,
    exit_code: int | None = None,
    now: datetime | None = None,
) -> Run:
    """Finish an attempt that failed for ``reason`` and count the failure (``failures + 1``).
    The run goes back to queued when the reason is retryable (:data:`RETRYABLE_REASONS`: lost
    worker, killed) and it has failed fewer than ``max_attempts`` times; to cancelled when a
    cancel was requested; else to failed with ``reason``. The event names the reason and the
    count. The caller enqueues the run again when the result is queued. A graceful stop is no
    failure: it goes through :func:`transition` to queued. Fenced by ``attempt`` like
    :func:`transition`. Raises RunNotFound, InvalidTransition (run not running), LeaseLost."""
    reason = FailureReason(reason)
    now = aware_now(now)
    with write_transaction(session):
        run = _locked_run(session, run_id)
        _check_fence(run, attempt)
        if run.status != S.running:
            raise InvalidTransition(run_id, run.status, S.queued, "only a running run is retried")
        failures = run.failures + 1
        values: dict[str, Any] = {"failures": failures}
        if exit_code is not None:
            values["exit_code"] = exit_code
        event_reason = None
        if run.cancel_requested:
            to, why = S.cancelled, None
        elif reason in RETRYABLE_REASONS and failures < max_attempts:
            to, why, event_reason = S.queued, None, reason
            message = f"{message} (failure {failures} of {max_attempts}: re-queued)"
        else:
            to, why = S.failed, reason
            values["failure_message"] = message
            if reason in RETRYABLE_REASONS:
                message = f"{message} (failure {failures} of {max_attempts}: giving up)"
        moved = _move(
            session,
            run_id,
            to,
            from_status=S.running,
            message=message,
            now=now,
            reason=why,
            actor=actor,
            attempt=attempt,
            values=values,
            event_reason=event_reason,
        )
        assert moved is not None
        return moved


def recover_expired_run(
    session: Session,
    run_id: uuid.UUID,
    *,
    max_attempts: int,
    actor: str | None = "reconciler",
    now: datetime | None = None,
) -> Run | None:
    """Reconciler step for one run from ``service.reads.expired_runs``: if it is still running with a
    lease that expired before ``now``, its worker is presumed lost: :func:`retry_or_fail`
    with reason lost_worker. Returns the updated run, or None when there was nothing to do
    (a heartbeat renewed the lease meanwhile, or the run moved on)."""
    now = aware_now(now)
    with read_transaction(session):
        run = get_run(session, run_id)
    if run.status != S.running or run.lease_expires_at is None or run.lease_expires_at >= now:
        return None
    try:
        return retry_or_fail(
            session,
            run_id,
            FailureReason.lost_worker,
            f"lease expired at {run.lease_expires_at.isoformat()} (worker {run.worker_id})",
            max_attempts=max_attempts,
            attempt=run.attempt,
            actor=actor,
            now=now,
        )
    except LeaseLost:
        return None  # moved on between the read and the write


def heartbeat_run(
    session: Session,
    run_id: uuid.UUID,
    worker_id: str,
    attempt: int,
    lease_seconds: float,
    *,
    now: datetime | None = None,
) -> Run:
    """Renew the lease of a running run: ``heartbeat_at = now``, ``lease_expires_at = now +
    lease_seconds``. Returns the run, whose ``cancel_requested`` tells the worker whether to
    stop. Raises :class:`LeaseLost` when the run is no longer running ``attempt`` on
    ``worker_id`` (nothing is written then)."""
    now = aware_now(now)
    with write_transaction(session):
        run = (
            session.execute(
                sa.update(Run)
                .where(
                    col(Run.id) == run_id,
                    col(Run.status) == S.running,
                    col(Run.attempt) == attempt,
                    col(Run.worker_id) == worker_id,
                )
                .values(heartbeat_at=now, lease_expires_at=now + timedelta(seconds=lease_seconds))
                .returning(Run)
                .execution_options(populate_existing=True, synchronize_session=False)
            )
            .scalars()
            .first()
        )
        if run is None:
            raise LeaseLost(run_id, attempt)
        return run


def mark_enqueued(session: Session, run_id: uuid.UUID, *, now: datetime | None = None) -> bool:
    """Note that a queued run's message was (re-)sent now (``queued_at = now``), so the
    reconciler's ``service.reads.stale_queued_runs`` does not pick it again before the stale period.
    Not a transition, no event. Returns False when the run is not queued."""
    now = aware_now(now)
    with write_transaction(session):
        result = _dml(
            session,
            sa.update(Run)
            .where(col(Run.id) == run_id, col(Run.status) == S.queued)
            .values(queued_at=now, updated_at=now)
            .execution_options(synchronize_session=False),
        )
        return result.rowcount == 1


def delete_run(session: Session, run_id: uuid.UUID) -> Run:
    """Delete a finished run and, by ON DELETE CASCADE, its events, metric and router points,
    checkpoint records and provenance. Returns the deleted run (detached) so the caller can
    remove its folder (``settings.run_dir(run.id)``); files are not touched here.
    Raises RunNotFound, RunActive (queued or running), RunInUse (a queued or running run's
    ``initial_checkpoint_dir`` is one of its recorded checkpoints)."""
    with write_transaction(session):
        run = _locked_run(session, run_id, deleting=True)
        if run.status not in TERMINAL_STATUSES:
            raise RunActive(run_id, run.status)
        paths = set(
            session.exec(select(Checkpoint.path).where(col(Checkpoint.run_id) == run_id)).all()
        )
        users = [
            other.id
            for other in active_runs(session)
            if (other.resolved_train or {}).get("initial_checkpoint_dir") in paths
        ]
        if users:
            raise RunInUse(run_id, users)
        session.expunge(run)
        session.execute(
            sa.delete(Run).where(col(Run.id) == run_id).execution_options(synchronize_session=False)
        )
        return run


# -- ingestion ----------------------------------------------------------------------------------


def _float_or_none(value: Any, column: str) -> float | None:
    if value is None or (isinstance(value, str) and not value.strip()):
        return None
    try:
        number = float(value)
    except (TypeError, ValueError):
        raise ValueError(f"metric {column}: not a number: {value!r}") from None
    # Non-finite values: SQLite cannot store NaN and JSON cannot carry either; NULL on both.
    return number if math.isfinite(number) else None


def _int(value: Any, column: str) -> int:
    try:
        number = float(value) if isinstance(value, str) else value
        if isinstance(number, float):
            if not number.is_integer():
                raise ValueError
            number = int(number)
        return int(number)
    except (TypeError, ValueError):
        raise ValueError(f"{column}: not an integer: {value!r}") from None


def _metric_row(run_id: uuid.UUID, row: Mapping[str, Any]) -> dict[str, Any]:
    unknown = set(row) - {"step", *METRIC_COLUMNS}
    if unknown:
        raise ValueError(
            f"unknown metric columns {sorted(unknown)}; expected step and "
            f"{', '.join(METRIC_COLUMNS)}"
        )
    if row.get("step") in (None, ""):
        raise ValueError(f"metric row without a step: {dict(row)!r}")
    step = _int(row["step"], "step")
    if not 0 <= step <= MAX_STEP:
        raise ValueError(f"step must be >= 0 and <= {MAX_STEP}, got {step}")
    out: dict[str, Any] = {"run_id": run_id, "step": step}
    tokens = row.get("tokens")
    out["tokens"] = None if tokens in (None, "") else _int(tokens, "tokens")
    for column in METRIC_COLUMNS[1:]:
        out[column] = _float_or_none(row.get(column), column)
    return out


def _upsert_changed(
    session: Session, table: sa.Table, rows: list[dict[str, Any]], key: Sequence[str]
) -> int:
    """``INSERT ... ON CONFLICT (key) DO UPDATE`` the other columns, only where a value differs;
    returns how many rows were inserted or changed (RETURNING gives back exactly those:
    the driver's rowcount is not reliable for multi-row statements, psycopg reports -1).
    Every dict in ``rows`` must have the same keys."""
    changed = 0
    for start in range(0, len(rows), BATCH_SIZE):
        chunk = rows[start : start + BATCH_SIZE]
        insert = _insert(session, table).values(chunk)
        columns = [c for c in chunk[0] if c not in key]
        stmt = insert.on_conflict_do_update(
            index_elements=key,
            set_={c: insert.excluded[c] for c in columns},
            where=sa.or_(*(table.c[c].is_distinct_from(insert.excluded[c]) for c in columns)),
        ).returning(table.c[key[-1]])
        changed += len(session.execute(stmt).all())
    return changed


def _dml(session: Session, stmt: sa.Executable) -> sa.CursorResult[Any]:
    """Execute an UPDATE or DELETE. Its result is a ``CursorResult`` (``rowcount``); the
    typing of ``Session.execute`` says only ``Result``."""
    return cast(sa.CursorResult[Any], session.execute(stmt))


def _discard_after(session: Session, table: sa.Table, run_id: uuid.UUID, step: int) -> int:
    """Delete ``table``'s rows of ``run_id`` past ``step``; returns how many."""
    result = _dml(session, sa.delete(table).where(table.c.run_id == run_id, table.c.step > step))
    return int(result.rowcount or 0)


def record_metrics(
    session: Session,
    run_id: uuid.UUID,
    rows: Iterable[Mapping[str, Any]],
    *,
    attempt: int | None = None,
    keep_through: int | None = None,
) -> int:
    """Store metrics.csv rows of a run; returns how many rows were inserted or changed.

    Each row maps ``step`` and any of the metrics.csv columns (:data:`METRIC_COLUMNS`) to
    numbers or CSV strings; "" and missing mean NULL, as do NaN/inf. One row per step, and the
    last value sent for a step wins, which mirrors the file: a resumed attempt re-trains the
    steps after its checkpoint and rewrites their rows (``worker.metrics.MetricsWriter``).
    Re-sending identical rows changes nothing (``INSERT ... ON CONFLICT DO UPDATE ... WHERE``
    a value differs), so the runner can re-send a whole file after a restart.

    ``keep_through``: the file was rewritten and ends at this step (a resumed attempt dropped
    the rows written after its checkpoint): stored rows past it are deleted first, in the
    same transaction, so the database never keeps steps the file no longer has.

    Inserted in batches of :data:`BATCH_SIZE` in one transaction. With ``attempt`` the run
    must be running that attempt (:class:`LeaseLost` otherwise). Raises ValueError for
    unknown columns or a missing/negative step, RunNotFound.
    """
    prepared: dict[int, dict[str, Any]] = {}
    for row in rows:
        item = _metric_row(run_id, row)
        prepared[item["step"]] = item
    if not prepared and attempt is None and keep_through is None:
        return 0
    with write_transaction(session):
        run = _locked_run(session, run_id, shared=True)
        _check_fence(run, attempt)
        if keep_through is not None:
            _discard_after(session, table_of(MetricPoint), run_id, keep_through)
        return _upsert_changed(
            session,
            table_of(MetricPoint),
            [prepared[k] for k in sorted(prepared)],
            ("run_id", "step"),
        )


def router_rows(step: int, fractions: Sequence[Sequence[float]]) -> list[dict[str, Any]]:
    """Rows for :func:`record_router_stats` from one step's matrix ``fractions[layer][expert]``
    (shape n_moe_layers x n_expert, each row summing to 1)."""
    return [
        {"step": step, "layer": layer, "expert": expert, "fraction": float(value)}
        for layer, per_expert in enumerate(fractions)
        for expert, value in enumerate(per_expert)
    ]


def record_router_stats(
    session: Session,
    run_id: uuid.UUID,
    rows: Iterable[Mapping[str, Any]],
    *,
    attempt: int | None = None,
    keep_through: int | None = None,
) -> int:
    """Store MoE router telemetry rows ``{step, layer, expert, fraction}`` (see
    :func:`router_rows`); returns how many rows were inserted or changed. One row per
    (step, layer, expert), the last value sent wins; ``keep_through`` deletes stored rows
    past that step first, as in :func:`record_metrics` (router.csv is rewritten on resume like
    metrics.csv). Fractions within 1e-6 outside [0, 1] are clamped (float round-off); further
    out is a ValueError. Fenced by ``attempt`` like :func:`record_metrics`."""
    prepared: dict[tuple[int, int, int], dict[str, Any]] = {}
    for row in rows:
        step, layer, expert = (_int(row[k], k) for k in ("step", "layer", "expert"))
        fraction = float(row["fraction"])
        if not (-1e-6 <= fraction <= 1 + 1e-6):
            raise ValueError(
                f"router fraction must be in [0, 1], got {fraction} "
                f"(step {step}, layer {layer}, expert {expert})"
            )
        prepared[(step, layer, expert)] = {
            "run_id": run_id,
            "step": step,
            "layer": layer,
            "expert": expert,
            "fraction": min(1.0, max(0.0, fraction)),
        }
    if not prepared and attempt is None and keep_through is None:
        return 0
    with write_transaction(session):
        run = _locked_run(session, run_id, shared=True)
        _check_fence(run, attempt)
        if keep_through is not None:
            _discard_after(session, table_of(RouterPoint), run_id, keep_through)
        return _upsert_changed(
            session,
            table_of(RouterPoint),
            [prepared[k] for k in sorted(prepared)],
            ("run_id", "step", "layer", "expert"),
        )


#: The step of a checkpoint folder name: ``step-00000500`` -> 500; None otherwise.
checkpoint_step = contract.checkpoint_step


def record_checkpoint(
    session: Session,
    run_id: uuid.UUID,
    name: str,
    path: str,
    *,
    step: int | None = None,
    size_bytes: int | None = None,
    attempt: int | None = None,
    now: datetime | None = None,
) -> Checkpoint:
    """Record a complete checkpoint folder ``name`` (``step-00000500`` or ``final``) at
    ``path``. ``step`` defaults to the number in a ``step-N`` name (for ``final`` pass the step
    it was written at if known). Idempotent by (run, name): recording again updates path, step
    and size (a resumed attempt may rewrite the folder) and keeps ``created_at``. The first
    record of a name records the ``checkpoint`` webhook deliveries of the run. Fenced by
    ``attempt``. Returns the stored row. Raises RunNotFound, LeaseLost."""
    now = aware_now(now)
    if step is None:
        step = checkpoint_step(name)
    with write_transaction(session):
        run = _locked_run(session, run_id, shared=True)
        _check_fence(run, attempt)
        if run.webhooks:
            add_deliveries(
                session,
                run.webhooks,
                "checkpoint",
                event="run.checkpoint",
                dedupe_key=f"run:{run.id}:checkpoint:{name}",
                data={"run": _hook_run(run), "checkpoint": {"name": name, "step": step}},
                run_id=run.id,
                now=now,
            )
        stmt = _insert(session, table_of(Checkpoint)).values(
            run_id=run_id,
            name=name,
            path=str(path),
            step=step,
            size_bytes=size_bytes,
            created_at=now,
        )
        stmt = stmt.on_conflict_do_update(
            index_elements=["run_id", "name"],
            set_={
                "path": stmt.excluded.path,
                "step": stmt.excluded.step,
                "size_bytes": stmt.excluded.size_bytes,
            },
        )
        session.execute(stmt)
        return session.exec(
            select(Checkpoint)
            .where(col(Checkpoint.run_id) == run_id, col(Checkpoint.name) == name)
            .execution_options(populate_existing=True)
        ).one()


def remove_checkpoint(session: Session, run_id: uuid.UUID, name: str) -> bool:
    """Forget checkpoint ``name`` of a run (retention deleted its folder). Returns whether a
    record existed."""
    with write_transaction(session):
        result = _dml(
            session,
            sa.delete(Checkpoint)
            .where(col(Checkpoint.run_id) == run_id, col(Checkpoint.name) == name)
            .execution_options(synchronize_session=False),
        )
        return result.rowcount == 1


def record_provenance(
    session: Session,
    run_id: uuid.UUID,
    *,
    package_versions: Mapping[str, str] | None = None,
    git_commit: str | None = None,
    seed: int | None = None,
    hardware: Mapping[str, Any] | None = None,
    data_hash: str | None = None,
    tokenizer_hash: str | None = None,
    now: datetime | None = None,
) -> RunProvenance:
    """Store (or replace, on a later attempt) what produced the run: package versions, code
    commit, seed, hardware description, sha256 digests of the data and the tokenizer."""
    now = aware_now(now)
    values = {
        "package_versions": dict(package_versions or {}),
        "git_commit": git_commit,
        "seed": seed,
        "hardware": dict(hardware or {}),
        "data_hash": data_hash,
        "tokenizer_hash": tokenizer_hash,
        "recorded_at": now,
    }
    with write_transaction(session):
        _locked_run(session, run_id, shared=True)
        stmt = _insert(session, table_of(RunProvenance)).values(run_id=run_id, **values)
        stmt = stmt.on_conflict_do_update(index_elements=["run_id"], set_=values)
        session.execute(stmt)
        return session.exec(
            select(RunProvenance)
            .where(col(RunProvenance.run_id) == run_id)
            .execution_options(populate_existing=True)
        ).one()


# -- workers ------------------------------------------------------------------------------------


def register_worker(
    session: Session,
    worker_id: str,
    host: str,
    *,
    pid: int | None = None,
    gpus: Sequence[Mapping[str, Any]] = (),
    gpu_memory_bytes: int | None = None,
    kind: str | None = None,
    host_memory_bytes: int | None = None,
    free_bytes: int | None = None,
    role: WorkerRole | str = WorkerRole.all,
    now: datetime | None = None,
) -> Worker:
    """Register (or re-register after a restart) a worker: ``gpus`` is a list of
    ``{"index", "name", "memory_bytes"}``; ``gpu_memory_bytes`` defaults to the smallest
    ``memory_bytes`` among them; ``kind`` (max 200 characters) defaults to the first GPU's
    name, or None for a CPU worker (pass "cpu: <model>"); ``host_memory_bytes`` is the
    machine's memory (what a CPU worker trains in), ``free_bytes`` the free space under
    RUNS_DIR (None = not reported); ``role`` which queues it consumes (:class:`WorkerRole`).
    Re-registering resets ``started_at``, the heartbeat and the current run."""
    now = aware_now(now)
    role = WorkerRole(role).value
    gpu_list = [dict(g) for g in gpus]
    if gpu_memory_bytes is None:
        sizes = [g["memory_bytes"] for g in gpu_list if g.get("memory_bytes") is not None]
        gpu_memory_bytes = min(sizes) if sizes else None
    if kind is None and gpu_list and gpu_list[0].get("name"):
        kind = str(gpu_list[0]["name"])
    values = {
        "host": host,
        "pid": pid,
        "gpus": gpu_list,
        "gpu_count": len(gpu_list),
        "gpu_memory_bytes": gpu_memory_bytes,
        "heartbeat_at": now,
        "kind": kind[:200] if kind else None,
        "host_memory_bytes": host_memory_bytes,
        "free_bytes": free_bytes,
        "role": role,
        "current_run_id": None,
        "started_at": now,
    }
    with write_transaction(session):
        stmt = _insert(session, table_of(Worker)).values(id=worker_id, **values)
        session.execute(stmt.on_conflict_do_update(index_elements=["id"], set_=values))
        return session.exec(
            select(Worker)
            .where(col(Worker.id) == worker_id)
            .execution_options(populate_existing=True)
        ).one()


_UNSET: Any = object()


def heartbeat_worker(
    session: Session,
    worker_id: str,
    *,
    current_run_id: uuid.UUID | None = _UNSET,
    free_bytes: int | None = _UNSET,
    now: datetime | None = None,
) -> Worker | None:
    """Record that a worker is alive (``heartbeat_at = now``), what it runs when
    ``current_run_id`` is given (None = idle) and the free space under RUNS_DIR when
    ``free_bytes`` is given. Returns None when the worker is not registered (it was pruned):
    the worker should :func:`register_worker` again."""
    now = aware_now(now)
    values: dict[str, Any] = {"heartbeat_at": now}
    if current_run_id is not _UNSET:
        values["current_run_id"] = current_run_id
    if free_bytes is not _UNSET:
        values["free_bytes"] = free_bytes
    with write_transaction(session):
        return (
            session.execute(
                sa.update(Worker)
                .where(col(Worker.id) == worker_id)
                .values(**values)
                .returning(Worker)
                .execution_options(populate_existing=True, synchronize_session=False)
            )
            .scalars()
            .first()
        )


def deregister_worker(session: Session, worker_id: str) -> bool:
    """Remove a worker's row (clean shutdown). Returns whether it existed."""
    with write_transaction(session):
        result = _dml(
            session,
            sa.delete(Worker)
            .where(col(Worker.id) == worker_id)
            .execution_options(synchronize_session=False),
        )
        return result.rowcount == 1


# -- calibration (worker throughput) -------------------------------------------------------------


def throughput_key(resolved_model: Mapping[str, Any], precision: str) -> str:
    """The model-config identity that :class:`Throughput` rows are kept by: sha256 hex of the
    resolved model config (canonical JSON) and the precision (bf16 and fp32 differ several-fold
    in speed). Other train settings (micro-batch, sequence length) are not part of it."""
    return request_hash({"model": dict(resolved_model), "precision": precision})


def _record_throughput(session: Session, run: Run, now: datetime) -> Throughput | None:
    """Inside the caller's transaction: fold a succeeded run's speed into the
    :class:`Throughput` row of (its model config, its worker's kind). Nothing is recorded
    when the worker row (or its kind), the metrics or the estimate are missing."""
    if run.worker_id is None:
        return None
    worker = session.get(Worker, run.worker_id)
    kind = worker.kind if worker is not None else None
    tps = measured_tokens_per_sec(session, run.id)
    estimate = run.estimate or {}
    plan = estimate.get("plan") if isinstance(estimate, dict) else None
    world = plan.get("world_size") if isinstance(plan, dict) else None
    precision = (run.resolved_train or {}).get("precision")
    if not kind or tps is None or not math.isfinite(tps) or tps <= 0 or not precision:
        return None
    world = world if isinstance(world, int) and world > 0 else 1
    per_device = tps / world
    fpt = estimate.get("flops_per_token")
    flops = per_device * fpt if isinstance(fpt, (int, float)) and fpt > 0 else None
    key = throughput_key(run.resolved_model, precision)
    table = table_of(Throughput)
    stmt = _insert(session, table).values(
        model_key=key,
        worker_kind=kind,
        tokens_per_sec_per_device=per_device,
        flops_per_sec_per_device=flops,
        runs=1,
        last_run_id=run.id,
        updated_at=now,
    )
    n = table.c.runs
    # a running mean over the runs; an upsert, so two runs finishing at once both count
    stmt = stmt.on_conflict_do_update(
        index_elements=["model_key", "worker_kind"],
        set_={
            "tokens_per_sec_per_device": (
                table.c.tokens_per_sec_per_device * n + stmt.excluded.tokens_per_sec_per_device
            )
            / (n + 1),
            "flops_per_sec_per_device": sa.case(
                (
                    stmt.excluded.flops_per_sec_per_device.is_(None),
                    table.c.flops_per_sec_per_device,
                ),
                (
                    table.c.flops_per_sec_per_device.is_(None),
                    stmt.excluded.flops_per_sec_per_device,
                ),
                else_=(
                    table.c.flops_per_sec_per_device * n + stmt.excluded.flops_per_sec_per_device
                )
                / (n + 1),
            ),
            "runs": n + 1,
            "last_run_id": stmt.excluded.last_run_id,
            "updated_at": stmt.excluded.updated_at,
        },
    )
    session.execute(stmt)
    return session.exec(
        select(Throughput)
        .where(col(Throughput.model_key) == key, col(Throughput.worker_kind) == kind)
        .execution_options(populate_existing=True)
    ).one()
