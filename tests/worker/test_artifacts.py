"""Checkpoints in the object store (worker/retention.py, worker/runner.py) against a real S3
HTTP server (moto's, started here), with the runner tests' stand-in engine: each checkpoint is
uploaded and only then recorded, retention deletes the store copy, a fenced-out attempt uploads
nothing, an interrupted upload records nothing."""

from __future__ import annotations

from pathlib import Path

import pytest

from service import artifacts, reads
from service.artifacts import ArtifactStore
from service.db import migrate, open_database
from service.models import RunStatus
from tests.support.db import settings_for
from tests.support.objectstore import S3Server
from tests.worker.test_runner import _claimed_run, _engine, _run, _settings
from worker.outcome import OutcomeKind
from worker.retention import Checkpoints


@pytest.fixture(scope="module")
def s3():
    server = S3Server().start()
    yield server
    server.stop()


@pytest.fixture
def bucket(s3, monkeypatch) -> str:
    for name, value in s3.env.items():
        monkeypatch.setenv(name, value)
    return s3.make_bucket()


@pytest.fixture
def db(tmp_path: Path):
    settings = settings_for(tmp_path)
    migrate(settings)
    database = open_database(settings)
    yield database
    database.dispose()


def _stored_names(store: ArtifactStore, run_id) -> set[str]:
    return {key.split("/")[2] for key, _ in store.list(artifacts.run_prefix(run_id))}


def test_each_recorded_checkpoint_is_in_the_store_and_retention_deletes_it(tmp_path, db, bucket):
    settings = _settings(tmp_path, db, keep_checkpoints=2, artifact_url=f"s3://{bucket}/ci")
    run = _claimed_run(db, settings, tmp_path)
    outcome, moved = _run(db, settings, run, _engine(tmp_path, steps=8, pause=0.15, save_every=2))
    assert outcome.kind == OutcomeKind.succeeded and moved.status == RunStatus.succeeded
    store = artifacts.store_for(settings)
    assert store is not None
    with db.session() as session:
        recorded = [c.name for c in reads.list_checkpoints(session, run.id)]
    assert recorded == ["step-00000006", "step-00000008", "final"]
    # pruned step folders are gone from the store too; the run's files were synced at its end
    assert _stored_names(store, run.id) == {*recorded, "files"}
    synced = {key.rsplit("/", 1)[1] for key, _ in store.list(f"runs/{run.id}/files/")}
    assert synced == {"metrics.csv", "router.csv", "train.log"}  # this engine writes no events
    out = Path(run.resolved_train["out_dir"])
    for name in recorded:
        keys = {k for k, _ in store.list(artifacts.checkpoint_prefix(run.id, name))}
        assert keys == {
            f"runs/{run.id}/{name}/lit_model.pth",
            f"runs/{run.id}/{name}/training_state.json",
        }
        assert (
            b"".join(store.iter_chunks(f"runs/{run.id}/{name}/lit_model.pth"))
            == (out / name / "lit_model.pth").read_bytes()
        )


def _folder(out: Path, name: str, step: int) -> None:
    (out / name).mkdir(parents=True)
    (out / name / "lit_model.pth").write_bytes(b"w" * 2000)
    (out / name / "training_state.json").write_text(f'{{"step": {step}}}')


def _writer(db):
    def write(_what, fn):
        with db.session() as session:
            return fn(session)

    return write


def _drain(checkpoints: Checkpoints, db) -> None:
    checkpoints.drain(_writer(db), lambda: None, poll=0.1)
    checkpoints.close()


def test_a_fenced_out_attempt_uploads_and_records_nothing(tmp_path, db, bucket):
    settings = _settings(tmp_path, db, artifact_url=f"s3://{bucket}/ci")
    run = _claimed_run(db, settings, tmp_path)
    out = Path(run.resolved_train["out_dir"])
    _folder(out, "step-00000002", 2)
    store = artifacts.store_for(settings)
    assert store is not None
    checkpoints = Checkpoints(db, out, run.id, run.attempt, 0, store=store, fenced_out=lambda: True)
    _drain(checkpoints, db)
    assert store.list(artifacts.run_prefix(run.id)) == []
    with db.session() as session:
        assert reads.list_checkpoints(session, run.id) == []


