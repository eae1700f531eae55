"""Settings, engines and migrations, on real SQLite and PostgreSQL."""

from __future__ import annotations

import uuid
from datetime import UTC, datetime, timedelta, timezone

import pytest
import sqlalchemy as sa
from alembic.autogenerate import compare_metadata
from alembic.runtime.migration import MigrationContext
from pydantic import ValidationError

from service import settings as settings_module
from service.db import (
    current_revision,
    downgrade,
    head_revision,
    make_engine,
    migrate,
    schema_is_current,
)
from service.models import Run, metadata
from service.settings import (
    InvalidSettingsError,
    Settings,
    UnsafeSettingsError,
    get_settings,
    use_settings,
)
from tests.support import REPO
from tests.support.db import create_pg_database, drop_pg_database, settings_for

TABLES = {
    "runs",
    "run_events",
    "metric_points",
    "router_points",
    "checkpoints",
    "workers",
    "run_provenance",
    "throughput",
    "sweeps",
    "sweep_trials",
    "webhook_deliveries",
}


# -- settings -----------------------------------------------------------------------------------


@pytest.fixture
def clean_env(monkeypatch: pytest.MonkeyPatch) -> pytest.MonkeyPatch:
    """No MOEJOBS_* variable from the developer's shell leaks into a settings test."""
    import os

    for name in list(os.environ):
        if name.startswith("MOEJOBS_"):
            monkeypatch.delenv(name)
    return monkeypatch


def test_defaults_derive_from_home(clean_env, tmp_path):
    s = Settings(home=tmp_path / "h")
    home = tmp_path / "h"
    assert s.home == home
    assert s.database_url == f"sqlite:///{home}/moejobs.sqlite3"
    assert s.broker_url == f"sqla+sqlite:///{home}/broker.sqlite3"
    assert s.data_root == home / "data"
    assert s.runs_dir == home / "runs"
    assert (s.host, s.port, s.api_token) == ("127.0.0.1", 8000, None)
    assert s.worker_gpus == "all" and s.allow_unschedulable is False
    assert s.run_dir("abc") == home / "runs" / "abc"
    assert not home.exists()  # building settings creates nothing
    s.ensure_dirs()
    assert (home / "data").is_dir() and (home / "runs").is_dir()


def test_every_setting_is_in_the_readme_settings_table():
    readme = (REPO / "README.md").read_text()
    rows = {line.split("|")[1] for line in readme.splitlines() if line.startswith("| `MOEJOBS_")}
    documented = " ".join(rows)
    missing = [
        f"MOEJOBS_{name.upper()}"
        for name in Settings.model_fields
        if f"`MOEJOBS_{name.upper()}`" not in documented
    ]
    assert not missing, f"settings missing from the README's table: {missing}"


def test_home_default_is_user_folder(clean_env, monkeypatch, tmp_path):
    monkeypatch.setenv("HOME", str(tmp_path))
    assert Settings().home == tmp_path / ".moejobs"


def test_environment_is_read_with_prefix_and_explicit_values_win(clean_env, tmp_path):
    clean_env.setenv("MOEJOBS_HOME", str(tmp_path / "envhome"))
    clean_env.setenv("MOEJOBS_RUNS_DIR", str(tmp_path / "elsewhere"))
    clean_env.setenv("MOEJOBS_PORT", "9001")
    clean_env.setenv("MOEJOBS_WORKER_GPUS", "0, 2")
    clean_env.setenv("MOEJOBS_API_TOKEN", "")  # empty counts as unset
    clean_env.setenv("MOEJOBS_DATABASE_URL", "postgresql://u@db.example/moejobs")
    s = Settings()
    assert s.home == tmp_path / "envhome"
    assert s.runs_dir == tmp_path / "elsewhere"
    assert s.data_root == tmp_path / "envhome" / "data"
    assert s.port == 9001
    assert s.worker_gpus == [0, 2]
    assert s.api_token is None
    assert s.database_url == "postgresql+psycopg://u@db.example/moejobs"
    explicit = Settings(home=tmp_path / "cli", port=8080)
    assert explicit.home == tmp_path / "cli" and explicit.port == 8080
    # a set variable still wins over a derived default
    assert explicit.runs_dir == tmp_path / "elsewhere"


