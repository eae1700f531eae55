"""Database fixtures for the tests (no tests here): a fresh PostgreSQL database per test
session and a migrated SQLite file per test, behind one parametrized ``database`` fixture.

The PostgreSQL server is the session's (``tests.support.servers.postgres_admin_url``: the admin
URL in ``MOEJOBS_TEST_POSTGRES_URL`` or ``MOEJOBS_TEST_DATABASE_URL``, else the machine's on
127.0.0.1:5432, else a throwaway server): tests that cannot reach it fail with a message saying
so, they are never skipped. Each session creates ``moejobs_test_<random>`` and drops it at the
end.

The fixtures (``postgres_url``, ``postgres_migrated``, ``database``) are in tests/conftest.py.
"""

from __future__ import annotations

import uuid
from pathlib import Path

import psycopg
import pytest
import sqlalchemy as sa
from psycopg import sql

from service.db import Database
from service.models import metadata
from service.settings import Settings
from tests.support.servers import postgres_admin_url


def _admin_connect() -> psycopg.Connection:
    admin_url = postgres_admin_url()
    try:
        return psycopg.connect(admin_url, autocommit=True, connect_timeout=5)
    except psycopg.OperationalError as error:
        problem = str(error).strip()
    pytest.fail(
        f"PostgreSQL is not reachable at {admin_url}: {problem}\n"
        "These tests need a real PostgreSQL server: start it (e.g. "
        "`pg_ctlcluster 15 main start`), point MOEJOBS_TEST_POSTGRES_URL at an admin "
        "connection URL, or unset it to let the tests start their own.",
        pytrace=False,
    )


def create_pg_database(prefix: str = "moejobs_test") -> str:
    """Create an empty database ``<prefix>_<random>`` and return its SQLAlchemy URL."""
    name = f"{prefix}_{uuid.uuid4().hex[:12]}"
    with _admin_connect() as conn:
        conn.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name)))
    url = sa.make_url(postgres_admin_url()).set(drivername="postgresql+psycopg", database=name)
    return url.render_as_string(hide_password=False)


def drop_pg_database(url: str) -> None:
    """Drop the database of ``url``, disconnecting any leftover sessions first."""
    name = sa.make_url(url).database
    assert name is not None, url
    with _admin_connect() as conn:
        conn.execute(
            sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(name))
        )


def settings_for(tmp_path: Path, database_url: str | None = None, **overrides) -> Settings:
    """Settings rooted in ``tmp_path`` whatever MOEJOBS_* variables the shell has. Checkpoint
    samples are off unless a test asks for them (each is a torch process beside the training)."""
    home = tmp_path / "home"
    overrides.setdefault("sample_prompts", "none")  # "" is ignored in a child's environment
    return Settings(
        home=home,
        database_url=database_url or f"sqlite:///{home / 'moejobs.sqlite3'}",
        broker_url=f"sqla+sqlite:///{home / 'broker.sqlite3'}",
        data_root=home / "data",
        runs_dir=home / "runs",
        host="127.0.0.1",
        api_token=None,
        **overrides,
    )


def truncate_all(db: Database) -> None:
    tables = ", ".join(t.name for t in metadata.sorted_tables)
    with db.engine.begin() as conn:
        conn.execute(sa.text(f"TRUNCATE {tables} CASCADE"))
