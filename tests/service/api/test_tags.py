"""Tags and notes (issue 11): set at submission, changed with ``PATCH /runs/{id}``, shown on
runs and used by the list filters (``tag``, ``name``, ``status``) on SQLite and PostgreSQL."""

from __future__ import annotations

import uuid

from service import runs
from tests.support.api import ApiEnv, body


def _submit(env: ApiEnv, name: str, **extra) -> str:
    r = env.client.post("/runs", json=body(name, **extra))
    assert r.status_code == 201, r.text
    return r.json()["id"]


def _names(env: ApiEnv, query: str) -> list[str]:
    r = env.client.get(f"/runs?sort=name&{query}")
    assert r.status_code == 200, r.text
    return [run["name"] for run in r.json()["items"]]


def test_tags_and_note_at_submission_and_later(api: ApiEnv):
    c = api.client
    run_id = _submit(api, "tagged", tags=["lr=3e-4", "baseline", "lr=3e-4"], note="first try")
    run = c.get(f"/runs/{run_id}").json()
    assert run["tags"] == ["lr=3e-4", "baseline"]  # duplicates dropped, order kept
    assert run["note"] == "first try"

    r = c.patch(
        f"/runs/{run_id}", json={"add_tags": ["keep", "baseline"], "remove_tags": ["lr=3e-4"]}
    )
    assert r.status_code == 200, r.text
    assert r.json()["tags"] == ["baseline", "keep"] and r.json()["note"] == "first try"
    r = c.patch(f"/runs/{run_id}", json={"tags": ["x"], "note": "line 1\nline 2"})
    assert (r.json()["tags"], r.json()["note"]) == (["x"], "line 1\nline 2")
    r = c.patch(f"/runs/{run_id}", json={"note": None})
    assert (r.json()["tags"], r.json()["note"]) == (["x"], None)
    assert c.get("/runs").json()["items"][0]["tags"] == ["x"]

    # finished runs too
    with api.session() as s:
        runs.request_cancel(s, uuid.UUID(run_id))
    assert c.patch(f"/runs/{run_id}", json={"tags": []}).json()["tags"] == []


def test_invalid_tags_and_notes_are_422_naming_the_field(api: ApiEnv):
    c = api.client
    r = c.post("/runs", json=body("bad", tags=["ok", "has space"]))
    assert r.status_code == 422
    assert [e["loc"] for e in r.json()["errors"]] == [["body", "tags"]]
    assert "invalid tag 'has space'" in r.json()["message"]
    r = c.post("/runs", json=body("bad", tags=[f"t{i}" for i in range(33)]))
    assert r.status_code == 422 and "at most 32 tags" in r.json()["message"]
    r = c.post("/runs", json=body("bad", note="bell\x07"))
    assert r.status_code == 422 and r.json()["errors"][0]["loc"] == ["body", "note"]
    assert "U+0007" in r.json()["message"]

    run_id = _submit(api, "good")
    for patch, loc in (
        ({"tags": ["x" * 65]}, ["body", "tags"]),
        ({"add_tags": ["a,b"]}, ["body", "add_tags"]),
        ({"tags": [1]}, ["body", "tags", 0]),
        ({"note": "x" * 10_001}, ["body", "note"]),
        ({"tags": ["a"], "add_tags": ["b"]}, ["body", "tags"]),
        ({"colour": "red"}, ["body", "colour"]),
    ):
        r = c.patch(f"/runs/{run_id}", json=patch)
        assert r.status_code == 422, (patch, r.text)
        assert r.json()["errors"][0]["loc"] == loc, (patch, r.json())
    assert c.get(f"/runs/{run_id}").json()["tags"] == []
    assert (
        c.patch(f"/runs/{run_id}", json={"tags": [f"t{i}" for i in range(32)]}).status_code == 200
    )
    r = c.patch(f"/runs/{run_id}", json={"add_tags": ["one-more"]})
    assert r.status_code == 422 and r.json()["errors"][0]["loc"] == ["body", "add_tags"]
    assert "at most 32 tags per run, got 33" in r.json()["message"]
    assert len(c.get(f"/runs/{run_id}").json()["tags"]) == 32
    r = c.patch(f"/runs/{uuid.uuid4()}", json={"tags": ["a"]})
    assert r.status_code == 404 and r.json()["code"] == "run_not_found"


def test_list_filters_by_tag_name_and_status(api: ApiEnv):
    c = api.client
    _submit(api, "Alpha-lr", tags=["lr=3e-4", "sweep:a"])
    _submit(api, "beta-LR", tags=["lr=3e-4"])
    gamma = _submit(api, "gamma", tags=["lr", "sweep:a"])
    _submit(api, "100%_done")
    with api.session() as s:
        runs.request_cancel(s, uuid.UUID(gamma))

    assert _names(api, "tag=lr=3e-4") == ["Alpha-lr", "beta-LR"]
    assert _names(api, "tag=sweep:a") == ["Alpha-lr", "gamma"]
    assert _names(api, "tag=lr=3e-4&tag=sweep:a") == ["Alpha-lr"]  # all of them
    assert _names(api, "tag=lr") == ["gamma"]  # whole tags only
    assert _names(api, "tag=nope") == []
    assert _names(api, "name=lr") == ["Alpha-lr", "beta-LR"]  # substring, any case
    assert _names(api, "name=0%25_") == ["100%_done"]  # % and _ are literal
    assert _names(api, "name=a&tag=sweep:a&status=cancelled") == ["gamma"]
    assert _names(api, "tag=sweep:a&status=queued") == ["Alpha-lr"]
    # paging keeps the filters
    page = c.get("/runs?sort=name&tag=lr=3e-4&limit=1").json()
    assert [r["name"] for r in page["items"]] == ["Alpha-lr"]
    nxt = c.get(f"/runs?sort=name&tag=lr=3e-4&limit=1&cursor={page['next_cursor']}").json()
    assert [r["name"] for r in nxt["items"]] == ["beta-LR"] and nxt["next_cursor"] is None

    r = c.get("/runs?tag=a%20b")
    assert r.status_code == 422 and r.json()["errors"][0]["loc"] == ["query", "tag", 0]
    r = c.get("/runs?name=a%00b")
    assert r.status_code == 422 and r.json()["errors"][0]["loc"] == ["query", "name"]


def test_idempotency_counts_tags_and_note(sqlite_api: ApiEnv):
    c = sqlite_api.client
    key = {"Idempotency-Key": "k-tags"}
    first = c.post("/runs", json=body("idem", tags=["a"], note="n"), headers=key)
    again = c.post("/runs", json=body("idem", tags=["a"], note="n"), headers=key)
    assert first.status_code == again.status_code == 201
    assert again.json()["id"] == first.json()["id"] and again.json()["created"] is False
    other = c.post("/runs", json=body("idem", tags=["b"], note="n"), headers=key)
    assert other.status_code == 409
    # a PATCH changes the run, not the request: the retry still finds it
    c.patch(f"/runs/{first.json()['id']}", json={"tags": ["changed"]})
    again = c.post("/runs", json=body("idem", tags=["a"], note="n"), headers=key)
    assert again.json()["id"] == first.json()["id"] and again.json()["tags"] == ["changed"]
