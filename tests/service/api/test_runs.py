"""The runs API against a real database (SQLite and PostgreSQL, migrated with Alembic) and the
embedded SQLite broker: submission in JSON/YAML/multipart, every invalid config shape of
tests/service/config/test_validate.py as a 422 with its path, idempotency, limits, auth, paths, listing,
metrics, checkpoints as streamed tars, logs, cancel and delete."""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys
import tarfile
import uuid
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
import yaml

from service import reads, runs
from service.config.merge import deep_merge
from service.db import StartupError
from service.main import create_app
from service.queue import TRAIN_TASK
from tests.support import REPO
from tests.support.api import MODEL, TRAIN, ApiEnv, body

DELETE = object()


def _apply(base: dict, over: dict) -> dict:
    out = deep_merge(base, {k: v for k, v in over.items() if v is not DELETE})
    for k, v in over.items():
        if v is DELETE:
            del out[k]
    return out


# -- submission -----------------------------------------------------------------------------------


def test_json_submission_is_stored_resolved_and_enqueued(api: ApiEnv):
    r = api.client.post("/runs", json=body("first"))
    assert r.status_code == 201, r.text
    run = r.json()
    assert run["status"] == "queued" and run["name"] == "first" and run["enqueued"] is True
    assert run["created"] is True and run["attempt"] == 0
    assert run["estimate"]["plan"]["optimizer_steps"] == 20
    assert run["estimate"]["params"]["total"] > 0
    # the data and tokenizer folders do not exist yet: warnings, not errors
    locs = {tuple(w["loc"]) for w in run["warnings"]}
    assert ("body", "train_config", "tokenizer_dir") in locs
    # the message is in the broker, by task name, with the run id only
    assert api.broker_messages() == [{"task": TRAIN_TASK, "args": [run["id"]], "kwargs": {}}]
    # resolved paths: inputs under DATA_ROOT, outputs in the run's folder
    run_id = uuid.UUID(run["id"])
    with api.session() as s:
        row = reads.get_run(s, run_id)
        assert row.submitted_train == TRAIN and row.submitted_model == MODEL
        resolved = row.resolved_train
    data_root = api.data_root
    assert resolved["out_dir"] == str(api.settings.run_dir(run_id) / "out")
    assert resolved["tokenizer_dir"] == str(data_root / "tok")
    assert resolved["data"]["init_args"]["train_data_path"] == str(data_root / "ds/train")
    assert resolved["optimizer"]["class_path"] == "torch.optim.AdamW"
    events = api.client.get(f"/runs/{run_id}/events").json()
    assert [(e["from_status"], e["to_status"]) for e in events] == [(None, "queued")]
    # the resolved YAML is what the DB holds
    config = yaml.safe_load(api.client.get(f"/runs/{run_id}/config").text)
    assert config == {"train_config": resolved, "model_config": row.resolved_model}
    submitted = yaml.safe_load(api.client.get(f"/runs/{run_id}/config?submitted=true").text)
    assert submitted == {"train_config": TRAIN, "model_config": MODEL}


def test_yaml_and_multipart_bodies_give_the_same_run(sqlite_api: ApiEnv):
    c = sqlite_api.client
    r = c.post(
        "/runs",
        content=yaml.safe_dump(body("as-yaml")),
        headers={"Content-Type": "application/yaml"},
    )
    assert r.status_code == 201, r.text
    r2 = c.post(
        "/runs",
        data={"name": "as-multipart"},
        files={
            "train_config": ("train.yaml", yaml.safe_dump(TRAIN), "application/yaml"),
            "model_config": ("model.json", json.dumps(MODEL), "application/json"),
        },
    )
    assert r2.status_code == 201, r2.text
    with sqlite_api.session() as s:
        a = reads.get_run(s, uuid.UUID(r.json()["id"]))
        b = reads.get_run(s, uuid.UUID(r2.json()["id"]))
    assert a.submitted_train == b.submitted_train == TRAIN
    assert a.resolved_model == b.resolved_model
    assert b.name == "as-multipart"
    assert len(sqlite_api.broker_messages()) == 2


def test_preset_is_merged_over_the_documents(sqlite_api: ApiEnv):
    train = yaml.safe_load(Path("configs/train_config.yaml").read_text())
    model = yaml.safe_load(Path("configs/model_config.yaml").read_text())
    r = sqlite_api.client.post(
        "/runs",
        json={"name": "tiny", "preset": "cpu-tiny", "train_config": train, "model_config": model},
    )
    assert r.status_code == 201, r.text
    assert r.json()["estimate"]["plan"]["optimizer_steps"] == 300
    with sqlite_api.session() as s:
        row = reads.get_run(s, uuid.UUID(r.json()["id"]))
    assert row.resolved_model["n_layer"] == 4 and row.preset == "cpu-tiny"
    assert row.submitted_model == model  # stored as given, before the preset


# -- invalid configs: every shape of tests/service/config/test_validate.py is a 422 naming the field ----------------