def test_the_fence_is_read_from_the_database_before_an_upload(tmp_path, db, bucket):
    from datetime import timedelta

    from service import runs
    from service.models import utcnow
    from worker.runner import WorkerInfo, _Attempt

    settings = _settings(tmp_path, db, artifact_url=f"s3://{bucket}/ci")
    run = _claimed_run(db, settings, tmp_path)
    out = Path(run.resolved_train["out_dir"])
    _folder(out, "step-00000002", 2)
    att = _Attempt(run, db, settings, WorkerInfo(worker_id="test-worker"))
    assert att.fenced_out() is False and att.checkpoints.store is not None
    with db.session() as session:  # the reconciler gives the run to another attempt
        runs.recover_expired_run(session, run.id, max_attempts=3, now=utcnow() + timedelta(hours=1))
    assert att.fenced_out() is True and att.lease_lost
    _drain(att.checkpoints, db)
    assert att.checkpoints.store.list(artifacts.run_prefix(run.id)) == []
    with db.session() as session:
        assert reads.list_checkpoints(session, run.id) == []


class _StopsMidUpload(ArtifactStore):
    """A store whose server stops after the first file of an upload (the rest fail)."""

    def __init__(self, url: str, server: S3Server) -> None:
        super().__init__(url)
        self.server, self.puts = server, 0

    def put_file(self, path: Path, key: str) -> None:
        self.puts += 1
        if self.puts == 2:
            self.server.stop()
        super().put_file(path, key)


def test_an_interrupted_upload_leaves_no_recorded_checkpoint(tmp_path, db, monkeypatch):
    server = S3Server().start()  # its own server: this test stops it
    try:
        for name, value in server.env.items():
            monkeypatch.setenv(name, value)
        url = f"s3://{server.make_bucket()}/ci"
        settings = _settings(tmp_path, db, artifact_url=url)
        run = _claimed_run(db, settings, tmp_path)
        out = Path(run.resolved_train["out_dir"])
        _folder(out, "step-00000002", 2)
        store = _StopsMidUpload(url, server)
        checkpoints = Checkpoints(db, out, run.id, run.attempt, 0, store=store)
        _drain(checkpoints, db)
        assert store.puts == 2 and checkpoints.upload_failures == 1
        with db.session() as session:
            assert reads.list_checkpoints(session, run.id) == []
        # the store answers again (moto keeps its buckets in this process): the next try
        # uploads every file, then records
        server = S3Server().start()
        monkeypatch.setenv("AWS_ENDPOINT_URL", server.endpoint)
        retry = Checkpoints(db, out, run.id, run.attempt, 0, store=ArtifactStore(url))
        _drain(retry, db)
        with db.session() as session:
            assert [c.name for c in reads.list_checkpoints(session, run.id)] == ["step-00000002"]
        prefix = artifacts.checkpoint_prefix(run.id, "step-00000002")
        assert len(ArtifactStore(url).list(prefix)) == 2
    finally:
        server.stop()


def test_without_a_store_nothing_changes(tmp_path, db):
    settings = _settings(tmp_path, db)
    assert settings.artifact_url is None
    run = _claimed_run(db, settings, tmp_path)
    out = Path(run.resolved_train["out_dir"])
    _folder(out, "step-00000002", 2)
    checkpoints = Checkpoints(db, out, run.id, run.attempt, 0)
    checkpoints.record(_writer(db))
    with db.session() as session:
        assert [c.name for c in reads.list_checkpoints(session, run.id)] == ["step-00000002"]