@pytest.mark.parametrize("host", ["0.0.0.0", "::", "192.168.1.5", "example.com", "[::]"])
def test_listening_beyond_loopback_needs_a_token(clean_env, tmp_path, host):
    with pytest.raises(UnsafeSettingsError, match="MOEJOBS_API_TOKEN"):
        Settings(home=tmp_path, host=host)
    token = "a-long-random-token-of-32-chars!"
    s = Settings(home=tmp_path, host=host, api_token=token)
    assert s.api_token.get_secret_value() == token


@pytest.mark.parametrize("host", ["0.0.0.0", "::", "192.168.1.5", "example.com"])
def test_a_short_token_is_refused_beyond_loopback(clean_env, tmp_path, host):
    short = "x" * 31
    with pytest.raises(UnsafeSettingsError) as info:
        Settings(home=tmp_path, host=host, api_token=short)
    assert str(info.value) == (
        f"MOEJOBS_HOST={host} listens beyond this machine but MOEJOBS_API_TOKEN has 31 characters: it "
        'needs at least 32 there (make one with `python -c "import secrets; '
        'print(secrets.token_urlsafe(32))"`), or listen on 127.0.0.1'
    )
    assert short not in str(info.value)
    # what the message suggests is long enough
    import secrets

    assert Settings(home=tmp_path, host=host, api_token=secrets.token_urlsafe(32)).host == host
    assert Settings(home=tmp_path, host=host, api_token="x" * 32).host == host


@pytest.mark.parametrize("host", ["127.0.0.1", "localhost", "::1"])
def test_a_short_token_is_allowed_on_loopback(clean_env, tmp_path, host):
    assert Settings(home=tmp_path, host=host, api_token="t").api_token.get_secret_value() == "t"


@pytest.mark.parametrize("host", ["127.0.0.1", "127.0.0.2", "localhost", "::1", "[::1]"])
def test_loopback_hosts_need_no_token(clean_env, tmp_path, host):
    assert Settings(home=tmp_path, host=host).host == host


def test_unsafe_error_does_not_echo_the_token(clean_env, tmp_path):
    with pytest.raises(UnsafeSettingsError) as info:
        Settings(home=tmp_path, heartbeat_seconds=200, api_token="sekrit-value")
    assert "sekrit-value" not in str(info.value)
    assert "MOEJOBS_LEASE_SECONDS" in str(info.value)


def test_blank_token_from_environment_is_unset(clean_env, tmp_path):
    clean_env.setenv("MOEJOBS_API_TOKEN", "   ")
    clean_env.setenv("MOEJOBS_HOST", "0.0.0.0")
    with pytest.raises(UnsafeSettingsError):
        Settings(home=tmp_path)


@pytest.mark.parametrize(
    "value, expected",
    [
        ("all", "all"),
        ("ALL", "all"),
        ("0", [0]),
        ("1,3", [1, 3]),
        ([2, 0], [2, 0]),
    ],
)
def test_worker_gpus_parsing(clean_env, tmp_path, value, expected):
    assert Settings(home=tmp_path, worker_gpus=value).worker_gpus == expected


@pytest.mark.parametrize("value", ["", "a,b", "-1", "0,0", "1.5"])
def test_worker_gpus_rejects_bad_lists(clean_env, tmp_path, value):
    with pytest.raises(ValidationError, match="worker_gpus"):
        Settings(home=tmp_path, worker_gpus=value)


def test_malformed_values_are_validation_errors(clean_env, tmp_path):
    with pytest.raises(ValidationError, match="port"):
        Settings(home=tmp_path, port=70000)
    clean_env.setenv("MOEJOBS_LEASE_SECONDS", "soon")
    with pytest.raises(ValidationError, match="lease_seconds"):
        Settings(home=tmp_path)


@pytest.mark.parametrize(
    "url, expected",
    [
        ("sqlite:///x.sqlite3", "sqlite:///x.sqlite3"),
        ("sqlite://", "sqlite://"),
        ("sqlite+pysqlite:///x", "sqlite+pysqlite:///x"),
        ("postgresql+psycopg://u@h/d", "postgresql+psycopg://u@h/d"),
        ("postgres://u@h/d", "postgresql+psycopg://u@h/d"),
        ("postgresql+psycopg2://u@h/d", "postgresql+psycopg://u@h/d"),
    ],
)
def test_database_urls_moejobs_can_use(clean_env, tmp_path, url, expected):
    assert Settings(home=tmp_path, database_url=url).database_url == expected


