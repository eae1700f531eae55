"""Sweeps without workers: the document's refusals (422 naming the field), validation, the
controller's lease, a grid's trials listed at once and queued ``max_concurrent`` at a time, a
seeded random sweep reproducible, cancel and delete, and the API process staying torch-free
with Optuna loaded. The trials' runs are never trained here (tests/e2e/test_sweeps.py trains
them with real workers)."""

from __future__ import annotations

import copy
import subprocess
import sys
import uuid
from datetime import timedelta
from typing import Any

import pytest
import yaml

from service.models import utcnow
from service.sweeps import controller
from tests.support import REPO
from tests.support.api import MODEL, TRAIN, ApiEnv

LR = "train_config.optimizer.init_args.lr"
EXPERTS = "model_config.n_expert"


def sweep_doc(**extra: Any) -> dict[str, Any]:
    doc: dict[str, Any] = {
        "name": "lr-and-experts",
        "base": {"train_config": copy.deepcopy(TRAIN), "model_config": copy.deepcopy(MODEL)},
        "method": "grid",
        "metric": {"name": "val_loss", "goal": "minimize"},
        "parameters": {LR: {"values": [0.001, 0.003]}, EXPERTS: {"values": [4, 8]}},
        "max_concurrent": 2,
        "seed": 0,
    }
    doc.update(extra)
    return doc


def refused(env: ApiEnv, doc: Any) -> dict[str, Any]:
    r = env.client.post("/sweeps", json=doc)
    assert r.status_code == 422, r.text
    return r.json()


def test_refusals_name_the_field(shared_sqlite_api: ApiEnv):
    env = shared_sqlite_api
    body = refused(env, sweep_doc(method="random"))
    assert body["errors"][0]["loc"] == ["body", "max_runs"]
    assert "required for method random" in body["errors"][0]["msg"]

    body = refused(
        env, sweep_doc(parameters={LR: {"min": 1e-4, "max": 1e-2, "distribution": "log_uniform"}})
    )
    assert body["errors"][0]["loc"] == ["body", "parameters", LR]
    assert "grid takes values" in body["errors"][0]["msg"]

    body = refused(env, sweep_doc(parameters={"optimizer.lr": {"values": [1]}}))
    assert body["errors"][0]["loc"] == ["body", "parameters", "optimizer.lr"]

    body = refused(env, sweep_doc(metric={"name": "accuracy", "goal": "minimize"}))
    assert body["errors"][0]["loc"][:3] == ["body", "metric", "name"]

    body = refused(env, sweep_doc(max_concurrent="2"))  # strict: no coercion
    assert body["errors"][0]["loc"] == ["body", "max_concurrent"]

    body = refused(
        env,
        sweep_doc(
            parameters={LR: {"min": 1, "max": 0, "distribution": "uniform"}},
            method="tpe",
            max_runs=4,
        ),
    )
    assert "min (1) must be below max (0)" in body["errors"][0]["msg"]

    body = refused(env, sweep_doc(parameters={"model_config.n_expertz": {"values": [4]}}))
    assert body["errors"][0]["loc"] == ["body", "parameters", "model_config.n_expertz"]
    assert "unknown path" in body["errors"][0]["msg"] and "n_expert" in body["errors"][0]["msg"]


def test_a_metric_the_base_never_logs_says_which_keys_to_set(shared_sqlite_api: ApiEnv):
    doc = sweep_doc()
    doc["base"]["train_config"]["eval"] = {"interval": 0, "final_validation": False}
    body = refused(shared_sqlite_api, doc)
    assert body["errors"][0]["loc"] == ["body", "metric", "name"]
    msg = body["errors"][0]["msg"]
    assert "train_config.eval.interval" in msg and "train_config.eval.final_validation" in msg
    # loss is always logged: the same base is fine with it
    doc["metric"] = {"name": "loss", "goal": "minimize"}
    r = shared_sqlite_api.client.post("/sweeps/validate", json=doc)
    assert r.status_code == 200 and r.json()["valid"] is True, r.text


def test_a_grid_with_invalid_points_lists_each_point(shared_sqlite_api: ApiEnv):
    # global_batch_size 4 is not a multiple of micro-batch 3 (nor of 8)
    doc = sweep_doc(parameters={"train_config.train.micro_batch_size": {"values": [2, 3, 8]}})
    body = refused(shared_sqlite_api, doc)
    points = sorted({e["point"] for e in body["errors"]})
    assert points == [1, 2], body
    assert all(e["loc"] == ["body", "parameters"] for e in body["errors"])
    assert "grid point 1 (train_config.train.micro_batch_size=3)" in body["errors"][0]["msg"]
    assert body["message"].startswith("2 of the grid's 3 points are invalid")


