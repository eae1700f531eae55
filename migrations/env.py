"""Alembic environment for moejobs.

The database comes from, in order: ``config.attributes["engine"]`` (tests, ``service.db.migrate``
with an engine), ``config.attributes["settings"]`` (``service.db.migrate(settings)``), else
``service.settings.get_settings()`` (the ``alembic`` command line; MOEJOBS_* environment). Never
from alembic.ini.

The whole upgrade runs in one transaction on both databases (SQLite's DDL is transactional
once SQLAlchemy emits BEGIN, which ``service.db.make_engine`` arranges), taken with the write
lock up front: BEGIN IMMEDIATE on SQLite, an advisory transaction lock on PostgreSQL, so two
processes migrating at once (``moejobs up`` twice) run one after the other and the second finds
nothing to do. SQLite gets batch mode (copy-and-move) for ALTERs it cannot do in place.
"""

from __future__ import annotations

import logging.config
from typing import TYPE_CHECKING, Any, Literal

import sqlalchemy as sa
from alembic import context

from service.db import _WRITE_OPTION, make_engine
from service.models import metadata as target_metadata
from service.settings import Settings, get_settings

if TYPE_CHECKING:
    from alembic.autogenerate.api import AutogenContext

config = context.config

#: pg_advisory_xact_lock key serialising concurrent migrations ("moejobs" as digits, any
#: constant works as long as it is the same in every process).
_PG_MIGRATION_LOCK = 0x6D6F656A6F6273

if "engine" not in config.attributes and "settings" not in config.attributes:
    # Only when run as the `alembic` command: configure logging from alembic.ini. Called from
    # the app, the app's logging stays as it is.
    if config.config_file_name is not None:
        logging.config.fileConfig(config.config_file_name, disable_existing_loggers=False)


def render_item(type_: str, obj: Any, autogen_context: AutogenContext) -> str | Literal[False]:
    """Render our column types as plain SQLAlchemy types in generated migrations, so that a
    migration keeps working when service/models.py changes later: UTCDateTime (a Python-side
    conversion) is a timestamp with time zone in the database; SQLModel's AutoString is a
    VARCHAR."""
    if type_ == "type":
        from sqlmodel.sql.sqltypes import AutoString

        from service.models import UTCDateTime

        if isinstance(obj, UTCDateTime):
            return "sa.DateTime(timezone=True)"
        if isinstance(obj, AutoString):
            return f"sa.String(length={obj.length!r})" if obj.length else "sa.String()"
    return False


def _settings() -> Settings:
    return config.attributes.get("settings") or get_settings()


def _database_url(settings: Settings) -> str:
    assert settings.database_url is not None  # Settings derives it from home when unset
    return settings.database_url


def run_migrations_offline() -> None:
    """``alembic upgrade --sql``: print the SQL for the configured database's dialect."""
    url = _database_url(_settings())
    context.configure(
        url=url,
        target_metadata=target_metadata,
        literal_binds=True,
        dialect_opts={"paramstyle": "named"},
        render_as_batch=url.startswith("sqlite"),
        compare_type=True,
        render_item=render_item,
    )
    with context.begin_transaction():
        context.run_migrations()


def run_migrations_online() -> None:
    engine: sa.Engine | None = config.attributes.get("engine")
    owned = engine is None
    if engine is None:
        settings = _settings()
        engine = make_engine(
            _database_url(settings), sqlite_busy_timeout_ms=settings.sqlite_busy_timeout_ms
        )
    try:
        with engine.connect() as connection:
            connection = connection.execution_options(**{_WRITE_OPTION: True})
            is_sqlite = connection.dialect.name == "sqlite"
            context.configure(
                connection=connection,
                target_metadata=target_metadata,
                render_as_batch=is_sqlite,
                compare_type=True,
                render_item=render_item,
                transactional_ddl=True,
            )
            raw = connection.connection.driver_connection if is_sqlite else None
            if raw is not None:
                # SQLite alters a table by copying it and dropping the old one: with foreign
                # keys on, that DROP deletes every child row through ON DELETE CASCADE. The
                # pragma only works outside a transaction; the keys are checked before commit.
                raw.execute("PRAGMA foreign_keys=OFF")
            try:
                with context.begin_transaction():
                    if connection.dialect.name == "postgresql":
                        connection.execute(
                            sa.text("SELECT pg_advisory_xact_lock(:key)"),
                            {"key": _PG_MIGRATION_LOCK},
                        )
                    context.run_migrations()
                    if raw is not None:
                        broken = connection.exec_driver_sql("PRAGMA foreign_key_check").fetchall()
                        if broken:
                            raise RuntimeError(
                                f"migration left rows whose foreign keys point "
                                f"nowhere: {broken[:5]}"
                            )
            finally:
                if raw is not None:
                    raw.execute("PRAGMA foreign_keys=ON")
    finally:
        if owned:
            engine.dispose()


if context.is_offline_mode():
    run_migrations_offline()
else:
    run_migrations_online()
