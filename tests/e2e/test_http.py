"""End to end over HTTP: the API under uvicorn (a subprocess), a real worker process, Redis,
and a fresh PostgreSQL database with migrations applied. A dataset is uploaded, a tokenizer is
trained from it by the worker, tiny MoE runs are submitted with ``POST /runs`` and followed
through the API; the trained model is downloaded as a tar and generated from with LitGPT.

``POST /smoke-test`` is not run here: it trains the shipped train config, whose
``compile: true`` costs minutes of torch.compile on a CPU.
"""

from __future__ import annotations

import copy
import io
import os
import signal
import subprocess
import sys
import tarfile
import time
from pathlib import Path

import httpx
import pytest

from service.db import migrate
from service.queue import enqueue_run, make_celery
from service.settings import ENV_PREFIX
from tests.support import REPO
from tests.support.client import free_port
from tests.support.db import create_pg_database, drop_pg_database
from tests.support.tiny import TINY_MODEL, VAL_MODULES, stdlib_text_files, tiny_train_config
from tests.support.worker import (
    CORPUS_TRAIN,
    WorkerProcess,
    csv_rows,
    pid_gone,
    require_redis,
    wait_for,
    worker_settings,
)

pytestmark = pytest.mark.slow

TERMINAL = {"succeeded", "failed", "cancelled"}


