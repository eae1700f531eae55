"""The reconciler: puts back into the broker what the broker lost, and cancels a smoke test
that no worker can claim. Every worker runs it periodically (``worker.registry.WorkerRuntime``
starts a thread); running it on several workers at once is harmless because claims are atomic
(and cancelling a cancelled run changes nothing).

Delivery and acknowledgement strategy
-------------------------------------
The database row, not the broker message, is the truth about a run. Messages are
**acknowledged early** (Celery's default ``task_acks_late=False``: the message is acked when the
task starts), prefetch is 1 and a worker runs one run at a time. What makes this safe:

- **No run is run twice.** The task first claims the row (``runs.claim_run``: a conditional
  ``UPDATE ... WHERE status='queued'``). A duplicated message, a message for a run that was
  cancelled or already finished, or a re-enqueue by the reconciler while the first message still
  exists, all claim nothing and return. Every write of an attempt is fenced by its attempt
  number, so a worker that lost its run (lease expired) can write nothing more, and its training
  process is killed (it also dies with its worker: parent-death signal).
- **No run is lost.** A claimed run holds a lease in the database that the worker renews every
  ``HEARTBEAT_SECONDS``. If the worker dies (kill -9, machine lost) the lease expires after
  ``LEASE_SECONDS``; :func:`reconcile` then re-queues the run (``runs.recover_expired_run``:
  back to queued while attempts remain, reason ``lost_worker``; failed after
  ``MAX_ATTEMPTS``) and enqueues a new message; the next attempt resumes from the latest
  complete checkpoint (``resume: auto``). A message acked but never claimed (the worker died in
  between) or lost by the broker leaves the run ``queued``: after ``QUEUED_STALE_SECONDS``
  without a claim the reconciler sends it again (``reads.stale_queued_runs`` +
  ``runs.mark_enqueued``).
- **A worker that stops cleanly** (SIGTERM) stops the training process with SIGTERM, which
  writes a checkpoint and exits 75; the run goes back to queued at once and is enqueued again.

Why not ``acks_late``: with Redis the broker re-delivers an unacknowledged message after its
visibility timeout (one hour by default) *even while the task is still running*, so a run
longer than the timeout would be started twice, and a timeout "longer than the longest run"
must be guessed and also delays recovery of a really lost message by that much. Early ack plus a
short database lease recovers a dead worker's run within ``LEASE_SECONDS`` whatever the run's
length, and works the same on the embedded SQLAlchemy transport.
"""

from __future__ import annotations

import logging
import uuid
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from service import reads, runs
from service.db import Database, open_database, read_transaction
from service.models import CancelReason, RunStatus
from service.settings import Settings

log = logging.getLogger("moejobs.reconciler")


@dataclass
class ReconcileSummary:
    """What one :func:`reconcile` pass did (run ids as strings)."""

    #: running runs whose lease expired and that went back to queued (and were enqueued)
    requeued: list[str] = field(default_factory=list)
    #: running runs whose lease expired and that failed (lost_worker, attempts exhausted)
    #: or were cancelled (a cancel had been requested)
    finished: list[str] = field(default_factory=list)
    #: queued runs without a claim for QUEUED_STALE_SECONDS that were enqueued again
    reenqueued: list[str] = field(default_factory=list)
    #: queued smoke tests cancelled because no worker that trains was live
    cancelled: list[str] = field(default_factory=list)
    #: enqueue failures (broker down): the run stays queued and is tried on a later pass
    errors: list[str] = field(default_factory=list)

    def __bool__(self) -> bool:
        return bool(
            self.requeued or self.finished or self.reenqueued or self.cancelled or self.errors
        )


def interval_seconds(settings: Settings) -> float:
    """How often a worker runs :func:`reconcile`: half the shorter of ``lease_seconds`` and
    ``queued_stale_seconds``, between 1 and 60 seconds (a lost run is noticed at most this
    long after its lease expired)."""
    return max(1.0, min(60.0, settings.lease_seconds / 2, settings.queued_stale_seconds / 2))