T, M = "train_config", "model_config"
INVALID: list[tuple[str, dict, dict, list[tuple]]] = [
    ("unknown-key", {"train": {"micro_batch_szie": 4}}, {}, [(T, "train", "micro_batch_szie")]),
    ("unknown-model-key", {}, {"n_embed": 64}, [(M, "n_embed")]),
    (
        "unknown-optimizer-key",
        {"optimizer": {"init_args": {"lrr": 0.1}}},
        {},
        [(T, "optimizer", "init_args", "lrr")],
    ),
    ("key-in-wrong-section", {"max_seq_length": 32}, {}, [(T, "max_seq_length")]),
    ("model-key-in-train", {"n_layer": 2}, {}, [(T, "n_layer")]),
    ("train-key-in-model", {}, {"micro_batch_size": 2}, [(M, "micro_batch_size")]),
    ("unknown-eval-key", {"eval": {"zzz": 1}}, {}, [(T, "eval", "zzz")]),
    ("train-key-named-model", {"model": {"n_layer": 2}}, {}, [(T, "model")]),
    (
        "train-key-named-model-beside-a-model-error",
        {"model": {"n_layer": 2}},
        {"n_layer": "many"},
        [(T, "model"), (M, "n_layer")],
    ),
    (
        "micro-batch-bound",
        {"train": {"micro_batch_size": 0}},
        {},
        [(T, "train", "micro_batch_size")],
    ),
    ("type-error", {"train": {"micro_batch_size": "four"}}, {}, [(T, "train", "micro_batch_size")]),
    ("precision", {"precision": "bf16"}, {}, [(T, "precision")]),
    ("logger", {"logger_name": "tensorboard"}, {}, [(T, "logger_name")]),
    ("missing-data", {"data": DELETE}, {}, [(T, "data")]),
    (
        "null-train-path",
        {"data": {"init_args": {"train_data_path": None}}},
        {},
        [(T, "data", "init_args", "train_data_path")],
    ),
    ("data-class", {"data": {"class_path": "os.system"}}, {}, [(T, "data", "class_path")]),
    (
        "optimizer-class",
        {"optimizer": {"class_path": "bitsandbytes.optim.AdamW8bit"}},
        {},
        [(T, "optimizer", "class_path")],
    ),
    (
        "optimizer-short-form",
        {"optimizer": DELETE, "__optimizer": "RMSprop"},
        {},
        [(T, "optimizer", "class_path")],
    ),
    (
        "optimizer-foreign-arg",
        {"optimizer": {"class_path": "SGD", "init_args": {"betas": [0.9, 0.95]}}},
        {},
        [(T, "optimizer", "init_args", "betas")],
    ),
    (
        "nesterov",
        {"optimizer": {"class_path": "SGD", "init_args": {"nesterov": True}}},
        {},
        [(T, "optimizer", "init_args", "nesterov")],
    ),
    (
        "betas",
        {"optimizer": {"init_args": {"betas": [0.9, 1.0]}}},
        {},
        [(T, "optimizer", "init_args", "betas")],
    ),
    ("lr", {"optimizer": {"init_args": {"lr": 0}}}, {}, [(T, "optimizer", "init_args", "lr")]),
    ("devices-0", {"devices": 0}, {}, [(T, "devices")]),
    ("devices-all", {"devices": "all"}, {}, [(T, "devices")]),
    ("resume", {"resume": 3}, {}, [(T, "resume")]),
    (
        "warmup-fraction",
        {"train": {"lr_warmup_fraction": 1.5}},
        {},
        [(T, "train", "lr_warmup_fraction")],
    ),
    ("mlp-class", {}, {"mlp_class_name": "SwiGLU"}, [(M, "mlp_class_name")]),
    ("norm-class", {}, {"norm_class_name": "BatchNorm"}, [(M, "norm_class_name")]),
    (
        "global-batch",
        {"devices": 2, "train": {"global_batch_size": 6}},
        {},
        [(T, "train", "global_batch_size")],
    ),
    (
        "global-batch-nodes",
        {"num_nodes": 2, "devices": 2, "train": {"global_batch_size": 2}},
        {},
        [(T, "train", "global_batch_size")],
    ),
    ("n-embd", {}, {"n_embd": 66}, [(M, "n_embd")]),
    ("query-groups", {}, {"n_query_groups": 3}, [(M, "n_query_groups")]),
    ("rope-odd", {}, {"head_size": 15, "n_embd": 64}, [(M, "rotary_percentage")]),
    ("experts-per-token-0", {}, {"n_expert_per_token": 0}, [(M, "n_expert_per_token")]),
    ("experts-per-token-5", {}, {"n_expert_per_token": 5}, [(M, "n_expert_per_token")]),
    ("moe-no-experts", {}, {"n_expert": 0}, [(M, "n_expert")]),
    ("moe-width", {}, {"moe_intermediate_size": DELETE}, [(M, "moe_intermediate_size")]),
    (
        "llama-mlp-width",
        {},
        {"mlp_class_name": "LLaMAMLP", "n_expert": 0},
        [(M, "intermediate_size")],
    ),
    (
        "dense-replace",
        {},
        {"mlp_class_name": "GptNeoxMLP", "n_expert": 0, "first_k_dense_replace": 1},
        [(M, "first_k_dense_replace")],
    ),
    ("shared-norm", {}, {"shared_attention_norm": True}, [(M, "shared_attention_norm")]),
    ("seq-len", {"train": {"max_seq_length": 128}}, {}, [(T, "train", "max_seq_length")]),
    ("vocab", {}, {"vocab_size": 300}, [(M, "vocab_size")]),
    ("max-tokens", {"train": {"max_tokens": 100}}, {}, [(T, "train", "max_tokens")]),
    ("min-lr", {"train": {"min_lr": 0.01}}, {}, [(T, "train", "min_lr")]),
    (
        "warmup-both",
        {"train": {"lr_warmup_steps": 2, "lr_warmup_fraction": 0.1}},
        {},
        [(T, "train", "lr_warmup_fraction")],
    ),
    ("tokenizer-required", {"tokenizer_dir": None}, {}, [(T, "tokenizer_dir")]),
    (
        "init-and-resume-path",
        {"initial_checkpoint_dir": "ckpt", "resume": "ckpt/step-00000005"},
        {},
        [(T, "initial_checkpoint_dir")],
    ),
    (
        "resume-allow-changes",
        {"resume_allow_changes": ["lr"]},
        {},
        [(T, "resume_allow_changes", 0)],
    ),
    (
        "sliding-window",
        {},
        {"sliding_window_size": 16, "sliding_window_indices": [1]},
        [(M, "sliding_window_indices")],
    ),
    ("expert-groups", {}, {"n_expert_groups": 3}, [(M, "n_expert_groups")]),
    (
        "both-documents",
        {"train": {"micro_batch_size": 0}, "precision": "fp8"},
        {"n_layer": "many"},
        [(T, "precision"), (T, "train", "micro_batch_size"), (M, "n_layer")],
    ),
]


