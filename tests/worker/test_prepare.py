"""Data preparation ahead of training (``worker.prepare``): what a training worker decides for a
queued run, the aux worker's preparation (a real subprocess tokenizing real text into the
token cache the training process reads), its failures and cancellation, and, with real worker
processes on the real Redis, a training worker training one run while an aux worker prepares
another run's corpus."""

from __future__ import annotations

import json
import os
import signal
import time
import uuid
from pathlib import Path

import numpy as np
import pytest

from service import reads, runs
from service.contract import read_events
from service.db import migrate, open_database
from service.models import FailureReason, RunStatus
from service.queue import enqueue_prepare, enqueue_run, make_celery
from tests.support.tiny import stdlib_text_files
from tests.support.worker import (
    WorkerProcess,
    build_data,
    create_tiny_run,
    get_run,
    require_redis,
    wait_for,
    worker_settings,
)
from worker import prepare


@pytest.fixture
def deployment(tmp_path):
    """Settings (SQLite, prepare every corpus ahead), a migrated database, a tiny corpus and
    tokenizer; yields (settings, db, corpus, tokenizer)."""
    home = tmp_path / "home"
    settings = worker_settings(
        home,
        f"sqlite:///{home / 'moejobs.sqlite3'}",
        "redis://127.0.0.1:1/0",
        prepare_min_bytes=0,
        token_cache=tmp_path / "token-cache",
    )
    migrate(settings)
    db = open_database(settings)
    corpus, tokenizer = build_data(settings.data_root)
    try:
        yield settings, db, corpus, tokenizer
    finally:
        db.dispose()


class Sent:
    """Collects the messages ``prepare_run`` sends."""

    def __init__(self) -> None:
        self.train: list[uuid.UUID] = []
        self.prepare: list[uuid.UUID] = []


def _prepare(settings, db, run_id, sent: Sent, **kwargs):
    return prepare.prepare_run(
        run_id,
        db=db,
        settings=settings,
        worker_id="aux-test",
        send_train=sent.train.append,
        send_prepare=sent.prepare.append,
        **kwargs,
    )


def _notes(db, run_id) -> list[str]:
    with db.session() as session:
        return [
            e.message
            for e in reads.list_events(session, run_id)
            if e.from_status == e.to_status == RunStatus.queued
        ]


def test_decide_follows_engine_size_marker_lock_and_aux_workers(deployment):
    settings, db, corpus, tokenizer = deployment
    run = create_tiny_run(db, settings, corpus, tokenizer, steps=2)
    run_dir = settings.run_dir(run.id)
    yes, no = (lambda: True), (lambda: False)

    def action(s=settings, aux=yes):
        return prepare.decide(run, s, aux).action

    assert action(settings.model_copy(update={"engine": "stub"})) == "train"
    need = prepare.data_need(run.resolved_train, run.resolved_model, run_dir)
    assert need is not None and need.n_bytes == sum(p.stat().st_size for p in need.train_files)
    assert need.val_files == ()  # no validation configured: the validation text is not tokenized
    assert action(settings.model_copy(update={"prepare_min_bytes": need.n_bytes + 1})) == "train"
    assert action(settings.model_copy(update={"prepare_min_bytes": need.n_bytes})) == "prepare"
    assert action(aux=no) == "train"  # nobody would prepare it
    prepare.write_marker(run_dir, "sent")
    assert action() == "wait"
    assert action(settings.model_copy(update={"queued_stale_seconds": 0.001})) == "prepare"
    with prepare.run_lock(run_dir) as got:  # a preparation under way (another open file)
        assert got and prepare.is_locked(run_dir)
        prepare.write_marker(run_dir, "running")
        assert action() == "wait"
    assert not prepare.is_locked(run_dir)
    assert action() == "prepare"  # running, but nobody holds the lock: its worker died
    prepare.write_marker(run_dir, "failed", message="boom")
    assert action() == "train"
    cache = settings.token_cache / "x.npy"
    prepare.write_marker(run_dir, "done", caches=[str(cache)])
    assert action() == "prepare"  # the cache was removed since
    cache.parent.mkdir(parents=True, exist_ok=True)
    cache.write_bytes(b"")
    assert action() == "train"
    bad = dict(run.resolved_train, data={"init_args": {"train_data_path": "/nonexistent"}})
    assert prepare.data_need(bad, run.resolved_model, run_dir) is None


