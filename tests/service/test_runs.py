"""The run lifecycle (service/runs.py) on real SQLite and PostgreSQL databases."""

from __future__ import annotations

import threading
import uuid
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
import sqlalchemy as sa

from service import reads, runs
from service.db import Database, read_transaction
from service.models import (
    Checkpoint,
    FailureReason,
    MetricPoint,
    RouterPoint,
    RunEvent,
    RunProvenance,
    RunStatus,
)
from tests.support import REPO

S = RunStatus
T0 = datetime(2025, 6, 1, 12, 0, 0, tzinfo=UTC)
TRAIN = {"train": {"micro_batch_size": 4, "max_tokens": 320000}, "precision": "32-true"}
MODEL = {"name": "tiny-moe", "n_layer": 2, "n_expert": 4}


def new_run(db: Database, name: str = "run", **kw: Any):
    with db.session() as s:
        args: dict[str, Any] = dict(
            name=name,
            submitted_train=TRAIN,
            submitted_model=MODEL,
            resolved_train={**TRAIN, "out_dir": "/runs/x"},
            resolved_model=MODEL,
            estimate={"optimizer_steps": 4},
            warnings=[{"loc": ["train"], "msg": "w"}],
        )
        args.update(kw)
        return runs.create_run(s, **args)


def create(db: Database, name: str = "run", **kw: Any):
    run, created = new_run(db, name, **kw)
    assert created
    return run


def call(db: Database, fn: Callable[..., Any], *args: Any, **kw: Any) -> Any:
    with db.session() as s:
        return fn(s, *args, **kw)


def running(db: Database, worker: str = "w1", now: datetime = T0, lease: float = 60):
    run = create(db)
    claimed = call(db, runs.claim_run, run.id, worker, lease, now=now)
    assert claimed is not None
    return claimed


def event_path(db: Database, run_id: uuid.UUID) -> list[tuple[str | None, str]]:
    events = call(db, reads.list_events, run_id)
    return [(e.from_status.value if e.from_status else None, e.to_status.value) for e in events]


# -- creation and idempotency -------------------------------------------------------------------


def test_create_run_stores_documents_and_writes_the_creation_event(database):
    rid = uuid.uuid4()
    run = create(database, "first", run_id=rid, preset="production", now=T0)
    assert run.id == rid and run.status == S.queued and run.attempt == 0
    got = call(database, reads.get_run, rid)
    assert got.submitted_train == TRAIN and got.resolved_train["out_dir"] == "/runs/x"
    assert got.estimate == {"optimizer_steps": 4}
    assert got.warnings == [{"loc": ["train"], "msg": "w"}]
    assert got.created_at == T0 == got.queued_at and got.preset == "production"
    events = call(database, reads.list_events, rid)
    assert [(e.from_status, e.to_status, e.message, e.actor) for e in events] == [
        (None, S.queued, "submitted", "api")
    ]
    with pytest.raises(reads.RunNotFound):
        call(database, reads.get_run, uuid.uuid4())


def test_idempotency_key_same_body_returns_the_first_run(database):
    first = create(database, idempotency_key="k1")
    again, created = new_run(database, idempotency_key="k1")
    assert not created and again.id == first.id
    assert call(database, reads.count_runs_by_status)[S.queued] == 1
    assert len(call(database, reads.list_events, first.id)) == 1


def test_idempotency_key_with_a_different_body_is_a_conflict(database):
    first = create(database, idempotency_key="k1")
    with pytest.raises(runs.IdempotencyConflict) as info:
        new_run(database, idempotency_key="k1", submitted_model={**MODEL, "n_layer": 3})
    assert info.value.run_id == first.id
    # an explicit body hash is what is compared when the caller supplies one
    create(database, idempotency_key="k2", body_hash="a" * 64)
    with pytest.raises(runs.IdempotencyConflict):
        new_run(database, idempotency_key="k2", body_hash="b" * 64)
    # keys are per owner; runs without a key never collide
    other = create(database, idempotency_key="k1", owner="someone-else")
    assert other.id != first.id
    create(database)
    create(database)
    assert sum(call(database, reads.count_runs_by_status).values()) == 5


