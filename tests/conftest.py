"""Fixtures every test folder shares: the PostgreSQL and Redis servers of the session, a
real-text corpus and a tokenizer trained on it, the tiny MoE documents, the databases (a
migrated SQLite file, the session's PostgreSQL database) and the app on them.

Every test gets its own token cache (``MOEJOBS_TOKEN_CACHE``) so nothing is written under the
user's home folder. The PostgreSQL and Redis servers of the session are chosen on first use by
``tests.support.servers`` (throwaway ones are stopped here when the session ends, and the
summary says which were used). Helpers the fixtures use are in ``tests/support/``.

Nothing here imports the service, its database layer or the web stack at module level: the GPU
check (bench/gpu_check.sh) runs tests/worker/moe/ on a machine with only the engine's packages,
so the fixtures that need them import them when they run.
"""

from __future__ import annotations

import copy
import os
import sqlite3
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pytest

from tests.support import servers
from tests.support.tiny import (
    TINY_MODEL,
    TRAIN_MODULES,
    VAL_MODULES,
    stdlib_text_files,
    tiny_train_config,
)

if TYPE_CHECKING:
    from service.db import Database
    from tests.support.api import ApiEnv

# One intra-op thread for torch in the tests and in the processes they start (inherited). On a
# CPU shared with other jobs, torch's default of one OpenMP thread per core stalls at every
# parallel region whenever another process holds a core: measured on the 2-core development
# machine, the 300-step learning test took 357 s with 2 threads and 58 s with 1. CI may override.
os.environ.setdefault("OMP_NUM_THREADS", "1")
if "torch" in sys.modules:  # imported before this file: the variable came too late
    sys.modules["torch"].set_num_threads(int(os.environ["OMP_NUM_THREADS"]))


def pytest_configure(config: pytest.Config) -> None:
    servers.mode()  # a bad MOEJOBS_TEST_SERVERS is a usage error, at once


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    servers.stop_throwaway_servers()


def pytest_terminal_summary(terminalreporter, exitstatus: int, config: pytest.Config) -> None:
    lines = servers.summary()
    if lines:
        terminalreporter.section("test servers")
        for line in lines:
            terminalreporter.write_line(line)


@pytest.fixture(autouse=True)
def _token_cache(tmp_path_factory, monkeypatch):
    monkeypatch.setenv("MOEJOBS_TOKEN_CACHE", str(tmp_path_factory.getbasetemp() / "token-cache"))


@pytest.fixture(scope="session")
def corpus(tmp_path_factory) -> Path:
    """``<tmp>/corpus/{train,val}/*.txt`` from standard-library sources (~1 MB of real text)."""
    root = tmp_path_factory.mktemp("corpus")
    stdlib_text_files(root / "train", TRAIN_MODULES)
    stdlib_text_files(root / "val", VAL_MODULES)
    return root


@pytest.fixture(scope="session")
def tokenizer_dir(corpus, tmp_path_factory) -> Path:
    """A 1024-id byte-level BPE trained on the corpus with ``worker.tokenizer.train_tokenizer``."""
    from worker.tokenizer import train_tokenizer

    return train_tokenizer(
        [corpus / "train"], tmp_path_factory.mktemp("tok") / "tokenizer", vocab_size=1024
    )


@pytest.fixture
def tiny_model() -> dict:
    """A fresh copy of :data:`TINY_MODEL`."""
    return copy.deepcopy(TINY_MODEL)


@pytest.fixture
def train_doc(tmp_path, corpus, tokenizer_dir) -> dict:
    """:func:`tiny_train_config` with ``out_dir = tmp_path / "run"``."""
    return tiny_train_config(tmp_path / "run", corpus, tokenizer_dir)


# Databases (helpers in tests/support/db.py).


@pytest.fixture(scope="session")
def postgres_url() -> Iterator[str]:
    """URL of a fresh, empty PostgreSQL database for this test session (dropped afterwards)."""
    from tests.support.db import create_pg_database, drop_pg_database

    url = create_pg_database()
    try:
        yield url
    finally:
        drop_pg_database(url)


@pytest.fixture(scope="session")
def postgres_migrated(postgres_url: str) -> str:
    """The session's PostgreSQL database, migrated to head once."""
    from service.db import migrate
    from tests.support.db import settings_for

    migrate(settings_for(Path("/nonexistent-moejobs-home"), postgres_url))
    return postgres_url


@pytest.fixture(params=["sqlite", "postgresql"])
def database(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Database]:
    """A migrated, empty database: a new SQLite file, or the session's PostgreSQL database
    (emptied after the test). ``request.param`` names the backend."""
    from service.db import migrate, open_database
    from tests.support.db import settings_for, truncate_all

    if request.param == "sqlite":
        settings = settings_for(tmp_path)
        migrate(settings)
        db = open_database(settings)
        try:
            yield db
        finally:
            db.dispose()
    else:
        url = request.getfixturevalue("postgres_migrated")
        db = open_database(settings_for(tmp_path, url))
        try:
            yield db
        finally:
            truncate_all(db)
            db.dispose()


# The app under test on those databases (helpers in tests/support/api.py).


@pytest.fixture(scope="session")
def sqlite_template(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A SQLite database migrated to head once; tests get copies (migrating takes ~1 s)."""
    from service.db import migrate
    from tests.support.db import settings_for

    folder = tmp_path_factory.mktemp("template")
    settings = settings_for(folder)
    migrate(settings)
    assert settings.database_url is not None
    path = Path(settings.database_url.removeprefix("sqlite:///"))
    with sqlite3.connect(path) as conn:
        conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    return path


@pytest.fixture(params=["sqlite", "postgresql"])
def backend(request: pytest.FixtureRequest) -> str:
    """Each database backend."""
    return request.param


@pytest.fixture
def make_api(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Any]:
    """``make_api(backend, worker=True, **settings_overrides) -> ApiEnv``: start an app (at
    most one per test; stopped at teardown), with one live CPU worker registered unless
    ``worker`` is False."""
    from tests.support.api import make_env

    started: list[Iterator[ApiEnv]] = []

    def start(backend: str = "sqlite", *, worker: bool = True, **overrides: Any) -> ApiEnv:
        gen = make_env(request, tmp_path / f"app{len(started)}", backend, **overrides)
        started.append(gen)
        env = next(gen)
        if worker:
            env.register_worker()
        return env

    yield start
    for gen in reversed(started):
        for _ in gen:
            pass


@pytest.fixture
def api(backend: str, make_api: Any) -> ApiEnv:
    """The app on each backend, default settings, one live CPU worker registered."""
    return make_api(backend)


@pytest.fixture
def sqlite_api(make_api: Any) -> ApiEnv:
    """The app on SQLite only (behaviour that does not depend on the database)."""
    return make_api("sqlite")


@pytest.fixture(scope="module")
def shared_sqlite_api(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[ApiEnv]:
    """One SQLite app for a whole module, for tests that only read or are refused before
    anything is stored (e.g. the many invalid configs)."""
    from tests.support.api import make_env

    tmp = tmp_path_factory.mktemp("shared")
    gen = make_env(request, tmp, "sqlite")
    env = next(gen)
    env.register_worker()
    yield env
    for _ in gen:
        pass