def test_a_train_key_named_model_from_a_preset_is_placed_in_the_train_config(
    shared_sqlite_api: ApiEnv, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
):
    """Issues name their document: an unknown train key ``model`` that a preset brings in (not
    in the submitted train document) is reported under ``train_config``, the model document's
    error under ``model_config`` (the path prefix ``model`` once placed both in the model
    document: the train document was validated a second time, as submitted, to tell them apart)."""
    from service.config import presets

    (tmp_path / "with-model-key.yaml").write_text(
        "train_config:\n  model: {n_layer: 2}\nmodel_config: {}\n"
    )
    monkeypatch.setattr(presets, "PRESETS_DIR", tmp_path)
    r = shared_sqlite_api.client.post(
        "/runs",
        json=body(preset="with-model-key", model_config=_apply(MODEL, {"n_head": 0})),
    )
    assert r.status_code == 422, r.text
    assert [tuple(e["loc"]) for e in r.json()["errors"]] == [
        ("body", T, "model"),
        ("body", M, "n_head"),
    ]


@pytest.mark.parametrize("case", INVALID, ids=[c[0] for c in INVALID])
def test_every_invalid_config_is_a_422_with_the_field_path(shared_sqlite_api: ApiEnv, case):
    _name, train_over, model_over, expected = case
    train = _apply(TRAIN, {k: v for k, v in train_over.items() if not k.startswith("__")})
    for k, v in train_over.items():
        if k.startswith("__"):
            train[k[2:]] = v
    model = _apply(MODEL, model_over)
    r = shared_sqlite_api.client.post("/runs", json=body(train_config=train, model_config=model))
    assert r.status_code == 422, r.text
    doc = r.json()
    assert doc["code"] == "invalid_config"
    locs = [tuple(e["loc"]) for e in doc["errors"]]
    assert locs == [("body", *loc) for loc in expected]
    assert all(e["msg"] and "Traceback" not in e["msg"] for e in doc["errors"])
    assert doc["message"]
    # the same document through /runs/validate: 200, valid false, the same errors
    v = shared_sqlite_api.client.post(
        "/runs/validate", json=body(train_config=train, model_config=model)
    )
    assert v.status_code == 200 and v.json()["valid"] is False
    assert [tuple(e["loc"]) for e in v.json()["errors"]] == locs


@pytest.mark.parametrize(
    "doc, loc",
    [
        ({"name": "x", "train_config": ["a"], "model_config": MODEL}, ("body", "train_config")),
        ({"name": "x", "train_config": TRAIN, "model_config": "b"}, ("body", "model_config")),
        ({"name": "x", "train_config": TRAIN}, ("body", "model_config")),
        ({"train_config": TRAIN, "model_config": MODEL}, ("body", "name")),
        ({"name": "", "train_config": TRAIN, "model_config": MODEL}, ("body", "name")),
        (
            {"name": "x", "train_config": TRAIN, "model_config": MODEL, "extra": 1},
            ("body", "extra"),
        ),
        (
            {"name": "x", "preset": "nope", "train_config": TRAIN, "model_config": MODEL},
            ("body", "preset"),
        ),
        (
            {"name": "x", "preset": "smoke-test", "train_config": TRAIN, "model_config": MODEL},
            ("body", "preset"),
        ),
        (["not", "a", "mapping"], ("body",)),
    ],
    ids=[
        "train-list",
        "model-str",
        "model-missing",
        "name-missing",
        "name-empty",
        "extra-key",
        "unknown-preset",
        "reserved-preset",
        "body-list",
    ],
)
def test_bad_envelopes_are_422s_naming_the_key(shared_sqlite_api: ApiEnv, doc: Any, loc: tuple):
    r = shared_sqlite_api.client.post("/runs", json=doc)
    assert r.status_code == 422, r.text
    assert loc in [tuple(e["loc"]) for e in r.json()["errors"]]


@pytest.mark.parametrize(
    "content, content_type, needle",
    [
        (b'{"name": "x", ', "application/json", "invalid JSON at line 1"),
        (b"name: x\ntrain_config: [\n", "application/yaml", "invalid YAML at line"),
        (b"a: &x [1, 2]\nb: *x\n", "application/yaml", "aliases"),
        (b"[" * 100_000, "application/json", "invalid JSON"),
        (
            b"name: x\nname: y\n",
            "application/yaml",
            "invalid YAML at line 2, column 1: duplicate key 'name' (first given on line 1)",
        ),
        (
            b'{"name": "x", "train_config": {"seed": 1, "seed": 2}}',
            "application/json",
            "invalid JSON: duplicate key 'seed'",
        ),
    ],
)
def test_unreadable_documents_are_422s(
    shared_sqlite_api: ApiEnv, content: bytes, content_type: str, needle: str
):
    r = shared_sqlite_api.client.post(
        "/runs", content=content, headers={"Content-Type": content_type}
    )
    assert r.status_code == 422, r.text
    assert needle in r.json()["message"] and r.json()["errors"][0]["loc"] == ["body"]


def test_unsupported_media_type_is_415(shared_sqlite_api: ApiEnv):
    r = shared_sqlite_api.client.post("/runs", content=b"x", headers={"Content-Type": "text/csv"})
    assert r.status_code == 415 and r.json()["code"] == "unsupported_media_type"


def test_multipart_with_a_broken_file_names_the_part(shared_sqlite_api: ApiEnv):
    r = shared_sqlite_api.client.post(
        "/runs",
        data={"name": "x"},
        files={
            "train_config": ("t.yaml", "a: [", "application/yaml"),
            "model_config": ("m.yaml", yaml.safe_dump(MODEL), "application/yaml"),
        },
    )
    assert r.status_code == 422
    assert r.json()["errors"][0]["loc"] == ["body", "train_config"]


# -- idempotency ---------------------------------------------------------------------------------


def test_idempotency_key_returns_the_first_run_and_refuses_another_body(api: ApiEnv):
    headers = {"Idempotency-Key": "retry-1"}
    first = api.client.post("/runs", json=body("idem"), headers=headers)
    again = api.client.post("/runs", json=body("idem"), headers=headers)
    assert first.status_code == again.status_code == 201
    assert again.json()["id"] == first.json()["id"] and again.json()["created"] is False
    assert len(api.broker_messages()) == 1  # the retry sends nothing
    other = api.client.post("/runs", json=body("idem-2"), headers=headers)
    assert other.status_code == 409
    assert other.json()["code"] == "idempotency_conflict"
    assert other.json()["run_id"] == first.json()["id"]
    assert len(api.client.get("/runs").json()["items"]) == 1
    long_key = api.client.post("/runs", json=body(), headers={"Idempotency-Key": "k" * 300})
    assert long_key.status_code == 422
    assert long_key.json()["errors"][0]["loc"] == ["header", "Idempotency-Key"]


