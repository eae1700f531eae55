"""Runs from runs: ``initial_checkpoint_dir: run:ID/<checkpoint>`` resolved at submission
through the database (``service.references``), refused with a 422 naming the field when the run
or the checkpoint is unknown, refused on the command line (no database); and a real fine-tune
of the tiny MoE from a referenced checkpoint."""

from __future__ import annotations

import copy
import shutil
import subprocess
import sys
import uuid
from pathlib import Path

import pytest
import yaml

from service import runs
from service.config.paths import RUN_REFERENCE_CLI_MESSAGE
from tests.support import REPO
from tests.support.api import MODEL, TRAIN, ApiEnv, body
from tests.support.tiny import TINY_MODEL, tiny_train_config

FIELD = ["body", "train_config", "initial_checkpoint_dir"]


def _new_run(env: ApiEnv) -> str:
    r = env.client.post("/runs", json=body("source"))
    assert r.status_code == 201, r.text
    return r.json()["id"]


def _record(env: ApiEnv, run_id: str, name: str) -> Path:
    """A checkpoint folder ``name`` of run ``run_id`` (weights and tokenizer files), recorded."""
    folder = env.settings.run_dir(run_id) / "out" / name
    folder.mkdir(parents=True)
    for file in ("lit_model.pth", "model_config.yaml", "tokenizer.json"):
        (folder / file).write_bytes(b"x")
    with env.session() as s:
        runs.record_checkpoint(s, uuid.UUID(run_id), name, str(folder))
    return folder


def _with_initial(ref: str, **train: object) -> dict:
    doc = copy.deepcopy(TRAIN)
    doc["initial_checkpoint_dir"] = ref
    doc["resume"] = "auto"
    doc.update(train)
    return body("fine-tune", train_config=doc, model_config=MODEL)


def test_a_run_reference_resolves_to_the_recorded_checkpoint(api: ApiEnv):
    source = _new_run(api)
    step = _record(api, source, "step-00000005")
    final = _record(api, source, "final")
    r = api.client.post("/runs", json=_with_initial(f"run:{source}/final"))
    assert r.status_code == 201, r.text
    tuned = r.json()["id"]
    resolved = yaml.safe_load(api.client.get(f"/runs/{tuned}/config").text)
    assert resolved["train_config"]["initial_checkpoint_dir"] == str(final)
    submitted = yaml.safe_load(api.client.get(f"/runs/{tuned}/config?submitted=true").text)
    assert submitted["train_config"]["initial_checkpoint_dir"] == f"run:{source}/final"
    assert not [w for w in r.json()["warnings"] if w["loc"] == FIELD], r.json()["warnings"]
    for ref, expected in (
        ("step-00000005", step),
        ("5", step),
        ("latest", final),
        ("final", final),
    ):
        v = api.client.post("/runs/validate", json=_with_initial(f"run:{source}/{ref}")).json()
        assert v["valid"], (ref, v["errors"])
        assert v["resolved"]["train_config"]["initial_checkpoint_dir"] == str(expected), ref


def test_latest_without_final_is_the_newest_step(sqlite_api: ApiEnv):
    source = _new_run(sqlite_api)
    _record(sqlite_api, source, "step-00000005")
    newest = _record(sqlite_api, source, "step-00000010")
    v = sqlite_api.client.post("/runs/validate", json=_with_initial(f"run:{source}/latest"))
    assert v.json()["resolved"]["train_config"]["initial_checkpoint_dir"] == str(newest)


def _refusal(env: ApiEnv, ref: str, loc: list[str] = FIELD, **train: object) -> str:
    r = env.client.post("/runs", json=_with_initial(ref, **train))
    assert r.status_code == 422, r.text
    doc = r.json()
    assert doc["code"] == "invalid_config"
    assert [e["loc"] for e in doc["errors"]] == [loc], doc
    return doc["errors"][0]["msg"]


