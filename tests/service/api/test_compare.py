"""``GET /compare`` and ``GET /compare/metrics`` (issue 11) on SQLite and PostgreSQL: the
config keys that differ between runs, their final and best metrics, overlays of several runs."""

from __future__ import annotations

import copy
import uuid

from service import runs
from service.api.compare import config_differences, flatten
from tests.support.api import MODEL, TRAIN, ApiEnv, body


def _submit(env: ApiEnv, name: str, lr: float, n_expert: int) -> str:
    train, model = copy.deepcopy(TRAIN), copy.deepcopy(MODEL)
    train["optimizer"]["init_args"]["lr"] = lr
    model["n_expert"] = n_expert
    r = env.client.post("/runs", json=body(name, train_config=train, model_config=model))
    assert r.status_code == 201, r.text
    return r.json()["id"]


def _row(step: int, loss: float, **extra) -> dict:
    return {
        "step": step,
        "tokens": 64 * step,
        "loss": loss,
        "tokens_per_sec": 1000.0 + step,
        **extra,
    }


def test_two_runs_differ_in_exactly_lr_and_n_expert(api: ApiEnv):
    a = _submit(api, "small-lr", 0.001, 4)
    b = _submit(api, "big-lr", 0.003, 8)
    with api.session() as s:
        runs.record_metrics(
            s,
            uuid.UUID(a),
            [_row(1, 5.0), _row(2, 3.0, val_loss=3.5), _row(3, 3.2), _row(4, 3.0, val_loss=3.1)],
        )
    r = api.client.get(f"/compare?runs={a},{b}")
    assert r.status_code == 200, r.text
    doc = r.json()
    assert [(d["key"], d["values"]) for d in doc["differences"]] == [
        ("model_config.n_expert", [4, 8]),
        ("train_config.optimizer.init_args.lr", [0.001, 0.003]),
    ]
    assert doc["left_out"] == ["train_config.out_dir"]
    first, second = doc["runs"]
    assert (first["id"], first["name"], second["name"]) == (a, "small-lr", "big-lr")
    assert first["final"]["step"] == 4 and first["final"]["val_loss"] == 3.1
    assert first["best"]["loss"] == {"value": 3.0, "step": 2}  # the first step reaching it
    assert first["best"]["val_loss"] == {"value": 3.1, "step": 4}
    assert first["best"]["tokens_per_sec"] == {"value": 1004.0, "step": 4}
    assert "mfu" not in first["best"]
    assert second["final"] is None and second["best"] == {}
    assert first["steps_total"] == 20

    # order follows the request; a repeated id counts once; the parameter may repeat
    again = api.client.get(f"/compare?runs={b}&runs={a},{b}").json()
    assert [x["id"] for x in again["runs"]] == [b, a]
    assert again["differences"][0]["values"] == [8, 4]

    # overlays: several runs' columns in one request, downsampled per run
    with api.session() as s:
        runs.record_metrics(s, uuid.UUID(b), [_row(i, 9.0 - i / 10) for i in range(1, 101)])
    r = api.client.get(f"/compare/metrics?runs={a},{b}&columns=loss,val_loss&points=10")
    assert r.status_code == 200, r.text
    page = r.json()
    assert page["columns"] == ["loss", "val_loss"]
    sa_, sb = page["series"]
    assert (sa_["run_id"], sa_["total"], sa_["downsampled"]) == (a, 4, False)
    assert sa_["step"] == [1, 2, 3, 4] and sa_["values"]["val_loss"] == [None, 3.5, None, 3.1]
    assert (sb["total"], sb["downsampled"], len(sb["step"])) == (100, True, 10)
    assert (
        sb["step"][0] == 1 and sb["step"][-1] == 100 and set(sb["values"]) == {"loss", "val_loss"}
    )
    default = api.client.get(f"/compare/metrics?runs={a},{b}").json()
    assert default["columns"] == ["loss", "val_loss", "learning_rate", "tokens_per_sec"]


def test_compare_errors(sqlite_api: ApiEnv):
    c = sqlite_api.client
    a = _submit(sqlite_api, "one", 0.001, 4)
    missing = uuid.uuid4()
    for query, loc_msg in (
        (f"runs={a}", "got 1"),
        (f"runs={a},{a}", "got 1"),
        (f"runs={a},nope", "'nope' is not a run id"),
        ("runs=", "got 0"),
    ):
        r = c.get(f"/compare?{query}")
        assert r.status_code == 422, r.text
        assert r.json()["errors"][0]["loc"] == ["query", "runs"] and loc_msg in r.json()["message"]
    r = c.get("/compare")
    assert r.status_code == 422 and r.json()["errors"][0]["loc"] == ["query", "runs"]
    r = c.get(f"/compare?runs={a},{missing}")
    assert r.status_code == 404 and r.json()["code"] == "run_not_found"
    assert str(missing) in r.json()["message"]
    r = c.get(f"/compare/metrics?runs={a},{missing}")
    assert r.status_code == 404
    r = c.get(f"/compare/metrics?runs={a},{missing}&columns=loss,bogus")
    assert r.status_code == 422 and r.json()["errors"][0]["loc"] == ["query", "columns"]
    assert "'bogus'" in r.json()["message"]


def test_config_differences_leave_out_each_runs_own_folders(tmp_path):
    one, two = tmp_path / "runs" / "1", tmp_path / "runs" / "2"
    configs = [
        {"train_config": {"out_dir": "x", "cache": f"{one}/cache", "data": {"p": "/d"}, "l": [1]}},
        {"train_config": {"out_dir": "y", "cache": f"{two}/cache", "data": {"p": "/e"}, "l": [2]}},
    ]
    diffs, left_out = config_differences(configs, [one, two])
    assert [d.key for d in diffs] == ["train_config.data.p", "train_config.l"]
    assert left_out == ["train_config.cache", "train_config.out_dir"]
    assert dict(flatten({"a": {"b": {}, "c": 1}})) == {"a.b": {}, "a.c": 1}
    # a key one run lacks differs (null there); equal values of another type do not
    diffs, _ = config_differences([{"a": 1, "b": 1.0}, {"b": 1}], [one, two])
    assert [(d.key, d.values) for d in diffs] == [("a", [1, None])]
