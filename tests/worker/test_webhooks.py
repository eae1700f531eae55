"""Webhooks end to end on SQLite and PostgreSQL: a run ends through ``service.runs``, the
outbox row is written with the move, and ``worker.webhooks.send_due`` delivers it to a real
HTTP receiver started here, signed, once; after a refused first attempt it arrives on the
retry; a sender that no longer holds the lease records nothing; the attempts are lines of the
run's history."""

from __future__ import annotations

import json
import socket
import uuid
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from pydantic import SecretStr

from service import reads, runs, webhooks
from service.db import Database, read_transaction
from service.models import DeliveryState, RunStatus, WebhookDelivery
from service.settings import Settings
from tests.support import REPO
from tests.support.db import settings_for
from tests.support.webhooks import SECRET, Receiver, check_signed
from worker.webhooks import send_due

T0 = datetime(2026, 12, 3, 12, 0, tzinfo=UTC)


@pytest.fixture
def receiver() -> Iterator[Receiver]:
    r = Receiver()
    yield r
    r.close()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def hook_settings(tmp_path: Path, **overrides: Any) -> Settings:
    return settings_for(tmp_path, webhook_secret=SecretStr(SECRET), **overrides)


def ended_run(db: Database, url: str, events: list[str] | None = None, now: datetime = T0):
    """A run with one subscription, claimed and moved to succeeded at ``now``."""
    hook = webhooks.RunWebhook(url=url, **({"events": events} if events else {}))
    with db.session() as s:
        run, _ = runs.create_run(
            s,
            name="hooked",
            submitted_train={},
            submitted_model={},
            resolved_train={},
            resolved_model={},
            webhooks=[hook.model_dump()],
            tags=["t1"],
            now=now,
        )
        runs.claim_run(s, run.id, "w1", 60, now=now)
        if events and "checkpoint" in events:
            runs.record_checkpoint(s, run.id, "step-00000002", "/x", attempt=1, now=now)
            runs.record_checkpoint(s, run.id, "step-00000002", "/x", attempt=1, now=now)
        return runs.transition(s, run.id, RunStatus.succeeded, "done", attempt=1, now=now)


def deliveries(db: Database) -> list[WebhookDelivery]:
    with db.session() as s, read_transaction(s):
        from sqlmodel import select

        return list(s.exec(select(WebhookDelivery)).all())


def history(db: Database, run_id: uuid.UUID) -> list[str]:
    with db.session() as s:
        return [e.message for e in reads.list_events(s, run_id) if e.actor == "webhooks"]


def test_terminal_event_arrives_once_signed(database: Database, tmp_path: Path, receiver):
    settings = hook_settings(tmp_path)
    run = ended_run(database, receiver.url)
    [row] = deliveries(database)
    assert (row.event, row.state, row.run_id) == ("run.succeeded", DeliveryState.pending, run.id)

    summary = send_due(settings, database, "w1")
    assert summary.delivered == [str(row.id)]
    assert len(receiver.requests) == 1
    doc = check_signed(receiver.requests[0])
    assert doc["event"] == "run.succeeded" and doc["id"] == str(row.id)
    assert doc["run"]["id"] == str(run.id) and doc["run"]["status"] == "succeeded"
    assert doc["run"]["tags"] == ["t1"]
    assert receiver.requests[0][0]["X-Moejobs-Delivery"] == str(row.id)
    assert SECRET not in receiver.requests[0][1].decode()

    # a second pass (another worker) sends nothing more
    assert send_due(settings, database, "w2").delivered == []
    assert len(receiver.requests) == 1
    [row] = deliveries(database)
    assert (row.state, row.attempts, row.last_status_code) == (DeliveryState.delivered, 1, 200)
    [line] = history(database, run.id)
    assert "run.succeeded" in line and "delivered (HTTP 200, attempt 1)" in line
    assert "token=abc" not in line  # the query (a receiver's token) stays out of the history


def test_receiver_down_first_then_delivered_on_retry_once(database: Database, tmp_path: Path):
    settings = hook_settings(tmp_path, webhook_max_attempts=3)
    port = free_port()
    run = ended_run(database, f"http://127.0.0.1:{port}/hook")

    first = send_due(settings, database, "w1", now=T0)  # nobody listens: refused
    assert first.retried and not first.delivered
    [row] = deliveries(database)
    assert row.attempts == 1 and row.state == DeliveryState.pending
    assert row.next_attempt_at == T0 + timedelta(seconds=webhooks.backoff_seconds(1))
    assert row.lease_holder is None

    receiver = Receiver(port)
    try:
        # not due yet: nothing is sent before the backoff has passed
        assert send_due(settings, database, "w1", now=T0 + timedelta(seconds=1)).retried == []
        assert receiver.requests == []
        later = T0 + timedelta(seconds=webhooks.backoff_seconds(1))
        assert send_due(settings, database, "w2", now=later).delivered == [str(row.id)]
        assert send_due(settings, database, "w1", now=later + timedelta(hours=1)).delivered == []
        assert len(receiver.requests) == 1
        doc = check_signed(receiver.requests[0])
        assert doc["run"]["id"] == str(run.id)
    finally:
        receiver.close()
    lines = history(database, run.id)
    assert len(lines) == 2
    assert "attempt 1 of 3 failed (ConnectError" in lines[0] and "next in 10 s" in lines[0]
    assert "delivered (HTTP 200, attempt 2)" in lines[1]


