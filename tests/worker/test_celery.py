"""Real worker processes (``python -m worker.celery_app``) on a SQLite database: a run that
survives a worker's warm shutdown (SIGTERM: re-queued at once) and a killed worker (SIGKILL:
recovered by another worker's reconciler), resuming from its checkpoints each time (Redis
broker); and a worker on the embedded defaults (kombu's SQLAlchemy transport), which has no
Celery remote control.

The HTTP end to end on PostgreSQL (success, duplicate message, cancel, smoke test) is in
tests/e2e/test_http.py.
"""

from __future__ import annotations

import os
import signal
import uuid
from pathlib import Path

import pytest
from sqlmodel import select

from service import reads
from service.db import migrate, open_database
from service.models import FailureReason, RunStatus, Throughput, Worker
from service.queue import (
    enqueue_run,
    enqueue_tokenizer,
    make_celery,
    tokenizer_marker_paths,
)
from tests.support.worker import (
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

STEPS = 48  # optimizer steps of the tiny run that survives two workers


def _disk_step(out: Path) -> int:
    """The last step in ``out/metrics.csv`` (0 before the first row)."""
    try:
        rows = csv_rows(out / "metrics.csv")
    except (OSError, ValueError):
        return 0
    return int(rows[-1]["step"]) if rows else 0


def _new_checkpoint(out: Path, after: int) -> str | None:
    """The name of a complete ``step-XXXXXXXX`` folder past step ``after``, if any."""
    for path in sorted(out.glob("step-*")):
        if path.is_dir() and int(path.name[5:]) > after:
            return path.name
    return None


def test_run_survives_a_worker_shutdown_and_a_killed_worker(tmp_path):
    """Worker A is stopped (SIGTERM): the training checkpoints, the run is re-queued at once.
    Worker B resumes it and is killed (SIGKILL, like a lost machine): the training dies with
    it, the lease expires, worker C's reconciler re-queues the run, C resumes and finishes."""
    broker = require_redis()
    home = tmp_path / "home"
    # Short lease: the reconciler (every lease/2 = 6 s) sees a dead worker's lease expire
    # 12 s after its last heartbeat.
    settings = worker_settings(
        home,
        f"sqlite:///{home / 'moejobs.sqlite3'}",
        broker,
        lease_seconds=12.0,
        heartbeat_seconds=1.0,
        worker_stale_seconds=5.0,
    )
    migrate(settings)
    db = open_database(settings)
    corpus, tokenizer = build_data(settings.data_root)
    token_cache = tmp_path / "token-cache"
    workers = {
        name: WorkerProcess(settings, home / f"worker-{name}.log", token_cache) for name in "abc"
    }

    def logs() -> str:
        return "\n".join(f"== worker {n}\n{w.log()}" for n, w in workers.items())

    def checkpoints():
        with db.session() as session:
            return {c.name: c.step for c in reads.list_checkpoints(session, run.id)}

    try:
        a_id = workers["a"].start().wait_registered(db)
        with db.session() as session:
            row = [w for w in reads.live_workers(session, 60) if w.id == a_id][0]
        assert row.pid == workers["a"].pid and row.gpu_count == len(row.gpus)
        sample = settings.data_root / "sample"  # seeded at start-up for the smoke test
        assert (sample / "tokenizer" / "tokenizer.json").is_file()
        assert any((sample / "train").glob("*.txt")) and any((sample / "val").glob("*.txt"))

        run = create_tiny_run(db, settings, corpus, tokenizer, steps=STEPS, save_interval=4)
        assert enqueue_run(make_celery(settings), run.id).ok
        run_dir = settings.run_dir(run.id)
        out = Path(run.resolved_train["out_dir"])

        # 1. warm shutdown of A mid-run. A tiny step takes milliseconds on a quiet CPU, so
        # the training is frozen (SIGSTOP) while the test looks at the database: nothing
        # here depends on how fast the machine is.
        wait_for(
            lambda: (out / "step-00000004").is_dir(),
            300,
            "the first checkpoint on disk",
            poll=0.01,
            on_fail=logs,
        )
        pid_a = int((run_dir / "train.pid").read_text())
        os.kill(pid_a, signal.SIGSTOP)
        wait_for(
            lambda: "step-00000004" in checkpoints(), 60, "the first checkpoint's row", on_fail=logs
        )
        os.kill(pid_a, signal.SIGCONT)
        wait_for(lambda: _disk_step(out) >= 6, 60, "step 6 in metrics.csv", poll=0.01)
        os.kill(pid_a, signal.SIGSTOP)
        workers["a"].proc.send_signal(signal.SIGTERM)  # warm shutdown
        wait_for(
            lambda: "worker shutting down: SIGTERM" in (run_dir / "train.log").read_text(),
            60,
            "A to pass the shutdown on to its training",
            on_fail=logs,
        )
        os.kill(pid_a, signal.SIGCONT)  # the pending SIGTERM lands: checkpoint, exit 75
        assert workers["a"].proc.wait(timeout=120) == 0, logs()
        assert pid_gone(pid_a)
        after_a = get_run(db, run.id)
        assert after_a.status == RunStatus.queued and after_a.exit_code == 75
        stopped_at = max(s for s in checkpoints().values())  # the SIGTERM checkpoint
        assert stopped_at >= 6
        assert a_id not in {w.id for w in _all_workers(db)}  # deregistered

        # 2. B resumes it (A re-sent the message) and is killed after its own checkpoint
        b_id = workers["b"].start().wait_registered(db)
        b_ckpt = wait_for(
            lambda: _new_checkpoint(out, stopped_at),
            300,
            "a checkpoint of worker B on disk",
            poll=0.01,
            on_fail=logs,
        )
        pid_b = int((run_dir / "train.pid").read_text())
        assert pid_b != pid_a
        os.kill(pid_b, signal.SIGSTOP)  # frozen mid-run until B dies, so B never finishes
        wait_for(lambda: b_ckpt in checkpoints(), 60, "B's checkpoint's row", on_fail=logs)
        workers["b"].kill()
        wait_for(lambda: pid_gone(pid_b), 30, "B's training process to die with B")
        assert get_run(db, run.id).status == RunStatus.running  # until the lease expires

        # 3. C's reconciler recovers the run; C resumes and finishes it
        c_id = workers["c"].start().wait_registered(db)
        done = wait_for(
            lambda: (r := get_run(db, run.id)).status in TERMINAL and r,
            400,
            "the recovered run to finish",
            on_fail=logs,
        )
        assert done.status == RunStatus.succeeded, done.failure_message
        assert done.attempt == 3 and done.worker_id == c_id
        with db.session() as session:
            events = reads.list_events(session, run.id)
            points = reads.list_metrics(session, run.id)
        steps = [p.step for p in points]
        S = RunStatus
        assert [(e.from_status, e.to_status) for e in events] == [
            (None, S.queued),
            (S.queued, S.running),
            (S.running, S.queued),
            (S.queued, S.running),
            (S.running, S.queued),
            (S.queued, S.running),
            (S.running, S.succeeded),
        ]
        assert events[2].actor == f"worker:{a_id}" and "shutting down" in events[2].message
        assert events[4].actor == "reconciler" and "lease expired" in events[4].message
        assert f"worker {b_id}" in events[4].message
        assert [e.attempt for e in events if e.to_status == S.running] == [1, 2, 3]
        # resumed from checkpoints, never started over: every step once, the file agrees
        assert steps == list(range(1, STEPS + 1))
        file_rows = csv_rows(out / "metrics.csv")
        assert [int(r["step"]) for r in file_rows] == steps
        # the steps B trained past its checkpoint were trained again by C: the rows are C's
        assert [p.loss for p in points] == pytest.approx(
            [float(r["loss"]) for r in file_rows], rel=1e-5
        )
        log = (run_dir / "train.log").read_text()
        assert all(f"attempt {n} on worker" in log for n in (1, 2, 3))
        assert log.count("resuming from") == 2
        assert {"step-00000004", f"step-{STEPS:08d}", "final"} <= set(checkpoints())
        assert b_id not in {w.id for w in _live(db)}
        # calibration: the speed the run reached, filed under the kind of the worker that
        # finished it (tokens / elapsed_s of its last metric row; one device)
        with db.session() as session:
            (speed,) = session.exec(select(Throughput)).all()
            kind = session.get(Worker, c_id).kind
        assert kind and speed.worker_kind == kind and speed.runs == 1
        assert speed.tokens_per_sec_per_device == pytest.approx(
            points[-1].tokens / points[-1].elapsed_s
        )

        # a clean stop removes the worker's row
        assert workers["c"].stop() == 0
        assert c_id not in {w.id for w in _all_workers(db)}
    finally:
        for worker in workers.values():
            worker.kill()
        db.dispose()


def test_worker_on_the_embedded_broker(tmp_path):
    """SQLite database + kombu's SQLAlchemy transport (what `moejobs up` uses): the worker
    starts without remote control, skips messages for unknown runs, trains tokenizers."""
    home = tmp_path / "home"
    settings = worker_settings(
        home, f"sqlite:///{home / 'moejobs.sqlite3'}", f"sqla+sqlite:///{home / 'broker.sqlite3'}"
    )
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
        assert enqueue_tokenizer(
            app, name="tok", dataset_dir=corpus, out_dir=out, vocab_size=600
        ).ok
        _, bad_error = tokenizer_marker_paths(settings, "bad")
        assert enqueue_tokenizer(
            app,
            name="bad",
            dataset_dir=settings.data_root / "none",
            out_dir=settings.data_root / "tokenizers" / "bad",
            vocab_size=600,
        ).ok
        wait_for(
            lambda: (
                (out / "tokenizer.json").is_file() and not marker.exists() and bad_error.exists()
            ),
            120,
            "the tokenizer tasks",
            on_fail=worker.log,
        )
        assert not error_file.exists()
        assert "no .txt files" in bad_error.read_text()
        wait_for(
            lambda: f"run {ghost}: not found" in worker.log() and "not a run id" in worker.log(),
            60,
            "the run messages",
            on_fail=worker.log,
        )
        assert worker.stop() == 0
        assert worker_id not in {w.id for w in _all_workers(db)}
    finally:
        worker.kill()
        db.dispose()


def test_failure_reasons_have_one_home():
    """The database's failure reasons are the contract's (service.contract.FailureReason)."""
    from service import contract, models

    assert models.FailureReason is contract.FailureReason
    assert set(contract.RETRYABLE_REASONS) | set(contract.PERMANENT_REASONS) == set(FailureReason)


def _live(db):
    with db.session() as session:
        return reads.live_workers(session, 5)


def _all_workers(db):
    with db.session() as session:
        return reads.live_workers(session, 10**9)
