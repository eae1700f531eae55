"""What the dashboard reads: ``latest_metrics`` on runs (one query per page), the engine's
events (``GET /runs/{id}/engine-events``), and 503s naming the broker with ``Retry-After``."""

from __future__ import annotations

import sqlite3
import uuid
from typing import Any

import sqlalchemy as sa

from service import reads, runs
from service.api.models import MetricRow
from service.contract import METRIC_COLUMNS, append_event
from tests.support.api import ApiEnv, body


def _new_run(env: ApiEnv, name: str = "run") -> uuid.UUID:
    r = env.client.post("/runs", json=body(name))
    assert r.status_code == 201, r.text
    return uuid.UUID(r.json()["id"])


def _row(step: int, **extra: Any) -> dict[str, Any]:
    return {
        "step": step,
        "tokens": step * 64,
        "loss": 9.0 - step / 100,
        "learning_rate": 1e-3,
        "grad_norm": 0.5 + step / 1000,
        "tokens_per_sec": 1000.0 + step,
        "mfu": 0.25,
        "elapsed_s": step / 4,
        **extra,
    }


def test_metric_rows_have_exactly_the_contract_columns():
    assert tuple(MetricRow.model_fields) == ("step", *METRIC_COLUMNS)


def test_latest_metrics_is_the_row_of_the_highest_step(api: ApiEnv):
    c = api.client
    quiet, busy, other = _new_run(api, "quiet"), _new_run(api, "busy"), _new_run(api, "other")
    with api.session() as s:
        # stored out of order, and the newest row carries validation values
        runs.record_metrics(s, busy, [_row(3), _row(1), _row(2)])
        runs.record_metrics(s, busy, [_row(4, val_loss=2.5, val_ppl=12.18)])
        runs.record_metrics(s, other, [_row(7)])
    page = {r["name"]: r for r in c.get("/runs").json()["items"]}
    assert page["quiet"]["latest_metrics"] is None
    expected = {
        "step": 4,
        "tokens": 256,
        "loss": 8.96,
        "learning_rate": 1e-3,
        "grad_norm": 0.504,
        "tokens_per_sec": 1004.0,
        "mfu": 0.25,
        "elapsed_s": 1.0,
        "val_loss": 2.5,
        "val_ppl": 12.18,
    }
    assert page["busy"]["latest_metrics"] == expected
    assert page["other"]["latest_metrics"]["step"] == 7
    assert c.get(f"/runs/{busy}").json()["latest_metrics"] == expected
    assert c.get(f"/runs/{quiet}").json()["latest_metrics"] is None
    # the same row as the metrics endpoint's last one
    assert c.get(f"/runs/{busy}/metrics").json()["items"][-1] == expected
    # paging: each page carries its own runs' rows
    first = c.get("/runs", params={"limit": 2, "sort": "name"}).json()
    assert [r["name"] for r in first["items"]] == ["busy", "other"]
    assert [r["latest_metrics"]["step"] for r in first["items"]] == [4, 7]
    rest = c.get("/runs", params={"limit": 2, "sort": "name", "cursor": first["next_cursor"]})
    assert [(r["name"], r["latest_metrics"]) for r in rest.json()["items"]] == [("quiet", None)]


def _count_statements(env: ApiEnv, path: str) -> int:
    engine = env.app.state.db.engine
    seen: list[str] = []

    def count(_conn, _cursor, statement, *_args) -> None:
        if statement.lstrip().upper().startswith("SELECT"):
            seen.append(statement)

    sa.event.listen(engine, "before_cursor_execute", count)
    try:
        assert env.client.get(path).status_code == 200
    finally:
        sa.event.remove(engine, "before_cursor_execute", count)
    return len(seen)


def test_a_page_of_runs_costs_the_same_queries_whatever_its_length(api: ApiEnv):
    ids = [_new_run(api, f"r{i}") for i in range(3)]
    with api.session() as s:
        for i, run_id in enumerate(ids):
            runs.record_metrics(s, run_id, [_row(step) for step in range(1, 3 + i)])
    few = _count_statements(api, "/runs")
    ids += [_new_run(api, f"more{i}") for i in range(9)]
    with api.session() as s:
        for run_id in ids[3:]:
            runs.record_metrics(s, run_id, [_row(1), _row(2)])
    many = _count_statements(api, "/runs")
    assert few == many == 2  # the page, then every run's newest metric row
    items = api.client.get("/runs").json()["items"]
    assert len(items) == 12 and all(r["latest_metrics"]["step"] >= 2 for r in items)


