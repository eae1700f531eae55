"""Real worker processes (``python -m worker.celery_app``) on a SQLite database: a worker
killed mid-run (SIGKILL) and the run recovered by another worker's reconciler, resumed from
its checkpoint (Redis broker); and a worker on the embedded defaults (kombu's SQLAlchemy
transport), which has no Celery remote control.

The HTTP end to end on PostgreSQL (success, duplicate message, cancel, smoke test) is in
tests/test_e2e_http.py.
"""
from __future__ import annotations

import uuid
from pathlib import Path

import pytest

from service import runs
from service.db import migrate, open_database
from service.models import FailureReason, RunStatus
from service.queue import enqueue_run, enqueue_tokenizer, make_celery, tokenizer_marker_paths
from test_worker_support import (
    TERMINAL,
    WorkerProcess,
    build_data,
    create_tiny_run,
    csv_rows,
    get_run,
    pid_gone,
    require_redis,
    wait_for,
    worker_settings,
)

pytestmark = pytest.mark.slow


def test_killed_worker_run_is_recovered_and_resumed_by_another_worker(tmp_path):
    broker = require_redis()
    home = tmp_path / "home"
    # Short lease: the reconciler (every lease/2 = 5 s) sees the dead worker's lease expire
    # 10 s after its last heartbeat.
    settings = worker_settings(home, f"sqlite:///{home / 'moejobs.sqlite3'}", broker,
                               lease_seconds=10.0, heartbeat_seconds=1.0,
                               worker_stale_seconds=5.0)
    migrate(settings)
    db = open_database(settings)
    corpus, tokenizer = build_data(settings.data_root)
    token_cache = tmp_path / "token-cache"
    first = WorkerProcess(settings, home / "worker-a.log", token_cache).start()
    second = WorkerProcess(settings, home / "worker-b.log", token_cache)
    try:
        first_id = first.wait_registered(db)
        with db.session() as session:
            row = [w for w in runs.live_workers(session, 60) if w.id == first_id][0]
        assert row.pid == first.pid and row.gpu_count == len(row.gpus)
        sample = settings.data_root / "sample"  # seeded at start-up for the smoke test
        assert (sample / "tokenizer" / "tokenizer.json").is_file()
        assert any((sample / "train").glob("*.txt")) and any((sample / "val").glob("*.txt"))

        run = create_tiny_run(db, settings, corpus, tokenizer, steps=16, save_interval=4)
        assert enqueue_run(make_celery(settings), run.id).ok

        def checkpoint_recorded():
            with db.session() as session:
                return any(c.name == "step-00000004" for c in runs.list_checkpoints(session, run.id))
        wait_for(checkpoint_recorded, 300, "the first checkpoint", on_fail=first.log)
        pid = int((settings.run_dir(run.id) / "train.pid").read_text())
        first.kill()  # like a lost machine: no shutdown, no cleanup
        # the training process dies with its worker (parent-death signal)
        wait_for(lambda: pid_gone(pid), 30, "the orphaned training process to die")
        assert get_run(db, run.id).status == RunStatus.running  # until the lease expires

        second.start()
        second_id = second.wait_registered(db)
        done = wait_for(lambda: (r := get_run(db, run.id)).status in TERMINAL and r, 400,
                        "the recovered run to finish", on_fail=second.log)
        assert done.status == RunStatus.succeeded, done.failure_message
        assert done.attempt == 2 and done.worker_id == second_id
        with db.session() as session:
            events = runs.list_events(session, run.id)
            steps = [p.step for p in runs.list_metrics(session, run.id)]
            names = [c.name for c in runs.list_checkpoints(session, run.id)]
        assert [(e.from_status, e.to_status) for e in events] == [
            (None, RunStatus.queued), (RunStatus.queued, RunStatus.running),
            (RunStatus.running, RunStatus.queued), (RunStatus.queued, RunStatus.running),
            (RunStatus.running, RunStatus.succeeded)]
        lost = events[2]
        assert lost.actor == "reconciler" and "lease expired" in lost.message
        assert f"worker {first_id}" in lost.message
        assert events[3].actor == f"worker:{second_id}" and events[3].attempt == 2
        # resumed from a checkpoint, not started over: every step once, the file agrees
        out = Path(run.resolved_train["out_dir"])
        assert steps == list(range(1, 17))
        assert [int(r["step"]) for r in csv_rows(out / "metrics.csv")] == steps
        log = (settings.run_dir(run.id) / "train.log").read_text()
        assert "attempt 1 on worker" in log and "attempt 2 on worker" in log
        assert "resuming from" in log
        assert names == ["step-00000004", "step-00000008", "step-00000012", "step-00000016",
                         "final"]
        assert first_id not in {w.id for w in _live(db)}

        # a clean stop removes the worker's row
        assert second.stop() == 0
        assert second_id not in {w.id for w in _all_workers(db)}
    finally:
        first.kill()
        second.stop()
        db.dispose()


def test_worker_on_the_embedded_broker(tmp_path):
    """SQLite database + kombu's SQLAlchemy transport (what `moejobs up` uses): the worker
    starts without remote control, skips messages for unknown runs, trains tokenizers."""
    home = tmp_path / "home"
    settings = worker_settings(home, f"sqlite:///{home / 'moejobs.sqlite3'}",
                               f"sqla+sqlite:///{home / 'broker.sqlite3'}")
    migrate(settings)
    db = open_database(settings)
    corpus = settings.data_root / "texts"
    (corpus / "train").mkdir(parents=True)
    (corpus / "train" / "a.txt").write_text(Path(uuid.__file__).read_text())
    worker = WorkerProcess(settings, home / "worker.log", tmp_path / "token-cache").start()
    try:
        worker_id = worker.wait_registered(db)
        app = make_celery(settings)
        ghost = uuid.uuid4()
        assert enqueue_run(app, ghost).ok
        assert enqueue_run(app, "not-a-uuid").ok
        marker, error_file = tokenizer_marker_paths(settings, "tok")
        marker.parent.mkdir(parents=True, exist_ok=True)
        marker.write_text("{}")
        out = settings.data_root / "tokenizers" / "tok"
        assert enqueue_tokenizer(app, name="tok", dataset_dir=corpus, out_dir=out,
                                 vocab_size=600).ok
        _, bad_error = tokenizer_marker_paths(settings, "bad")
        assert enqueue_tokenizer(app, name="bad", dataset_dir=settings.data_root / "none",
                                 out_dir=settings.data_root / "tokenizers" / "bad",
                                 vocab_size=600).ok
        wait_for(lambda: (out / "tokenizer.json").is_file() and not marker.exists()
                 and bad_error.exists(), 120, "the tokenizer tasks", on_fail=worker.log)
        assert not error_file.exists()
        assert "no .txt files" in bad_error.read_text()
        wait_for(lambda: f"run {ghost}: not found" in worker.log()
                 and "not a run id" in worker.log(), 60, "the run messages", on_fail=worker.log)
        assert worker.stop() == 0
        assert worker_id not in {w.id for w in _all_workers(db)}
    finally:
        worker.kill()
        db.dispose()


def test_failure_reason_list_is_what_the_runner_uses():
    """The runner only produces reasons of the fixed list (service.models.FailureReason)."""
    from worker import runner

    assert set(runner._ENGINE_REASONS.values()) <= set(FailureReason)


def _live(db):
    with db.session() as session:
        return runs.live_workers(session, 5)


def _all_workers(db):
    with db.session() as session:
        return runs.live_workers(session, 10**9)
