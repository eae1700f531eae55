"""A tokenizer trained through the API keeps its request (dataset, requested_at) once ready,
says when its vocabulary is smaller than requested, and the worker's task never replaces a
folder of other files. The task runs in-process (``worker.tasks.tokenizer_job``, what the
Celery task calls) on the message the API put on the embedded broker."""

from __future__ import annotations

import json
from datetime import datetime
from pathlib import Path

from service.queue import TOKENIZER_TASK, aux_queue, tokenizer_marker_paths
from tests.support.api import ApiEnv
from worker.tasks import tokenizer_job

#: 400 bytes of real text: fewer than 512 distinct tokens (the user's case: 8192 asked, 294 learned).
SMALL_TEXT = Path(json.__file__).read_bytes()[:400]


def _run_sent_task(env: ApiEnv) -> dict:
    """Run the one tokenizer message the API sent, as the worker would."""
    messages = env.broker_messages(aux_queue(env.settings))
    assert [m["task"] for m in messages] == [TOKENIZER_TASK]
    return tokenizer_job(env.settings, **messages[0]["kwargs"])


def _listed(env: ApiEnv) -> dict[str, dict]:
    r = env.client.get("/tokenizers")
    assert r.status_code == 200, r.text
    return {t["name"]: t for t in r.json()}


def test_ready_tokenizer_keeps_its_request_and_warns_about_a_small_vocabulary(sqlite_api: ApiEnv):
    c, settings = sqlite_api.client, sqlite_api.settings
    assert c.post("/datasets/kjv", files={"f": ("kjv.txt", SMALL_TEXT)}).status_code == 201
    r = c.post("/tokenizers/kjv", json={"dataset": "kjv", "vocab_size": 8192})
    assert r.status_code == 202, r.text
    pending = r.json()
    assert pending["warnings"] == [] and pending["requested_vocab_size"] == 8192

    result = _run_sent_task(sqlite_api)
    assert result["ok"], result
    marker, error_file = tokenizer_marker_paths(settings, "kjv")
    assert not marker.exists() and not error_file.exists()
    ready = _listed(sqlite_api)["kjv"]
    learned = ready["vocab_size"]
    assert ready["status"] == "ready" and 258 < learned < 512
    assert ready["dataset"] == "kjv"
    assert datetime.fromisoformat(ready["requested_at"]) == datetime.fromisoformat(
        pending["requested_at"]
    )
    assert ready["requested_vocab_size"] == 8192
    expected = [f"the corpus has too little distinct text for 8192 tokens: {learned} learned"]
    assert ready["warnings"] == expected == result["warnings"]

    # a duplicate delivery re-trains it in place and keeps the request
    folder = sqlite_api.data_root / "tokenizers" / "kjv"
    before = (folder / "tokenizer.json").stat().st_ino
    messages = sqlite_api.broker_messages(aux_queue(settings))
    assert messages == []  # already consumed above; send the same kwargs again by hand
    again = tokenizer_job(
        settings,
        name="kjv",
        dataset_dir=str(sqlite_api.data_root / "kjv"),
        out_dir=str(folder),
        vocab_size=8192,
    )
    assert again["ok"], again
    assert (folder / "tokenizer.json").stat().st_ino != before  # replaced, not kept
    assert _listed(sqlite_api)["kjv"] == ready
    assert sorted(p.name for p in folder.parent.iterdir()) == [".pending", "kjv"]  # no leftovers

    # delete and request again under the same name: a new tokenizer replaces the old one
    assert c.delete("/tokenizers/kjv").status_code == 204
    r = c.post("/tokenizers/kjv", json={"dataset": "kjv", "vocab_size": 512})
    assert r.status_code == 202, r.text
    assert _run_sent_task(sqlite_api)["ok"]
    again = _listed(sqlite_api)["kjv"]
    assert (
        again["status"],
        again["vocab_size"],
        again["requested_vocab_size"],
        again["dataset"],
    ) == ("ready", learned, 512, "kjv")
    assert again["requested_at"] != ready["requested_at"]
    assert again["warnings"] == [
        f"the corpus has too little distinct text for 512 tokens: {learned} learned"
    ]


def test_task_refuses_a_tokenizer_folder_holding_other_files(sqlite_api: ApiEnv):
    c = sqlite_api.client
    assert c.post("/datasets/kjv", files={"f": ("kjv.txt", SMALL_TEXT)}).status_code == 201
    folder = sqlite_api.data_root / "tokenizers" / "kjv"
    folder.mkdir(parents=True)
    (folder / "notes.txt").write_text("keep me\n")
    assert c.post("/tokenizers/kjv", json={"dataset": "kjv"}).status_code == 202

    result = _run_sent_task(sqlite_api)
    assert not result["ok"]
    assert (folder / "notes.txt").read_text() == "keep me\n"
    failed = _listed(sqlite_api)["kjv"]
    assert failed["status"] == "failed" and failed["dataset"] == "kjv"
    assert failed["error"] == (
        f"{folder} is not a tokenizer folder (it holds notes.txt): choose an empty or new folder"
    )