def test_engine_events_of_a_run(api: ApiEnv):
    c = api.client
    run_id = _new_run(api)
    assert c.get(f"/runs/{run_id}/engine-events").json() == []  # no file yet
    out = api.settings.run_dir(run_id) / "out"
    written = [
        append_event(out, "started", attempt=1),
        append_event(out, "configured", attempt=1),
        append_event(
            out,
            "checkpoint_written",
            attempt=1,
            step=5,
            message="step-00000005",
            path=str(out / "step-00000005"),
        ),
        append_event(out, "started", attempt=2),
    ]
    with open(out / "events.jsonl", "a") as fh:
        fh.write('{"at": "2030-01-01T00:00:00Z", "ev')  # cut short by a crash: skipped
    got = c.get(f"/runs/{run_id}/engine-events").json()
    assert [(e["event"], e["attempt"]) for e in got] == [
        ("started", 1),
        ("configured", 1),
        ("checkpoint_written", 1),
        ("started", 2),
    ]
    assert got[2]["step"] == 5 and got[2]["message"] == "step-00000005"
    assert got[2]["data"] == {"path": str(out / "step-00000005")}
    assert [e["at"] for e in got] == [w.at.isoformat().replace("+00:00", "Z") for w in written]
    assert [
        e["event"] for e in c.get(f"/runs/{run_id}/engine-events", params={"attempt": 2}).json()
    ] == ["started"]
    missing = c.get(f"/runs/{uuid.uuid4()}/engine-events")
    assert missing.status_code == 404 and missing.json()["code"] == "run_not_found"
    spec = c.get("/openapi.json").json()
    op = spec["paths"]["/runs/{run_id}/engine-events"]["get"]
    assert op["responses"]["200"]["content"]["application/json"]["schema"]["items"][
        "$ref"
    ].endswith("/EngineEventPublic")
    assert "404" in op["responses"]


def test_routes_that_need_the_broker_say_503_naming_it(make_api, tmp_path):
    env = make_api("sqlite", broker_url="redis://127.0.0.1:1/0")
    c = env.client
    data = env.settings.data_root / "kjv"
    data.mkdir(parents=True)
    (data / "a.txt").write_text("in the beginning " * 50)
    r = c.post("/tokenizers/kjv", json={"dataset": "kjv", "vocab_size": 512})
    assert r.status_code == 503
    assert r.json()["code"] == "broker_unavailable" and r.json()["dependency"] == "broker"
    assert int(r.headers["Retry-After"]) > 0 and "broker" in r.json()["message"]
    r = c.post("/smoke-test")
    assert r.status_code == 503 and r.json()["dependency"] == "broker"
    assert int(r.headers["Retry-After"]) > 0
    with env.session() as s:
        assert reads.list_runs(s)[0] == []  # nothing stored
    # POST /runs stores the run and says the broker did not take it (no 503)
    r = c.post("/runs", json=body())
    assert r.status_code == 201 and r.json()["enqueued"] is False
    assert any("broker did not take" in w["msg"] for w in r.json()["warnings"])


def test_which_database_errors_mean_unavailable(tmp_path):
    from service.db import make_engine, unavailable_reason

    engine = make_engine(
        f"sqlite:///{tmp_path / 'x.sqlite3'}",
        sqlite_busy_timeout_ms=0,
        pool_size=1,
        max_overflow=0,
        pool_timeout=0.1,
    )
    with engine.begin() as conn:
        conn.exec_driver_sql("CREATE TABLE t (a INTEGER)")

    def error_of(fn) -> Exception:
        try:
            fn()
        except Exception as error:  # noqa: BLE001 - the error is the subject
            return error
        raise AssertionError("no error")

    def query(sql: str):
        def run():
            with engine.connect() as conn:
                conn.exec_driver_sql(sql)

        return run

    # a bug in a query stays a bug (500), whatever the driver calls it
    assert unavailable_reason(error_of(query("SELECT nosuch FROM t"))) is None
    assert unavailable_reason(error_of(query("SELEC 1"))) is None
    # the pool's wait ran out: busy
    held = engine.connect()
    assert "no pooled connection came free" in unavailable_reason(error_of(engine.connect))
    held.close()
    # a lock held by another process past the busy timeout
    other = sqlite3.connect(tmp_path / "x.sqlite3", isolation_level=None)
    other.execute("BEGIN EXCLUSIVE")
    try:
        assert "database is locked" in unavailable_reason(
            error_of(query("INSERT INTO t VALUES (1)"))
        )
    finally:
        other.execute("ROLLBACK")
        other.close()
    engine.dispose()
    # nothing listens there
    pg = make_engine(
        "postgresql+psycopg://postgres@127.0.0.1:1/none", connect_args={"connect_timeout": 2}
    )
    assert "OperationalError" in unavailable_reason(error_of(pg.connect))
    assert unavailable_reason(ValueError("x")) is None


def test_runs_show_their_failures_apart_from_their_attempts(api: ApiEnv):
    """attempt counts claims, failures what MOEJOBS_MAX_ATTEMPTS bounds: a graceful stop adds
    an attempt and no failure; a lost worker adds both."""
    run_id = _new_run(api, "counted")
    with api.session() as s:
        runs.claim_run(s, run_id, "w1", 60)
        runs.transition(s, run_id, "queued", "graceful stop", attempt=1)
        runs.claim_run(s, run_id, "w1", 60)
        runs.retry_or_fail(s, run_id, "lost_worker", "lease expired", max_attempts=3, attempt=2)
    shown = api.client.get(f"/runs/{run_id}").json()
    assert (shown["status"], shown["attempt"], shown["failures"]) == ("queued", 2, 1)
    listed = {r["name"]: r for r in api.client.get("/runs").json()["items"]}["counted"]
    assert (listed["attempt"], listed["failures"]) == (2, 1)
