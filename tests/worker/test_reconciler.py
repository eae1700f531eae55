"""The reconciler (worker/reconciler.py) and the worker registry (worker/registry.py) against
real databases (SQLite and PostgreSQL) and the real Redis; time is moved with ``now=``."""

from __future__ import annotations

import base64
import json
import shutil
import subprocess
import sys
import uuid
from datetime import timedelta

import pytest
import redis
import sqlalchemy as sa

from service import reads, runs
from service.models import FailureReason, RunStatus, Worker, utcnow
from service.queue import TRAIN_TASK, make_celery
from tests.support import REPO
from tests.support.db import settings_for
from tests.support.worker import require_redis
from worker.reconciler import interval_seconds, reconcile
from worker.registry import (
    WorkerRuntime,
    ensure_sample_data,
    host_memory_bytes,
    owned_gpus,
    sample_paths,
    worker_kind,
)


@pytest.fixture
def deployment(tmp_path, database):
    broker = require_redis()
    settings = settings_for(
        tmp_path,
        database.engine.url.render_as_string(hide_password=False),
        celery_queue=f"test-rec-{uuid.uuid4().hex[:10]}",
        lease_seconds=30,
        heartbeat_seconds=5,
        worker_stale_seconds=20,
        queued_stale_seconds=60,
        max_attempts=2,
    )
    settings = settings.model_copy(update={"broker_url": broker})
    client = redis.Redis.from_url(broker)
    yield settings, database, make_celery(settings), client
    client.delete(settings.celery_queue)


def _queued_ids(client, queue: str) -> list[str]:
    ids = []
    for raw in client.lrange(queue, 0, -1):
        message = json.loads(raw)
        assert message["headers"]["task"] == TRAIN_TASK
        args, _kwargs, _embed = json.loads(base64.b64decode(message["body"]))
        ids.append(args[0])
    return ids


def _run(db, name="r", preset=None):
    train, model = {"out_dir": "/nowhere"}, {"name": "m"}
    with db.session() as session:
        run, _ = runs.create_run(
            session,
            name=name,
            submitted_train=train,
            submitted_model=model,
            resolved_train=train,
            resolved_model=model,
            preset=preset,
        )
    return run


def _claim(db, run, worker="lost-worker", lease=30, now=None):
    with db.session() as session:
        return runs.claim_run(session, run.id, worker, lease, now=now)


def test_expired_lease_requeues_and_enqueues(deployment):
    settings, db, app, client = deployment
    run = _run(db)
    _claim(db, run)
    assert not reconcile(settings, db=db, celery_app=app)  # lease still valid: nothing
    later = utcnow() + timedelta(seconds=31)
    summary = reconcile(settings, db=db, celery_app=app, now=later)
    assert summary.requeued == [str(run.id)] and not summary.errors
    with db.session() as session:
        current = reads.get_run(session, run.id)
        last = reads.list_events(session, run.id)[-1]
    assert current.status == RunStatus.queued and current.worker_id is None
    assert (last.actor, last.from_status, last.to_status) == (
        "reconciler",
        RunStatus.running,
        RunStatus.queued,
    )
    assert "lost-worker" in last.message
    assert _queued_ids(client, settings.celery_queue) == [str(run.id)]
    # a second pass finds nothing more to do
    assert not reconcile(settings, db=db, celery_app=app, now=later)


def test_expired_lease_after_the_last_attempt_fails_lost_worker(deployment):
    settings, db, app, client = deployment
    run = _run(db)
    for attempt in (1, 2):  # max_attempts = 2
        t0 = utcnow() + timedelta(seconds=100 * attempt)
        assert _claim(db, run, now=t0).attempt == attempt
        summary = reconcile(settings, db=db, celery_app=app, now=t0 + timedelta(seconds=31))
    assert summary.finished == [str(run.id)] and not summary.requeued
    with db.session() as session:
        current = reads.get_run(session, run.id)
    assert current.status == RunStatus.failed
    assert current.failure_reason == FailureReason.lost_worker
    assert _queued_ids(client, settings.celery_queue) == [str(run.id)]  # only the first retry


def test_expired_lease_of_a_cancelled_run_ends_cancelled(deployment):
    settings, db, app, client = deployment
    run = _run(db)
    _claim(db, run)
    with db.session() as session:
        runs.request_cancel(session, run.id)
    summary = reconcile(settings, db=db, celery_app=app, now=utcnow() + timedelta(seconds=31))
    assert summary.finished == [str(run.id)]
    with db.session() as session:
        assert reads.get_run(session, run.id).status == RunStatus.cancelled
    assert _queued_ids(client, settings.celery_queue) == []