def test_unknown_run_or_checkpoint_is_a_422_listing_what_exists(api: ApiEnv):
    source = _new_run(api)
    missing = uuid.uuid4()
    assert (
        _refusal(api, f"run:{missing}/final") == f"run:{missing}/final: there is no run {missing}"
    )
    msg = _refusal(api, f"run:{source}/final")
    assert msg == (
        f"run:{source}/final: run {source} (queued) has no recorded checkpoint 'final'; "
        "its checkpoints: none recorded yet"
    )
    _record(api, source, "step-00000005")
    _record(api, source, "step-00000010")
    msg = _refusal(api, f"run:{source}/step-00000007")
    assert msg.endswith(
        "has no recorded checkpoint 'step-00000007'; its checkpoints: step-00000005, step-00000010"
    ), msg
    assert "expected run:<run id>/final" in _refusal(api, f"run:{source}")
    assert "is not a run id" in _refusal(api, "run:nope/final")
    # a reference anywhere else is refused, not resolved under the data root
    msg = _refusal(
        api,
        f"run:{source}/step-00000005",
        loc=["body", "train_config", "resume"],
        initial_checkpoint_dir=None,
        resume=f"run:{source}/step-00000005",
    )
    assert "accepted only in initial_checkpoint_dir" in msg
    # /runs/validate says the same
    v = api.client.post("/runs/validate", json=_with_initial(f"run:{missing}/final")).json()
    assert not v["valid"] and v["errors"][0]["loc"] == FIELD


def test_the_command_line_refuses_a_run_reference(tmp_path, corpus, tokenizer_dir):
    doc = tiny_train_config(tmp_path / "out", corpus, tokenizer_dir)
    doc["initial_checkpoint_dir"] = f"run:{uuid.uuid4()}/final"
    t, m = tmp_path / "train.yaml", tmp_path / "model.yaml"
    t.write_text(yaml.safe_dump(doc))
    m.write_text(yaml.safe_dump(TINY_MODEL))
    done = subprocess.run(
        [sys.executable, "run_train.py", "--dry-run", "--config", str(t), "--model-config", str(m)],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 2, done.stderr
    assert f"initial_checkpoint_dir: {RUN_REFERENCE_CLI_MESSAGE}" in done.stderr
    assert "Traceback" not in done.stderr


@pytest.mark.slow
def test_fine_tune_from_a_referenced_checkpoint_loads_its_weights(
    sqlite_api: ApiEnv, corpus, tokenizer_dir
):
    """The engine trains the tiny MoE as run A (in A's folder), A's final checkpoint is
    recorded, run B is submitted with ``run:A/final`` and its resolved config trains from A's
    weights (and tokenizer: B names none)."""
    from service.config.validate import validate_configs
    from worker.train import run_training

    env = sqlite_api
    shutil.copytree(corpus, env.data_root / "corpus")
    shutil.copytree(tokenizer_dir, env.data_root / "tok")
    doc = tiny_train_config(Path("out"), Path("corpus"), Path("tok"), max_tokens=4 * 32 * 2)
    r = env.client.post("/runs", json=body("A", train_config=doc, model_config=TINY_MODEL))
    assert r.status_code == 201, r.text
    a = r.json()["id"]
    resolved_a = yaml.safe_load(env.client.get(f"/runs/{a}/config").text)
    va = validate_configs(resolved_a["train_config"], resolved_a["model_config"])
    result = run_training(va.train, va.model)
    assert result.checkpoint_dir is not None
    with env.session() as s:
        runs.record_checkpoint(s, uuid.UUID(a), "final", str(result.checkpoint_dir), step=2)

    tuned = copy.deepcopy(doc)
    tuned.pop("tokenizer_dir")  # the tokenizer comes with the referenced checkpoint
    tuned["initial_checkpoint_dir"] = f"run:{a}/final"
    r = env.client.post("/runs", json=body("B", train_config=tuned, model_config=TINY_MODEL))
    assert r.status_code == 201, r.text
    resolved_b = yaml.safe_load(env.client.get(f"/runs/{r.json()['id']}/config").text)
    assert resolved_b["train_config"]["initial_checkpoint_dir"] == str(result.checkpoint_dir)
    vb = validate_configs(resolved_b["train_config"], resolved_b["model_config"])
    tuned_result = run_training(vb.train, vb.model)
    assert tuned_result.steps == 2
    log = (Path(vb.train.out_dir) / "train.log").read_text(encoding="utf-8")
    assert f"weights initialised from {result.checkpoint_dir}" in log


def test_a_run_that_others_start_from_is_not_deleted(api: ApiEnv):
    source = _new_run(api)
    final = _record(api, source, "final")
    r = api.client.post("/runs", json=_with_initial(f"run:{source}/latest"))
    assert r.status_code == 201, r.text
    tuned = r.json()["id"]
    assert api.client.post(f"/runs/{source}/cancel").json()["status"] == "cancelled"
    r = api.client.delete(f"/runs/{source}")
    assert r.status_code == 409, r.text
    assert r.json()["code"] == "run_in_use" and r.json()["used_by"] == [tuned]
    assert final.is_dir()
    assert api.client.post(f"/runs/{tuned}/cancel").json()["status"] == "cancelled"
    assert api.client.delete(f"/runs/{source}").status_code == 204
    assert not final.exists()
