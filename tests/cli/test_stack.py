"""The embedded stack (cli/stack.py) when what it needs is not there: it says what it waits
for while it waits, and gives up naming the setting to fix. Real child processes; no training."""

from __future__ import annotations

import pytest

from cli.stack import LocalStack, StackError, redact_url
from service.settings import Settings
from tests.support.client import free_port


def test_redact_url_hides_only_the_password():
    assert redact_url("redis://:pw@127.0.0.1:6379/0") == "redis://:***@127.0.0.1:6379/0"
    assert redact_url("postgresql+psycopg://u:pw@h/db") == "postgresql+psycopg://u:***@h/db"
    assert redact_url("redis://h:6379/0") == "redis://h:6379/0"
    assert redact_url("sqla+sqlite:////x/broker.sqlite3") == "sqla+sqlite:////x/broker.sqlite3"


@pytest.mark.slow
def test_a_broker_that_is_down_is_named_while_waiting_and_when_giving_up(tmp_path):
    settings = Settings(
        home=tmp_path / "home", port=free_port(), broker_url="redis://:sekrit@127.0.0.1:1/0"
    )  # nothing listens on port 1
    stack = LocalStack(settings)
    lines: list[str] = []
    try:
        with pytest.raises(StackError) as info:
            stack.start(ready_timeout=20, progress=lines.append)
    finally:
        stack.stop(timeout=30)
    message = str(info.value)
    assert message.startswith(
        "gave up after 20 s: the broker at "
        "MOEJOBS_BROKER_URL=redis://:***@127.0.0.1:1/0 did not answer"
    )
    assert "set MOEJOBS_BROKER_URL" in message
    assert any(
        line.startswith("waiting for the broker at MOEJOBS_BROKER_URL=redis://:***@127.0.0.1:1/0")
        for line in lines
    ), lines
    assert "sekrit" not in message + "".join(lines)


def test_an_unreachable_database_is_named_before_anything_starts(tmp_path):
    settings = Settings(
        home=tmp_path / "home",
        port=free_port(),
        database_url="postgresql://nobody:sekrit@127.0.0.1:1/moejobs",
    )
    stack = LocalStack(settings)
    with pytest.raises(
        StackError,
        match=r"^cannot migrate the database of MOEJOBS_DATABASE_URL "
        r"\(postgresql\+psycopg://nobody:\*\*\*@127\.0\.0\.1:1/moejobs\)",
    ):
        stack.start(ready_timeout=5)
    assert stack.procs == {}


def test_start_up_progress_shows_one_short_line_of_an_error():
    """A transient broker error while the embedded stack starts (the API and the worker both
    creating kombu's queue table) is shown without its SQL statement; /readyz keeps it whole."""
    from cli.stack import _brief

    raw = (
        "IntegrityError: (sqlite3.IntegrityError) UNIQUE constraint failed: kombu_queue.name "
        "[SQL: INSERT INTO kombu_queue (name) VALUES (?)]\n[parameters: ('celery',)]\n"
        "(Background on this error at: https://sqlalche.me/e/20/gkpj)"
    )
    assert _brief(raw) == (
        "IntegrityError: (sqlite3.IntegrityError) UNIQUE constraint failed: kombu_queue.name"
    )
    assert _brief("x" * 500) == "x" * 157 + "..."
    assert _brief("Connection refused") == "Connection refused"
