"""Webhooks through a real worker: the API (FastAPI's TestClient) takes a run with a
subscription, a worker process (``python -m worker.celery_app``, ``MOEJOBS_ENGINE=stub``, the
embedded SQLite database and broker) trains it, and its webhook thread delivers the terminal
event to a receiver started here: once, signed."""

from __future__ import annotations

import time
from pathlib import Path

from fastapi.testclient import TestClient
from pydantic import SecretStr

from service.db import migrate, open_database
from service.main import create_app
from tests.support.api import body
from tests.support.tiny import stdlib_text_files
from tests.support.webhooks import SECRET, Receiver, check_signed
from tests.support.worker import WorkerProcess, wait_for, worker_settings


def test_a_run_trained_by_a_worker_notifies_once(tmp_path: Path):
    home = tmp_path / "home"
    settings = worker_settings(
        home,
        f"sqlite:///{home / 'moejobs.sqlite3'}",
        f"sqla+sqlite:///{home / 'broker.sqlite3'}",
        engine="stub",
        webhook_secret=SecretStr(SECRET),
        webhook_tick_seconds=0.3,
    )
    migrate(settings)
    assert settings.data_root is not None
    stdlib_text_files(settings.data_root / "ds" / "train", ["textwrap"])
    stdlib_text_files(settings.data_root / "ds" / "val", ["heapq"])
    (settings.data_root / "tok").mkdir(parents=True)
    db = open_database(settings)
    receiver = Receiver()
    worker = WorkerProcess(
        settings,
        tmp_path / "worker.log",
        tmp_path / "token-cache",
        extra_env={"MOEJOBS_STUB_STEP_SECONDS": "0.01"},
    ).start()
    try:
        worker.wait_registered(db)
        with TestClient(create_app(settings)) as client:
            r = client.post("/runs", json=body("hooked", webhooks=[{"url": receiver.url}]))
            assert r.status_code == 201, r.text
            run_id = r.json()["id"]
            wait_for(lambda: receiver.requests, 60, "the webhook", on_fail=worker.log)
            time.sleep(1.0)  # a few more sender passes: nothing is sent again
            assert len(receiver.requests) == 1
            doc = check_signed(receiver.requests[0])
            assert doc["event"] == "run.succeeded" and doc["run"]["id"] == run_id
            [shown] = client.get(f"/runs/{run_id}/webhooks").json()
            assert shown["state"] == "delivered" and shown["attempts"] == 1
            lines = [e["message"] for e in client.get(f"/runs/{run_id}/events").json()]
            assert any("delivered (HTTP 200, attempt 1)" in line for line in lines)
        assert SECRET not in worker.log()
    finally:
        worker.stop(timeout=30)
        receiver.close()
        db.dispose()