# -- limits, auth, errors -----------------------------------------------------------------------


def test_oversized_bodies_are_413(make_api):
    env = make_api("sqlite", request_body_limit_bytes=4096)
    big = body(train_config={**TRAIN, "out_dir": "x" * 5000})
    r = env.client.post("/runs", json=big)
    assert r.status_code == 413 and r.json()["code"] == "body_too_large"
    assert "MOEJOBS_REQUEST_BODY_LIMIT_BYTES" in r.json()["message"]

    def chunks():  # no Content-Length: counted while streaming
        payload = json.dumps(big).encode()
        for i in range(0, len(payload), 1000):
            yield payload[i : i + 1000]

    r = env.client.post("/runs", content=chunks(), headers={"Content-Type": "application/json"})
    assert r.status_code == 413
    assert env.client.post("/runs", json=body()).status_code == 201  # small ones still pass


def test_bearer_token_is_required_when_set(make_api):
    env = make_api("sqlite", api_token="s3cret-token")
    c = env.client
    r = c.get("/runs")
    assert r.status_code == 401 and r.headers["www-authenticate"] == "Bearer"
    assert r.json()["code"] == "unauthorized"
    assert c.get("/runs", headers={"Authorization": "Bearer nope"}).status_code == 403
    assert c.get("/runs", headers={"Authorization": "Bearer s3cret-token"}).status_code == 200
    assert c.post("/runs", json=body()).status_code == 401
    for path in (
        "/healthz",
        "/readyz",
        "/metrics",
        "/docs",
        "/openapi.json",
        "/docs/assets/swagger-ui.css",
        "/",
        "/static/app.js",
    ):
        assert c.get(path).status_code not in (401, 403), path
    schemes = c.get("/openapi.json").json()["components"]["securitySchemes"]
    assert any(s.get("scheme") == "bearer" for s in schemes.values())


def test_an_unexpected_error_is_a_json_500_with_an_id(sqlite_api: ApiEnv, caplog):
    def boom():
        raise RuntimeError("secret internal detail")

    sqlite_api.app.add_api_route("/boom", boom)
    r = sqlite_api.client.get("/boom")
    assert r.status_code == 500
    doc = r.json()
    assert doc["code"] == "internal_error" and len(doc["error_id"]) == 32
    assert "secret" not in r.text and "Traceback" not in r.text
    assert doc["error_id"] in caplog.text and "secret internal detail" in caplog.text


def test_unknown_and_malformed_run_ids(sqlite_api: ApiEnv):
    r = sqlite_api.client.get(f"/runs/{uuid.uuid4()}")
    assert r.status_code == 404 and r.json()["code"] == "run_not_found"
    r = sqlite_api.client.get("/runs/not-a-uuid")
    assert r.status_code == 422 and r.json()["errors"][0]["loc"] == ["path", "run_id"]
    assert sqlite_api.client.get("/nope").json()["code"] == "not_found"


# -- paths --------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "over, loc",
    [
        ({"tokenizer_dir": "../../etc"}, ("tokenizer_dir",)),
        ({"tokenizer_dir": "/etc"}, ("tokenizer_dir",)),
        ({"tokenizer_dir": "~/tok"}, ("tokenizer_dir",)),
        (
            {"data": {"init_args": {"train_data_path": "ds/../../../x"}}},
            ("data", "init_args", "train_data_path"),
        ),
        (
            {"data": {"init_args": {"val_data_path": "/var/lib"}}},
            ("data", "init_args", "val_data_path"),
        ),
        ({"out_dir": "/tmp/elsewhere"}, ("out_dir",)),
        ({"out_dir": "../../x"}, ("out_dir",)),
        ({"resume": "/etc/ckpt"}, ("resume",)),
        ({"resume": False, "initial_checkpoint_dir": "../outside"}, ("initial_checkpoint_dir",)),
    ],
)
def test_paths_escaping_their_roots_are_422s(shared_sqlite_api: ApiEnv, over: dict, loc: tuple):
    r = shared_sqlite_api.client.post("/runs", json=body(train_config=deep_merge(TRAIN, over)))
    assert r.status_code == 422, r.text
    assert [tuple(e["loc"]) for e in r.json()["errors"]] == [("body", "train_config", *loc)]


def test_checkpoint_inputs_may_name_an_earlier_runs_folder(sqlite_api: ApiEnv):
    assert sqlite_api.settings.runs_dir is not None
    earlier = sqlite_api.settings.runs_dir / "0000" / "out" / "final"
    r = sqlite_api.client.post(
        "/runs",
        json=body(
            train_config={
                **TRAIN,
                "resume": False,
                "initial_checkpoint_dir": str(earlier),
                "out_dir": "./checkpoints",
            }
        ),
    )
    assert r.status_code == 201, r.text
    with sqlite_api.session() as s:
        row = reads.get_run(s, uuid.UUID(r.json()["id"]))
    assert row.resolved_train["initial_checkpoint_dir"] == str(earlier)
    assert row.resolved_train["out_dir"].endswith(f"{row.id}/out")


# -- schedulability ------------------------------------------------------------------------------


def test_runs_no_live_worker_can_serve_are_refused(make_api):
    env = make_api("sqlite", worker=False)
    two = body(
        train_config=deep_merge(
            TRAIN, {"devices": 2, "train": {"global_batch_size": 4, "micro_batch_size": 2}}
        )
    )
    r = env.client.post("/runs", json=body())
    assert r.status_code == 422 and r.json()["code"] == "unschedulable"
    assert "no live worker" in r.json()["message"]
    env.register_worker("cpu-only", gpus=0)
    assert env.client.post("/runs", json=body()).status_code == 201
    r = env.client.post("/runs", json=two)
    assert r.status_code == 422
    assert r.json()["errors"][0]["loc"] == ["body", "train_config", "devices"]
    env.register_worker("two-gpus", gpus=2)
    assert env.client.post("/runs", json=two).status_code == 201
    r = env.client.post(
        "/runs",
        json=body(
            train_config={
                **TRAIN,
                "num_nodes": 2,
                "train": {**TRAIN["train"], "global_batch_size": 4},
            }
        ),
    )
    assert r.status_code == 422 and r.json()["errors"][0]["loc"][-1] == "num_nodes"