def test_stale_queued_run_is_sent_again_while_a_worker_is_idle(deployment):
    settings, db, app, client = deployment
    run = _run(db)
    later = utcnow() + timedelta(seconds=61)
    # no live worker: nothing is sent (nobody could take it; the message may still exist)
    assert not reconcile(settings, db=db, celery_app=app, now=later)
    with db.session() as session:
        runs.register_worker(session, "busy", "h", now=later)
        busy_run = _run(db, "busy-run")
        runs.claim_run(session, busy_run.id, "busy", 300, now=later)
    # every live worker busy: the message is waiting, not lost
    assert not reconcile(settings, db=db, celery_app=app, now=later)
    with db.session() as session:
        runs.register_worker(session, "idle", "h", now=later)
    summary = reconcile(settings, db=db, celery_app=app, now=later)
    assert summary.reenqueued == [str(run.id)]
    assert _queued_ids(client, settings.celery_queue) == [str(run.id)]
    # marked as enqueued now: not sent again before another stale period
    assert not reconcile(settings, db=db, celery_app=app, now=later + timedelta(seconds=30))
    with db.session() as session:
        assert reads.get_run(session, run.id).status == RunStatus.queued


def test_broker_down_is_reported_and_the_run_stays_queued(deployment):
    settings, db, _, _ = deployment
    down = settings.model_copy(update={"broker_url": "redis://127.0.0.1:1/0"})
    run = _run(db)
    _claim(db, run)
    summary = reconcile(
        down, db=db, celery_app=make_celery(down), now=utcnow() + timedelta(seconds=31)
    )
    assert summary.errors and str(run.id) in summary.errors[0] and not summary.requeued
    with db.session() as session:
        assert reads.get_run(session, run.id).status == RunStatus.queued


def test_a_queued_smoke_test_is_cancelled_while_no_worker_trains(deployment):
    # What GET /smoke-test/{id} did before it lost its side effect: the reconciler does it now.
    settings, db, app, client = deployment
    smoke = _run(db, "smoke-test-1", preset=reads.SMOKE_TEST_PRESET)
    plain = _run(db, "plain")
    now = utcnow()
    with db.session() as session:
        runs.register_worker(session, "trainer", "h", role="train", now=now)
    # a worker that trains is live: the smoke test waits for it
    assert not reconcile(settings, db=db, celery_app=app, now=now)
    # the trainer's heartbeat is stale (worker_stale_seconds = 20); only an aux worker is live
    later = now + timedelta(seconds=21)
    with db.session() as session:
        runs.register_worker(session, "aux", "h", role="aux", now=later)
    summary = reconcile(settings, db=db, celery_app=app, now=later)
    assert summary.cancelled == [str(smoke.id)] and not summary.errors
    with db.session() as session:
        current = reads.get_run(session, smoke.id)
        last = reads.list_events(session, smoke.id)[-1]
        assert reads.get_run(session, plain.id).status == RunStatus.queued  # not a smoke test
    assert current.status == RunStatus.cancelled and current.cancel_requested
    assert (last.actor, last.from_status, last.to_status) == (
        "reconciler",
        RunStatus.queued,
        RunStatus.cancelled,
    )
    assert last.message == f"smoke test failed: {reads.SMOKE_TEST_NO_WORKER}"
    assert not reconcile(settings, db=db, celery_app=app, now=later)  # nothing more to do
    # a smoke test already claimed is left alone, trainer or not
    running = _run(db, "smoke-test-2", preset=reads.SMOKE_TEST_PRESET)
    _claim(db, running, lease=300, now=later)
    assert not reconcile(settings, db=db, celery_app=app, now=later)
    with db.session() as session:
        assert reads.get_run(session, running.id).status == RunStatus.running
    assert _queued_ids(client, settings.celery_queue) == []


def test_interval_follows_the_lease_and_stale_periods(tmp_path):
    assert interval_seconds(settings_for(tmp_path)) == 60.0
    assert (
        interval_seconds(
            settings_for(tmp_path, lease_seconds=10, heartbeat_seconds=1, worker_stale_seconds=5)
        )
        == 5.0
    )
    assert (
        interval_seconds(
            settings_for(tmp_path, lease_seconds=1, heartbeat_seconds=0.2, worker_stale_seconds=5)
        )
        == 1.0
    )


