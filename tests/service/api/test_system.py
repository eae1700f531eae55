"""Probes, Prometheus metrics, workers, JSON Schemas and the smoke test through the API."""

from __future__ import annotations

import time
import uuid
from datetime import timedelta
from pathlib import Path

import sqlalchemy as sa
import yaml
from prometheus_client.parser import text_string_to_metric_families

from service import reads, runs
from service.contract import append_event
from service.models import utcnow
from service.queue import TRAIN_TASK
from tests.support.api import MODEL, ApiEnv, body
from worker.reconciler import reconcile


def test_healthz_and_ready_when_everything_is_up(api: ApiEnv):
    assert api.client.get("/healthz").json() == {"status": "ok"}
    r = api.client.get("/readyz")
    assert r.status_code == 200, r.text
    assert r.json() == {
        "status": "ready",
        "checks": {
            "database": {"ok": True},
            "broker": {"ok": True},
            "workers": {"ok": True, "live": 1},
        },
    }


def test_readyz_names_the_broker_when_it_is_unreachable(make_api):
    env = make_api("sqlite", broker_url="redis://127.0.0.1:1/0")
    r = env.client.get("/readyz")
    assert r.status_code == 503
    doc = r.json()
    assert doc["code"] == "not_ready" and doc["down"] == ["broker"]
    assert "broker" in doc["message"] and "127.0.0.1:1" in doc["checks"]["broker"]["error"]
    # the API still takes runs: they stay queued for the reconciler
    created = env.client.post("/runs", json=body())
    assert created.status_code == 201 and created.json()["enqueued"] is False
    assert created.json()["status"] == "queued"
    assert created.json()["warnings"][-1] == {
        "loc": ["body"],
        "msg": (
            "the broker did not take the run's message (see GET /readyz): the run stays queued and "
            "a worker's reconciler sends it again after MOEJOBS_QUEUED_STALE_SECONDS (300 s)"
        ),
    }
    # the warning belongs to that answer, not to the stored run
    run = env.client.get(f"/runs/{created.json()['id']}").json()
    assert not any("did not take" in w["msg"] for w in run["warnings"]), run["warnings"]


def test_readyz_names_workers_when_none_is_live(make_api):
    env = make_api("sqlite", worker=False)
    r = env.client.get("/readyz")
    assert r.status_code == 503 and r.json()["down"] == ["workers"]
    assert "no worker heartbeat" in r.json()["message"]
    with env.session() as s:  # a worker whose last heartbeat is too old does not count
        runs.register_worker(s, "old", "host", now=utcnow() - timedelta(seconds=3600))
    assert env.client.get("/readyz").json()["down"] == ["workers"]
    workers = env.client.get("/workers").json()
    assert [(w["id"], w["live"]) for w in workers] == [("old", False)]
    env.register_worker("fresh", gpus=2)
    assert env.client.get("/readyz").status_code == 200
    workers = {w["id"]: w for w in env.client.get("/workers").json()}
    assert workers["fresh"]["live"] and workers["fresh"]["gpu_count"] == 2


def test_readyz_names_the_database_when_its_schema_is_not_current(sqlite_api: ApiEnv):
    with sqlite_api.db.engine.begin() as conn:
        conn.execute(sa.text("UPDATE alembic_version SET version_num = 'old'"))
    r = sqlite_api.client.get("/readyz")
    assert r.status_code == 503 and r.json()["down"] == ["database"]
    assert "moejobs migrate" in r.json()["checks"]["database"]["error"]