def test_request_hash_ignores_key_order():
    assert runs.request_hash({"a": 1, "b": [1, {"c": 2, "d": 3}]}) == runs.request_hash(
        {"b": [1, {"d": 3, "c": 2}], "a": 1}
    )
    assert runs.request_hash({"a": 1}) != runs.request_hash({"a": 2})


def test_concurrent_retries_with_one_key_create_one_run(database):
    results: list[Any] = []
    barrier = threading.Barrier(4)

    def submit() -> None:
        barrier.wait()
        try:
            results.append(new_run(database, idempotency_key="same"))
        except BaseException as error:  # pragma: no cover - shown by the assertion
            results.append(error)

    threads = [threading.Thread(target=submit) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert all(isinstance(r, tuple) for r in results), results
    assert len({run.id for run, _ in results}) == 1
    assert sorted(created for _, created in results) == [False, False, False, True]


# -- claiming -----------------------------------------------------------------------------------


def test_claim_starts_the_run_and_a_second_claim_gets_none(database):
    run = create(database)
    call(database, runs.register_worker, "w1", "host-a", now=T0)
    claimed = call(database, runs.claim_run, run.id, "w1", 60, now=T0)
    assert claimed.status == S.running and claimed.worker_id == "w1" and claimed.attempt == 1
    assert claimed.started_at == T0 and claimed.lease_expires_at == T0 + timedelta(seconds=60)
    assert call(database, runs.claim_run, run.id, "w2", 60, now=T0) is None
    assert call(database, runs.claim_run, uuid.uuid4(), "w2", 60) is None
    assert event_path(database, run.id) == [(None, "queued"), ("queued", "running")]
    worker = call(database, reads.live_workers, 60, now=T0)[0]
    assert worker.current_run_id == run.id


@pytest.mark.parametrize("contenders", [2, 8])
def test_concurrent_claims_exactly_one_wins(database, contenders):
    run = create(database)
    barrier = threading.Barrier(contenders)
    results: list[Any] = []

    def claim(i: int) -> None:
        with database.session() as s:
            barrier.wait()
            try:
                results.append(runs.claim_run(s, run.id, f"w{i}", 60))
            except BaseException as error:  # pragma: no cover - shown by the assertion
                results.append(error)

    threads = [threading.Thread(target=claim, args=(i,)) for i in range(contenders)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    winners = [r for r in results if r is not None]
    assert len(results) == contenders
    assert len(winners) == 1 and not isinstance(winners[0], BaseException), results
    final = call(database, reads.get_run, run.id)
    assert final.attempt == 1 and final.worker_id == winners[0].worker_id
    assert event_path(database, run.id) == [(None, "queued"), ("queued", "running")]


# -- transitions --------------------------------------------------------------------------------


def test_success_path_and_terminal_states_are_final(database):
    run = running(database)
    done = call(
        database,
        runs.transition,
        run.id,
        S.succeeded,
        "training finished",
        attempt=1,
        exit_code=0,
        actor="worker:w1",
        now=T0 + timedelta(minutes=5),
    )
    assert done.status == S.succeeded and done.finished_at == T0 + timedelta(minutes=5)
    assert done.lease_expires_at is None and done.exit_code == 0
    assert event_path(database, run.id) == [
        (None, "queued"),
        ("queued", "running"),
        ("running", "succeeded"),
    ]
    for target in S:
        with pytest.raises(runs.InvalidTransition):
            call(
                database,
                runs.transition,
                run.id,
                target,
                "again",
                reason=FailureReason.crashed if target == S.failed else None,
            )
    assert len(call(database, reads.list_events, run.id)) == 3


def test_failure_needs_a_reason_and_records_it(database):
    run = running(database)
    with pytest.raises(ValueError, match="failure reason"):
        call(database, runs.transition, run.id, S.failed, "boom")
    with pytest.raises(ValueError, match="only goes with failed"):
        call(database, runs.transition, run.id, S.succeeded, "ok", reason="crashed")
    assert call(database, reads.get_run, run.id).status == S.running  # nothing half-written
    failed = call(
        database,
        runs.transition,
        run.id,
        "failed",
        "CUDA out of memory",
        reason="out_of_memory",
        exit_code=1,
    )
    assert failed.failure_reason == FailureReason.out_of_memory
    assert failed.failure_message == "CUDA out of memory"
    last = call(database, reads.list_events, run.id)[-1]
    assert (last.to_status, last.reason, last.attempt) == (S.failed, FailureReason.out_of_memory, 1)


def test_transition_rules(database):
    queued = create(database)
    with pytest.raises(runs.InvalidTransition, match="claim_run"):
        call(database, runs.transition, queued.id, S.running)
    with pytest.raises(runs.InvalidTransition):
        call(database, runs.transition, queued.id, S.succeeded)
    with pytest.raises(runs.InvalidTransition):
        call(database, runs.transition, queued.id, S.queued)
    # a queued run may fail before it ever starts (e.g. nothing can run it)
    failed = call(
        database, runs.transition, queued.id, S.failed, "no worker", reason="invalid_config"
    )
    assert failed.status == S.failed
    with pytest.raises(reads.RunNotFound):
        call(database, runs.transition, uuid.uuid4(), S.cancelled)


def test_requeue_clears_the_worker_and_fences_the_old_attempt(database):
    run = running(database)
    back = call(
        database,
        runs.transition,
        run.id,
        S.queued,
        "worker shutting down",
        attempt=1,
        now=T0 + timedelta(seconds=5),
    )
    assert back.status == S.queued and back.worker_id is None and back.lease_expires_at is None
    assert back.queued_at == T0 + timedelta(seconds=5) and back.attempt == 1
    with pytest.raises(runs.LeaseLost):
        call(database, runs.heartbeat_run, run.id, "w1", 1, 60)
    again = call(database, runs.claim_run, run.id, "w2", 60)
    assert again.attempt == 2
    # the first worker, late, can neither write nor finish the run
    with pytest.raises(runs.LeaseLost):
        call(database, runs.record_metrics, run.id, [{"step": 1, "loss": 1.0}], attempt=1)
    with pytest.raises(runs.LeaseLost):
        call(database, runs.record_checkpoint, run.id, "step-00000001", "/x", attempt=1)
    with pytest.raises(runs.LeaseLost):
        call(database, runs.transition, run.id, S.succeeded, attempt=1)
    assert call(database, reads.list_metrics, run.id) == []
    done = call(database, runs.transition, run.id, S.succeeded, attempt=2)
    assert done.status == S.succeeded


def test_heartbeat_renews_the_lease(database):
    run = running(database, now=T0, lease=60)
    beat = call(database, runs.heartbeat_run, run.id, "w1", 1, 60, now=T0 + timedelta(seconds=30))
    assert beat.lease_expires_at == T0 + timedelta(seconds=90) and not beat.cancel_requested
    with pytest.raises(runs.LeaseLost):
        call(database, runs.heartbeat_run, run.id, "other-worker", 1, 60)
    assert call(database, reads.expired_runs, now=T0 + timedelta(seconds=89)) == []
    assert [r.id for r in call(database, reads.expired_runs, now=T0 + timedelta(seconds=91))] == [
        run.id
    ]


# -- cancellation -------------------------------------------------------------------------------


def test_cancelling_a_queued_run_finishes_it_and_no_claim_follows(database):
    run = create(database)
    cancelled = call(database, runs.request_cancel, run.id, now=T0)
    assert cancelled.status == S.cancelled and cancelled.cancel_requested
    assert cancelled.finished_at == T0
    assert call(database, runs.claim_run, run.id, "w1", 60) is None
    assert call(database, runs.request_cancel, run.id).status == S.cancelled  # idempotent
    assert event_path(database, run.id) == [(None, "queued"), ("queued", "cancelled")]


def test_cancelling_a_running_run_sets_the_flag_for_its_worker(database):
    run = running(database)
    flagged = call(database, runs.request_cancel, run.id, "user asked", now=T0)
    assert flagged.status == S.running and flagged.cancel_requested
    assert flagged.cancel_requested_at == T0
    call(database, runs.request_cancel, run.id)  # asking twice adds nothing
    beat = call(database, runs.heartbeat_run, run.id, "w1", 1, 60)
    assert beat.cancel_requested
    with pytest.raises(runs.InvalidTransition, match="cancel was requested"):
        call(database, runs.transition, run.id, S.queued, attempt=1)
    done = call(
        database,
        runs.transition,
        run.id,
        S.cancelled,
        "stopped after SIGTERM",
        attempt=1,
        exit_code=75,
    )
    assert done.status == S.cancelled
    assert event_path(database, run.id) == [
        (None, "queued"),
        ("queued", "running"),
        ("running", "running"),
        ("running", "cancelled"),
    ]


def test_finished_runs_cannot_be_cancelled(database):
    run = running(database)
    call(database, runs.transition, run.id, S.succeeded, attempt=1)
    with pytest.raises(runs.InvalidTransition, match="already finished"):
        call(database, runs.request_cancel, run.id)


# -- reconciler ---------------------------------------------------------------------------------


def test_expired_lease_requeues_until_max_attempts_then_fails(database):
    run = running(database, now=T0, lease=60)
    later = T0 + timedelta(seconds=61)
    assert (
        call(
            database,
            runs.recover_expired_run,
            run.id,
            max_attempts=2,
            now=T0 + timedelta(seconds=59),
        )
        is None
    )  # not expired yet
    back = call(database, runs.recover_expired_run, run.id, max_attempts=2, now=later)
    assert back.status == S.queued
    assert call(database, runs.recover_expired_run, run.id, max_attempts=2, now=later) is None
    call(database, runs.claim_run, run.id, "w2", 60, now=later)
    gone = call(
        database,
        runs.recover_expired_run,
        run.id,
        max_attempts=2,
        now=later + timedelta(seconds=61),
    )
    assert gone.status == S.failed and gone.failure_reason == FailureReason.lost_worker
    assert "giving up" in call(database, reads.list_events, run.id)[-1].message
    assert event_path(database, run.id)[1:] == [
        ("queued", "running"),
        ("running", "queued"),
        ("queued", "running"),
        ("running", "failed"),
    ]


def test_expired_run_with_a_cancel_request_ends_cancelled(database):
    run = running(database, now=T0, lease=60)
    call(database, runs.request_cancel, run.id)
    done = call(
        database, runs.recover_expired_run, run.id, max_attempts=3, now=T0 + timedelta(minutes=5)
    )
    assert done.status == S.cancelled


def test_retry_or_fail_classifies(database):
    run = running(database)
    back = call(
        database,
        runs.retry_or_fail,
        run.id,
        "killed",
        "SIGKILL from outside",
        max_attempts=3,
        attempt=1,
    )
    assert back.status == S.queued
    call(database, runs.claim_run, run.id, "w1", 60)
    failed = call(
        database,
        runs.retry_or_fail,
        run.id,
        "invalid_data",
        "empty file a.txt",
        max_attempts=3,
        attempt=2,
    )
    assert failed.status == S.failed and failed.failure_reason == FailureReason.invalid_data
    assert failed.failure_message == "empty file a.txt"


def test_graceful_stops_do_not_count_as_failures_and_failures_are_bounded(database):
    """attempt counts claims (the fencing token); failures count failed attempts and are
    what max_attempts bounds: five graceful stops and two lost workers still leave the run
    queued at max_attempts=3; the third failure ends it."""
    run = running(database)
    for attempt in range(1, 6):  # five graceful stops (worker shutdown: checkpoint, re-queue)
        back = call(database, runs.transition, run.id, S.queued, "graceful stop", attempt=attempt)
        assert back.status == S.queued and back.failures == 0
        call(database, runs.claim_run, run.id, "w1", 60)
    for attempt, failures in ((6, 1), (7, 2)):
        back = call(
            database,
            runs.retry_or_fail,
            run.id,
            "lost_worker",
            "lease expired",
            max_attempts=3,
            attempt=attempt,
        )
        assert (back.status, back.failures, back.attempt) == (S.queued, failures, attempt)
        call(database, runs.claim_run, run.id, "w1", 60)
    events = call(database, reads.list_events, run.id)
    assert events[-2].reason == FailureReason.lost_worker  # the cause, on a re-queue event
    assert "failure 2 of 3: re-queued" in events[-2].message
    done = call(
        database, runs.retry_or_fail, run.id, "killed", "SIGKILL", max_attempts=3, attempt=8
    )
    assert (done.status, done.failures, done.failure_reason) == (S.failed, 3, FailureReason.killed)
    assert "failure 3 of 3: giving up" in call(database, reads.list_events, run.id)[-1].message


def test_stale_queued_runs_and_mark_enqueued(database):
    old = create(database, "old", now=T0)
    create(database, "new", now=T0 + timedelta(minutes=9))
    stale = call(database, reads.stale_queued_runs, 300, now=T0 + timedelta(minutes=10))
    assert [r.id for r in stale] == [old.id]
    assert call(database, runs.mark_enqueued, old.id, now=T0 + timedelta(minutes=10))
    assert call(database, reads.stale_queued_runs, 300, now=T0 + timedelta(minutes=10)) == []
    call(database, runs.request_cancel, old.id)
    assert not call(database, runs.mark_enqueued, old.id)


# -- ingestion ----------------------------------------------------------------------------------


def csv_row(step: int, **kw: Any) -> dict[str, str]:
    row = {
        "step": str(step),
        "tokens": str(step * 512),
        "loss": f"{10 - step * 0.01:.4f}",
        "learning_rate": "0.0003",
        "grad_norm": "1.5",
        "tokens_per_sec": "1000.0",
        "mfu": "",
        "elapsed_s": f"{step * 0.5}",
        "val_loss": "",
        "val_ppl": "",
    }
    row.update(kw)
    return row


def test_metrics_are_idempotent_by_step_and_the_last_value_wins(database):
    run = running(database)
    assert (
        call(database, runs.record_metrics, run.id, [csv_row(s) for s in range(1, 11)], attempt=1)
        == 10
    )
    # re-sending identical rows (runner restart) changes nothing
    assert (
        call(database, runs.record_metrics, run.id, [csv_row(s) for s in range(1, 11)], attempt=1)
        == 0
    )
    # rows of steps already stored with other values (a resumed attempt re-trained them)
    # replace the stored ones, like the rewritten file
    resent = [csv_row(s, loss="999") for s in range(6, 16)]
    assert call(database, runs.record_metrics, run.id, resent, attempt=1) == 10
    assert call(database, runs.record_metrics, run.id, resent) == 0
    points = call(database, reads.list_metrics, run.id)
    assert [p.step for p in points] == list(range(1, 16))
    assert points[4].loss == pytest.approx(10 - 5 * 0.01)
    assert [p.loss for p in points[5:]] == [999.0] * 10
    p = points[0]
    assert (p.tokens, p.learning_rate, p.mfu, p.val_loss, p.elapsed_s) == (
        512,
        3e-4,
        None,
        None,
        0.5,
    )
    assert [q.step for q in call(database, reads.list_metrics, run.id, after_step=12, limit=2)] == [
        13,
        14,
    ]
    # a value going back to NULL is a change too
    assert call(database, runs.record_metrics, run.id, [csv_row(15, loss="")]) == 1
    assert call(database, reads.list_metrics, run.id)[-1].loss is None


def test_keep_through_drops_rows_past_a_rewritten_file(database):
    """A resumed attempt rewrites metrics.csv and router.csv up to its checkpoint (step 4 here):
    the rows the dead attempt stored past it go, in the same transaction as the new rows."""
    run = running(database)
    call(database, runs.record_metrics, run.id, [csv_row(s) for s in range(1, 9)], attempt=1)
    call(
        database,
        runs.record_router_stats,
        run.id,
        [r for s in range(1, 9) for r in runs.router_rows(s, [[0.25, 0.75]])],
        attempt=1,
    )
    assert (
        call(
            database,
            runs.record_metrics,
            run.id,
            [csv_row(s) for s in range(1, 5)],
            attempt=1,
            keep_through=4,
        )
        == 0
    )
    assert [p.step for p in call(database, reads.list_metrics, run.id)] == [1, 2, 3, 4]
    assert (
        call(
            database,
            runs.record_router_stats,
            run.id,
            runs.router_rows(5, [[0.5, 0.5]]),
            attempt=1,
            keep_through=5,
        )
        == 2
    )
    router = call(database, reads.list_router_points, run.id)
    assert sorted({r.step for r in router}) == [1, 2, 3, 4, 5]
    assert [r.fraction for r in router if r.step == 5] == [0.5, 0.5]
    # an empty rewritten file (the run started over) keeps nothing; fenced like any write
    with pytest.raises(runs.LeaseLost):
        call(database, runs.record_metrics, run.id, [], attempt=2, keep_through=0)
    assert call(database, runs.record_metrics, run.id, [], attempt=1, keep_through=0) == 0
    assert call(database, reads.list_metrics, run.id) == []


def test_metrics_in_many_batches_with_duplicates_inside_one_call(database):
    run = running(database)
    rows = [
        {"step": s, "loss": 1.0 / (s + 1), "val_loss": 2.0 if s % 100 == 0 else None}
        for s in range(2 * runs.BATCH_SIZE + 7)
    ]
    rows.append({"step": 3, "loss": 123.0})  # duplicate inside the same call: the last wins
    assert call(database, runs.record_metrics, run.id, rows) == 2 * runs.BATCH_SIZE + 7
    points = call(database, reads.list_metrics, run.id)
    assert len(points) == 2 * runs.BATCH_SIZE + 7 and points[3].loss == 123.0
    assert points[100].val_loss == 2.0 and points[101].val_loss is None


def test_metric_values_are_checked(database):
    run = running(database)
    with pytest.raises(ValueError, match="unknown metric columns"):
        call(database, runs.record_metrics, run.id, [{"step": 1, "iter": 3}])
    with pytest.raises(ValueError, match="without a step"):
        call(database, runs.record_metrics, run.id, [{"loss": 1.0}])
    with pytest.raises(ValueError, match="not a number"):
        call(database, runs.record_metrics, run.id, [{"step": 1, "loss": "abc"}])
    with pytest.raises(ValueError, match=">= 0"):
        call(database, runs.record_metrics, run.id, [{"step": -1}])
    assert (
        call(
            database,
            runs.record_metrics,
            run.id,
            [{"step": "2", "loss": "nan", "grad_norm": float("inf")}],
        )
        == 1
    )
    (point,) = call(database, reads.list_metrics, run.id)
    assert point.loss is None and point.grad_norm is None
    with pytest.raises(reads.RunNotFound):
        call(database, runs.record_metrics, uuid.uuid4(), [{"step": 1}])


def test_router_stats_are_idempotent(database):
    run = running(database)
    fractions = [[0.25, 0.25, 0.5, 0.0], [0.0, 0.0, 0.0, 1.0 + 1e-9]]  # float round-off
    rows = runs.router_rows(10, fractions)
    assert len(rows) == 8
    assert call(database, runs.record_router_stats, run.id, rows, attempt=1) == 8
    assert call(database, runs.record_router_stats, run.id, rows, attempt=1) == 0
    points = call(database, reads.list_router_points, run.id)
    assert [(p.layer, p.expert) for p in points][:2] == [(0, 0), (0, 1)]
    assert points[2].fraction == 0.5 and points[-1].fraction == 1.0  # clamped
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        call(database, runs.record_router_stats, run.id, runs.router_rows(11, [[1.5]]))


def test_checkpoints_are_idempotent_by_name(database):
    run = running(database)
    first = call(
        database,
        runs.record_checkpoint,
        run.id,
        "step-00000002",
        "/runs/x/step-00000002",
        size_bytes=100,
        attempt=1,
        now=T0,
    )
    assert first.step == 2 and first.size_bytes == 100
    again = call(
        database,
        runs.record_checkpoint,
        run.id,
        "step-00000002",
        "/runs/x/step-00000002",
        size_bytes=120,
        attempt=1,
        now=T0 + timedelta(minutes=1),
    )
    assert again.id == first.id and again.size_bytes == 120 and again.created_at == T0
    call(database, runs.record_checkpoint, run.id, "step-00000004", "/runs/x/step-00000004")
    call(database, runs.record_checkpoint, run.id, "final", "/runs/x/final", step=4)
    names = [c.name for c in call(database, reads.list_checkpoints, run.id)]
    assert names == ["step-00000002", "step-00000004", "final"]
    assert call(database, reads.get_checkpoint, run.id, "final").step == 4
    assert call(database, reads.get_checkpoint, run.id, 4).name == "step-00000004"
    assert call(database, reads.get_checkpoint, run.id, "2").name == "step-00000002"
    assert call(database, reads.get_checkpoint, run.id, 3) is None
    assert call(database, runs.remove_checkpoint, run.id, "step-00000002")
    assert not call(database, runs.remove_checkpoint, run.id, "step-00000002")
    assert runs.checkpoint_step("step-00000500") == 500 and runs.checkpoint_step("final") is None


def test_provenance_is_recorded_and_replaced(database):
    run = running(database)
    first = call(
        database,
        runs.record_provenance,
        run.id,
        package_versions={"torch": "2.14.1"},
        git_commit="abc123",
        seed=42,
        hardware={"gpus": []},
        data_hash="d" * 64,
        tokenizer_hash="t" * 64,
    )
    assert first.seed == 42 and first.package_versions == {"torch": "2.14.1"}
    second = call(database, runs.record_provenance, run.id, seed=43)
    assert second.seed == 43 and second.git_commit is None


# -- workers ------------------------------------------------------------------------------------


def test_worker_registry(database):
    gpus = [
        {"index": 0, "name": "H200", "memory_bytes": 140 * 2**30},
        {"index": 1, "name": "H100", "memory_bytes": 80 * 2**30},
    ]
    w = call(database, runs.register_worker, "w1", "gpu-host", pid=123, gpus=gpus, now=T0)
    assert (w.gpu_count, w.gpu_memory_bytes, w.started_at) == (2, 80 * 2**30, T0)
    call(database, runs.register_worker, "cpu", "laptop", now=T0 - timedelta(minutes=5))
    live = call(database, reads.live_workers, 60, now=T0 + timedelta(seconds=30))
    assert [x.id for x in live] == ["w1"]
    assert call(database, runs.heartbeat_worker, "cpu", now=T0 + timedelta(seconds=20)) is not None
    live = call(database, reads.live_workers, 60, now=T0 + timedelta(seconds=30))
    assert [x.id for x in live] == ["cpu", "w1"]
    assert reads.worker_can_serve(live[1], 2) and not reads.worker_can_serve(live[1], 3)
    assert reads.worker_can_serve(live[0], 1) and not reads.worker_can_serve(live[0], 2)
    assert call(database, runs.heartbeat_worker, "nobody") is None
    # running and finishing a run keeps current_run_id in step
    run = create(database)
    call(database, runs.claim_run, run.id, "w1", 60, now=T0 + timedelta(seconds=40))
    live = call(database, reads.live_workers, 60, now=T0 + timedelta(seconds=40))
    assert live[1].current_run_id == run.id
    call(database, runs.transition, run.id, S.succeeded, attempt=1)
    live = call(database, reads.live_workers, 60, now=T0 + timedelta(seconds=40))
    assert live[1].current_run_id is None
    assert call(database, runs.deregister_worker, "w1")
    assert not call(database, runs.deregister_worker, "w1")


# -- deletion, listing --------------------------------------------------------------------------


def test_delete_run_removes_its_rows(database):
    run = running(database)
    with pytest.raises(runs.RunActive):
        call(database, runs.delete_run, run.id)
    call(database, runs.record_metrics, run.id, [csv_row(1), csv_row(2)])
    call(database, runs.record_router_stats, run.id, runs.router_rows(1, [[0.5, 0.5]]))
    call(database, runs.record_checkpoint, run.id, "final", "/runs/x/final")
    call(database, runs.record_provenance, run.id, seed=1)
    call(database, runs.transition, run.id, S.succeeded, attempt=1)
    keep = running(database, "w2")
    call(database, runs.record_metrics, keep.id, [csv_row(1)])
    deleted = call(database, runs.delete_run, run.id)
    assert deleted.id == run.id and deleted.status == S.succeeded
    with database.session() as s:
        for model in (RunEvent, MetricPoint, RouterPoint, Checkpoint, RunProvenance):
            assert (
                s.execute(
                    sa.select(sa.func.count()).select_from(model).where(model.run_id == run.id)
                ).scalar()
                == 0
            ), model
    assert len(call(database, reads.list_metrics, keep.id)) == 1
    with pytest.raises(reads.RunNotFound):
        call(database, runs.delete_run, run.id)


def test_list_runs_pages_through_everything_in_order(database):
    created = [
        create(database, f"run-{i % 3}", now=T0 + timedelta(seconds=i // 2)) for i in range(8)
    ]
    call(database, runs.request_cancel, created[0].id)
    for sort in ("-created_at", "created_at", "name", "-name", "status", "-status"):
        seen: list[uuid.UUID] = []
        cursor = None
        while True:
            page, cursor = call(database, reads.list_runs, limit=3, cursor=cursor, sort=sort)
            seen.extend(r.id for r in page)
            if cursor is None:
                break
        assert sorted(seen) == sorted(r.id for r in created), sort
        everything, last = call(database, reads.list_runs, limit=100, sort=sort)
        assert last is None and [r.id for r in everything] == seen, sort
        key = sort.lstrip("-")
        values = [getattr(r, key) for r in everything]
        values = [v.value if isinstance(v, RunStatus) else v for v in values]
        assert values == sorted(values, reverse=sort.startswith("-")), sort
    page, _ = call(database, reads.list_runs, status="cancelled")
    assert [r.id for r in page] == [created[0].id]
    with pytest.raises(ValueError, match="sort must be"):
        call(database, reads.list_runs, sort="attempt")
    with pytest.raises(ValueError, match="invalid cursor"):
        call(database, reads.list_runs, cursor="garbage")
    counts = call(database, reads.count_runs_by_status)
    assert counts[S.queued] == 7 and counts[S.cancelled] == 1 and counts[S.running] == 0


# -- concurrency on SQLite ----------------------------------------------------------------------


def test_write_after_a_stale_read_transaction(database):
    """A session that read (opening a read transaction, an old WAL snapshot on SQLite) and
    then writes after another connection committed must not fail with "database is
    locked": write_transaction ends the read and begins with the write lock."""
    run = create(database)
    with database.session() as reader:
        assert reads.list_runs(reader)[0][0].status == S.queued  # read transaction open
        assert call(database, runs.claim_run, run.id, "w1", 60) is not None  # other commit
        done = runs.transition(reader, run.id, S.succeeded, "ok", attempt=1)
        assert done.status == S.succeeded


def test_a_read_transaction_ends_with_its_block(database):
    """service.db.read_transaction: the block reads in a transaction of its own, none is left
    open after it (the next block sees another connection's commit), what it read stays
    readable, and ORM changes pending on the session are refused."""
    run = create(database)
    with database.session() as reader:
        assert reads.list_runs(reader)[0][0].status == S.queued  # read transaction open
        with read_transaction(reader):
            got = reads.get_run(reader, run.id)
        assert not reader.in_transaction()
        assert got.status == S.queued and got.name == "run"
        assert call(database, runs.claim_run, run.id, "w1", 60) is not None  # other commit
        with read_transaction(reader):
            assert reads.get_run(reader, run.id).status == S.running
        reader.add(RunEvent(run_id=run.id, to_status=S.running, message="pending"))
        with pytest.raises(RuntimeError, match="uncommitted ORM changes"):
            with read_transaction(reader):
                pass


def test_writers_in_several_processes_share_one_sqlite_file(tmp_path):
    """Embedded mode: the API and workers are separate processes writing one SQLite file.
    BEGIN IMMEDIATE + busy timeout: every write succeeds, none is lost."""
    import os
    import subprocess
    import sys

    from service.db import migrate, open_database
    from tests.support.db import settings_for

    settings = settings_for(tmp_path)
    migrate(settings)
    code = """
import sys, uuid
from service.db import open_database
from service.settings import Settings
from service import runs
db = open_database(Settings())
worker = sys.argv[1]
for i in range(15):
    with db.session() as s:
        run, _ = runs.create_run(s, name=f"{worker}-{i}", submitted_train={}, submitted_model={},
                                 resolved_train={}, resolved_model={})
        claimed = runs.claim_run(s, run.id, worker, 60)
        runs.record_metrics(s, run.id, [{"step": k, "loss": 1.0} for k in range(20)],
                            attempt=claimed.attempt)
        runs.heartbeat_worker(s, worker)
        runs.transition(s, run.id, "succeeded", attempt=claimed.attempt)
"""
    env = {k: v for k, v in os.environ.items() if not k.startswith("MOEJOBS_")}
    env.update(settings.to_env())
    root = REPO
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", code, f"p{i}"],
            cwd=root,
            env=env,
            stderr=subprocess.PIPE,
            text=True,
        )
        for i in range(2)
    ]
    outcomes = [(p.wait(timeout=300), p.stderr.read()) for p in procs]
    for p in procs:
        p.stderr.close()
    assert [rc for rc, _ in outcomes] == [0, 0], outcomes
    db = open_database(settings)
    try:
        with db.session() as s:
            assert reads.count_runs_by_status(s)[S.succeeded] == 30
            assert s.execute(sa.select(sa.func.count()).select_from(MetricPoint)).scalar() == 600
    finally:
        db.dispose()
