"""Engines, sessions and migrations. Nothing is connected at import: the app, the worker and the
CLI call :func:`open_database` (or :func:`make_engine`) at start-up.

SQLite (the embedded default) is set up for several processes sharing one file: WAL journal
(readers never block the writer), a busy timeout (writers wait for the lock instead of failing),
foreign keys on (SQLite ignores them otherwise, and run deletion relies on ON DELETE CASCADE).
SQLAlchemy, not the sqlite3 module, emits BEGIN, and write transactions begin with
``BEGIN IMMEDIATE`` (:func:`write_transaction`): a transaction that reads and then writes
would otherwise fail at once with "database is locked" if another process committed in between
(WAL snapshot conflict), which no busy timeout helps with.

PostgreSQL goes through psycopg 3 (``postgresql+psycopg://``) with pre-ping on checkout.

The schema belongs to Alembic: :func:`migrate` upgrades to head; the app never calls
``create_all``. :func:`check_schema` is the start-up check of the API, the workers and the CLI
(no process starts on a database that is unreachable or not at head).
"""

from __future__ import annotations

import contextlib
import sqlite3
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import sqlalchemy as sa
from sqlalchemy import event
from sqlalchemy.engine import Engine
from sqlalchemy.orm import sessionmaker
from sqlmodel import Session

from service.resources import project_path
from service.settings import Settings, normalize_database_url, sqlite_path

#: Connection execution option that makes SQLite begin with BEGIN IMMEDIATE.
_WRITE_OPTION = "moejobs_write"

#: The shipped migrations/ folder and alembic.ini (repository root, or inside an installed wheel).
MIGRATIONS_DIR = project_path("migrations")
ALEMBIC_INI = project_path("alembic.ini")


def make_engine(
    url: str,
    *,
    sqlite_busy_timeout_ms: int = 30_000,
    echo: bool = False,
    idle_in_transaction_ms: int | None = None,
    **kwargs: Any,
) -> Engine:
    """An Engine for ``url`` (``sqlite:///PATH`` or a PostgreSQL URL, normalised to psycopg 3).

    SQLite: the folder of the database file is created; each new connection gets
    ``journal_mode=WAL`` (file databases), ``busy_timeout=sqlite_busy_timeout_ms``,
    ``foreign_keys=ON`` and ``synchronous=NORMAL`` (durable with WAL except for the last
    transactions on power loss); BEGIN is emitted by SQLAlchemy, IMMEDIATE for
    :func:`write_transaction`. PostgreSQL: ``idle_in_transaction_ms`` sets the server's
    ``idle_in_transaction_session_timeout`` for these connections, so the server ends the
    session of a client that stalls inside a transaction (a frozen worker) and its row locks
    do not block everyone else. Extra ``kwargs`` go to ``sqlalchemy.create_engine``.
    """
    url = normalize_database_url(url)
    if url.startswith("sqlite"):
        path = sqlite_path(url)
        if path is not None:
            path.parent.mkdir(parents=True, exist_ok=True)
        engine = sa.create_engine(url, echo=echo, **kwargs)
        _configure_sqlite(engine, sqlite_busy_timeout_ms, file_backed=path is not None)
        return engine
    kwargs.setdefault("pool_pre_ping", True)
    if idle_in_transaction_ms is not None:
        connect_args = dict(kwargs.pop("connect_args", {}))
        option = f"-c idle_in_transaction_session_timeout={int(idle_in_transaction_ms)}"
        connect_args["options"] = " ".join(p for p in (connect_args.get("options"), option) if p)
        kwargs["connect_args"] = connect_args
    return sa.create_engine(url, echo=echo, **kwargs)


def _configure_sqlite(engine: Engine, busy_timeout_ms: int, *, file_backed: bool) -> None:
    @event.listens_for(engine, "connect")
    def _on_connect(dbapi_connection: Any, _record: Any) -> None:
        # Take BEGIN away from the sqlite3 module (it would skip it before SELECTs and DDL).
        dbapi_connection.isolation_level = None
        cursor = dbapi_connection.cursor()
        try:
            if file_backed:
                cursor.execute("PRAGMA journal_mode=WAL")
            cursor.execute(f"PRAGMA busy_timeout={int(busy_timeout_ms)}")
            cursor.execute("PRAGMA foreign_keys=ON")
            cursor.execute("PRAGMA synchronous=NORMAL")
        finally:
            cursor.close()

    @event.listens_for(engine, "begin")
    def _on_begin(conn: sa.Connection) -> None:
        immediate = conn.get_execution_options().get(_WRITE_OPTION, False)
        conn.exec_driver_sql("BEGIN IMMEDIATE" if immediate else "BEGIN")


