"""Fixtures for the API tests (no tests here): the app on a migrated SQLite file or on the
session's PostgreSQL database, with its embedded SQLite broker under the test's HOME, driven
through FastAPI's TestClient; helpers to read the broker's messages with a plain kombu
consumer.

The fixtures (``api``, ``sqlite_api``, ``make_api``, ...) are in tests/conftest.py.
"""

from __future__ import annotations

import shutil
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from fastapi import FastAPI
from fastapi.testclient import TestClient
from kombu import Connection, Queue
from pydantic import SecretStr

from service import runs
from service.db import Database, open_database
from service.main import create_app
from service.settings import Settings
from tests.support import configs
from tests.support.db import settings_for, truncate_all

# A small valid pair without warnings (as tests/service/config/test_validate.py's): 20 optimizer
# steps.
TRAIN: dict = configs.load("valid_train")
MODEL: dict = configs.load("valid_model")


def body(name: str = "test-run", **extra: Any) -> dict:
    """A valid POST /runs JSON body; ``extra`` keys replace the envelope's."""
    doc = {"name": name, "train_config": TRAIN, "model_config": MODEL}
    doc.update(extra)
    return doc


@dataclass
class ApiEnv:
    """One app under test: its client, settings, database and backend name."""

    client: TestClient
    settings: Settings
    db: Database
    backend: str

    @property
    def app(self) -> FastAPI:
        """The app the client drives (``TestClient.app`` is typed as any ASGI app)."""
        assert isinstance(self.client.app, FastAPI)
        return self.client.app

    @property
    def data_root(self) -> Path:
        """``settings.data_root`` (never None once the settings are validated)."""
        assert self.settings.data_root is not None
        return self.settings.data_root

    def session(self):
        return self.db.session()

    def register_worker(self, worker_id: str = "w1", gpus: int = 0) -> None:
        """A worker row with a fresh heartbeat (what a running worker writes)."""
        with self.db.session() as s:
            runs.register_worker(
                s,
                worker_id,
                "testhost",
                pid=1,
                gpus=[{"index": i, "name": "GPU", "memory_bytes": 80 << 30} for i in range(gpus)],
            )

    def broker_messages(self, queue: str | None = None) -> list[dict]:
        """Consume every message waiting in ``queue`` (default the training queue) with a
        plain kombu consumer: ``[{"task": name, "args": [...], "kwargs": {...}}]``."""
        name = queue or self.settings.celery_queue
        out = []
        with Connection(self.settings.broker_url) as conn:
            bound = Queue(name).bind(conn.default_channel)
            while True:
                message = bound.get(no_ack=True, accept=["json"])
                if message is None:
                    break
                args, kwargs, _embed = message.decode()
                out.append({"task": message.headers["task"], "args": args, "kwargs": kwargs})
        return out


def sqlite_settings(tmp_path: Path, template: Path, **overrides: Any) -> Settings:
    settings = settings_for(tmp_path, **overrides)
    assert settings.database_url is not None
    target = Path(settings.database_url.removeprefix("sqlite:///"))
    target.parent.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(template, target)
    return settings


def make_env(
    request: pytest.FixtureRequest, tmp_path: Path, backend: str, **overrides: Any
) -> Iterator[ApiEnv]:
    """Start the app for ``backend`` with settings ``overrides``; yields an :class:`ApiEnv`."""
    token = overrides.pop("api_token", None)  # settings_for pins these two
    broker_url = overrides.pop("broker_url", None)
    if backend == "sqlite":
        settings = sqlite_settings(
            tmp_path, request.getfixturevalue("sqlite_template"), **overrides
        )
    else:
        settings = settings_for(tmp_path, request.getfixturevalue("postgres_migrated"), **overrides)
    if token is not None:
        settings.api_token = SecretStr(token)
    if broker_url is not None:
        settings.broker_url = broker_url
    app = create_app(settings)
    db = open_database(settings)
    try:
        with TestClient(app, raise_server_exceptions=False) as client:
            yield ApiEnv(client=client, settings=settings, db=db, backend=backend)
    finally:
        if backend == "postgresql":
            truncate_all(db)
        db.dispose()