def _samples(text: str) -> dict[tuple[str, tuple], float]:
    out = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            out[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    return out


def test_prometheus_metrics(api: ApiEnv):
    ids = [api.client.post("/runs", json=body(f"r{i}")).json()["id"] for i in range(3)]
    api.client.post(f"/runs/{ids[0]}/cancel")
    with api.session() as s:
        runs.record_metrics(s, uuid.UUID(ids[1]), [{"step": i, "loss": 1.0} for i in range(1, 8)])
    r = api.client.get("/metrics")
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/plain")
    m = _samples(r.text)
    q = api.settings.celery_queue
    assert m[("moejobs_runs", (("status", "queued"),))] == 2
    assert m[("moejobs_runs", (("status", "cancelled"),))] == 1
    assert m[("moejobs_runs", (("status", "running"),))] == 0
    assert m[("moejobs_queue_depth", (("queue", q),))] == 3  # the cancelled run's message too
    # each run's data preparation (engine litgpt), sent before its training message
    assert m[("moejobs_queue_depth", (("queue", q + ".aux"),))] == 3
    assert m[("moejobs_workers_live", ())] == 1 and m[("moejobs_workers_registered", ())] == 1
    assert m[("moejobs_metric_rows", ())] == 7
    assert m[("moejobs_database_up", ())] == 1 and m[("moejobs_broker_up", ())] == 1


def test_metrics_with_the_broker_down(make_api):
    env = make_api("sqlite", broker_url="redis://127.0.0.1:1/0")
    m = _samples(env.client.get("/metrics").text)
    assert m[("moejobs_broker_up", ())] == 0
    assert not any(name == "moejobs_queue_depth" for name, _ in m)


def test_json_schemas(sqlite_api: ApiEnv):
    train = sqlite_api.client.get("/schemas/train-config").json()
    model = sqlite_api.client.get("/schemas/model-config").json()
    assert "micro_batch_size" in str(train) and "optimizer" in train["properties"]
    assert "n_expert" in model["properties"] and model["additionalProperties"] is False


# -- smoke test ---------------------------------------------------------------------------------


def _tiny_model(tmp_path: Path) -> Path:
    path = tmp_path / "tiny-model.yaml"
    path.write_text(yaml.safe_dump({**MODEL, "block_size": 64}))
    return path


def _engine_events(out_dir: Path, attempt: int, kinds: list[str], gaps: list[float]) -> dict:
    """Append the engine's events ``kinds`` to ``out_dir/events.jsonl`` as the engine does,
    ``gaps[i]`` seconds after the previous one; returns {kind: the event's UTC time}."""
    marks = {}
    for kind, gap in zip(kinds, gaps, strict=True):
        time.sleep(gap)
        marks[kind] = append_event(out_dir, kind, attempt=attempt).at
    return marks


def test_smoke_test_is_a_real_queued_run_one_at_a_time(make_api, tmp_path, monkeypatch):
    env = make_api("sqlite", smoke_model_config=_tiny_model(tmp_path))
    c, settings = env.client, env.settings
    r = c.post("/smoke-test")
    assert r.status_code == 202, r.text
    doc = r.json()
    assert doc["status"] == "pending" and doc["failed_stage"] is None
    assert [s["name"] for s in doc["stages"]] == [
        "queued_wait",
        "startup",
        "data_tokenizer",
        "model_build",
        "first_step",
        "finish",
    ]
    run_id = uuid.UUID(doc["id"])
    with env.session() as s:
        run = reads.get_run(s, run_id)
    assert run.preset == "smoke-test" and run.name.startswith("smoke-test")
    sample = settings.data_root / "sample"
    t = run.resolved_train
    assert t["tokenizer_dir"] == str(sample / "tokenizer")
    assert t["data"]["init_args"] == {
        **t["data"]["init_args"],
        "train_data_path": str(sample / "train"),
        "val_data_path": str(sample / "val"),
    }
    assert (t["precision"], t["devices"], t["train"]["max_tokens"]) == ("32-true", 1, 64)
    assert run.resolved_model["n_layer"] == MODEL["n_layer"]  # the configured small model
    assert env.broker_messages() == [{"task": TRAIN_TASK, "args": [str(run_id)], "kwargs": {}}]
    # one at a time: queued, then running
    again = c.post("/smoke-test")
    assert again.status_code == 409 and again.json()["run_id"] == str(run_id)
    assert c.get(f"/smoke-test/{run_id}", params={"wait": 0.3}).json()["status"] == "pending"
    with env.session() as s:
        claimed = runs.claim_run(s, run_id, "w1", 60)
    assert c.post("/smoke-test").status_code == 409
    assert c.get(f"/smoke-test/{run_id}").json()["status"] == "running"

    # what the engine leaves behind: its events file (UTC times), whatever this server's zone
    monkeypatch.setenv("TZ", "Pacific/Chatham")  # +12:45 / +13:45
    time.tzset()
    out = settings.run_dir(run_id) / "out"
    # an earlier attempt's events and a line cut short by a crash do not count
    append_event(out, "configured", attempt=claimed.attempt - 1)
    marks = _engine_events(
        out,
        claimed.attempt,
        ["started", "configured", "data_ready", "model_built", "first_step"],
        [0.01, 0.02, 0.03, 0.05, 0.07],
    )
    with open(out / "events.jsonl", "a") as fh:
        fh.write('{"at": "2031-01-01T00:00:00Z", "event": "first_st')
    finished_at = marks["first_step"] + timedelta(seconds=0.75)
    with env.session() as s:
        runs.record_metrics(s, run_id, [{"step": 1, "loss": 5.5, "elapsed_s": 1.25}])
        runs.transition(s, run_id, "succeeded", "exit 0", attempt=claimed.attempt, now=finished_at)
    report = c.get(f"/smoke-test/{run_id}", params={"wait": 5}).json()
    assert report["status"] == "passed" and report["failed_stage"] is None
    seconds = {s["name"]: s["seconds"] for s in report["stages"]}
    assert {s["status"] for s in report["stages"]} == {"ok"}

    def gap(a, b) -> float:
        return round((b - a).total_seconds(), 3)

    assert seconds == {
        "queued_wait": gap(run.created_at, claimed.started_at),
        "startup": gap(claimed.started_at, marks["configured"]),
        "data_tokenizer": gap(marks["configured"], marks["data_ready"]),
        "model_build": gap(marks["data_ready"], marks["model_built"]),
        "first_step": gap(marks["model_built"], marks["first_step"]),
        "finish": 0.75,
    }
    assert seconds["model_build"] >= 0.05 and seconds["first_step"] >= 0.07
    # each stage is rounded to the millisecond on its own
    assert abs(report["total_seconds"] - sum(seconds.values())) <= 0.004
    # finished: a new one may start
    assert c.post("/smoke-test").status_code == 202


def test_smoke_test_names_the_failing_stage(make_api, tmp_path):
    env = make_api("sqlite", smoke_model_config=_tiny_model(tmp_path))
    run_id = uuid.UUID(env.client.post("/smoke-test").json()["id"])
    with env.session() as s:
        claimed = runs.claim_run(s, run_id, "w1", 60)
    _engine_events(
        env.settings.run_dir(run_id) / "out",
        claimed.attempt,
        ["started", "configured", "data_ready"],
        [0, 0.01, 0.01],
    )
    with env.session() as s:
        runs.transition(
            s,
            run_id,
            "failed",
            "exit 1",
            reason="crashed",
            attempt=claimed.attempt,
            failure_message=None,
        )
    report = env.client.get(f"/smoke-test/{run_id}").json()
    assert report["status"] == "failed" and report["failed_stage"] == "model_build"
    states = {s["name"]: s["status"] for s in report["stages"]}
    assert states == {
        "queued_wait": "ok",
        "startup": "ok",
        "data_tokenizer": "ok",
        "model_build": "failed",
        "first_step": "skipped",
        "finish": "skipped",
    }
    assert report["message"] == "exit 1"  # the run's failure message comes first


def test_smoke_test_without_a_worker_fails_at_the_queue(make_api, tmp_path):
    env = make_api("sqlite", worker=False, smoke_model_config=_tiny_model(tmp_path))
    r = env.client.post("/smoke-test")
    assert r.status_code == 202
    doc = r.json()
    assert doc["status"] == "failed" and doc["failed_stage"] == "queued_wait"
    assert "no live worker" in doc["message"]
    # reading the verdict changes nothing (issue 10: a GET has no side effect): still queued
    assert doc["run_status"] == "queued"
    again = env.client.get(f"/smoke-test/{doc['id']}").json()
    assert again["run_status"] == "queued" and again["failed_stage"] == "queued_wait"
    assert env.client.post("/smoke-test").status_code == 409
    # a worker's reconciler cancels it (worker/reconciler.py)
    assert reconcile(env.settings, db=env.db).cancelled == [doc["id"]]
    again = env.client.get(f"/smoke-test/{doc['id']}").json()
    assert again["run_status"] == "cancelled" and again["failed_stage"] == "queued_wait"
    assert "no live worker" in again["message"]
    # it was cancelled, so another may be submitted
    assert env.client.post("/smoke-test").status_code == 202


def test_smoke_test_ids_must_be_smoke_tests(sqlite_api: ApiEnv):
    run_id = sqlite_api.client.post("/runs", json=body()).json()["id"]
    assert sqlite_api.client.get(f"/smoke-test/{run_id}").status_code == 404
    assert sqlite_api.client.get(f"/smoke-test/{uuid.uuid4()}").status_code == 404


def test_smoke_test_of_the_shipped_configs_validates(sqlite_api: ApiEnv):
    r = sqlite_api.client.post("/smoke-test")  # default: configs/model_config.yaml (MoE-200M)
    assert r.status_code == 202, r.text
    with sqlite_api.session() as s:
        run = reads.get_run(s, uuid.UUID(r.json()["id"]))
    assert run.resolved_model["name"] == "MoE-200M"
    assert run.resolved_train["train"]["global_batch_size"] == 1


def test_smoke_report_of_a_run_whose_engine_wrote_no_events():
    # an engine without events.jsonl: a success is still a pass, every stage done, the inner
    # ones untimed; a failure fails at the first stage whose end is unknown
    from service.api.smoke import build_report
    from service.models import Run, RunStatus

    created = utcnow()
    run = Run(
        name="smoke",
        submitted_train={},
        submitted_model={},
        resolved_train={},
        resolved_model={},
        status=RunStatus.succeeded,
        attempt=1,
        created_at=created,
        started_at=created + timedelta(seconds=2),
        finished_at=created + timedelta(seconds=9),
    )
    report = build_report(run, [], live_workers=1)
    assert report.status == "passed" and report.failed_stage is None
    assert [(s.name, s.seconds, s.status) for s in report.stages] == [
        ("queued_wait", 2.0, "ok"),
        ("startup", None, "ok"),
        ("data_tokenizer", None, "ok"),
        ("model_build", None, "ok"),
        ("first_step", None, "ok"),
        ("finish", None, "ok"),
    ]
    assert report.total_seconds == 9.0
    run.status, run.failure_message = RunStatus.failed, "crashed: boom"
    report = build_report(run, [], live_workers=1)
    assert report.status == "failed" and report.failed_stage == "startup"
    assert report.message == "crashed: boom"
