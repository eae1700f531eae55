"""The runner (worker/runner.py and the modules it uses: outcome, ingest, retention,
provenance) without Celery: real subprocesses, a real database.

Small Python scripts stand in for the training engine (``execute_attempt(command=...)``): they
exit with the engine's codes, write its ``result.json`` (``service.contract``), metrics.csv / router.csv and
checkpoint folders the way it does (temporary name, then rename), and handle SIGTERM by
"checkpointing" and exiting 75. The real engine runs in tests/worker/test_celery.py.
"""

from __future__ import annotations

import csv
import os
import signal
import sys
import textwrap
import threading
import time
import uuid
from datetime import timedelta
from pathlib import Path

import pytest

from service import reads, runs
from service.db import Database, migrate, open_database
from service.models import FailureReason, RunProvenance, RunStatus, utcnow
from tests.support.db import settings_for
from worker.ingest import CsvTail
from worker.outcome import Outcome, OutcomeKind, classify_exit, finish_attempt
from worker.retention import checkpoint_folders
from worker.runner import WorkerInfo, execute_attempt, write_configs

WORKER = "test-worker"

#: A stand-in engine. argv: steps, seconds per step, save_interval, on_sigterm ("exit75" |
#: "ignore"). Writes out_dir/metrics.csv (each row in two writes, to leave partial lines
#: around), out_dir/router.csv, out_dir/step-XXXXXXXX/ and out_dir/final/ like the engine.
FAKE_ENGINE = textwrap.dedent("""
    import json, os, signal, sys, time
    from pathlib import Path
    steps, pause, save_every, on_term = int(sys.argv[1]), float(sys.argv[2]), int(sys.argv[3]), sys.argv[4]
    out = Path(os.environ["FAKE_OUT_DIR"])
    out.mkdir(parents=True, exist_ok=True)
    stop = []
    if len(sys.argv) > 5 and sys.argv[5] == "fence":  # the engine's own watchdog
        from worker import fence
        fence.install(out)
    if on_term == "ignore":
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
    else:
        signal.signal(signal.SIGTERM, lambda *a: stop.append(1))

    def save(name, step):
        tmp = out / f".tmp-{name}-{os.getpid()}"
        tmp.mkdir()
        (tmp / "lit_model.pth").write_bytes(b"w" * 1000)
        (tmp / "training_state.json").write_text(json.dumps({"step": step}))
        if (out / name).exists():
            os.replace(out / name, out / f".old-{name}")
        os.replace(tmp, out / name)

    with open(out / "metrics.csv", "w") as m, open(out / "router.csv", "w") as r:
        m.write("step,tokens,loss,learning_rate,grad_norm,tokens_per_sec,mfu,elapsed_s,val_loss,val_ppl\\n")
        r.write("step,layer,expert,fraction\\n")
        m.flush(); r.flush()
        for step in range(1, steps + 1):
            m.write(f"{step},{step * 128},{10.0 / step:.6g},0.001,"); m.flush()
            time.sleep(pause / 2)
            m.write(f"0.5,1000,,{step * pause:.3f},,\\n"); m.flush()
            for layer in range(2):
                for expert in range(4):
                    r.write(f"{step},{layer},{expert},0.25\\n")
            r.flush()
            print(f"step {step}", flush=True)
            time.sleep(pause / 2)
            if stop:
                save(f"step-{step:08d}", step)
                print(f"error: interrupted: stopped by SIGTERM after optimizer step {step}", file=sys.stderr, flush=True)
                sys.exit(75)
            if save_every and step % save_every == 0:
                save(f"step-{step:08d}", step)
        save("final", steps)
""")


@pytest.fixture
def sqlite_db(tmp_path: Path):
    settings = settings_for(tmp_path)
    migrate(settings)
    db = open_database(settings)
    yield db
    db.dispose()


def _settings(tmp_path: Path, db: Database, **overrides):
    values = dict(
        heartbeat_seconds=0.5,
        lease_seconds=30,
        worker_stale_seconds=5,
        cancel_grace_seconds=20,
        keep_checkpoints=0,
    )
    values.update(overrides)
    return settings_for(tmp_path, db.engine.url.render_as_string(hide_password=False), **values)