def test_given_up_after_max_attempts(database: Database, tmp_path: Path, receiver):
    settings = hook_settings(tmp_path, webhook_max_attempts=2)
    receiver.status = 500
    run = ended_run(database, receiver.url)
    send_due(settings, database, "w1", now=T0)
    summary = send_due(settings, database, "w1", now=T0 + timedelta(hours=2))
    assert len(summary.given_up) == 1
    assert send_due(settings, database, "w1", now=T0 + timedelta(days=2)).retried == []
    assert len(receiver.requests) == 2
    [row] = deliveries(database)
    assert (row.state, row.attempts, row.last_status_code) == (DeliveryState.failed, 2, 500)
    assert "given up after 2 attempts (last: HTTP 500)" in history(database, run.id)[-1]


def test_a_claimed_delivery_is_sent_by_one_sender_only(database: Database, tmp_path: Path):
    ended_run(database, "http://127.0.0.1:9/never")
    with database.session() as s:
        [mine] = runs.claim_deliveries(s, "w1", now=T0)
    with database.session() as s:
        assert runs.claim_deliveries(s, "w2", now=T0) == []  # leased by w1
    with database.session() as s:  # w1's lease expired: w2 takes it; w1 may record nothing
        [theirs] = runs.claim_deliveries(s, "w2", now=T0 + timedelta(minutes=5))
    assert theirs.id == mine.id
    with database.session() as s:
        assert (
            runs.record_delivery(s, mine.id, "w1", status_code=200, error=None, max_attempts=3)
            is None
        )
    [row] = deliveries(database)
    assert row.state == DeliveryState.pending and row.lease_holder == "w2"


def test_checkpoint_events_once_per_checkpoint_and_settings_urls(
    database: Database, tmp_path: Path, receiver
):
    settings = hook_settings(tmp_path)
    run = ended_run(database, receiver.url, events=["checkpoint", "failed"])
    # the checkpoint was recorded twice: one delivery; succeeded is not subscribed
    assert [d.event for d in deliveries(database)] == ["run.checkpoint"]
    send_due(settings, database, "w1")
    [(_, body)] = receiver.requests
    doc = json.loads(body)
    assert doc["checkpoint"] == {"name": "step-00000002", "step": 2}
    assert doc["run"]["id"] == str(run.id)


def test_no_secret_sends_nothing(database: Database, tmp_path: Path, receiver):
    ended_run(database, receiver.url)
    assert send_due(settings_for(tmp_path), database, "w1").delivered == []
    assert receiver.requests == []
    [row] = deliveries(database)
    assert row.state == DeliveryState.pending and row.attempts == 0


def test_the_readmes_receiver_snippet_verifies_a_delivery(
    database: Database, tmp_path: Path, receiver
):
    """The verification snippet of README "Webhooks" accepts a real delivery and refuses a
    changed body, another secret and an old timestamp."""
    section = (REPO / "README.md").read_text().split("### Webhooks", 1)[1]
    snippet = section.split("```python\n", 1)[1].split("```", 1)[0]
    scope: dict[str, Any] = {}
    exec(snippet, scope)  # noqa: S102 - the README's own code
    verify = scope["verify"]
    ended_run(database, receiver.url)
    send_due(hook_settings(tmp_path), database, "w1")  # now: the clock (a fresh timestamp)
    [(headers, body)] = receiver.requests
    assert verify(SECRET, headers, body)
    assert not verify(SECRET, headers, body + b" ")
    assert not verify("another-secret-0123456789", headers, body)
    old = {**headers, "X-Moejobs-Timestamp": str(int(headers["X-Moejobs-Timestamp"]) - 3600)}
    assert not verify(SECRET, old, body)


def test_the_training_process_gets_neither_secret_nor_urls(tmp_path: Path, monkeypatch):
    from worker.runner import WorkerInfo, training_env

    monkeypatch.setenv("MOEJOBS_WEBHOOK_SECRET", SECRET)
    settings = hook_settings(tmp_path, webhook_urls="https://example.com/h")
    env = training_env(settings, WorkerInfo(worker_id="w1"), attempt=1)
    assert "MOEJOBS_WEBHOOK_SECRET" not in env and "MOEJOBS_WEBHOOK_URLS" not in env
    assert SECRET not in " ".join(env.values())
    assert env["MOEJOBS_ENGINE"] == settings.engine


def test_a_url_the_client_cannot_use_is_retried_then_given_up(
    database: Database, tmp_path: Path, receiver
):
    """A host that passes the submission's checks but that httpx cannot encode is a failed
    attempt like a refused connection: the pass goes on with the other deliveries."""
    settings = hook_settings(tmp_path, webhook_max_attempts=1)
    bad = ended_run(database, "http://xn--a.example/hook")
    good = ended_run(database, receiver.url)
    summary = send_due(settings, database, "w1")
    assert len(summary.given_up) == 1 and len(summary.delivered) == 1
    assert len(receiver.requests) == 1
    assert "given up after 1 attempt (last: InvalidCodepoint" in history(database, bad.id)[-1]
    assert "delivered" in history(database, good.id)[-1]