def test_validate_takes_yaml_and_lists_the_grid(shared_sqlite_api: ApiEnv):
    text = yaml.safe_dump(sweep_doc(), sort_keys=False)
    r = shared_sqlite_api.client.post(
        "/sweeps/validate", content=text, headers={"content-type": "application/yaml"}
    )
    assert r.status_code == 200, r.text
    assert r.json()["valid"] is True
    assert r.json()["points"] == [
        {LR: 0.001, EXPERTS: 4},
        {LR: 0.001, EXPERTS: 8},
        {LR: 0.003, EXPERTS: 4},
        {LR: 0.003, EXPERTS: 8},
    ]
    assert not any(w["loc"][:2] == ["body", "early_stopping"] for w in r.json()["warnings"])
    # median stopping that could never prune (min_steps past the base's last step) is a warning
    late = sweep_doc(early_stopping={"type": "median", "min_steps": 10_000})
    r = shared_sqlite_api.client.post("/sweeps/validate", json=late)
    assert r.status_code == 200 and r.json()["valid"] is True, r.text
    (warning,) = [w for w in r.json()["warnings"] if w["loc"][:2] == ["body", "early_stopping"]]
    assert warning["loc"] == ["body", "early_stopping", "min_steps"]
    assert "min_steps 10000 is not below the base's" in warning["msg"]
    assert warning["msg"].endswith("optimizer steps: no trial can be pruned")


def test_a_grid_lists_its_trials_and_queues_max_concurrent(sqlite_api: ApiEnv):
    c = sqlite_api.client
    r = c.post("/sweeps", json=sweep_doc())
    assert r.status_code == 201, r.text
    sweep = r.json()
    assert [t["number"] for t in sweep["trials"]] == [0, 1, 2, 3]
    assert [t["status"] for t in sweep["trials"]] == ["queued", "queued", "pending", "pending"]
    run = c.get(f"/runs/{sweep['trials'][1]['run_id']}").json()
    assert run["name"] == "lr-and-experts-1"
    assert run["sweep_id"] == sweep["id"]
    assert run["sweep_params"] == {LR: 0.001, EXPERTS: 8}
    resolved = yaml.safe_load(c.get(f"/runs/{run['id']}/config").text)
    assert resolved["model_config"]["n_expert"] == 8
    assert resolved["train_config"]["optimizer"]["init_args"]["lr"] == 0.001
    with sqlite_api.session() as s:  # a second tick while both run: nothing more is queued
        again = controller.tick(
            s,
            sqlite_api.settings,
            None,
            uuid.UUID(sweep["id"]),
            holder="test",
        )
    assert again.decided and again.submitted == []
    assert len(c.get("/runs").json()["items"]) == 2
    assert c.get("/sweeps").json()["items"][0]["trial_counts"] == {"queued": 2, "pending": 2}

    assert c.delete(f"/sweeps/{sweep['id']}").status_code == 409
    r = c.post(f"/sweeps/{sweep['id']}/cancel")
    assert r.status_code == 200, r.text
    done = r.json()
    assert done["status"] == "cancelled", done
    assert [t["status"] for t in done["trials"]] == ["cancelled", "cancelled", "pending", "pending"]
    assert {t["cancel_reason"] for t in done["trials"][:2]} == {"sweep_cancelled"}
    assert c.delete(f"/sweeps/{sweep['id']}").status_code == 204
    assert c.get(f"/sweeps/{sweep['id']}").status_code == 404
    kept = c.get(f"/runs/{run['id']}").json()  # its runs stay, as ordinary runs
    assert kept["sweep_id"] is None and kept["sweep_params"] == {LR: 0.001, EXPERTS: 8}


def test_parameters_win_over_the_preset(sqlite_api: ApiEnv):
    """The issue's example: a base with preset cpu-tiny, which sets both swept keys; each
    trial's values are merged over the preset (as explicit flags are on the command line)."""
    c = sqlite_api.client
    preset = c.get("/presets").json()
    tiny = next(p for p in preset if p["name"] == "cpu-tiny")
    assert tiny["model_config"]["n_expert"] not in (2, 6)  # the preset sets it: 4 or 8 would hide
    assert tiny["train_config"]["optimizer"]["init_args"]["lr"] != 0.0007
    doc = sweep_doc(parameters={LR: {"values": [0.0007]}, EXPERTS: {"values": [2, 6]}})
    doc["base"]["preset"] = "cpu-tiny"
    r = c.post("/sweeps", json=doc)
    assert r.status_code == 201, r.text
    for trial, experts in zip(r.json()["trials"], [2, 6], strict=True):
        run = c.get(f"/runs/{trial['run_id']}").json()
        assert run["preset"] == "cpu-tiny"
        resolved = yaml.safe_load(c.get(f"/runs/{run['id']}/config").text)
        assert resolved["model_config"]["n_expert"] == experts
        assert resolved["train_config"]["optimizer"]["init_args"]["lr"] == 0.0007
        assert resolved["train_config"]["train"]["max_tokens"] == 307200  # the preset's


def test_a_seeded_random_sweep_is_reproducible(sqlite_api: ApiEnv):
    c = sqlite_api.client
    params = {
        LR: {"min": 1e-4, "max": 1e-2, "distribution": "log_uniform"},
        EXPERTS: {"min": 2, "max": 8, "distribution": "int_uniform"},
    }

    def sampled(seed: int) -> list[dict[str, Any]]:
        doc = sweep_doc(method="random", max_runs=3, max_concurrent=3, parameters=params, seed=seed)
        r = c.post("/sweeps", json=doc)
        assert r.status_code == 201, r.text
        c.post(f"/sweeps/{r.json()['id']}/cancel")
        return [t["params"] for t in r.json()["trials"]]

    first, second, other = sampled(7), sampled(7), sampled(8)
    assert len(first) == 3 and first == second and first != other
    for p in first:
        assert 1e-4 <= p[LR] <= 1e-2 and isinstance(p[EXPERTS], int) and 2 <= p[EXPERTS] <= 8


