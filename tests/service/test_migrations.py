"""Every migration upgrades a *populated* database from the revision before it, on SQLite and
on PostgreSQL, with its rows intact; the constraints of the models survive SQLite's batch
copies. A new migration needs an entry in :data:`POPULATE` for the revision it starts from
(``test_every_revision_has_rows_to_upgrade`` says so)."""

from __future__ import annotations

import uuid
from datetime import UTC, datetime
from pathlib import Path

import pytest
import sqlalchemy as sa
from alembic.script import ScriptDirectory

from service.db import alembic_config, make_engine, migrate
from service.models import metadata
from tests.support.db import create_pg_database, drop_pg_database, settings_for

RUN_A, RUN_B = uuid.UUID(int=0xA), uuid.UUID(int=0xB)
T0 = datetime(2026, 11, 30, 10, 0, tzinfo=UTC)

#: Rows written at a revision before upgrading from it: (table, row) pairs.
POPULATE: dict[str, list[tuple[str, dict]]] = {
    "0001": [
        (
            "runs",
            dict(
                id=RUN_A,
                name="a",
                owner="local",
                status="failed",
                preset=None,
                submitted_train={},
                submitted_model={},
                resolved_train={"x": 1},
                resolved_model={},
                estimate=None,
                warnings=[],
                attempt=3,
                worker_id=None,
                created_at=T0,
                queued_at=T0,
                updated_at=T0,
                finished_at=T0,
                failure_reason="lost_worker",
                failure_message="lost",
                exit_code=None,
                cancel_requested=False,
            ),
        ),
        (
            "runs",
            dict(
                id=RUN_B,
                name="b",
                owner="local",
                status="running",
                preset="cpu-tiny",
                submitted_train={},
                submitted_model={},
                resolved_train={},
                resolved_model={},
                estimate={"params": 5},
                warnings=[],
                attempt=2,
                worker_id="w1",
                created_at=T0,
                queued_at=T0,
                updated_at=T0,
                heartbeat_at=T0,
                lease_expires_at=T0,
                cancel_requested=False,
                idempotency_key="k",
                request_hash="h" * 64,
            ),
        ),
        (
            "run_events",
            dict(
                run_id=RUN_A,
                at=T0,
                from_status="running",
                to_status="failed",
                reason="lost_worker",
                message="gone",
                actor="reconciler",
                attempt=3,
            ),
        ),
        (
            "metric_points",
            dict(
                run_id=RUN_B,
                step=1,
                tokens=128,
                loss=5.5,
                learning_rate=1e-3,
                grad_norm=1.0,
                tokens_per_sec=100.0,
                elapsed_s=1.5,
            ),
        ),
        ("router_points", dict(run_id=RUN_B, step=1, layer=0, expert=1, fraction=0.25)),
        (
            "checkpoints",
            dict(
                run_id=RUN_B, name="step-00000001", step=1, path="/x", size_bytes=10, created_at=T0
            ),
        ),
        (
            "workers",
            dict(
                id="w1",
                host="h",
                pid=1,
                gpus=[],
                gpu_count=0,
                heartbeat_at=T0,
                current_run_id=RUN_B,
                started_at=T0,
            ),
        ),
        (
            "run_provenance",
            dict(
                run_id=RUN_B,
                package_versions={},
                hardware={},
                git_commit=None,
                seed=1,
                recorded_at=T0,
            ),
        ),
    ],
    "0002": [
        (
            "runs",
            dict(
                id=RUN_A,
                name="a",
                owner="local",
                status="succeeded",
                preset=None,
                submitted_train={},
                submitted_model={},
                resolved_train={"x": 1},
                resolved_model={},
                estimate={"plan": {"world_size": 1}},
                warnings=[],
                attempt=1,
                failures=0,
                worker_id="w1",
                created_at=T0,
                queued_at=T0,
                updated_at=T0,
                finished_at=T0,
                cancel_requested=False,
            ),
        ),
        (
            "runs",
            dict(
                id=RUN_B,
                name="b",
                owner="local",
                status="failed",
                preset=None,
                submitted_train={},
                submitted_model={},
                resolved_train={},
                resolved_model={},
                estimate=None,
                warnings=[],
                attempt=2,
                failures=2,
                created_at=T0,
                queued_at=T0,
                updated_at=T0,
                finished_at=T0,
                failure_reason="no_space",
                failure_message="disk full",
                cancel_requested=False,
            ),
        ),
        ("metric_points", dict(run_id=RUN_A, step=4, tokens=512, loss=5.0, elapsed_s=2.0)),
        (
            "workers",
            dict(
                id="w1",
                host="h",
                pid=1,
                gpu_count=1,
                gpu_memory_bytes=80 << 30,
                gpus=[{"index": 0, "name": "NVIDIA H100", "memory_bytes": 80 << 30}],
                heartbeat_at=T0,
                current_run_id=None,
                started_at=T0,
            ),
        ),
        (
            "workers",
            dict(id="w2", host="h", pid=2, gpus=[], gpu_count=0, heartbeat_at=T0, started_at=T0),
        ),
    ],
    "0003": [
        (
            "runs",
            dict(
                id=RUN_A,
                name="a",
                owner="local",
                status="queued",
                preset=None,
                submitted_train={},
                submitted_model={},
                resolved_train={"x": 1},
                resolved_model={},
                estimate=None,
                warnings=[],
                attempt=0,
                failures=0,
                created_at=T0,
                queued_at=T0,
                updated_at=T0,
                cancel_requested=False,
            ),
        ),
        (
            "workers",
            dict(
                id="w1",
                host="h",
                pid=1,
                gpu_count=1,
                gpu_memory_bytes=80 << 30,
                gpus=[{"index": 0, "name": "NVIDIA H100", "memory_bytes": 80 << 30}],
                kind="NVIDIA H100",
                host_memory_bytes=64 << 30,
                free_bytes=1 << 40,
                heartbeat_at=T0,
                current_run_id=RUN_A,
                started_at=T0,
            ),
        ),
        (
            "workers",
            dict(
                id="w2",
                host="h",
                pid=2,
                gpus=[],
                gpu_count=0,
                kind="cpu: x",
                heartbeat_at=T0,
                started_at=T0,
            ),
        ),
        (
            "throughput",
            dict(
                model_key="k" * 64,
                worker_kind="NVIDIA H100",
                tokens_per_sec_per_device=1e5,
                flops_per_sec_per_device=1e14,
                runs=2,
                last_run_id=RUN_A,
                updated_at=T0,
            ),
        ),
    ],
    "0004": [
        (
            "runs",
            dict(
                id=RUN_A,
                name="a",
                owner="local",
                status="succeeded",
                preset="cpu-tiny",
                submitted_train={},
                submitted_model={},
                resolved_train={"x": 1},
                resolved_model={},
                estimate=None,
                warnings=[],
                attempt=1,
                failures=0,
                worker_id="w1",
                created_at=T0,
                queued_at=T0,
                updated_at=T0,
                finished_at=T0,
                cancel_requested=False,
            ),
        ),
        (
            "runs",
            dict(
                id=RUN_B,
                name="smoke-test-20261203-170000",
                owner="local",
                status="running",
                preset="smoke-test",
                submitted_train={},
                submitted_model={},
                resolved_train={},
                resolved_model={},
                estimate=None,
                warnings=[],
                attempt=1,
                failures=0,
                worker_id="w1",
                created_at=T0,
                queued_at=T0,
                updated_at=T0,
                heartbeat_at=T0,
                lease_expires_at=T0,
                cancel_requested=False,
            ),
        ),
        (
            "workers",
            dict(
                id="w1",
                host="h",
                pid=1,
                gpus=[],
                gpu_count=0,
                role="train",
                heartbeat_at=T0,
                current_run_id=RUN_B,
                started_at=T0,
            ),
        ),
    ],
    "0005": [
        (
            "runs",
            dict(
                id=RUN_A,
                name="a",
                owner="local",
                status="cancelled",
                preset="cpu-tiny",
                write_checkpoints=True,
                submitted_train={},
                submitted_model={},
                resolved_train={},
                resolved_model={},
                estimate=None,
                warnings=[],
                attempt=1,
                failures=0,
                created_at=T0,
                queued_at=T0,
                updated_at=T0,
                finished_at=T0,
                cancel_requested=True,
                cancel_requested_at=T0,
            ),
        ),
        (
            "checkpoints",
            dict(id=1, run_id=RUN_A, name="final", step=4, path="/r/a/final", created_at=T0),
        ),
    ],
    "0006": [
        (
            "sweeps",
            dict(
                id=uuid.UUID(int=0x5),
                name="s",
                owner="local",
                status="finished",
                method="grid",
                metric_name="val_loss",
                metric_goal="minimize",
                max_runs=None,
                max_concurrent=2,
                seed=0,
                spec={},
                cancel_requested=False,
                created_at=T0,
                updated_at=T0,
                finished_at=T0,
            ),
        ),
        (
            "runs",
            dict(
                id=RUN_A,
                name="a",
                owner="local",
                status="succeeded",
                preset="cpu-tiny",
                write_checkpoints=True,
                submitted_train={},
                submitted_model={},
                resolved_train={},
                resolved_model={},
                estimate=None,
                warnings=[],
                attempt=1,
                failures=0,
                created_at=T0,
                queued_at=T0,
                updated_at=T0,
                finished_at=T0,
                cancel_requested=False,
                tags=["x"],
                note="n",
                sweep_id=uuid.UUID(int=0x5),
                sweep_params={"train_config.optimizer.init_args.lr": 0.001},
            ),
        ),
    ],
}