def test_allow_unschedulable_queues_with_a_warning(make_api):
    env = make_api("sqlite", worker=False, allow_unschedulable=True)
    r = env.client.post("/runs", json=body())
    assert r.status_code == 201
    assert any("queued anyway" in w["msg"] for w in r.json()["warnings"])


def test_validate_queues_nothing(sqlite_api: ApiEnv):
    r = sqlite_api.client.post("/runs/validate", json=body())
    assert r.status_code == 200
    doc = r.json()
    assert doc["valid"] is True and doc["errors"] == [] and doc["estimate"]["plan"]
    assert doc["resolved"]["train_config"]["tokenizer_dir"].endswith("/tok")
    assert sqlite_api.broker_messages() == []
    assert sqlite_api.client.get("/runs").json()["items"] == []
    assert sqlite_api.client.post("/runs/validate", content=b"{").status_code == 422
    # no name needed to validate: the config's own errors come back
    doc = body()
    del doc["name"]
    doc["train_config"] = {**doc["train_config"], "seed": -1}
    r = sqlite_api.client.post("/runs/validate", json=doc)
    assert r.status_code == 200 and r.json()["valid"] is False
    assert [e["loc"] for e in r.json()["errors"]] == [["body", "train_config", "seed"]]


def test_readme_example_with_the_cpu_tiny_preset_is_a_moe_and_names_what_the_preset_replaced(
    sqlite_api: ApiEnv,
):
    """The README's POST /runs example: a partial train config, a bare model config and the
    cpu-tiny preset give the preset's MoE (not LitGPT's dense defaults); submitted values the
    preset overrides are listed in one warning."""
    data = sqlite_api.data_root
    for sub in ("data/custom_text/train", "data/custom_text/val", "data/tokenizer"):
        (data / sub).mkdir(parents=True, exist_ok=True)
    doc = {
        "name": "tiny",
        "preset": "cpu-tiny",
        "train_config": {
            "tokenizer_dir": "data/tokenizer",
            "train": {"max_tokens": 40960},
            "data": {
                "class_path": "litgpt.data.TextFiles",
                "init_args": {
                    "train_data_path": "data/custom_text/train",
                    "val_data_path": "data/custom_text/val",
                },
            },
        },
        "model_config": {"name": "MoE-tiny"},
    }
    sqlite_api.register_worker()
    r = sqlite_api.client.post("/runs", json=doc)
    assert r.status_code == 201, r.text
    run = r.json()
    model = sqlite_api.client.get(f"/runs/{run['id']}/config").text
    resolved = yaml.safe_load(model)["model_config"]
    assert (resolved["mlp_class_name"], resolved["n_expert"], resolved["norm_class_name"]) == (
        "LLaMAMoE",
        4,
        "RMSNorm",
    )
    assert run["estimate"]["params"]["experts"] > 0 and run["estimate"]["params"]["moe_layers"] == 4
    preset_warnings = [w for w in run["warnings"] if w["loc"] == ["body", "preset"]]
    assert [w["msg"] for w in preset_warnings] == [
        "preset 'cpu-tiny' replaced 1 submitted value(s): train_config.train.max_tokens 40960 -> "
        "307200 (a preset overrides the documents; leave out `preset` to keep yours)"
    ]
    assert not [w for w in run["warnings"] if "is ignored" in w["msg"]]


def test_extreme_values_are_answered_not_crashed_on(sqlite_api: ApiEnv):
    """Huge but valid numbers get an estimate; numbers past int64, infinities and absurd depths
    are 422s naming the field, answered at once (the API never loops over a submitted size)."""
    import copy

    def with_values(train_part: dict, model_part: dict | None = None) -> dict:
        doc = body()
        doc["train_config"] = copy.deepcopy(doc["train_config"])
        doc["train_config"].setdefault("train", {}).update(train_part)
        doc["model_config"] = {**doc["model_config"], **(model_part or {})}
        return doc

    c = sqlite_api.client
    r = c.post("/runs/validate", json=with_values({"max_tokens": 10**11, "save_interval": 10**6}))
    assert r.status_code == 200, r.text
    steps = r.json()["estimate"]["plan"]["optimizer_steps"]
    assert steps > 10**8 and r.json()["estimate"]["checkpoints_written"] == steps // 10**6 + 1
    # past the bounds of service.admission: no machine could run it, a 422 naming both fields
    r = c.post("/runs/validate", json=with_values({"max_tokens": 2**62, "save_interval": 1}))
    assert r.status_code == 200 and r.json()["valid"] is False
    assert [e["loc"][-1] for e in r.json()["errors"]] == ["max_tokens", "save_interval"]
    for train_part, model_part, loc in (
        ({"max_tokens": 10**30}, None, ["body", "train_config", "train", "max_tokens"]),
        ({}, {"n_layer": 10**9}, ["body", "model_config", "n_layer"]),
    ):
        r = c.post("/runs", json=with_values(train_part, model_part))
        assert r.status_code == 422, r.text
        assert loc in [e["loc"] for e in r.json()["errors"]]
    r = c.post(
        "/runs",
        content=b'{"name": "x", "train_config": {"train": {"max_norm": Infinity}}, '
        b'"model_config": {}}',
        headers={"Content-Type": "application/json"},
    )
    assert r.status_code == 422
    assert {
        "loc": ["body", "train_config", "train", "max_norm"],
        "msg": "must be a finite number, got inf",
    }.items() <= next(e for e in r.json()["errors"] if e["loc"][-1] == "max_norm").items()
    assert c.get("/runs").json()["items"] == []


# -- listing ----------------------------------------------------------------------------------