def test_invalid_sampled_points_are_skipped_and_bounded(sqlite_api: ApiEnv):
    # every micro-batch size in [3, 3] leaves global_batch_size 4 indivisible
    doc = sweep_doc(
        method="random",
        max_runs=2,
        metric={"name": "loss", "goal": "minimize"},
        parameters={"train_config.train.micro_batch_size": {"values": [3]}},
    )
    r = sqlite_api.client.post("/sweeps", json=doc)
    assert r.status_code == 201, r.text
    sweep = r.json()
    assert sweep["status"] == "failed", sweep
    assert [t["status"] for t in sweep["trials"]] == ["skipped"] * 10
    assert sweep["trials"][0]["errors"][0]["loc"][:3] == ["body", "train_config", "train"]
    assert "10 sampled points were invalid" in sweep["end_reason"]


def test_one_controller_holds_the_lease(sqlite_api: ApiEnv):
    r = sqlite_api.client.post("/sweeps", json=sweep_doc())
    sweep_id = uuid.UUID(r.json()["id"])
    now = utcnow()
    with sqlite_api.session() as s:
        assert controller._take_lease(s, sweep_id, "a", now)
        assert not controller._take_lease(s, sweep_id, "b", now)
        assert controller._take_lease(s, sweep_id, "a", now)  # the holder renews
        # an abandoned lease expires
        later = now + timedelta(seconds=controller.LEASE_SECONDS + 1)
        assert controller._take_lease(s, sweep_id, "b", later)
        controller._release_lease(s, sweep_id, "b")
        assert controller._take_lease(s, sweep_id, "c", now)


def test_the_api_process_imports_no_torch_with_optuna_loaded():
    code = (
        "import sys, service.main, service.sweeps.controller as c, optuna; "
        "optuna.create_study(sampler=optuna.samplers.TPESampler(seed=0)).ask({}); "
        "print(sorted(m for m in sys.modules if m.split('.')[0] in "
        "('torch', 'litgpt', 'lightning', 'worker')))"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=REPO
    )
    assert out.stdout.strip() == "[]"


@pytest.mark.parametrize("path", ["/sweeps/" + str(uuid.UUID(int=1)), "/sweeps/x"])
def test_unknown_sweep(shared_sqlite_api: ApiEnv, path: str):
    r = shared_sqlite_api.client.get(path)
    assert r.status_code in (404, 422)


def test_the_command_line_creates_follows_and_cancels(tmp_path, capsys):
    from cli.main import main
    from tests.support.client import live_server

    with live_server(tmp_path / "srv") as server:
        good = tmp_path / "sweep.yaml"
        good.write_text(yaml.safe_dump(sweep_doc(), sort_keys=False))
        assert main(["sweep", "create", str(good), "--url", server.url]) == 0
        out = capsys.readouterr().out
        assert "(lr-and-experts): running; grid, minimize val_loss" in out
        sweep_id = out.split()[1]
        assert out.count(" queued ") == 2 and out.count(" pending ") == 2, out

        assert main(["sweep", "status", sweep_id, "--url", server.url]) == 0
        assert "lr" in capsys.readouterr().out

        assert main(["sweep", "list", "--url", server.url]) == 0
        listed = capsys.readouterr().out.splitlines()
        assert listed[0].split()[:4] == ["ID", "STATUS", "METHOD", "BEST"]
        assert listed[1].split()[:3] == [sweep_id, "running", "grid"]
        assert listed[1].endswith("lr-and-experts")

        assert main(["sweep", "cancel", sweep_id, "--url", server.url]) == 0
        assert ": cancelled;" in capsys.readouterr().out
        # --follow ends at once on an ended sweep, exit 1: it did not finish
        assert main(["sweep", "status", sweep_id, "--follow", "--url", server.url]) == 1

        bad = tmp_path / "bad.yaml"
        bad.write_text(yaml.safe_dump(sweep_doc(method="tpe")))
        assert main(["sweep", "create", str(bad), "--url", server.url]) == 2
        assert "max_runs: required for method tpe" in capsys.readouterr().err


def test_a_plain_cancel_records_reason_requested(sqlite_api: ApiEnv):
    from service import reads
    from tests.support.api import body

    run = sqlite_api.client.post("/runs", json=body()).json()
    assert sqlite_api.client.post(f"/runs/{run['id']}/cancel").status_code == 200
    with sqlite_api.session() as s:
        row = reads.get_run(s, uuid.UUID(run["id"]))
    assert row.status.value == "cancelled" and row.cancel_reason is not None
    assert row.cancel_reason.value == "requested"
    assert run["sweep_id"] is None and run["sweep_params"] is None