# -- registry -----------------------------------------------------------------------------------


def test_owned_gpus_narrows_to_the_listed_indices(tmp_path):
    found = [{"index": i, "name": f"GPU {i}", "memory_bytes": (80 + i) << 30} for i in range(4)]
    assert owned_gpus(settings_for(tmp_path), found) == (found, None)
    owned, visible = owned_gpus(settings_for(tmp_path, worker_gpus="3,1"), found)
    assert [g["index"] for g in owned] == [3, 1] and visible == "3,1"
    owned, visible = owned_gpus(settings_for(tmp_path, worker_gpus="1,7"), found)
    assert [g["index"] for g in owned] == [1] and visible == "1"


def test_runtime_registers_heartbeats_and_deregisters(tmp_path, database):
    settings = settings_for(tmp_path, database.engine.url.render_as_string(hide_password=False))
    runtime = WorkerRuntime(settings, worker_id="rt-1", reconcile=False)
    runtime.start(seed_sample=False)
    try:
        with database.session() as session:
            (row,) = [w for w in reads.live_workers(session, 60) if w.id == "rt-1"]
            first = row.heartbeat_at
            runs.deregister_worker(session, "rt-1")  # pruned by someone: heartbeat re-registers
        runtime.heartbeat()
        with database.session() as session:
            (row,) = [w for w in reads.live_workers(session, 60) if w.id == "rt-1"]
        assert row.heartbeat_at >= first and row.gpu_count == len(runtime.gpus)
        assert runtime.info.hardware["gpus"] == [
            {k: g.get(k) for k in ("index", "name", "memory_bytes")} for g in runtime.gpus
        ]
        # what admission compares runs with: the kind, the host's memory, the free space
        assert row.kind == worker_kind(runtime.gpus) and row.kind
        assert row.kind.startswith("cpu: ") == (not runtime.gpus)
        assert row.host_memory_bytes == host_memory_bytes() and row.host_memory_bytes > 2**28
        free = shutil.disk_usage(settings.runs_dir).free
        assert abs(row.free_bytes - free) < 2**30
        with database.session() as session:  # the heartbeat renews the free space
            session.execute(sa.update(Worker).where(Worker.id == "rt-1").values(free_bytes=1))
            session.commit()
        runtime.heartbeat()
        with database.session() as session:
            (row,) = [w for w in reads.live_workers(session, 60) if w.id == "rt-1"]
        assert abs(row.free_bytes - free) < 2**30
    finally:
        runtime.stop()
    with database.session() as session:
        assert "rt-1" not in {w.id for w in reads.live_workers(session, 10**9)}
    assert runtime.shutdown.is_set()


def test_runtime_refuses_an_unmigrated_database(tmp_path):
    settings = settings_for(tmp_path)  # a new SQLite file, never migrated
    runtime = WorkerRuntime(settings, worker_id="rt-2", reconcile=False)
    with pytest.raises(RuntimeError, match="moejobs migrate"):
        runtime.start(seed_sample=False)
    runtime.stop()


def test_sample_data_seeded_once_by_concurrent_workers(tmp_path):
    settings = settings_for(tmp_path)
    code = (
        f"import sys; sys.path.insert(0, {str(REPO)!r})\n"
        "from tests.support.db import settings_for\nfrom pathlib import Path\n"
        "from worker.registry import ensure_sample_data\n"
        f"ensure_sample_data(settings_for(Path({str(tmp_path)!r})))\n"
    )
    procs = [
        subprocess.Popen([sys.executable, "-c", code], stderr=subprocess.PIPE, text=True)
        for _ in range(2)
    ]
    for proc in procs:
        _, err = proc.communicate(timeout=300)
        assert proc.returncode == 0, err
    paths = sample_paths(settings)
    assert any(paths["train"].glob("*.txt")) and any(paths["val"].glob("*.txt"))
    assert (paths["tokenizer"] / "tokenizer.json").is_file()
    root = paths["train"].parent
    assert sorted(p.name for p in root.iterdir()) == ["tokenizer", "train", "val"]
    assert not [p for p in root.parent.iterdir() if p.name.startswith(".tmp-")]
    before = (paths["tokenizer"] / "tokenizer.json").stat().st_mtime_ns
    assert ensure_sample_data(settings) == paths  # complete: nothing rebuilt
    assert (paths["tokenizer"] / "tokenizer.json").stat().st_mtime_ns == before