def test_pagination_sort_and_filters(api: ApiEnv):
    ids = []
    for name in ["d", "b", "e", "a", "c"]:
        r = api.client.post("/runs", json=body(name))
        assert r.status_code == 201
        ids.append(r.json()["id"])
    seen, cursor = [], None
    while True:
        params = {"limit": 2, **({"cursor": cursor} if cursor else {})}
        page = api.client.get("/runs", params=params).json()
        seen += [item["id"] for item in page["items"]]
        cursor = page["next_cursor"]
        if cursor is None:
            break
    assert seen == list(reversed(ids))  # newest first by default, nothing twice
    names = [i["name"] for i in api.client.get("/runs", params={"sort": "name"}).json()["items"]]
    assert names == ["a", "b", "c", "d", "e"]
    page = api.client.get("/runs", params={"sort": "-name", "limit": 3}).json()
    rest = api.client.get("/runs", params={"sort": "-name", "cursor": page["next_cursor"]}).json()
    assert [i["name"] for i in page["items"] + rest["items"]] == ["e", "d", "c", "b", "a"]
    r = api.client.get("/runs", params={"sort": "password"})
    assert r.status_code == 422 and r.json()["errors"][0]["loc"] == ["query", "sort"]
    assert api.client.get("/runs", params={"cursor": "garbage"}).status_code == 422
    assert api.client.get("/runs", params={"status": "nope"}).status_code == 422
    assert api.client.get("/runs", params={"limit": 0}).status_code == 422
    api.client.post(f"/runs/{ids[0]}/cancel")
    cancelled = api.client.get("/runs", params={"status": "cancelled"}).json()["items"]
    assert [i["id"] for i in cancelled] == [ids[0]]


# -- metrics, router telemetry ---------------------------------------------------------------


def _metric_rows(n: int, val_every: int = 25) -> list[dict]:
    rows = []
    for step in range(1, n + 1):
        row = {
            "step": step,
            "tokens": step * 128,
            "loss": 10.0 / step,
            "learning_rate": 1e-3,
            "grad_norm": 1.5,
            "tokens_per_sec": 1000.0,
            "mfu": "",
            "elapsed_s": step * 0.5,
        }
        if step % val_every == 0:
            row.update(val_loss=5.0 / step, val_ppl=2.0)
        rows.append(row)
    return rows


def _new_run(env: ApiEnv) -> str:
    r = env.client.post("/runs", json=body())
    assert r.status_code == 201, r.text
    return r.json()["id"]


def test_metrics_json_csv_paging_and_downsampling(api: ApiEnv):
    run_id = _new_run(api)
    with api.session() as s:
        assert runs.record_metrics(s, uuid.UUID(run_id), _metric_rows(100)) == 100
    c = api.client
    page = c.get(f"/runs/{run_id}/metrics").json()
    assert page["total"] == 100 and len(page["items"]) == 100 and not page["downsampled"]
    assert page["items"][0] == {
        "step": 1,
        "tokens": 128,
        "loss": 10.0,
        "learning_rate": 1e-3,
        "grad_norm": 1.5,
        "tokens_per_sec": 1000.0,
        "mfu": None,
        "elapsed_s": 0.5,
        "val_loss": None,
        "val_ppl": None,
    }
    after = c.get(f"/runs/{run_id}/metrics", params={"after_step": 90}).json()
    assert [i["step"] for i in after["items"]] == list(range(91, 101))
    limited = c.get(f"/runs/{run_id}/metrics", params={"after_step": 10, "limit": 5}).json()
    assert [i["step"] for i in limited["items"]] == [11, 12, 13, 14, 15]
    assert limited["next_after_step"] == 15
    empty = c.get(f"/runs/{run_id}/metrics", params={"after_step": 100}).json()
    assert empty["items"] == [] and empty["next_after_step"] == 100
    small = c.get(f"/runs/{run_id}/metrics", params={"max_points": 10}).json()
    steps = [i["step"] for i in small["items"]]
    assert small["downsampled"] and len(steps) <= 10 and small["total"] == 100
    assert steps[0] == 1 and steps[-1] == 100 and steps == sorted(set(steps))
    assert {25, 50, 75, 100} <= set(steps)  # validation rows kept
    csv_text = c.get(f"/runs/{run_id}/metrics", headers={"Accept": "text/csv"})
    assert csv_text.headers["content-type"].startswith("text/csv")
    lines = csv_text.text.splitlines()
    assert (
        lines[0]
        == "step,tokens,loss,learning_rate,grad_norm,tokens_per_sec,mfu,elapsed_s,val_loss,val_ppl"
    )
    assert lines[1] == "1,128,10.0,0.001,1.5,1000.0,,0.5,,"
    assert len(lines) == 101
    assert c.get(f"/runs/{run_id}/metrics?format=csv&max_points=5").text.count("\n") <= 7
    assert c.get(f"/runs/{uuid.uuid4()}/metrics").status_code == 404


def test_router_telemetry(sqlite_api: ApiEnv):
    run_id = _new_run(sqlite_api)
    with sqlite_api.session() as s:
        rows = runs.router_rows(1, [[0.5, 0.25, 0.25, 0.0], [0.25, 0.25, 0.25, 0.25]])
        rows += runs.router_rows(2, [[0.4, 0.2, 0.2, 0.2], [0.1, 0.3, 0.3, 0.3]])
        runs.record_router_stats(s, uuid.UUID(run_id), rows)
    doc = sqlite_api.client.get(f"/runs/{run_id}/router").json()
    assert len(doc["items"]) == 16 and doc["next_after_step"] == 2
    assert doc["items"][0] == {"step": 1, "layer": 0, "expert": 0, "fraction": 0.5}
    later = sqlite_api.client.get(f"/runs/{run_id}/router", params={"after_step": 1}).json()
    assert {i["step"] for i in later["items"]} == {2}


# -- checkpoints -------------------------------------------------------------------------------


def _read_member(tar: tarfile.TarFile, member: tarfile.TarInfo) -> bytes:
    """The bytes of a regular-file member (``extractfile`` gives None for other kinds)."""
    data = tar.extractfile(member)
    assert data is not None, member.name
    return data.read()