def test_preparation_fills_the_cache_the_training_process_reads(deployment):
    settings, db, corpus, tokenizer = deployment
    run = create_tiny_run(db, settings, corpus, tokenizer, steps=2)
    sent = Sent()
    outcome = _prepare(settings, db, run.id, sent)
    run_dir = settings.run_dir(run.id)
    assert outcome.state == "ready", (run_dir / "train.log").read_text()
    assert sent.train == [run.id] and sent.prepare == []
    marker = prepare.read_marker(run_dir)
    assert marker["state"] == "done" and marker["tokens"]["train"] > 1000
    (cache,) = [Path(p) for p in marker["caches"]]
    assert cache.parent == settings.token_cache and cache.is_file()
    assert get_run(db, run.id).status == RunStatus.queued  # never claimed: no worker held

    # the ids are the ones the training process computes for itself (another cache folder)
    from worker.data import tokenize_files
    from worker.tokenizer import load_tokenizer

    files = sorted((corpus / "train").glob("*.txt"))
    own = tokenize_files(
        files, load_tokenizer(tokenizer, 1024), tokenizer, 1024, cache_dir=run_dir / "own-cache"
    )
    assert own.path.name == cache.name
    np.testing.assert_array_equal(np.load(cache, mmap_mode="r"), own.tokens)

    events = read_events(run_dir / "out")
    progress = [e for e in events if e.event.value == "data_progress"]
    assert progress and progress[-1].data["done"] is True
    assert progress[-1].data["tokens"] == marker["tokens"]["train"]
    notes = _notes(db, run.id)
    assert notes[0].startswith("preparing data on aux-test: 4 files") and "MB" in notes[0]
    assert notes[1].startswith("data prepared: ") and "training tokens" in notes[1]
    log = (run_dir / "train.log").read_text()
    assert "data preparation: " in log and "data: tokenizing:" in log

    # the training worker now claims it; a second preparation only hashes and finds the cache
    assert prepare.decide(run, settings, lambda: True).action == "train"
    started = time.monotonic()
    again = _prepare(settings, db, run.id, sent)
    assert again.state == "ready" and again.message == "already prepared"
    assert time.monotonic() - started < 5  # no process started (it takes seconds to import)
    assert len(_notes(db, run.id)) == 2


def test_data_the_engine_refuses_fails_the_run_during_preparation(deployment):
    settings, db, corpus, tokenizer = deployment
    bad = settings.data_root / "bad"
    stdlib_text_files(bad / "train", ["textwrap"])
    stdlib_text_files(bad / "val", ["heapq"])
    (bad / "train" / "zz.txt").write_bytes(b"fine text\n\xff\xfe not utf-8\n")
    run = create_tiny_run(db, settings, bad, tokenizer, steps=2)
    sent = Sent()
    outcome = _prepare(settings, db, run.id, sent)
    assert outcome.state == "failed_run", outcome
    failed = get_run(db, run.id)
    assert failed.status == RunStatus.failed and failed.failure_reason == FailureReason.invalid_data
    assert "zz.txt" in failed.failure_message and "not valid UTF-8" in failed.failure_message
    assert sent.train == []
    assert list(settings.token_cache.glob("*.tmp")) == []


def test_a_cancelled_run_stops_its_preparation(deployment):
    settings, db, corpus, tokenizer = deployment
    run = create_tiny_run(db, settings, corpus, tokenizer, steps=2)
    run_dir = settings.run_dir(run.id)
    sent = Sent()

    def cancel_soon() -> bool:  # asked every second while the process runs
        if (run_dir / "train.log").exists() and get_run(db, run.id).status == RunStatus.queued:
            with db.session() as session:
                runs.request_cancel(session, run.id)
        return False

    outcome = _prepare(settings, db, run.id, sent, shutdown=cancel_soon)
    assert outcome.state == "stopped" and outcome.message == "the run is cancelled"
    assert prepare.read_marker(run_dir)["state"] == "stopped"
    assert sent.train == [] and sent.prepare == []
    assert not prepare.is_locked(run_dir)
    assert list(settings.token_cache.glob("*.npy")) == []


def test_a_stopping_worker_hands_the_preparation_on(deployment):
    settings, db, corpus, tokenizer = deployment
    run = create_tiny_run(db, settings, corpus, tokenizer, steps=2)
    sent = Sent()
    outcome = _prepare(settings, db, run.id, sent, shutdown=lambda: True)
    assert outcome.state == "stopped" and outcome.message == "worker stopping"
    assert sent.prepare == [run.id] and sent.train == []
    assert get_run(db, run.id).status == RunStatus.queued