#: How SQLite's OperationalErrors that mean "not now" begin (lower case). Its other
#: OperationalErrors (a syntax error, no such column) are bugs.
_SQLITE_UNAVAILABLE = (
    "database is locked",
    "database table is locked",
    "database is busy",
    "unable to open database",
    "disk i/o error",
)


def unavailable_reason(error: BaseException) -> str | None:
    """A one-line reason when ``error`` (raised while using an engine) means the database
    cannot serve right now and a retry later may work: unreachable or refusing connections,
    a connection lost mid-query (server restarted or stopped), the pool's timeout, a SQLite
    lock held past the busy timeout. None for every other error (a bug, a constraint
    violation), which must stay a 500."""
    if isinstance(error, sa.exc.TimeoutError):  # QueuePool timeout, not a DBAPI error
        return f"no pooled connection came free: {_one_line(error)}"
    if not isinstance(error, sa.exc.DBAPIError):
        return None
    if error.connection_invalidated:
        return f"connection lost: {_one_line(error.orig)}"
    if isinstance(error.orig, sqlite3.Error):
        message = str(error.orig).lower()
        return _one_line(error.orig) if message.startswith(_SQLITE_UNAVAILABLE) else None
    if isinstance(error, (sa.exc.OperationalError, sa.exc.InterfaceError)):
        return _one_line(error.orig)
    return None


def _one_line(error: BaseException | None) -> str:
    text = " ".join(f"{type(error).__name__}: {error}".split())
    return text[:300]


def make_session_factory(engine: Engine) -> sessionmaker[Session]:
    """A factory of ``sqlmodel.Session`` bound to ``engine``. ``expire_on_commit=False``:
    objects returned by ``service.runs`` stay readable after their commit (the API serialises
    them after the function returned)."""
    return sessionmaker(bind=engine, class_=Session, expire_on_commit=False)


@contextlib.contextmanager
def session_scope(factory: sessionmaker[Session]) -> Iterator[Session]:
    """A session for one unit of work: rolled back if the block raises, always closed.
    Commits happen inside ``service.runs``, not here."""
    session = factory()
    try:
        yield session
    except BaseException:
        session.rollback()
        raise
    finally:
        session.close()


def _end_read(session: Session) -> None:
    """End the read-only transaction open on ``session``, if any; RuntimeError when the
    session holds ORM changes (they would be committed by surprise)."""
    if session.new or session.dirty or session.deleted:
        raise RuntimeError(
            "session has uncommitted ORM changes made outside service.runs; "
            "state changes go through service.runs"
        )
    if session.in_transaction():
        session.commit()  # nothing pending: only ends the read transaction, objects stay loaded


@contextlib.contextmanager
def read_transaction(session: Session) -> Iterator[Session]:
    """Run the block's reads (``service.reads``) in a transaction of their own on ``session``,
    ended when the block exits: nothing stays open afterwards while the caller does slower
    work (a broker call, a file), which on PostgreSQL would count towards the
    idle-in-transaction limit (:func:`idle_in_transaction_ms`) and on SQLite keep an old WAL
    snapshot. Objects read in the block stay readable after it. A read transaction already
    open on the session is ended first; ORM changes pending on it raise ``RuntimeError``, as
    in :func:`write_transaction`."""
    _end_read(session)
    with session.begin():
        yield session


@contextlib.contextmanager
def write_transaction(session: Session) -> Iterator[Session]:
    """Run the block in a new write transaction on ``session`` and commit it (roll back and
    re-raise on error). On SQLite the transaction starts with BEGIN IMMEDIATE, taking the
    write lock up front (waiting up to the busy timeout), so read-then-write blocks cannot
    hit a snapshot conflict; on PostgreSQL it is an ordinary READ COMMITTED transaction (use
    row locks or conditional UPDATEs inside).

    A read-only transaction already open on the session is ended first. Pending ORM changes
    made outside ``service.runs`` raise ``RuntimeError``: they would be committed by surprise.
    """
    _end_read(session)
    session.connection(execution_options={_WRITE_OPTION: True})
    try:
        yield session
        session.commit()
    except BaseException:
        session.rollback()
        raise


@dataclass
class Database:
    """An engine and its session factory, built once per process at start-up."""

    engine: Engine
    sessions: sessionmaker[Session]

    @contextlib.contextmanager
    def session(self) -> Iterator[Session]:
        """``with db.session() as s: ...`` — see :func:`session_scope`."""
        with session_scope(self.sessions) as session:
            yield session

    def dispose(self) -> None:
        """Close pooled connections (at shutdown, and in a child process after fork)."""
        self.engine.dispose()