def _make_checkpoint(env: ApiEnv, run_id: str, name: str) -> dict[str, bytes]:
    folder = env.settings.run_dir(run_id) / "out" / name
    folder.mkdir(parents=True)
    files = {
        "lit_model.pth": os.urandom(2_500_000 + 7),  # several chunks, not block-aligned
        "model_config.yaml": b"n_layer: 2\n",
        "tokenizer.json": json.dumps({"a": "\u00e9" * 100}).encode(),
        "state/optimizer.pt": os.urandom(1000),
    }
    for rel, data in files.items():
        (folder / rel).parent.mkdir(parents=True, exist_ok=True)
        (folder / rel).write_bytes(data)
    with env.session() as s:
        runs.record_checkpoint(
            s, uuid.UUID(run_id), name, str(folder), size_bytes=sum(map(len, files.values()))
        )
    return files


def test_checkpoint_archive_streams_the_folder_as_a_tar(api: ApiEnv):
    run_id = _new_run(api)
    files = _make_checkpoint(api, run_id, "step-00000005")
    final_files = _make_checkpoint(api, run_id, "final")
    listed = api.client.get(f"/runs/{run_id}/checkpoints").json()
    assert [(c["name"], c["step"]) for c in listed] == [("step-00000005", 5), ("final", None)]
    assert listed[0]["archive_url"] == f"/runs/{run_id}/checkpoints/5/archive"
    for ref, name, expected in (
        ("5", "step-00000005", files),
        ("final", "final", final_files),
        ("step-00000005", "step-00000005", files),
    ):
        with api.client.stream("GET", f"/runs/{run_id}/checkpoints/{ref}/archive") as r:
            assert r.status_code == 200
            assert r.headers["content-type"] == "application/x-tar"
            chunks = list(r.iter_bytes())
            data = b"".join(chunks)
        assert int(r.headers["content-length"]) == len(data) and len(data) % 10240 == 0
        root = f"{run_id}-{name}"
        assert f'filename="{root}.tar"' in r.headers["content-disposition"]
        with tarfile.open(fileobj=io.BytesIO(data)) as tar:
            members = {m.name: m for m in tar.getmembers()}
            got = {
                m.name[len(root) + 1 :]: _read_member(tar, m)
                for m in members.values()
                if m.isfile()
            }
        assert got == expected
        assert members[root].isdir() and members[f"{root}/state"].isdir()
    assert api.client.get(f"/runs/{run_id}/checkpoints/7/archive").status_code == 404
    # recorded, but the folder is gone (retention)
    import shutil

    shutil.rmtree(api.settings.run_dir(run_id) / "out" / "final")
    r = api.client.get(f"/runs/{run_id}/checkpoints/final/archive")
    assert r.status_code == 410 and r.json()["code"] == "checkpoint_gone"


def test_signed_download_link_opens_one_archive_without_the_header(make_api):
    """With an API token a browser cannot send the header with a link: POST .../link returns a
    signed, expiring URL for that one archive, which a plain GET streams."""
    from service.api.signing import sign_path

    token = "s3cret-token"
    env = make_api("sqlite", api_token=token)
    auth = {"Authorization": f"Bearer {token}"}
    env.client.headers.update(auth)
    run_id = _new_run(env)
    files = _make_checkpoint(env, run_id, "final")
    _make_checkpoint(env, run_id, "step-00000005")
    before = datetime.now(UTC)
    r = env.client.post(f"/runs/{run_id}/checkpoints/final/link")
    assert r.status_code == 200, r.text
    link = r.json()
    path = f"/runs/{run_id}/checkpoints/final/archive"
    assert link["url"].startswith(path + "?expires=") and "&signature=" in link["url"]
    expires_at = datetime.fromisoformat(link["expires_at"])
    assert 290 <= (expires_at - before).total_seconds() <= 302  # MOEJOBS_DOWNLOAD_LINK_SECONDS
    del env.client.headers["Authorization"]
    with env.client.stream("GET", link["url"]) as r:
        assert r.status_code == 200
        data = b"".join(r.iter_bytes())
    with tarfile.open(fileobj=io.BytesIO(data)) as tar:
        got = {m.name.split("/", 1)[1]: tar.extractfile(m).read() for m in tar if m.isfile()}
    assert got == files
    # the signature opens that path only, for GET, unaltered and unexpired
    query = link["url"].split("?", 1)[1]
    other = f"/runs/{run_id}/checkpoints/5/archive?{query}"
    tampered = link["url"][:-1] + ("0" if link["url"][-1] != "0" else "1")
    expired, _ = sign_path(token, path, -1)
    wrong_key, _ = sign_path("another-token", path, 300)
    for url in (other, tampered, expired, wrong_key):
        r = env.client.get(url)
        assert r.status_code == 403 and r.json()["code"] == "invalid_link", url
    assert env.client.get(path).status_code == 401  # no signature, no header
    assert env.client.get(f"/runs/{run_id}/events?{query}").status_code == 401  # not an archive
    assert env.client.post(link["url"]).status_code in (401, 405)  # not for POST
    assert env.client.post(f"/runs/{run_id}/checkpoints/final/link").status_code == 401
    # unknown checkpoint: 404 before any link is made
    r = env.client.post(f"/runs/{run_id}/checkpoints/9/link", headers=auth)
    assert r.status_code == 404 and r.json()["code"] == "checkpoint_not_found"


def test_download_link_without_a_token_is_the_plain_path(api: ApiEnv):
    run_id = _new_run(api)
    _make_checkpoint(api, run_id, "step-00000005")
    link = api.client.post(f"/runs/{run_id}/checkpoints/5/link").json()
    assert link == {"url": f"/runs/{run_id}/checkpoints/5/archive", "expires_at": None}
    assert api.client.get(link["url"]).status_code == 200


def test_out_of_range_steps_in_urls_are_4xx(api: ApiEnv):
    """Numbers no step column can hold, in the path or the query, are a 404 or a 422, not a
    database error."""
    run_id = _new_run(api)
    _make_checkpoint(api, run_id, "step-00000005")
    c = api.client
    for ref in ("99999999999999999999999", "2147483648", "²"):
        r = c.get(f"/runs/{run_id}/checkpoints/{ref}/archive")
        assert r.status_code == 404 and r.json()["code"] == "checkpoint_not_found", ref
    for series in ("metrics", "router"):
        r = c.get(f"/runs/{run_id}/{series}", params={"after_step": 99999999999999999999})
        assert r.status_code == 422 and r.json()["errors"][0]["loc"] == ["query", "after_step"]
        assert (
            c.get(f"/runs/{run_id}/{series}", params={"after_step": 2**31 - 1}).status_code == 200
        )