def _claimed_run(
    db: Database,
    settings,
    tmp_path: Path,
    *,
    max_attempts_used: int = 0,
    write_checkpoints: bool = True,
):
    run_id = uuid.uuid4()
    data = tmp_path / "data" / "train"
    data.mkdir(parents=True, exist_ok=True)
    (data / "a.txt").write_text("some text\n")
    train = {
        "out_dir": str(settings.run_dir(run_id) / "out"),
        "seed": 7,
        "resume": "auto",
        "tokenizer_dir": None,
        "data": {"init_args": {"train_data_path": str(data), "val_data_path": None}},
    }
    model = {"name": "tiny"}
    with db.session() as session:
        runs.create_run(
            session,
            name="t",
            submitted_train=train,
            submitted_model=model,
            resolved_train=train,
            resolved_model=model,
            run_id=run_id,
            write_checkpoints=write_checkpoints,
        )
        run = runs.claim_run(session, run_id, WORKER, settings.lease_seconds)
    assert run is not None
    return run


def _script(tmp_path: Path, body: str) -> list[str]:
    path = tmp_path / f"engine_{uuid.uuid4().hex[:8]}.py"
    path.write_text(textwrap.dedent(body))
    return [sys.executable, str(path)]


def _engine(tmp_path: Path, steps: int, pause: float, save_every: int, on_term: str = "exit75"):
    path = tmp_path / "fake_engine.py"
    path.write_text(FAKE_ENGINE)
    return [sys.executable, str(path), str(steps), str(pause), str(save_every), on_term]


def _run(db, settings, run, command, info=None, out_env=True):
    info = info or WorkerInfo(worker_id=WORKER)
    if out_env:
        os.environ["FAKE_OUT_DIR"] = run.resolved_train["out_dir"]
    try:
        outcome = execute_attempt(run, db, settings, info, poll_seconds=0.1, command=command)
    finally:
        os.environ.pop("FAKE_OUT_DIR", None)
    moved = finish_attempt(db, run.id, run.attempt, outcome, settings=settings, worker_id=WORKER)
    return outcome, moved


def _pid_gone(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    return False


def _csv_rows(path: Path) -> list[dict[str, str]]:
    with open(path, newline="") as fh:
        return list(csv.DictReader(fh))


def _wait_for(predicate, timeout: float = 30.0, what: str = "condition"):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.05)
    raise AssertionError(f"timed out waiting for {what}")


# -- classification of real exits --------------------------------------------------------------


def _result(outcome: str, reason: str | None, message: str, code: int) -> str:
    """Script lines that write the engine's result.json into FAKE_OUT_DIR and exit ``code``."""
    return (
        "import os, sys\nfrom service.contract import EngineResult\n"
        f"EngineResult(outcome={outcome!r}, reason={reason!r}, message={message!r}, "
        f"exit_code={code}, attempt=int(os.environ['MOEJOBS_ATTEMPT'])"
        ").write(os.environ['FAKE_OUT_DIR'])\n"
        f"sys.exit({code})"
    )