def idle_in_transaction_ms(settings: Settings) -> int:
    """How long PostgreSQL lets a session of ours sit idle inside a transaction before it
    ends it: a quarter of the lease, at least one second. Our transactions last
    milliseconds; a client idle inside one for this long is frozen (SIGSTOP, a hung host)
    and its row locks would otherwise stop the reconciler from recovering its run."""
    return max(1000, int(settings.lease_seconds * 1000 / 4))


def open_database(settings: Settings, **engine_kwargs: Any) -> Database:
    """The :class:`Database` of ``settings.database_url``. Connects lazily; does not migrate.
    On PostgreSQL, sessions idle inside a transaction are ended after
    :func:`idle_in_transaction_ms`."""
    assert settings.database_url is not None
    engine_kwargs.setdefault("idle_in_transaction_ms", idle_in_transaction_ms(settings))
    engine = make_engine(
        settings.database_url,
        sqlite_busy_timeout_ms=settings.sqlite_busy_timeout_ms,
        **engine_kwargs,
    )
    return Database(engine=engine, sessions=make_session_factory(engine))


# -- migrations ---------------------------------------------------------------------------------


def alembic_config(settings: Settings | None = None, engine: Engine | None = None) -> Any:
    """An ``alembic.config.Config`` for ``migrations/`` that targets ``engine`` (when given)
    or ``settings.database_url``. The URL never comes from alembic.ini: ``migrations/env.py``
    reads ``config.attributes["engine"]``, else ``config.attributes["settings"]``, else
    ``service.settings.get_settings()``."""
    from alembic.config import Config

    config = Config(str(ALEMBIC_INI))
    config.set_main_option("script_location", str(MIGRATIONS_DIR))
    if settings is not None:
        config.attributes["settings"] = settings
    if engine is not None:
        config.attributes["engine"] = engine
    return config


def migrate(settings: Settings, revision: str = "head", *, engine: Engine | None = None) -> None:
    """Upgrade the database of ``settings`` (or ``engine``) to ``revision`` (default the newest),
    as ``moejobs migrate`` and ``moejobs up`` do. Safe to call when already current. Raises
    Alembic/SQLAlchemy errors (e.g. database unreachable) unchanged."""
    from alembic import command

    command.upgrade(alembic_config(settings, engine), revision)


def downgrade(settings: Settings, revision: str = "base", *, engine: Engine | None = None) -> None:
    """Downgrade to ``revision`` (default: no tables). For tests and operators; destroys data."""
    from alembic import command

    command.downgrade(alembic_config(settings, engine), revision)


def head_revision() -> str | None:
    """The newest revision id in ``migrations/versions``."""
    from alembic.script import ScriptDirectory

    return ScriptDirectory.from_config(alembic_config()).get_current_head()


def current_revision(engine: Engine) -> str | None:
    """The revision the database is at (None when it was never migrated)."""
    from alembic.runtime.migration import MigrationContext

    with engine.connect() as conn:
        return MigrationContext.configure(conn).get_current_revision()


def schema_is_current(engine: Engine) -> bool:
    """True when the database is migrated to head (for readiness checks and start-up)."""
    return current_revision(engine) == head_revision()


# -- start-up check -----------------------------------------------------------------------------


class StartupError(RuntimeError):
    """The app cannot start: database unreachable or not migrated. The message says what to do."""


def safe_url(url: str) -> str:
    """``url`` with its password hidden, for messages and logs (``"<database url>"`` when it
    cannot be parsed)."""
    try:
        return sa.make_url(url).render_as_string(hide_password=True)
    except Exception:
        return "<database url>"


def check_schema(db: Database, settings: Settings, process: str = "server") -> None:
    """Raise :class:`StartupError` unless the database answers and is at the migration head;
    the message tells the user to start ``process`` (``"server"``, ``"worker"``) again."""
    url = safe_url(settings.database_url or "")
    try:
        revision = current_revision(db.engine)
    except Exception as error:
        raise StartupError(
            f"database {url} is unreachable: {type(error).__name__}: "
            f"{' '.join(str(error).split())[:300]}"
        ) from None
    head = head_revision()
    if revision != head:
        state = "has no moejobs tables" if revision is None else f"is at revision {revision}"
        raise StartupError(
            f"database {url} {state}, but this code needs revision {head}: run `moejobs migrate` "
            f"(or `moejobs up`, which migrates) and start the {process} again"
        )
