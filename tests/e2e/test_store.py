"""The object store through real workers (``python -m worker.celery_app``, the stub engine, the
embedded SQLite database and broker) and moto's S3 server started here: worker A trains a run
and uploads each checkpoint before recording it; A is killed (SIGKILL) and the run's folder
is emptied (as on another machine); worker B takes the run over, fetches the newest recorded
checkpoint from the store and resumes at its step; the run's files are synced; the API
streams the archive from the store and deleting the run deletes its objects."""

from __future__ import annotations

import copy
import io
import shutil
import tarfile
import uuid
from pathlib import Path

from fastapi.testclient import TestClient

from service import artifacts, reads
from service.db import migrate, open_database
from service.main import create_app
from service.models import RunStatus
from tests.support.api import TRAIN, body
from tests.support.objectstore import S3Server
from tests.support.tiny import stdlib_text_files
from tests.support.worker import WorkerProcess, pid_gone, wait_for, worker_settings

#: Leases of seconds, so the killed worker's run is recovered quickly (tests/support/faults.py).
TIMING = dict(
    heartbeat_seconds=0.5,
    lease_seconds=7.0,
    trainer_deadline_seconds=2.0,
    checkpoint_write_seconds=2.0,
    worker_stale_seconds=3.0,
    queued_stale_seconds=5.0,
)


def test_kill_9_then_resume_from_the_store_on_an_empty_folder(tmp_path: Path, monkeypatch):
    s3 = S3Server().start()
    for name, value in s3.env.items():  # the API and this test read the store too
        monkeypatch.setenv(name, value)
    home = tmp_path / "home"
    settings = worker_settings(
        home,
        f"sqlite:///{home / 'moejobs.sqlite3'}",
        f"sqla+sqlite:///{home / 'broker.sqlite3'}",
        engine="stub",
        artifact_url=f"s3://{s3.make_bucket()}/ci",
        artifact_sync_seconds=1.0,
        **TIMING,
    )
    migrate(settings)
    assert settings.data_root is not None
    stdlib_text_files(settings.data_root / "ds" / "train", ["textwrap"])
    stdlib_text_files(settings.data_root / "ds" / "val", ["heapq"])
    (settings.data_root / "tok").mkdir(parents=True)
    db = open_database(settings)
    env = {**s3.env, "MOEJOBS_STUB_STEP_SECONDS": "0.25"}
    a = WorkerProcess(settings, tmp_path / "a.log", tmp_path / "token-cache", env).start()
    b: WorkerProcess | None = None
    store = artifacts.store_for(settings)
    assert store is not None
    try:
        a.wait_registered(db)
        train = copy.deepcopy(TRAIN)
        train["train"]["max_tokens"] = 4 * 32 * 40  # 40 steps, a checkpoint every 5
        with TestClient(create_app(settings)) as client:
            r = client.post("/runs", json=body("stored", train_config=train))
            assert r.status_code == 201, r.text
            run_id = uuid.UUID(r.json()["id"])

            def recorded() -> list[str]:
                with db.session() as session:
                    return [c.name for c in reads.list_checkpoints(session, run_id)]

            wait_for(lambda: len(recorded()) >= 2, 60, "two recorded checkpoints", on_fail=a.log)
            # upload, then record: every recorded checkpoint is complete in the store
            for name in recorded():
                keys = {k.rsplit("/", 1)[1] for k, _ in store.list(f"runs/{run_id}/{name}/")}
                assert {"lit_model.pth", "training_state.json"} <= keys, (name, keys)
            run_dir = settings.run_dir(run_id)
            trainer = int((run_dir / "train.pid").read_text())
            a.kill()
            wait_for(lambda: pid_gone(trainer), 15, "the training to die with its worker")
            at_kill = recorded()
            shutil.rmtree(run_dir)  # another machine: nothing of the run on its disk
            b = WorkerProcess(settings, tmp_path / "b.log", tmp_path / "token-cache", env).start()

            def done():
                with db.session() as session:
                    run = reads.get_run(session, run_id)
                return run if run.status in (RunStatus.succeeded, RunStatus.failed) else None

            run = wait_for(done, 120, "the run to finish on worker B", on_fail=b.log)
            assert run.status == RunStatus.succeeded and run.attempt == 2, run.failure_message
            assert run.worker_id.endswith(b.worker_id_suffix)
            # B resumed at the newest checkpoint recorded when A died, fetched from the store
            newest = at_kill[-1]
            log = (run_dir / "train.log").read_text()
            assert f"resuming from {run_dir / 'out' / newest} (step {int(newest[5:])})" in log
            assert "attempt 1 on worker" in log  # A's lines came back with the synced log
            with db.session() as session:
                steps = [p.step for p in reads.list_metrics(session, run_id)]
            assert steps == list(range(1, 41))
            # the files synced at the end, the last attempt's trailer in the log
            files = {k.rsplit("/", 1)[1]: k for k, _ in store.list(f"runs/{run_id}/files/")}
            assert set(files) == {"metrics.csv", "router.csv", "events.jsonl", "train.log"}
            stored_log = b"".join(store.iter_chunks(files["train.log"])).decode()
            assert stored_log.rstrip().endswith(log.rstrip().splitlines()[-1])

            # the archive from the store when the folder is not on this machine
            shutil.rmtree(run_dir / "out" / "final")
            answer = client.get(f"/runs/{run_id}/checkpoints/final/archive")
            assert answer.status_code == 200, answer.text
            with tarfile.open(fileobj=io.BytesIO(answer.content)) as tar:
                names = tar.getnames()
            assert f"{run_id}-final/lit_model.pth" in names

            assert client.delete(f"/runs/{run_id}").status_code == 204
            assert store.list(artifacts.run_prefix(run_id)) == []
    finally:
        a.kill()
        if b is not None:
            b.stop(timeout=30)
        db.dispose()
        s3.stop()