@pytest.mark.parametrize(
    "url", ["bogus://x", "mysql://u:hunter2@h/d", "postgresql+asyncpg://u:hunter2@h/d", "hunter2"]
)
def test_other_database_urls_are_refused_without_echoing_them(clean_env, tmp_path, url):
    with pytest.raises(ValidationError, match="database_url") as info:
        Settings(home=tmp_path, database_url=url)
    assert "hunter2" not in str(info.value)
    problem = settings_module.InvalidSettingsError.from_exception(info.value)
    [line] = problem.lines()
    assert line.startswith("MOEJOBS_DATABASE_URL: ") and "sqlite:///PATH" in line
    assert "hunter2" not in line


def test_load_settings_names_flags_and_variables(clean_env, tmp_path):
    clean_env.setenv("MOEJOBS_LEASE_SECONDS", "soon")
    with pytest.raises(settings_module.InvalidSettingsError) as info:
        settings_module.load_settings(home=tmp_path, port=0)
    assert info.value.lines({"port": "--port"}) == [
        "--port: must be greater than or equal to 1, got 0",
        "MOEJOBS_LEASE_SECONDS: expected a number, got 'soon'",
    ]


def test_to_env_round_trips(clean_env, tmp_path):
    original = Settings(
        home=tmp_path,
        host="0.0.0.0",
        api_token="t" * 32,
        worker_gpus="0,1",
        allow_unschedulable=True,
        lease_seconds=60,
    )
    for name, value in original.to_env().items():
        clean_env.setenv(name, value)
    assert Settings() == original


def test_get_settings_is_cached_and_overridable(clean_env, tmp_path):
    clean_env.setenv("MOEJOBS_HOME", str(tmp_path / "a"))
    use_settings(None)
    try:
        first = get_settings()
        assert get_settings() is first and first.home == tmp_path / "a"
        mine = settings_module.settings_for_home(tmp_path / "b")
        use_settings(mine)
        assert get_settings() is mine
        clean_env.setenv("MOEJOBS_HOME", str(tmp_path / "c"))
        use_settings(None)  # back to the environment, re-read
        assert get_settings().home == tmp_path / "c"
    finally:
        use_settings(None)


# -- engines ------------------------------------------------------------------------------------


def test_sqlite_connections_get_the_pragmas(tmp_path):
    engine = make_engine(f"sqlite:///{tmp_path}/sub/x.sqlite3", sqlite_busy_timeout_ms=1234)
    try:
        with engine.connect() as conn:
            assert conn.exec_driver_sql("PRAGMA journal_mode").scalar() == "wal"
            assert conn.exec_driver_sql("PRAGMA foreign_keys").scalar() == 1
            assert conn.exec_driver_sql("PRAGMA busy_timeout").scalar() == 1234
    finally:
        engine.dispose()
    assert (tmp_path / "sub" / "x.sqlite3").exists()


def test_sqlite_ddl_is_transactional(tmp_path):
    """SQLAlchemy emits BEGIN itself, so a rolled-back CREATE TABLE leaves nothing behind
    (the sqlite3 module alone would have autocommitted it): what makes a failed migration
    roll back cleanly on SQLite."""
    engine = make_engine(f"sqlite:///{tmp_path}/x.sqlite3")
    try:
        with engine.connect() as conn:
            conn.exec_driver_sql("CREATE TABLE t (x INTEGER)")
            conn.rollback()
        assert "t" not in sa.inspect(engine).get_table_names()
    finally:
        engine.dispose()