def test_a_training_worker_trains_while_an_aux_worker_prepares(tmp_path):
    """One training worker (role train) and one aux worker (role aux), the litgpt engine, real
    Redis. Run A trains (its process frozen with SIGSTOP, so it keeps the training worker for as
    long as the test needs); run B, whose data is not tokenized, is queued: the aux worker
    prepares it while A holds the training worker, B stays queued and unclaimed meanwhile, and
    the training worker takes B once A is over."""
    broker = require_redis()
    home = tmp_path / "home"
    settings = worker_settings(
        home,
        f"sqlite:///{home / 'moejobs.sqlite3'}",
        broker,
        prepare_min_bytes=0,
        token_cache=tmp_path / "token-cache",
    )
    migrate(settings)
    db = open_database(settings)
    corpus, tokenizer = build_data(settings.data_root)
    other = settings.data_root / "other"  # B's text: not tokenized by A
    stdlib_text_files(other / "train", ["ast", "difflib", "pathlib", "typing"])
    stdlib_text_files(other / "val", ["heapq"])
    trainer = WorkerProcess(
        settings,
        home / "train.log",
        tmp_path / "token-cache",
        extra_env={"MOEJOBS_WORKER_ROLE": "train"},
    )
    aux = WorkerProcess(
        settings,
        home / "aux.log",
        tmp_path / "token-cache",
        extra_env={"MOEJOBS_WORKER_ROLE": "aux"},
    )
    app = make_celery(settings)

    def logs() -> str:
        return f"== train worker\n{trainer.log()}\n== aux worker\n{aux.log()}"

    frozen: int | None = None
    try:
        train_id = trainer.start().wait_registered(db)
        aux_id = aux.start().wait_registered(db)
        with db.session() as session:
            roles = {w.id: w.role for w in reads.live_workers(session, 60)}
            assert roles == {train_id: "train", aux_id: "aux"}
            assert [w.id for w in reads.live_workers(session, 60, role="trains")] == [train_id]

        a = create_tiny_run(
            db, settings, corpus, tokenizer, steps=400, save_interval=None, name="a"
        )
        assert enqueue_prepare(app, a.id).ok and enqueue_run(app, a.id).ok  # as the API does
        a_out = Path(a.resolved_train["out_dir"])
        wait_for(lambda: (a_out / "metrics.csv").is_file(), 300, "run A to train", on_fail=logs)
        frozen = int((settings.run_dir(a.id) / "train.pid").read_text())
        os.kill(frozen, signal.SIGSTOP)
        assert prepare.read_marker(settings.run_dir(a.id))["state"] == "done"

        b = create_tiny_run(db, settings, other, tokenizer, steps=2, name="b")
        assert enqueue_prepare(app, b.id).ok and enqueue_run(app, b.id).ok
        b_dir = settings.run_dir(b.id)
        wait_for(
            lambda: prepare.read_marker(b_dir).get("state") == "done",
            300,
            "the aux worker to prepare B",
            on_fail=logs,
        )
        # B was prepared while A held the training worker, without being claimed
        assert get_run(db, a.id).status == RunStatus.running
        assert get_run(db, b.id).status == RunStatus.queued and get_run(db, b.id).attempt == 0
        with db.session() as session:
            current = {w.id: w.current_run_id for w in reads.live_workers(session, 60)}
        assert current == {train_id: a.id, aux_id: None}
        events = read_events(b_dir / "out")
        assert [e for e in events if e.event.value == "data_progress" and e.data.get("done")]
        assert not [e for e in events if e.event.value == "started"]  # no training process yet
        notes = _notes(db, b.id)
        assert notes[0].startswith(f"preparing data on {aux_id}") and notes[1].startswith(
            "data prepared"
        )

        with db.session() as session:
            runs.request_cancel(session, a.id)
        os.kill(frozen, signal.SIGCONT)
        frozen = None
        wait_for(
            lambda: get_run(db, b.id).status == RunStatus.succeeded,
            300,
            "the training worker to train B",
            on_fail=logs,
        )
        assert get_run(db, a.id).status == RunStatus.cancelled
        b_log = (b_dir / "train.log").read_text()
        tail = b_log.split(f"attempt 1 on worker {train_id}", 1)[1]
        assert "data: tokenizing" not in tail  # the training found the prepared cache
        cache = json.loads((b_dir / prepare.MARKER_FILE).read_text())["caches"][0]
        assert str(cache) in tail
    finally:
        if frozen is not None:
            os.kill(frozen, signal.SIGCONT)
        for worker in (trainer, aux):
            worker.stop()
        db.dispose()


def test_roles_choose_queues_and_only_training_workers_count(deployment):
    from service.queue import aux_queue, train_queue, worker_queues
    from worker.celery_app import worker_argv

    settings, db, *_ = deployment
    queues = {
        role: worker_queues(settings.model_copy(update={"worker_role": role}))
        for role in ("all", "train", "aux")
    }
    assert queues == {
        "all": [train_queue(settings), aux_queue(settings)],
        "train": [train_queue(settings)],
        "aux": [aux_queue(settings)],
    }
    argv = worker_argv(settings.model_copy(update={"worker_role": "aux"}))
    assert argv[argv.index("-Q") + 1] == aux_queue(settings)
    with db.session() as session:
        aux = runs.register_worker(session, "aux-1", "h", role="aux", kind="cpu: x")
        assert (
            len(reads.live_workers(session, 60, role="trains")) == 0
        )  # readiness needs a worker that trains
        assert not reads.worker_can_serve(aux, 1)
        assert reads.live_workers(session, 60, role="trains") == []
        runs.register_worker(
            session,
            "gpu-1",
            "h",
            role="train",
            gpus=[{"index": 0, "name": "NVIDIA H100", "memory_bytes": 80 << 30}],
        )
        assert len(reads.live_workers(session, 60, role="trains")) == 1
        assert [w.id for w in reads.live_workers(session, 60, role="aux")] == ["aux-1"]
        with pytest.raises(ValueError):
            runs.register_worker(session, "x", "h", role="gpu")