# -- logs, cancel, delete ---------------------------------------------------------------------


def test_logs_tail(sqlite_api: ApiEnv):
    run_id = _new_run(sqlite_api)
    assert sqlite_api.client.get(f"/runs/{run_id}/logs").text == ""
    log = sqlite_api.settings.run_dir(run_id) / "train.log"
    log.parent.mkdir(parents=True)
    log.write_text("".join(f"line {i} \u00e9\n" for i in range(50_000)), encoding="utf-8")
    r = sqlite_api.client.get(f"/runs/{run_id}/logs", params={"tail": 3})
    assert r.text == "line 49997 \u00e9\nline 49998 \u00e9\nline 49999 \u00e9\n"
    assert r.headers["content-type"].startswith("text/plain")
    assert sqlite_api.client.get(f"/runs/{run_id}/logs?tail=0").text == ""


def test_cancel_and_delete(api: ApiEnv):
    c = api.client
    run_id = _new_run(api)
    folder = api.settings.run_dir(run_id)
    (folder / "out").mkdir(parents=True)
    r = c.delete(f"/runs/{run_id}")
    assert r.status_code == 409 and r.json()["code"] == "run_active"
    r = c.post(f"/runs/{run_id}/cancel")
    assert r.status_code == 200 and r.json()["status"] == "cancelled"
    assert c.post(f"/runs/{run_id}/cancel").json()["status"] == "cancelled"  # idempotent
    events = [(e["from_status"], e["to_status"]) for e in c.get(f"/runs/{run_id}/events").json()]
    assert events == [(None, "queued"), ("queued", "cancelled")]
    assert c.delete(f"/runs/{run_id}").status_code == 204
    assert not folder.exists()
    assert c.get(f"/runs/{run_id}").status_code == 404
    assert c.delete(f"/runs/{run_id}").status_code == 404
    # a finished run cannot be cancelled
    other = uuid.UUID(_new_run(api))
    with api.session() as s:
        runs.claim_run(s, other, "w1", 60)
        runs.transition(s, other, "succeeded", "done")
    r = c.post(f"/runs/{other}/cancel")
    assert r.status_code == 409 and r.json()["code"] == "invalid_transition"


def test_running_run_cancel_sets_the_flag(api: ApiEnv):
    run_id = uuid.UUID(_new_run(api))
    with api.session() as s:
        runs.claim_run(s, run_id, "w1", 60)
    r = api.client.post(f"/runs/{run_id}/cancel")
    assert r.status_code == 200
    assert r.json()["status"] == "running" and r.json()["cancel_requested"] is True


# -- start-up and imports ------------------------------------------------------------------------


def test_app_refuses_to_start_on_an_unmigrated_database(tmp_path: Path):
    from fastapi.testclient import TestClient

    from tests.support.db import settings_for

    app = create_app(settings_for(tmp_path))
    with pytest.raises(StartupError, match="moejobs migrate"):
        with TestClient(app):
            pass


def test_importing_the_app_loads_neither_torch_nor_worker():
    code = (
        "import sys, service.main, service.queue, service.api; "
        "bad = sorted(m for m in sys.modules if m == 'torch' or m.startswith('torch.') "
        "or m == 'worker' or m.startswith('worker.') or m == 'litgpt'); print(bad)"
    )
    out = subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        check=True,
        cwd=REPO,
    )
    assert out.stdout.strip() == "[]"


def test_docs_are_served_without_a_cdn(sqlite_api: ApiEnv):
    pytest.importorskip("swagger_ui_bundle", reason="needs the swagger-ui-bundle-v2 package")
    c = sqlite_api.client
    page = c.get("/docs")
    assert page.status_code == 200 and "swagger-ui" in page.text
    assert "http://" not in page.text and "https://" not in page.text
    for asset in ("swagger-ui-bundle.js", "swagger-ui.css"):
        r = c.get(f"/docs/assets/{asset}")
        assert r.status_code == 200 and len(r.content) > 10_000
    assert c.get("/docs/assets/..%2Fsecret").status_code == 404
    spec = c.get("/openapi.json").json()
    assert "/runs" in spec["paths"] and "/smoke-test" in spec["paths"]
    content = spec["paths"]["/runs"]["post"]["requestBody"]["content"]
    assert set(content) == {"application/json", "application/yaml", "multipart/form-data"}
    assert "model_config" in spec["components"]["schemas"]["RunCreate"]["properties"]


def test_runs_are_enqueued_on_real_redis(make_api):
    """The production broker: a unique queue per test on the session's Redis."""
    from tests.support.worker import require_redis

    broker = require_redis()
    queue = f"moejobs-test-{uuid.uuid4().hex[:12]}"
    env = make_api("sqlite", broker_url=broker, celery_queue=queue)
    try:
        assert env.client.get("/readyz").json()["checks"]["broker"] == {"ok": True}
        run_id = _new_run(env)
        assert env.broker_messages() == [{"task": TRAIN_TASK, "args": [run_id], "kwargs": {}}]
        assert env.broker_messages() == []
    finally:
        import redis

        client = redis.Redis.from_url(broker)
        client.delete(queue, queue + ".aux")
        client.close()


def test_resume_true_is_refused_for_a_new_run(sqlite_api: ApiEnv):
    """A new run's out_dir is empty, so `resume: true` could only fail its first start."""
    doc = body(train_config={**TRAIN, "resume": True})
    r = sqlite_api.client.post("/runs", json=doc)
    assert r.status_code == 422, r.text
    [e] = r.json()["errors"]
    assert e["loc"] == ["body", "train_config", "resume"] and "use resume: auto" in e["msg"]
    report = sqlite_api.client.post("/runs/validate", json=doc).json()
    assert report["valid"] is False and report["errors"][0]["loc"] == e["loc"]
    assert sqlite_api.client.get("/runs").json()["items"] == []