def test_a_run_from_another_runs_checkpoint_fetches_it_when_its_folder_is_not_here(
    tmp_path, db, bucket
):
    """Run B's initial_checkpoint_dir is run A's recorded final (as ``run:A/final`` resolves);
    A trained on another machine (its folder is not here): B's attempt fetches the checkpoint
    from the store into B's own folder and the engine loads it from there."""
    import json
    import shutil
    import sys
    import uuid

    import yaml

    from service import runs
    from tests.worker.test_runner import WORKER

    settings = _settings(tmp_path, db, artifact_url=f"s3://{bucket}/ci")
    a = _claimed_run(db, settings, tmp_path)
    a_out = Path(a.resolved_train["out_dir"])
    _folder(a_out, "final", 8)
    store = artifacts.store_for(settings)
    assert store is not None
    _drain(Checkpoints(db, a_out, a.id, a.attempt, 0, store=store), db)
    with db.session() as session:
        (final,) = reads.list_checkpoints(session, a.id)
    shutil.rmtree(settings.run_dir(a.id))  # A's machine is another one

    b_id = uuid.uuid4()
    train = {**a.resolved_train, "out_dir": str(settings.run_dir(b_id) / "out")}
    train["initial_checkpoint_dir"] = final.path
    with db.session() as session:
        runs.create_run(
            session,
            name="b",
            submitted_train={**train, "initial_checkpoint_dir": f"run:{a.id}/final"},
            submitted_model={"name": "tiny"},
            resolved_train=train,
            resolved_model={"name": "tiny"},
            run_id=b_id,
        )
        b = runs.claim_run(session, b_id, WORKER, settings.lease_seconds)
    assert b is not None
    engine = tmp_path / "reads_initial.py"
    engine.write_text(
        "import json, sys, yaml\nfrom pathlib import Path\n"
        "folder = Path(yaml.safe_load(open('train_config.yaml'))['initial_checkpoint_dir'])\n"
        "weights = (folder / 'lit_model.pth').read_bytes()\n"
        "json.dump({'folder': str(folder), 'size': len(weights)}, open('seen.json', 'w'))\n"
    )
    outcome, moved = _run(db, settings, b, [sys.executable, str(engine)])
    assert outcome.kind == OutcomeKind.succeeded and moved.status == RunStatus.succeeded
    b_dir = settings.run_dir(b_id)
    seen = json.loads((b_dir / "seen.json").read_text())
    assert seen == {"folder": str(b_dir / "initial_checkpoint"), "size": 2000}
    assert not settings.run_dir(a.id).exists(), "A's folder is not written here"
    # the database keeps the recorded path (what protects A's checkpoint from deletion)
    assert moved.resolved_train["initial_checkpoint_dir"] == final.path
    written = yaml.safe_load((b_dir / "train_config.yaml").read_text())
    assert written["initial_checkpoint_dir"] == str(b_dir / "initial_checkpoint")
    assert "using its copy from the object store" in (b_dir / "train.log").read_text()


def test_an_initial_checkpoint_that_is_here_or_not_recorded_is_not_fetched(tmp_path, db, bucket):
    from worker.artifacts import fetch_initial_checkpoint

    settings = _settings(tmp_path, db, artifact_url=f"s3://{bucket}/ci")
    store = artifacts.store_for(settings)
    assert store is not None
    here = tmp_path / "shared" / "final"
    _folder(here.parent, "final", 8)  # a shared file system: the folder is here
    run_dir = tmp_path / "runs" / "b"
    assert fetch_initial_checkpoint(store, db, str(here), run_dir) is None
    # not a recorded checkpoint: the engine reports the missing folder, as without a store
    assert fetch_initial_checkpoint(store, db, str(tmp_path / "nowhere"), run_dir) is None
    assert not run_dir.exists()


def test_an_initial_checkpoint_missing_from_the_store_fails_the_attempt_retryably(
    tmp_path, db, bucket
):
    import sys
    import uuid

    from service import runs
    from service.models import Checkpoint, FailureReason
    from tests.worker.test_runner import WORKER

    settings = _settings(tmp_path, db, artifact_url=f"s3://{bucket}/ci")
    a = _claimed_run(db, settings, tmp_path)
    path = str(settings.run_dir(a.id) / "out" / "final")  # recorded, never uploaded, not here
    with db.session() as session:
        session.add(Checkpoint(run_id=a.id, name="final", step=8, path=path))
        session.commit()
    b_id = uuid.uuid4()
    train = {**a.resolved_train, "out_dir": str(settings.run_dir(b_id) / "out")}
    train["initial_checkpoint_dir"] = path
    with db.session() as session:
        runs.create_run(
            session,
            name="b",
            submitted_train=train,
            submitted_model={"name": "tiny"},
            resolved_train=train,
            resolved_model={"name": "tiny"},
            run_id=b_id,
        )
        b = runs.claim_run(session, b_id, WORKER, settings.lease_seconds)
    assert b is not None
    marker = tmp_path / "engine-ran"
    outcome, _ = _run(db, settings, b, [sys.executable, "-c", f"open({str(marker)!r}, 'w')"])
    assert outcome.kind == OutcomeKind.failed and outcome.reason == FailureReason.lost_worker
    assert not marker.exists(), "the engine does not start without its initial weights"
    assert not (settings.run_dir(b_id) / "initial_checkpoint").exists()