def _enqueue(celery_app: Any, run_id: uuid.UUID) -> None:
    """Send the run's message; RuntimeError when the broker could not take it."""
    from service.queue import enqueue_run

    result = enqueue_run(celery_app, str(run_id))
    if not result.ok:
        raise RuntimeError(result.error or "broker unreachable")


def reconcile(
    settings: Settings,
    *,
    db: Database | None = None,
    celery_app: Any = None,
    now: datetime | None = None,
) -> ReconcileSummary:
    """One reconciliation pass (see the module docstring):

    1. every ``running`` run whose lease expired before ``now`` goes through
       ``runs.recover_expired_run`` (queued again, or failed ``lost_worker`` once
       ``settings.max_attempts`` attempts were made, or cancelled if that was requested);
       re-queued runs are enqueued;
    2. a queued smoke test (``service.reads.active_smoke_test``) is cancelled while no worker
       that trains is live (heartbeat within ``settings.worker_stale_seconds``; an ``aux``
       worker's reconciler sees that): nothing can claim it, and it must not start by surprise
       much later nor keep a new smoke test from being submitted. Its report
       (``GET /smoke-test/{id}``) already says it failed at ``queued_wait``;
    3. every ``queued`` run not claimed for ``settings.queued_stale_seconds`` is enqueued
       again and marked (``runs.mark_enqueued``), but only while some live worker is idle:
       when every worker is busy, a run waiting in the broker is not lost, only waiting, and
       duplicating its message would only lengthen the queue.

    ``db`` and ``celery_app`` default to ones built from ``settings``
    (``service.queue.make_celery``). Returns a :class:`ReconcileSummary`. Database errors
    propagate; enqueue errors are collected in ``summary.errors``.
    """
    own_db = db is None
    if db is None:
        db = open_database(settings)
    if celery_app is None:
        from service.queue import make_celery

        celery_app = make_celery(settings)
    summary = ReconcileSummary()
    try:
        with db.session() as session:
            with read_transaction(session):
                expired = reads.expired_runs(session, now=now)
            for run in expired:
                moved = runs.recover_expired_run(
                    session, run.id, max_attempts=settings.max_attempts, now=now
                )
                if moved is None:
                    continue
                if moved.status == RunStatus.queued:
                    log.warning(
                        "run %s: lease expired (worker %s lost): re-queued", run.id, run.worker_id
                    )
                    try:
                        _enqueue(celery_app, moved.id)
                        summary.requeued.append(str(moved.id))
                    except Exception as error:  # broker down: step 3 re-sends it later
                        summary.errors.append(f"{moved.id}: {error}")
                else:
                    log.warning("run %s: lease expired: %s", run.id, moved.status.value)
                    summary.finished.append(str(moved.id))

            with read_transaction(session):
                trainers = reads.live_workers(
                    session, settings.worker_stale_seconds, now=now, role="trains"
                )
                smoke = reads.active_smoke_test(session)
            if smoke is not None and smoke.status == RunStatus.queued and not trainers:
                try:
                    runs.request_cancel(
                        session,
                        smoke.id,
                        f"smoke test failed: {reads.SMOKE_TEST_NO_WORKER}",
                        actor="reconciler",
                        now=now,
                        reason=CancelReason.no_worker,
                    )
                except reads.RunError as error:  # finished or deleted meanwhile
                    log.info("smoke test %s: not cancelled (%s)", smoke.id, error)
                else:
                    log.warning("smoke test %s: no live worker trains runs: cancelled", smoke.id)
                    summary.cancelled.append(str(smoke.id))
            idle = [w for w in trainers if w.current_run_id is None]
            if idle:
                with read_transaction(session):
                    stale = reads.stale_queued_runs(session, settings.queued_stale_seconds, now=now)
                for run in stale:
                    try:
                        _enqueue(celery_app, run.id)
                    except Exception as error:
                        summary.errors.append(f"{run.id}: {error}")
                        continue
                    if runs.mark_enqueued(session, run.id, now=now):
                        log.info(
                            "run %s: queued without a claim for over %.0f s: enqueued again",
                            run.id,
                            settings.queued_stale_seconds,
                        )
                        summary.reenqueued.append(str(run.id))
    finally:
        if own_db:
            db.dispose()
    return summary