def _steps() -> list[tuple[str, str]]:
    """(from, to) revision pairs, oldest first."""
    script = ScriptDirectory.from_config(alembic_config())
    steps = []
    for r in reversed(list(script.walk_revisions())):
        if r.down_revision is None:
            continue
        # one down revision each: the history is linear (a merge would name several)
        assert isinstance(r.down_revision, str), (r.revision, r.down_revision)
        steps.append((r.down_revision, r.revision))
    return steps


def test_every_revision_has_rows_to_upgrade():
    for before, after in _steps():
        assert before in POPULATE, f"add rows for revision {before} (upgraded by {after})"


@pytest.fixture(params=["sqlite", "postgresql"])
def fresh_settings(request, tmp_path):
    if request.param == "sqlite":
        yield settings_for(tmp_path)
        return
    url = create_pg_database("moejobs_upgrade")
    try:
        yield settings_for(tmp_path, url)
    finally:
        drop_pg_database(url)


def _snapshot(engine: sa.Engine) -> dict[str, list[dict]]:
    tables = sa.MetaData()
    tables.reflect(engine)
    out = {}
    with engine.connect() as conn:
        for name, table in tables.tables.items():
            if name == "alembic_version":
                continue
            rows = conn.execute(sa.select(table)).mappings().all()
            out[name] = sorted((dict(r) for r in rows), key=repr)
    return out


