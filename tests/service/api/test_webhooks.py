"""Webhooks through the API: subscriptions at submission are checked (a 422 naming the field),
need the server's secret, are stored with the server's MOEJOBS_WEBHOOK_URLS; a delivered
event shows in ``GET /runs/{id}/webhooks`` and in the run's history; the secret is in no
answer."""

from __future__ import annotations

import copy
import uuid
from typing import Any

import pytest

from service import runs
from service.models import RunStatus
from tests.support.api import MODEL, TRAIN, body
from tests.support.webhooks import SECRET, Receiver, check_signed
from worker.webhooks import send_due


@pytest.fixture
def receiver():
    r = Receiver()
    yield r
    r.close()


@pytest.mark.parametrize(
    ("hooks", "loc", "words"),
    [
        ([{"url": "ftp://example.com/x"}], ["body", "webhooks", 0, "url"], "http:// or https://"),
        ([{"url": "http://u:p@example.com/"}], ["body", "webhooks", 0, "url"], "user:password"),
        ([{"url": "https://" + "a" * 2050}], ["body", "webhooks", 0, "url"], "at most 2048"),
        ([{"url": "/relative"}], ["body", "webhooks", 0, "url"], "http:// or https://"),
        ([{"url": "http://a..b/"}], ["body", "webhooks", 0, "url"], "not a valid host name"),
        (
            [{"url": "https://example.com/", "events": ["exploded"]}],
            ["body", "webhooks", 0, "events"],
            "unknown events",
        ),
        ([{"url": "https://example.com/", "secret": "x"}], ["body", "webhooks", 0, "secret"], ""),
        ([{"url": f"https://e.com/{i}"} for i in range(9)], ["body", "webhooks"], "at most 8"),
    ],
)
def test_bad_webhooks_are_422_naming_the_field(make_api: Any, hooks, loc, words):
    api = make_api("sqlite", webhook_secret=SECRET)
    r = api.client.post("/runs", json=body(webhooks=hooks))
    assert r.status_code == 422, r.text
    error = r.json()["errors"][0]
    assert error["loc"] == loc and words in error["msg"]


def test_webhooks_need_the_servers_secret(sqlite_api):
    r = sqlite_api.client.post("/runs", json=body(webhooks=[{"url": "https://example.com/h"}]))
    assert r.status_code == 422
    error = r.json()["errors"][0]
    assert error["loc"] == ["body", "webhooks"] and "MOEJOBS_WEBHOOK_SECRET" in error["msg"]


def test_a_run_that_ends_notifies_its_and_the_servers_urls(make_api: Any, receiver):
    other = Receiver()
    try:
        api = make_api("sqlite", webhook_secret=SECRET, webhook_urls=other.url)
        r = api.client.post(
            "/runs", json=body(webhooks=[{"url": receiver.url, "events": ["failed", "succeeded"]}])
        )
        assert r.status_code == 201, r.text
        run_id = uuid.UUID(r.json()["id"])
        with api.session() as s:
            runs.claim_run(s, run_id, "w1", 60)
            runs.transition(s, run_id, RunStatus.succeeded, "done", attempt=1)
        assert api.client.get(f"/runs/{run_id}/webhooks").json()[0]["state"] == "pending"
        summary = send_due(api.settings, api.db, "w1")
        assert len(summary.delivered) == 2
        assert [check_signed(x)["event"] for x in receiver.requests] == ["run.succeeded"]
        assert [check_signed(x)["event"] for x in other.requests] == ["run.succeeded"]
    finally:
        other.close()
    listed = api.client.get(f"/runs/{run_id}/webhooks")
    assert listed.status_code == 200
    shown = listed.json()
    assert {d["state"] for d in shown} == {"delivered"}
    assert {d["url"] for d in shown} == {
        f"http://127.0.0.1:{p}/hook" for p in (receiver.port, other.port)
    }
    assert all(d["attempts"] == 1 and d["last_status_code"] == 200 for d in shown)
    events = api.client.get(f"/runs/{run_id}/events").json()
    lines = [e["message"] for e in events if e["actor"] == "webhooks"]
    assert len(lines) == 2 and all("delivered (HTTP 200, attempt 1)" in x for x in lines)
    for path in (f"/runs/{run_id}", f"/runs/{run_id}/webhooks", f"/runs/{run_id}/events"):
        assert SECRET not in api.client.get(path).text
    assert api.client.get(f"/runs/{uuid.uuid4()}/webhooks").status_code == 404


def sweep_doc(**extra: Any) -> dict[str, Any]:
    doc: dict[str, Any] = {
        "name": "hooked-sweep",
        "base": {"train_config": copy.deepcopy(TRAIN), "model_config": copy.deepcopy(MODEL)},
        "method": "grid",
        "metric": {"name": "val_loss", "goal": "minimize"},
        "parameters": {"train_config.optimizer.init_args.lr": {"values": [0.001, 0.003]}},
        "max_concurrent": 1,
    }
    doc.update(extra)
    return doc


def test_a_sweep_that_ends_notifies_its_urls(make_api: Any, receiver):
    api = make_api("sqlite", webhook_secret=SECRET)
    bad = api.client.post("/sweeps", json=sweep_doc(webhooks=[{"url": "gopher://x/"}]))
    assert bad.status_code == 422
    assert bad.json()["errors"][0]["loc"] == ["body", "webhooks", 0, "url"]
    bad = api.client.post(
        "/sweeps", json=sweep_doc(webhooks=[{"url": receiver.url, "events": ["succeeded"]}])
    )
    assert bad.status_code == 422 and "unknown events" in bad.json()["errors"][0]["msg"]

    r = api.client.post("/sweeps", json=sweep_doc(webhooks=[{"url": receiver.url}]))
    assert r.status_code == 201, r.text
    sweep = r.json()
    trial_run = sweep["trials"][0]["run_id"]
    assert api.client.post(f"/sweeps/{sweep['id']}/cancel").json()["status"] == "cancelled"
    assert len(send_due(api.settings, api.db, "w1").delivered) == 1
    assert send_due(api.settings, api.db, "w2").delivered == []
    [request] = receiver.requests
    doc = check_signed(request)
    assert doc["event"] == "sweep.cancelled"
    assert doc["sweep"]["id"] == sweep["id"] and doc["sweep"]["status"] == "cancelled"
    shown = api.client.get(f"/sweeps/{sweep['id']}/webhooks").json()
    assert [(d["event"], d["state"]) for d in shown] == [("sweep.cancelled", "delivered")]
    # the trials do not notify the sweep's URLs (their runs have no subscription here)
    assert api.client.get(f"/runs/{trial_run}/webhooks").json() == []
    assert api.client.get(f"/sweeps/{uuid.uuid4()}/webhooks").status_code == 404


def test_sweep_webhooks_need_the_servers_secret(sqlite_api):
    r = sqlite_api.client.post(
        "/sweeps", json=sweep_doc(webhooks=[{"url": "https://example.com/h"}])
    )
    assert r.status_code == 422
    assert r.json()["errors"][0]["loc"] == ["body", "webhooks"]