def test_timestamps_come_back_aware_utc(database):
    plus_two = timezone(timedelta(hours=2))
    stamp = datetime(2025, 3, 1, 12, 30, 15, 123456, tzinfo=plus_two)
    with database.session() as s:
        run = Run(
            name="t",
            submitted_train={},
            submitted_model={},
            resolved_train={},
            resolved_model={},
            created_at=stamp,
            queued_at=stamp,
            updated_at=stamp,
        )
        s.add(run)
        s.commit()
        run_id = run.id
    with database.session() as s:
        got = s.get(Run, run_id)
        assert got.created_at == stamp
        assert got.created_at.tzinfo is not None and got.created_at.utcoffset() == timedelta(0)
        assert got.created_at.hour == 10
        # SQL comparison with an aware bound value agrees with Python's
        assert (
            s.execute(
                sa.select(sa.func.count())
                .select_from(Run)
                .where(Run.created_at < stamp + timedelta(microseconds=1))
            ).scalar()
            == 1
        )
        assert (
            s.execute(
                sa.select(sa.func.count()).select_from(Run).where(Run.created_at > stamp)
            ).scalar()
            == 0
        )


def test_naive_timestamps_are_refused(database):
    with database.session() as s:
        s.add(
            Run(
                name="t",
                submitted_train={},
                submitted_model={},
                resolved_train={},
                resolved_model={},
                created_at=datetime(2025, 1, 1),
            )
        )
        with pytest.raises(sa.exc.StatementError, match="naive datetime"):
            s.commit()


def test_check_constraints_hold_in_the_database(database):
    """The database itself refuses a failed run without a reason and unknown statuses."""
    rid = uuid.uuid4().hex
    with database.engine.connect() as conn:
        insert = sa.text(
            "INSERT INTO runs (id, name, owner, status, submitted_train, submitted_model, "
            "resolved_train, resolved_model, warnings, attempt, created_at, queued_at, "
            "updated_at, cancel_requested) VALUES (:id, 'x', 'local', :status, '{}', '{}', "
            "'{}', '{}', '[]', 0, :t, :t, :t, false)"
        )
        t = datetime(2025, 1, 1, tzinfo=UTC)
        ident = rid if database.engine.dialect.name == "sqlite" else str(uuid.UUID(rid))
        for status, constraint in (
            ("failed", "ck_runs_failure_reason_iff_failed"),
            ("paused", "ck_runs_status"),
        ):
            with pytest.raises(sa.exc.IntegrityError, match=constraint):
                with conn.begin_nested():
                    conn.execute(insert, {"id": ident, "status": status, "t": t})
        conn.rollback()


# -- migrations ---------------------------------------------------------------------------------


@pytest.fixture(params=["sqlite", "postgresql"])
def empty_settings(request, tmp_path):
    """Settings pointing at a brand-new empty database of each kind."""
    if request.param == "sqlite":
        yield settings_for(tmp_path)
        return
    url = create_pg_database("moejobs_migrate")
    try:
        yield settings_for(tmp_path, url)
    finally:
        drop_pg_database(url)


def _tables(settings: Settings) -> set[str]:
    assert settings.database_url is not None
    engine = make_engine(settings.database_url)
    try:
        return set(sa.inspect(engine).get_table_names())
    finally:
        engine.dispose()


def test_migrations_upgrade_to_head_and_downgrade_to_base(empty_settings):
    assert head_revision() is not None
    migrate(empty_settings)
    assert _tables(empty_settings) == TABLES | {"alembic_version"}
    engine = make_engine(empty_settings.database_url)
    try:
        assert current_revision(engine) == head_revision()
        assert schema_is_current(engine)
        # The migrations build exactly what the models describe (names, types, constraints).
        with engine.connect() as conn:
            context = MigrationContext.configure(conn, opts={"compare_type": True})
            assert compare_metadata(context, metadata) == []
    finally:
        engine.dispose()
    migrate(empty_settings)  # already at head: nothing to do
    downgrade(empty_settings, "base")
    assert _tables(empty_settings) == {"alembic_version"}
    migrate(empty_settings)
    assert _tables(empty_settings) == TABLES | {"alembic_version"}


def test_concurrent_migrations_run_one_after_the_other(empty_settings):
    """`moejobs up` started twice at once (two processes): both upgrades succeed, the schema
    is built once (BEGIN IMMEDIATE on SQLite, an advisory lock on PostgreSQL)."""
    import os
    import subprocess
    import sys

    env = {k: v for k, v in os.environ.items() if not k.startswith("MOEJOBS_")}
    env.update(empty_settings.to_env())
    code = (
        "from service.db import migrate; from service.settings import Settings; migrate(Settings())"
    )
    root = REPO
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", code], cwd=root, env=env, stderr=subprocess.PIPE, text=True
        )
        for _ in range(2)
    ]
    results = [(p.wait(timeout=120), p.stderr.read()) for p in procs]
    for p in procs:
        p.stderr.close()
    assert [code for code, _ in results] == [0, 0], results
    engine = make_engine(empty_settings.database_url)
    try:
        assert schema_is_current(engine)
        with engine.connect() as conn:
            assert conn.execute(sa.text("SELECT count(*) FROM alembic_version")).scalar() == 1
    finally:
        engine.dispose()