class Api:
    """The API server subprocess and an HTTP client for it."""

    def __init__(self, settings, log_path: Path) -> None:
        self.settings, self.log_path = settings, log_path
        self.url = f"http://127.0.0.1:{settings.port}"
        env = {k: v for k, v in os.environ.items() if not k.startswith(ENV_PREFIX)}
        env.update(settings.to_env())
        env["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO), env.get("PYTHONPATH")) if p)
        with open(log_path, "ab") as log:
            self.proc = subprocess.Popen(
                [
                    sys.executable,
                    "-m",
                    "uvicorn",
                    "--factory",
                    "service.main:create_app",
                    "--host",
                    "127.0.0.1",
                    "--port",
                    str(settings.port),
                    "--log-level",
                    "warning",
                ],
                cwd=str(REPO),
                env=env,
                stdout=log,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
            )
        self.http = httpx.Client(base_url=self.url, timeout=60)

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def wait_up(self) -> None:
        def up():
            if self.proc.poll() is not None:
                raise AssertionError(f"API exited with {self.proc.returncode}:\n{self.log()}")
            try:
                return self.http.get("/healthz").status_code == 200
            except httpx.TransportError:
                return False

        wait_for(up, 120, "the API to listen", on_fail=self.log)

    def stop(self) -> None:
        self.http.close()
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


@pytest.fixture(scope="module")
def e2e(tmp_path_factory):
    broker = require_redis()
    url = create_pg_database("moejobs_e2e_test")
    home = tmp_path_factory.mktemp("e2e")
    settings = worker_settings(home / "home", url, broker, port=free_port())
    migrate(settings)
    api = Api(settings, home / "api.log")
    worker = WorkerProcess(settings, home / "worker.log", home / "token-cache").start()
    try:
        api.wait_up()
        wait_for(
            lambda: api.http.get("/readyz").status_code == 200,
            120,
            "readyz (database, broker, a live worker)",
            on_fail=lambda: api.http.get("/readyz").text + "\n" + worker.log(),
        )
        yield {"settings": settings, "api": api, "http": api.http, "worker": worker}
    finally:
        code = worker.stop()
        api.stop()
        drop_pg_database(url)
    assert code == 0, worker.log()


def _wait_run(e2e, run_id, timeout=400.0) -> dict:
    def finished():
        run = e2e["http"].get(f"/runs/{run_id}").json()
        return run if run["status"] in TERMINAL else None

    return wait_for(
        finished, timeout, f"run {run_id} to finish", poll=0.5, on_fail=e2e["worker"].log
    )


def _metrics(e2e, run_id) -> list[dict]:
    page = e2e["http"].get(f"/runs/{run_id}/metrics", params={"limit": 10000}).json()
    return page["items"]


def _assert_metrics_match_file(items: list[dict], path: Path) -> None:
    rows = csv_rows(path)
    assert [m["step"] for m in items] == [int(r["step"]) for r in rows]
    for item, row in zip(items, rows, strict=True):
        for column, text in row.items():
            if text == "":
                assert item[column] is None, (column, item["step"])
            else:
                assert item[column] == pytest.approx(float(text)), (column, item["step"])


def _submit(e2e, name: str, steps: int, save_interval: int | None) -> dict:
    # Paths relative to the data root; out_dir is the server's choice (RUNS_DIR/<id>/out).
    train = tiny_train_config(
        Path("out"),
        Path("tiny"),
        Path("tokenizers/tiny-tok"),
        max_tokens=4 * 32 * steps,
        save_interval=save_interval,
    )
    response = e2e["http"].post(
        "/runs",
        json={"name": name, "train_config": train, "model_config": copy.deepcopy(TINY_MODEL)},
    )
    assert response.status_code == 201, response.text
    created = response.json()
    assert created["status"] == "queued" and created["enqueued"]
    return created


def test_ready_with_a_registered_worker(e2e):
    workers = e2e["http"].get("/workers").json()
    pids = [w.get("pid") for w in (workers["items"] if isinstance(workers, dict) else workers)]
    assert e2e["worker"].pid in pids


def test_dataset_tokenizer_train_download_generate(e2e, tmp_path):
    http, settings = e2e["http"], e2e["settings"]
    # dataset upload (train/ and val/ sub-folders) and a tokenizer trained by the worker
    texts = tmp_path / "texts"
    stdlib_text_files(texts / "train", CORPUS_TRAIN)
    stdlib_text_files(texts / "val", VAL_MODULES[:1])
    files = [
        ("files", (f"{part}/{p.name}", p.read_bytes(), "text/plain"))
        for part in ("train", "val")
        for p in sorted((texts / part).glob("*.txt"))
    ]
    response = http.post("/datasets/tiny", files=files)
    assert response.status_code == 201, response.text
    response = http.post("/tokenizers/tiny-tok", json={"dataset": "tiny", "vocab_size": 1024})
    assert response.status_code == 202, response.text

    def tokenizer_ready():
        state = {t["name"]: t for t in http.get("/tokenizers").json()}.get("tiny-tok")
        assert state is None or state["status"] != "failed", state
        return state if state and state["status"] == "ready" else None

    ready = wait_for(tokenizer_ready, 120, "the tokenizer", on_fail=e2e["worker"].log)
    assert ready["vocab_size"] <= 1024

    # a run over HTTP; its message delivered twice
    created = _submit(e2e, "e2e-tiny", steps=20, save_interval=5)
    run_id = created["id"]
    assert enqueue_run(make_celery(settings), run_id).ok  # the duplicate
    run = _wait_run(e2e, run_id)
    assert run["status"] == "succeeded", run
    assert run["attempt"] == 1 and run["failure_reason"] is None

    out = settings.run_dir(run_id) / "out"
    items = _metrics(e2e, run_id)
    assert len(items) == 20
    _assert_metrics_match_file(items, out / "metrics.csv")
    checkpoints = http.get(f"/runs/{run_id}/checkpoints").json()
    on_disk = sorted(
        p.name
        for p in out.iterdir()
        if p.is_dir() and (p.name == "final" or p.name.startswith("step-"))
    )
    assert sorted(c["name"] for c in checkpoints) == on_disk
    assert [c["name"] for c in checkpoints] == [
        "step-00000005",
        "step-00000010",
        "step-00000015",
        "step-00000020",
        "final",
    ]
    for c in checkpoints:
        assert Path(c["path"]) == out / c["name"] and c["size_bytes"] > 0
    events = http.get(f"/runs/{run_id}/events").json()
    assert [(e["from_status"], e["to_status"]) for e in events] == [
        (None, "queued"),
        ("queued", "running"),
        ("running", "succeeded"),
    ]
    logs = http.get(f"/runs/{run_id}/logs", params={"tail": 5}).text
    assert "exit code 0: succeeded" in logs

    # the duplicate message was consumed and did nothing
    wait_for(
        lambda: f"run {run_id} is succeeded: message ignored" in e2e["worker"].log(),
        60,
        "the duplicate delivery",
        on_fail=e2e["worker"].log,
    )
    assert http.get(f"/runs/{run_id}").json()["attempt"] == 1
    assert len(http.get(f"/runs/{run_id}/events").json()) == 3

    # take the model away and generate with it
    response = http.get(f"/runs/{run_id}/checkpoints/final/archive")
    assert response.status_code == 200
    dest = tmp_path / "download"
    with tarfile.open(fileobj=io.BytesIO(response.content)) as tar:
        tar.extractall(dest, filter="data")
    folder = next(p.parent for p in dest.rglob("lit_model.pth"))
    # what `litgpt generate <folder>` does (worker.sample), in this process: litgpt is
    # usually imported here already, a `litgpt generate` subprocess would import it again
    from worker.sample import generate_sample

    text = generate_sample(folder, "def main(", max_new_tokens=8)
    assert text.startswith("def main(") and len(text) > len("def main(")


def test_cancel_over_http(e2e):
    http = e2e["http"]
    run_id = _submit(e2e, "e2e-cancel", steps=100_000, save_interval=None)["id"]
    wait_for(
        lambda: http.get(f"/runs/{run_id}/metrics").json()["total"] >= 3,
        300,
        "metric rows of the running run",
        poll=0.5,
        on_fail=e2e["worker"].log,
    )
    pid = int((e2e["settings"].run_dir(run_id) / "train.pid").read_text())
    assert not pid_gone(pid)
    response = http.post(f"/runs/{run_id}/cancel")
    assert response.status_code == 200 and response.json()["cancel_requested"]
    run = _wait_run(e2e, run_id, timeout=180)
    assert run["status"] == "cancelled" and run["failure_reason"] is None
    assert pid_gone(pid)
    out = e2e["settings"].run_dir(run_id) / "out"
    items = _metrics(e2e, run_id)
    _assert_metrics_match_file(items, out / "metrics.csv")
    time.sleep(2)
    assert len(_metrics(e2e, run_id)) == len(items)  # no later row
    events = http.get(f"/runs/{run_id}/events").json()
    assert [e["to_status"] for e in events][-2:] == ["running", "cancelled"]