def _stored(value, dialect: str):
    """``value`` as the models store it on ``dialect`` (reflected SQLite columns are plain
    CHAR/DATETIME: uuids as 32 hex digits, times as naive UTC)."""
    if dialect == "sqlite" and isinstance(value, uuid.UUID):
        return value.hex
    if dialect == "sqlite" and isinstance(value, datetime):
        return value.astimezone(UTC).replace(tzinfo=None)
    return value


def _insert(engine: sa.Engine, rows: list[tuple[str, dict]]) -> None:
    tables = sa.MetaData()
    tables.reflect(engine)
    dialect = engine.dialect.name
    with engine.begin() as conn:
        for name, row in rows:
            values = {k: _stored(v, dialect) for k, v in row.items()}
            conn.execute(tables.tables[name].insert().values(**values))


@pytest.mark.parametrize("step", _steps(), ids=lambda s: f"{s[0]}->{s[1]}")
def test_upgrade_keeps_the_rows_of_a_populated_database(fresh_settings, step):
    before, after = step
    migrate(fresh_settings, before)
    engine = make_engine(fresh_settings.database_url)
    try:
        _insert(engine, POPULATE[before])
        old = _snapshot(engine)
        assert sum(map(len, old.values())) == len(POPULATE[before])
        migrate(fresh_settings, after)
        new = _snapshot(engine)
        assert set(new) >= set(old)
        for table, rows in old.items():
            assert len(new[table]) == len(rows), table
            kept = sorted(({k: r[k] for k in rows[0]} for r in new[table]), key=repr)
            assert kept == rows, table
        if (before, after) == ("0001", "0002"):
            failures = {r["name"]: r["failures"] for r in new["runs"]}
            assert failures == {"a": 1, "b": 0}
            with engine.begin() as conn:  # the new reason is allowed, a made-up one is not
                conn.execute(
                    sa.text(
                        "UPDATE runs SET status='failed', failure_reason='no_space'"
                        ", finished_at=updated_at WHERE name='b'"
                    )
                )
            with pytest.raises(sa.exc.IntegrityError), engine.begin() as conn:
                conn.execute(sa.text("UPDATE runs SET failure_reason='bogus' WHERE name='b'"))
            with pytest.raises(sa.exc.IntegrityError), engine.begin() as conn:
                conn.execute(sa.text("UPDATE runs SET failures=-1 WHERE name='b'"))
        if (before, after) == ("0002", "0003"):
            # workers registered before report nothing (NULL: never a reason to refuse)
            assert {
                (r["id"], r["kind"], r["host_memory_bytes"], r["free_bytes"])
                for r in new["workers"]
            } == {("w1", None, None, None), ("w2", None, None, None)}
            assert new["throughput"] == []
            with engine.begin() as conn:
                conn.execute(
                    sa.text(
                        "INSERT INTO throughput (model_key, worker_kind, tokens_per_sec_per_device,"
                        " runs, updated_at) VALUES ('k', 'cpu: x', 10.5, 1, :t)"
                    ),
                    {"t": T0},
                )
            for bad in ("tokens_per_sec_per_device = 0", "runs = 0"):
                with pytest.raises(sa.exc.IntegrityError), engine.begin() as conn:
                    conn.execute(sa.text(f"UPDATE throughput SET {bad}"))
        if (before, after) == ("0003", "0004"):
            # workers registered before consumed both queues: role "all"; roles are checked
            assert {(r["id"], r["role"]) for r in new["workers"]} == {("w1", "all"), ("w2", "all")}
            with engine.begin() as conn:
                conn.execute(sa.text("UPDATE workers SET role='aux' WHERE id='w2'"))
            with pytest.raises(sa.exc.IntegrityError), engine.begin() as conn:
                conn.execute(sa.text("UPDATE workers SET role='gpu' WHERE id='w1'"))
            with pytest.raises(sa.exc.IntegrityError), engine.begin() as conn:
                conn.execute(sa.text("UPDATE workers SET role=NULL WHERE id='w1'"))
        if (before, after) == ("0004", "0005"):
            # runs write checkpoints, except smoke tests (the worker decided by the preset)
            assert {(r["preset"], bool(r["write_checkpoints"])) for r in new["runs"]} == {
                ("cpu-tiny", True),
                ("smoke-test", False),
            }
            with engine.begin() as conn:  # a new row without the column writes checkpoints
                conn.execute(
                    sa.text(
                        "INSERT INTO runs (id, name, owner, status, submitted_train,"
                        " submitted_model, resolved_train, resolved_model, warnings, attempt,"
                        " failures, created_at, queued_at, updated_at, cancel_requested)"
                        " VALUES (:id, 'c', 'local', 'queued', '{}', '{}', '{}', '{}', '[]', 0,"
                        " 0, :t, :t, :t, :f)"
                    ),
                    {"id": _stored(uuid.UUID(int=0xC), engine.dialect.name), "t": T0, "f": False},
                )
                stored = conn.execute(
                    sa.text("SELECT write_checkpoints FROM runs WHERE name='c'")
                ).scalar_one()
            assert bool(stored) is True
            with pytest.raises(sa.exc.IntegrityError), engine.begin() as conn:
                conn.execute(sa.text("UPDATE runs SET write_checkpoints=NULL WHERE name='a'"))
        if (before, after) == ("0005", "0006"):
            # existing runs: no tags, no note, no sweep, no recorded cancel reason
            run = new["runs"][0]
            assert (run["note"], run["sweep_id"], run["sweep_params"], run["cancel_reason"]) == (
                None,
                None,
                None,
                None,
            )
            assert run["tags"] in ([], "[]")
            assert new["sweeps"] == [] and new["sweep_trials"] == []
            sweep_id = _stored(uuid.UUID(int=0x5), engine.dialect.name)
            run_a = _stored(RUN_A, engine.dialect.name)
            with engine.begin() as conn:  # a sweep whose trial is run a, pruned
                conn.execute(
                    sa.text(
                        "INSERT INTO sweeps (id, name, owner, status, method, metric_name,"
                        " metric_goal, max_runs, max_concurrent, seed, spec, cancel_requested,"
                        " created_at, updated_at) VALUES (:id, 's', 'local', 'running', 'grid',"
                        " 'val_loss', 'minimize', NULL, 2, 0, '{}', :f, :t, :t)"
                    ),
                    {"id": sweep_id, "t": T0, "f": False},
                )
                conn.execute(
                    sa.text(
                        "INSERT INTO sweep_trials (sweep_id, number, params, state, run_id,"
                        " errors, created_at) VALUES (:s, 0, '{}', 'created', :r, '[]', :t)"
                    ),
                    {"s": sweep_id, "r": run_a, "t": T0},
                )
                conn.execute(
                    sa.text("UPDATE runs SET sweep_id=:s, cancel_reason='pruned'"),
                    {"s": sweep_id},
                )
            checks = [
                "UPDATE runs SET cancel_reason='bored'",
                "UPDATE sweeps SET method='bayes'",
                "UPDATE sweeps SET max_concurrent=0",
                "UPDATE sweeps SET status='paused'",
                "UPDATE sweep_trials SET state='maybe'",
                "UPDATE sweep_trials SET number=-1",
            ]
            for bad in checks:
                with pytest.raises(sa.exc.IntegrityError), engine.begin() as conn:
                    conn.execute(sa.text(bad))
            with engine.begin() as conn:  # deleting the run keeps the trial, without its run
                conn.execute(sa.text("DELETE FROM checkpoints"))
                conn.execute(sa.text("DELETE FROM runs"))
                left = conn.execute(sa.text("SELECT run_id FROM sweep_trials")).scalar_one()
            assert left is None
        if (before, after) == ("0006", "0007"):
            # existing runs and sweeps subscribe to nothing; the outbox starts empty
            assert [r["webhooks"] for r in new["runs"]] in ([[]], ["[]"])
            assert [r["webhooks"] for r in new["sweeps"]] in ([[]], ["[]"])
            assert new["webhook_deliveries"] == []
            dialect = engine.dialect.name
            row = {
                "run": _stored(RUN_A, dialect),
                "t": T0,
                "body": '{"event":"run.succeeded"}',
            }
            insert = (
                "INSERT INTO webhook_deliveries (id, run_id, event, url, dedupe_key, body, state,"
                " attempts, next_attempt_at, created_at) VALUES (:id, :run, 'run.succeeded',"
                " 'http://h/x', 'run:a:end', :body, 'pending', 0, :t, :t)"
            )
            with engine.begin() as conn:
                conn.execute(sa.text(insert), {**row, "id": _stored(uuid.UUID(int=1), dialect)})
            with pytest.raises(sa.exc.IntegrityError), engine.begin() as conn:  # once per URL
                conn.execute(sa.text(insert), {**row, "id": _stored(uuid.UUID(int=2), dialect)})
            for bad in (
                "UPDATE webhook_deliveries SET state='lost'",
                "UPDATE webhook_deliveries SET attempts=-1",
            ):
                with pytest.raises(sa.exc.IntegrityError), engine.begin() as conn:
                    conn.execute(sa.text(bad))
            with engine.begin() as conn:  # deleting the run deletes its deliveries
                conn.execute(sa.text("DELETE FROM runs"))
                left = conn.execute(sa.text("SELECT count(*) FROM webhook_deliveries"))
                assert left.scalar_one() == 0
    finally:
        engine.dispose()


def test_sqlite_batch_copies_keep_every_named_constraint(tmp_path: Path):
    """SQLite rebuilds a table to alter it; every CHECK, foreign key and unique constraint the
    models name must still be in the rebuilt tables' SQL at head."""
    settings = settings_for(tmp_path)
    migrate(settings)
    assert settings.database_url is not None
    engine = make_engine(settings.database_url)
    try:
        with engine.connect() as conn:
            sql = {
                name: text
                for name, text in conn.execute(
                    sa.text("SELECT name, sql FROM sqlite_master WHERE type='table'")
                )
            }
    finally:
        engine.dispose()
    for table in metadata.sorted_tables:
        for constraint in table.constraints:
            if isinstance(
                constraint, (sa.CheckConstraint, sa.UniqueConstraint, sa.ForeignKeyConstraint)
            ):
                name = str(constraint.name)
                assert name in sql[table.name], f"{table.name}: {name} lost"