def test_migrations_are_date_prefixed():
    from service.db import MIGRATIONS_DIR

    files = sorted(p.name for p in (MIGRATIONS_DIR / "versions").glob("*.py"))
    assert files, "no migration files"
    for name in files:
        stamp = name.split("_")[0]
        assert len(stamp) == 8 and stamp.isdigit(), name
        datetime.strptime(stamp, "%Y%m%d")


def test_app_code_never_calls_create_all():
    root = REPO
    for folder in ("service", "worker"):
        for path in (root / folder).rglob("*.py"):
            assert "create_all(" not in path.read_text(), path


def test_postgresql_ends_a_session_frozen_inside_a_transaction(tmp_path, postgres_migrated):
    """A client that stalls inside a transaction holding a row lock (a frozen worker) is
    ended by the server after a quarter of the lease, so another session gets the lock."""
    import time

    from service.db import idle_in_transaction_ms, open_database

    settings = settings_for(
        tmp_path, postgres_migrated, lease_seconds=4, heartbeat_seconds=0.5, worker_stale_seconds=2
    )
    assert idle_in_transaction_ms(settings) == 1000
    frozen, other = open_database(settings), open_database(settings)
    try:
        with frozen.engine.connect() as conn:
            conn.execute(sa.text("CREATE TABLE IF NOT EXISTS lock_probe (id int primary key)"))
            conn.execute(sa.text("INSERT INTO lock_probe VALUES (1) ON CONFLICT DO NOTHING"))
            conn.commit()
            conn.execute(sa.text("SELECT id FROM lock_probe WHERE id = 1 FOR UPDATE"))
            time.sleep(2.5)  # "frozen" inside the transaction: the server ends the session
            with pytest.raises(sa.exc.DBAPIError, match="idle-in-transaction timeout"):
                conn.execute(sa.text("SELECT 1"))
        with other.engine.connect() as conn:  # the lock is free again (else lock_timeout)
            conn.execute(sa.text("SET lock_timeout = '1s'"))
            conn.execute(sa.text("SELECT id FROM lock_probe WHERE id = 1 FOR UPDATE"))
            conn.execute(sa.text("DROP TABLE lock_probe"))
            conn.commit()
    finally:
        frozen.dispose()
        other.dispose()


def test_webhook_settings(clean_env, tmp_path):
    """WEBHOOK_URLS is a comma-separated list of http(s) URLs that needs a secret of at
    least 16 characters; no message repeats the secret or a URL."""
    secret = "a-webhook-secret-of-32-characters"
    s = settings_for(
        tmp_path, webhook_urls="http://a.example/x, https://b.example/y", webhook_secret=secret
    )
    assert s.webhook_urls == ["http://a.example/x", "https://b.example/y"]
    assert secret not in repr(s) and secret not in str(s.model_dump())
    assert Settings(**{**s.model_dump(), "webhook_secret": secret}).webhook_urls == s.webhook_urls
    with pytest.raises(UnsafeSettingsError, match="MOEJOBS_WEBHOOK_SECRET"):
        settings_for(tmp_path, webhook_urls="http://a.example/x")
    for bad in ("ftp://a.example/x", "http://user:pw@a.example/x", "http:///x"):
        with pytest.raises(ValidationError) as error:
            settings_for(tmp_path, webhook_urls=bad, webhook_secret=secret)
        text = str(InvalidSettingsError.from_exception(error.value))
        assert "MOEJOBS_WEBHOOK_URLS" in text and "pw@" not in text
    with pytest.raises(ValidationError) as error:
        settings_for(tmp_path, webhook_secret="short-secret")
    text = str(InvalidSettingsError.from_exception(error.value))
    assert "MOEJOBS_WEBHOOK_SECRET: needs at least 16 characters" in text
    assert "short-secret" not in text