CASES = {
    "ok": ("import sys; sys.exit(0)", OutcomeKind.succeeded, None, "training finished", 0),
    "ok-result": (
        _result("succeeded", None, "trained 8 steps", 0),
        OutcomeKind.succeeded,
        None,
        "trained 8 steps",
        0,
    ),
    "invalid-config": (
        _result("failed", "invalid_config", "train.micro_batch_size: must be at least 1", 2),
        OutcomeKind.failed,
        FailureReason.invalid_config,
        "train.micro_batch_size: must be at least 1",
        2,
    ),
    "invalid-config-no-result": (
        "import sys\nprint('devices: 4 GPUs requested but this machine has 0 visible', "
        "file=sys.stderr)\nsys.exit(2)",
        OutcomeKind.failed,
        FailureReason.invalid_config,
        "devices: 4 GPUs requested",
        2,
    ),
    "invalid-data": (
        _result("failed", "invalid_data", "/d/train: no .txt files at the top level", 1),
        OutcomeKind.failed,
        FailureReason.invalid_data,
        "/d/train: no .txt files",
        1,
    ),
    "out-of-memory": (
        _result("failed", "out_of_memory", "CUDA out of memory. Tried to allocate 2.00 GiB", 1),
        OutcomeKind.failed,
        FailureReason.out_of_memory,
        "CUDA out of memory",
        1,
    ),
    "no-space": (
        _result("failed", "no_space", "no space left on /runs/x/out (12 KiB free)", 1),
        OutcomeKind.failed,
        FailureReason.no_space,
        "no space left on /runs/x/out",
        1,
    ),
    "crash-traceback": (
        "def f():\n    raise RuntimeError('boom in the loop')\nf()",
        OutcomeKind.failed,
        FailureReason.crashed,
        "RuntimeError: boom in the loop",
        1,
    ),
    "crash-result": (
        _result("failed", "crashed", "ValueError: bad shape", 1),
        OutcomeKind.failed,
        FailureReason.crashed,
        "ValueError: bad shape",
        1,
    ),
    "other-exit-code": (
        "import sys; print('something odd', flush=True); sys.exit(3)",
        OutcomeKind.failed,
        FailureReason.crashed,
        "something odd",
        3,
    ),
    # an error line that looks like the engine's is just text: only result.json counts
    "log-text-is-not-a-reason": (
        "import sys\nprint('error: out_of_memory: not really', file=sys.stderr)\nsys.exit(1)",
        OutcomeKind.failed,
        FailureReason.crashed,
        "error: out_of_memory: not really",
        1,
    ),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_exit_classification_and_outcome(case, tmp_path, sqlite_db):
    body, kind, reason, message, code = CASES[case]
    settings = _settings(tmp_path, sqlite_db)
    run = _claimed_run(sqlite_db, settings, tmp_path)
    outcome, moved = _run(sqlite_db, settings, run, _script(tmp_path, body))
    assert (outcome.kind, outcome.reason, outcome.exit_code) == (kind, reason, code)
    assert message in outcome.message
    assert moved.status == RunStatus(kind)
    assert moved.failure_reason == reason and moved.exit_code == code
    if reason is not None:
        assert message in moved.failure_message
    log = (settings.run_dir(run.id) / "train.log").read_text()
    assert f"exit code {code}: {kind}" in log


def test_killed_by_signal_is_retried_then_fails(tmp_path, sqlite_db):
    settings = _settings(tmp_path, sqlite_db, max_attempts=2)
    body = "import os, signal\nprint('step 1', flush=True)\nos.kill(os.getpid(), signal.SIGKILL)"
    run = _claimed_run(sqlite_db, settings, tmp_path)
    outcome, moved = _run(sqlite_db, settings, run, _script(tmp_path, body))
    assert (outcome.kind, outcome.reason, outcome.exit_code) == (
        OutcomeKind.failed,
        FailureReason.killed,
        -signal.SIGKILL,
    )
    assert "SIGKILL" in outcome.message
    assert moved.status == RunStatus.queued  # attempt 1 of 2: retried

    with sqlite_db.session() as session:
        run = runs.claim_run(session, run.id, WORKER, settings.lease_seconds)
    assert run.attempt == 2
    outcome, moved = _run(sqlite_db, settings, run, _script(tmp_path, body))
    assert moved.status == RunStatus.failed and moved.failure_reason == FailureReason.killed
    with sqlite_db.session() as session:
        assert "giving up" in reads.list_events(session, run.id)[-1].message


def test_exit_75_without_shutdown_counts_as_killed(tmp_path, sqlite_db):
    settings = _settings(tmp_path, sqlite_db)
    run = _claimed_run(sqlite_db, settings, tmp_path)
    outcome, moved = _run(
        sqlite_db,
        settings,
        run,
        _script(
            tmp_path, _result("interrupted", None, "stopped by SIGTERM after optimizer step 3", 75)
        ),
    )
    assert (outcome.reason, outcome.exit_code) == (FailureReason.killed, 75)
    assert moved.status == RunStatus.queued and moved.failures == 1


def test_a_stale_result_of_an_earlier_attempt_is_not_read(tmp_path, sqlite_db):
    """Attempt 1 left a result.json saying invalid_data; attempt 2's process is SIGKILLed
    before writing one: the outcome is killed, not the stale reason."""
    from service.contract import EngineResult

    settings = _settings(tmp_path, sqlite_db)
    run = _claimed_run(sqlite_db, settings, tmp_path)
    out = Path(run.resolved_train["out_dir"])
    EngineResult(
        outcome="failed", reason="invalid_data", message="old", exit_code=1, attempt=0
    ).write(out)
    body = "import os, signal\nos.kill(os.getpid(), signal.SIGKILL)"
    outcome, _ = _run(sqlite_db, settings, run, _script(tmp_path, body))
    assert outcome.reason == FailureReason.killed
    assert not (out / "result.json").exists()


def test_classify_exit_rules():
    """Cases the scripts above cannot produce cheaply (OOM killer evidence, flags)."""
    from service.contract import EngineResult

    done = EngineResult(
        outcome="interrupted",
        message="stopped",
        exit_code=75,
        steps=12,
        checkpoint="/r/out/step-00000012",
    )
    assert (
        classify_exit(-9, None, ["step 3"], oom_killed=True).reason == FailureReason.out_of_memory
    )
    assert classify_exit(137, None, ["step 3"]).reason == FailureReason.killed  # 128 + SIGKILL
    assert classify_exit(137, None, [], oom_killed=True).reason == FailureReason.out_of_memory
    assert classify_exit(-15, None, []).reason == FailureReason.killed
    requeue = classify_exit(75, done, [], shutting_down=True)
    assert type(requeue.kind) is OutcomeKind and requeue.status == RunStatus.queued
    assert requeue.kind == OutcomeKind.requeue and "graceful stop" in requeue.message
    assert "step-00000012" in requeue.message
    assert (
        classify_exit(143, None, [], shutting_down=True).kind == OutcomeKind.requeue
    )  # before training
    assert classify_exit(143, None, []).reason == FailureReason.killed
    assert classify_exit(-9, None, [], shutting_down=True).kind == OutcomeKind.requeue
    fenced = classify_exit(76, None, ["error: fenced: no heartbeat"], shutting_down=True)
    assert (fenced.kind, fenced.reason) == (OutcomeKind.failed, FailureReason.lost_worker)
    assert classify_exit(1, None, ["x"], shutting_down=True).reason == FailureReason.crashed
    assert classify_exit(75, done, [], cancel_requested=True).kind == OutcomeKind.cancelled
    assert classify_exit(-9, None, [], cancel_requested=True).kind == OutcomeKind.cancelled
    assert classify_exit(0, None, [], cancel_requested=True).kind == OutcomeKind.succeeded
    assert classify_exit(1, None, [], lease_lost=True).kind == OutcomeKind.lease_lost
    assert classify_exit(1, None, []).message == "training exited with code 1"


def test_start_failure_is_a_crash(tmp_path, sqlite_db):
    settings = _settings(tmp_path, sqlite_db)
    run = _claimed_run(sqlite_db, settings, tmp_path)
    outcome, moved = _run(sqlite_db, settings, run, [str(tmp_path / "no-such-program")])
    assert outcome.kind == OutcomeKind.failed and outcome.reason == FailureReason.crashed
    assert "could not start training" in outcome.message
    assert moved.status == RunStatus.failed


@pytest.mark.parametrize("write_checkpoints", [True, False])
def test_the_runs_write_checkpoints_reaches_the_engine(tmp_path, sqlite_db, write_checkpoints):
    """A run created with ``write_checkpoints`` false (the smoke test) starts the engine with
    ``--no-checkpoints``; the default does not. (The stub engine then refuses the made-up
    configs: only the command line matters here.)"""
    settings = _settings(tmp_path, sqlite_db, engine="stub")
    run = _claimed_run(sqlite_db, settings, tmp_path, write_checkpoints=write_checkpoints)
    assert run.write_checkpoints is write_checkpoints
    outcome, _ = _run(sqlite_db, settings, run, None, out_env=False)
    assert outcome.kind == OutcomeKind.failed
    log = (settings.run_dir(run.id) / "train.log").read_text().splitlines()
    header = next(line for line in log if f"attempt {run.attempt} on worker" in line)
    assert "-m worker.entry --train-config" in header
    assert header.endswith("--no-checkpoints") is not write_checkpoints


# -- ingestion while the process runs -----------------------------------------------------------


def test_metrics_router_checkpoints_retention_provenance(tmp_path, database):
    settings = _settings(tmp_path, database, keep_checkpoints=2)
    run = _claimed_run(database, settings, tmp_path)
    outcome, moved = _run(
        database, settings, run, _engine(tmp_path, steps=8, pause=0.15, save_every=2)
    )
    assert outcome.kind == OutcomeKind.succeeded and moved.status == RunStatus.succeeded
    out = Path(run.resolved_train["out_dir"])
    with database.session() as session:
        points = reads.list_metrics(session, run.id)
        router = reads.list_router_points(session, run.id)
        checkpoints = reads.list_checkpoints(session, run.id)
        provenance = session.get(RunProvenance, run.id)
        events = reads.list_events(session, run.id)
    file_rows = _csv_rows(out / "metrics.csv")
    assert [p.step for p in points] == [int(r["step"]) for r in file_rows] == list(range(1, 9))
    for point, row in zip(points, file_rows, strict=True):
        assert point.tokens == int(row["tokens"])
        assert point.loss == pytest.approx(float(row["loss"]))
        assert point.elapsed_s == pytest.approx(float(row["elapsed_s"]))
        assert point.mfu is None and point.val_loss is None
    assert len(router) == 8 * 2 * 4 and {p.fraction for p in router} == {0.25}
    # retention: the two newest step folders and final stay, on disk and in the database
    on_disk = [name for name, _ in checkpoint_folders(out)]
    assert on_disk == ["step-00000006", "step-00000008", "final"]
    assert [(c.name, c.step) for c in checkpoints] == [
        ("step-00000006", 6),
        ("step-00000008", 8),
        ("final", 8),
    ]
    for c in checkpoints:
        assert Path(c.path) == out / c.name and c.size_bytes == 1000 + len(
            (out / c.name / "training_state.json").read_bytes()
        )
    assert provenance is not None and provenance.seed == 7
    assert provenance.data_hash and len(provenance.data_hash) == 64
    assert provenance.package_versions["python"] == sys.version.split()[0]
    assert [(e.from_status, e.to_status) for e in events][-1] == (
        RunStatus.running,
        RunStatus.succeeded,
    )
    assert int((settings.run_dir(run.id) / "train.pid").read_text()) > 0


RESUMED_ENGINE = """
    import os, sys, time
    from pathlib import Path
    out = Path(os.environ["FAKE_OUT_DIR"])
    time.sleep(0.5)  # the runner reads the dead attempt's files first

    def rewrite(name, header, lines):  # what worker.metrics.MetricsWriter does on resume
        tmp = out / f".{name}.tmp"
        tmp.write_text(header + "".join(lines))
        os.replace(tmp, out / name)

    metrics = [f"{s},{s * 128},{10.0 / s:.6g},0.001,0.5,1000,,{s}.0,,\\n" for s in range(1, 5)]
    metrics += [f"{s},{s * 128},99,0.001,0.5,1000,,{s}.0,,\\n" for s in (5, 6)]
    rewrite("metrics.csv", "step,tokens,loss,learning_rate,grad_norm,tokens_per_sec,mfu,"
            "elapsed_s,val_loss,val_ppl\\n", metrics)
    router = [f"{s},0,{e},{0.5 if s <= 4 else (0.9 if e == 0 else 0.1)}\\n"
              for s in range(1, 7) for e in (0, 1)]
    rewrite("router.csv", "step,layer,expert,fraction\\n", router)
    time.sleep(0.5)
"""


def test_a_resumed_attempt_rewrites_the_rows_past_its_checkpoint(tmp_path, database):
    """Attempt 1 died at step 8 after its step-4 checkpoint; attempt 2 resumes from step 4,
    rewrites metrics.csv/router.csv up to step 4 and re-trains steps 5-6 (other values).
    The database mirrors the files: steps 7-8 of the dead attempt are gone, 5-6 replaced."""
    settings = _settings(tmp_path, database)
    run = _claimed_run(database, settings, tmp_path)
    out = Path(run.resolved_train["out_dir"])
    out.mkdir(parents=True)
    dead = [{"step": s, "tokens": s * 128, "loss": 10.0 / s} for s in range(1, 9)]
    (out / "metrics.csv").write_text(
        "step,tokens,loss\n" + "".join(f"{r['step']},{r['tokens']},{r['loss']:.6g}\n" for r in dead)
    )
    (out / "router.csv").write_text(
        "step,layer,expert,fraction\n"
        + "".join(f"{s},0,{e},0.5\n" for s in range(1, 9) for e in (0, 1))
    )
    with database.session() as session:
        runs.record_metrics(session, run.id, dead, attempt=1)
        runs.record_router_stats(
            session, run.id, [r for s in range(1, 9) for r in runs.router_rows(s, [[0.5, 0.5]])]
        )
    outcome, moved = _run(database, settings, run, _script(tmp_path, RESUMED_ENGINE))
    assert outcome.kind == OutcomeKind.succeeded, outcome.message
    with database.session() as session:
        points = reads.list_metrics(session, run.id)
        router = reads.list_router_points(session, run.id)
    assert [p.step for p in points] == [int(r["step"]) for r in _csv_rows(out / "metrics.csv")]
    assert [p.step for p in points] == [1, 2, 3, 4, 5, 6]
    assert [p.loss for p in points] == pytest.approx([10.0, 5.0, 10 / 3, 2.5, 99.0, 99.0], rel=1e-5)
    assert [(p.step, p.expert, p.fraction) for p in router if p.step >= 4] == [
        (4, 0, 0.5),
        (4, 1, 0.5),
        (5, 0, 0.9),
        (5, 1, 0.1),
        (6, 0, 0.9),
        (6, 1, 0.1),
    ]


def test_cancel_stops_the_process_and_ingestion(tmp_path, database):
    settings = _settings(tmp_path, database)
    run = _claimed_run(database, settings, tmp_path)
    out = Path(run.resolved_train["out_dir"])
    pid_file = settings.run_dir(run.id) / "train.pid"

    def cancel_after_rows():
        _wait_for(
            lambda: (out / "metrics.csv").exists() and len(_csv_rows(out / "metrics.csv")) >= 3,
            what="metric rows",
        )
        with database.session() as session:
            runs.request_cancel(session, run.id)

    helper = threading.Thread(target=cancel_after_rows)
    helper.start()
    outcome, moved = _run(
        database, settings, run, _engine(tmp_path, steps=100000, pause=0.1, save_every=0)
    )
    helper.join()
    assert (outcome.kind, outcome.exit_code) == (OutcomeKind.cancelled, 75)
    assert moved.status == RunStatus.cancelled and moved.failure_reason is None
    assert _pid_gone(int(pid_file.read_text()))
    with database.session() as session:
        stored = [p.step for p in reads.list_metrics(session, run.id)]
    # every row the process wrote is stored, and nothing more is written after the end
    assert stored == [int(r["step"]) for r in _csv_rows(out / "metrics.csv")]
    time.sleep(0.5)
    with database.session() as session:
        assert [p.step for p in reads.list_metrics(session, run.id)] == stored
        events = reads.list_events(session, run.id)
    assert [e.to_status for e in events][-2:] == [RunStatus.running, RunStatus.cancelled]
    # the SIGTERM checkpoint was recorded before the run was cancelled
    assert (out / f"step-{stored[-1]:08d}").is_dir()


def test_cancel_escalates_to_sigkill_after_the_grace_period(tmp_path, sqlite_db):
    settings = _settings(tmp_path, sqlite_db, cancel_grace_seconds=1)
    run = _claimed_run(sqlite_db, settings, tmp_path)
    out = Path(run.resolved_train["out_dir"])

    def cancel_soon():
        _wait_for(lambda: (out / "metrics.csv").exists(), what="metrics.csv")
        with sqlite_db.session() as session:
            runs.request_cancel(session, run.id)

    helper = threading.Thread(target=cancel_soon)
    helper.start()
    outcome, moved = _run(
        sqlite_db, settings, run, _engine(tmp_path, 100000, 0.1, 0, on_term="ignore")
    )
    helper.join()
    assert (outcome.kind, outcome.exit_code) == (OutcomeKind.cancelled, -signal.SIGKILL)
    assert moved.status == RunStatus.cancelled
    log = (settings.run_dir(run.id) / "train.log").read_text()
    assert "SIGTERM to the training process" in log and "SIGKILL" in log


def test_worker_shutdown_requeues_after_the_checkpoint(tmp_path, sqlite_db):
    settings = _settings(tmp_path, sqlite_db)
    run = _claimed_run(sqlite_db, settings, tmp_path)
    out = Path(run.resolved_train["out_dir"])
    info = WorkerInfo(worker_id=WORKER)

    def shut_down():
        _wait_for(
            lambda: (out / "metrics.csv").exists() and len(_csv_rows(out / "metrics.csv")) >= 2,
            what="metric rows",
        )
        info.shutdown.set()

    helper = threading.Thread(target=shut_down)
    helper.start()
    outcome, moved = _run(sqlite_db, settings, run, _engine(tmp_path, 100000, 0.1, 0), info=info)
    helper.join()
    assert (outcome.kind, outcome.exit_code) == (OutcomeKind.requeue, 75)
    assert moved.status == RunStatus.queued and moved.worker_id is None
    with sqlite_db.session() as session:
        last = reads.list_events(session, run.id)[-1]
        recorded = [c.name for c in reads.list_checkpoints(session, run.id)]
    assert "graceful stop: worker shutting down" in last.message and last.reason is None
    assert moved.failures == 0  # a graceful stop is no failure
    assert recorded == [name for name, _ in checkpoint_folders(out)] and recorded


def test_lost_lease_kills_the_process_and_writes_nothing(tmp_path, database):
    settings = _settings(tmp_path, database)
    run = _claimed_run(database, settings, tmp_path)
    out = Path(run.resolved_train["out_dir"])

    def take_over():
        _wait_for(
            lambda: (out / "metrics.csv").exists() and len(_csv_rows(out / "metrics.csv")) >= 2,
            what="metric rows",
        )
        with database.session() as session:  # the reconciler, believing the worker lost
            moved = runs.recover_expired_run(
                session, run.id, max_attempts=3, now=utcnow() + timedelta(hours=1)
            )
            assert moved.status == RunStatus.queued

    helper = threading.Thread(target=take_over)
    helper.start()
    outcome, moved = _run(database, settings, run, _engine(tmp_path, 100000, 0.1, 0))
    helper.join()
    assert outcome.kind == OutcomeKind.lease_lost and moved is None
    assert outcome.exit_code == -signal.SIGKILL
    assert _pid_gone(int((settings.run_dir(run.id) / "train.pid").read_text()))
    with database.session() as session:
        current = reads.get_run(session, run.id)
        events = reads.list_events(session, run.id)
    assert current.status == RunStatus.queued and current.attempt == 1
    assert (events[-1].from_status, events[-1].to_status, events[-1].actor) == (
        RunStatus.running,
        RunStatus.queued,
        "reconciler",
    )


# -- pieces -------------------------------------------------------------------------------------


def test_csv_tail_reads_complete_lines_and_follows_a_replaced_file(tmp_path):
    path = tmp_path / "metrics.csv"
    tail = CsvTail(path)
    assert tail.read() == []
    path.write_text("step,loss\n1,2.5\n2,2.")
    assert tail.read() == [{"step": "1", "loss": "2.5"}] and tail.rewound
    with open(path, "a") as fh:
        fh.write("25\n3")
    assert tail.read() == [{"step": "2", "loss": "2.25"}]
    replacement = tmp_path / "new.csv"
    replacement.write_text("step,loss\n1,2.5\n2,9.0\n")
    assert not tail.rewound
    os.replace(replacement, path)  # what the engine does when it resumes
    assert tail.read() == [{"step": "1", "loss": "2.5"}, {"step": "2", "loss": "9.0"}]
    assert tail.rewound  # the rows above are the whole new file
    assert tail.read() == [] and not tail.rewound


def test_write_configs_resumes_later_attempts_from_their_checkpoint(tmp_path, sqlite_db):
    import yaml

    settings = _settings(tmp_path, sqlite_db)
    run = _claimed_run(sqlite_db, settings, tmp_path)
    run.resolved_train = {**run.resolved_train, "resume": False}
    run_dir = settings.run_dir(run.id)
    train_path, model_path = write_configs(run, run_dir)
    assert yaml.safe_load(train_path.read_text())["resume"] is False
    assert yaml.safe_load(model_path.read_text()) == {"name": "tiny"}
    (Path(run.resolved_train["out_dir"]) / "step-00000004").mkdir(parents=True)
    run.attempt = 2
    train_path, _ = write_configs(run, run_dir)
    assert yaml.safe_load(train_path.read_text())["resume"] == "auto"


def test_finish_attempt_requeue_becomes_cancel_when_cancel_was_requested(tmp_path, sqlite_db):
    settings = _settings(tmp_path, sqlite_db)
    run = _claimed_run(sqlite_db, settings, tmp_path)
    with sqlite_db.session() as session:
        runs.request_cancel(session, run.id)
    moved = finish_attempt(
        sqlite_db,
        run.id,
        run.attempt,
        Outcome(OutcomeKind.requeue, "shutting down", exit_code=75),
        settings=settings,
        worker_id=WORKER,
    )
    assert moved.status == RunStatus.cancelled


def test_database_outage_stops_the_training_before_the_lease_can_expire(tmp_path):
    """PostgreSQL refuses every connection to the run's database mid-run (ALLOW_CONNECTIONS
    false, sessions terminated): no heartbeat succeeds, the watchdog SIGTERMs the training
    once it stops vouching for the lease, it checkpoints and exits, and nothing is written
    meanwhile."""
    import psycopg
    import sqlalchemy as sa
    from psycopg import sql
    from sqlalchemy.exc import OperationalError

    from tests.support.db import create_pg_database, drop_pg_database
    from tests.support.servers import postgres_admin_url

    url = create_pg_database("moejobs_outage_test")
    name = sa.make_url(url).database
    settings = settings_for(
        tmp_path, url, heartbeat_seconds=0.5, lease_seconds=4, worker_stale_seconds=5
    )
    migrate(settings)
    db = open_database(settings)

    def set_connections(allowed: bool) -> None:
        with psycopg.connect(postgres_admin_url(), autocommit=True) as admin:
            admin.execute(
                sql.SQL("ALTER DATABASE {} ALLOW_CONNECTIONS {}").format(
                    sql.Identifier(name), sql.Literal(allowed)
                )
            )
            if not allowed:
                admin.execute(
                    "SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
                    "WHERE datname = %s AND pid <> pg_backend_pid()",
                    (name,),
                )

    try:
        run = _claimed_run(db, settings, tmp_path)
        out = Path(run.resolved_train["out_dir"])

        def outage():
            _wait_for(
                lambda: (out / "metrics.csv").exists() and len(_csv_rows(out / "metrics.csv")) >= 3,
                what="metric rows",
            )
            set_connections(False)

        helper = threading.Thread(target=outage)
        helper.start()
        os.environ["FAKE_OUT_DIR"] = str(out)
        try:
            outcome = execute_attempt(
                run,
                db,
                settings,
                WorkerInfo(worker_id=WORKER),
                poll_seconds=0.1,
                command=_engine(tmp_path, 100000, 0.1, 0),
            )
        finally:
            os.environ.pop("FAKE_OUT_DIR", None)
            helper.join()
        assert (outcome.kind, outcome.exit_code) == (OutcomeKind.requeue, 75)
        assert "database unreachable" in outcome.message
        assert _pid_gone(int((settings.run_dir(run.id) / "train.pid").read_text()))
        log = (settings.run_dir(run.id) / "train.log").read_text()
        assert "lease not renewed for" in log and "SIGKILL" not in log
        with pytest.raises(OperationalError):  # still down: the outcome cannot be written
            finish_attempt(db, run.id, run.attempt, outcome, settings=settings, worker_id=WORKER)
        set_connections(True)
        db.dispose()
        with db.session() as session:  # nothing was written: the reconciler will take over
            current = reads.get_run(session, run.id)
            stored = len(reads.list_metrics(session, run.id))
        assert current.status == RunStatus.running and current.attempt == 1
        assert stored < len(_csv_rows(out / "metrics.csv"))
        # once the database answers, the fenced outcome is written: re-queued, resumable
        moved = finish_attempt(
            db, run.id, run.attempt, outcome, settings=settings, worker_id=WORKER
        )
        assert moved.status == RunStatus.queued
    finally:
        set_connections(True)
        db.dispose()
        drop_pg_database(url)


def test_the_watchdog_vouches_while_the_lease_is_renewed_and_the_trainer_fences_itself_after(
    tmp_path, sqlite_db
):
    """The worker feeds the training's watchdog pipe while heartbeats succeed. When they stop
    (the database answers no more: here the run's row is locked by another writer), the
    runner stops vouching and sends SIGTERM; a training that ignores SIGTERM fences itself
    (exit 76, ``worker.fence``) once its deadline passes, before the runner's SIGKILL and
    before the lease expires."""
    settings = _settings(
        tmp_path,
        sqlite_db,
        lease_seconds=6,
        heartbeat_seconds=0.3,
        trainer_deadline_seconds=1.0,
        checkpoint_write_seconds=1.0,
        sqlite_busy_timeout_ms=200,
    )
    run = _claimed_run(sqlite_db, settings, tmp_path)
    out = Path(run.resolved_train["out_dir"])
    import sqlite3

    from service.settings import sqlite_path

    hold = threading.Event()
    released = threading.Event()

    def block_writes():
        _wait_for(
            lambda: (out / "metrics.csv").exists() and len(_csv_rows(out / "metrics.csv")) >= 10,
            what="metric rows",
        )
        # rows kept coming for well over the trainer deadline: the watchdog was fed
        conn = sqlite3.connect(sqlite_path(settings.database_url), isolation_level=None)
        try:
            conn.execute("BEGIN IMMEDIATE")  # every writer now waits, then fails
            hold.set()
            released.wait(30)
            conn.execute("ROLLBACK")
        finally:
            conn.close()

    helper = threading.Thread(target=block_writes)
    helper.start()
    started = time.monotonic()
    try:
        os.environ["FAKE_OUT_DIR"] = str(out)
        try:
            outcome = execute_attempt(
                run,
                sqlite_db,
                settings,
                WorkerInfo(worker_id=WORKER),
                poll_seconds=0.1,
                command=_engine(tmp_path, 100000, 0.1, 3, "ignore") + ["fence"],
            )
        finally:
            os.environ.pop("FAKE_OUT_DIR", None)
    finally:
        released.set()
        helper.join()
    assert hold.is_set()
    assert time.monotonic() - started > 2 * settings.trainer_deadline_seconds
    assert (outcome.kind, outcome.reason, outcome.exit_code) == (
        OutcomeKind.failed,
        FailureReason.lost_worker,
        76,
    )
    log = (settings.run_dir(run.id) / "train.log").read_text()
    assert "lease not renewed for" in log and "SIGKILL" not in log
    assert "error: fenced:" in log
    from service.contract import read_events

    assert [e.event.value for e in read_events(out)][-1] == "fenced"
