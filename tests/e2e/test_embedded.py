"""The embedded defaults end to end, started as the README says.

``moejobs up --home DIR`` (SQLite database, kombu's SQLAlchemy transport on SQLite as the broker,
the API and one worker as child processes), then the README's client commands as a user types
them: ``moejobs submit``, ``moejobs status --follow``, ``moejobs download``, ``moejobs smoke-test``;
finally Ctrl-C (SIGINT) stops everything. Tiny real MoE models train on the CPU.
"""

from __future__ import annotations

import csv
import os
import re
import signal
import subprocess
import sys
import time

import httpx
import pytest
import yaml

from tests.support import REPO
from tests.support.client import free_port
from tests.support.tiny import TINY_MODEL, TRAIN_MODULES, VAL_MODULES, stdlib_text_files

pytestmark = pytest.mark.slow


def moejobs(*argv: str, env: dict, timeout: float = 600) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "cli.main", *argv],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def test_up_then_submit_follow_download_and_smoke_test(tmp_path):
    from worker.sample import generate_sample
    from worker.tokenizer import train_tokenizer

    home, port = tmp_path / "home", free_port()
    url = f"http://127.0.0.1:{port}"
    # The smoke test trains a tiny model (the shipped MoE-200M needs ~12 GB and minutes here);
    # its vocabulary covers the worker's 4,096-id sample tokenizer.
    smoke_model = tmp_path / "smoke_model.yaml"
    smoke_model.write_text(
        yaml.safe_dump({**TINY_MODEL, "vocab_size": 4096, "padded_vocab_size": 4096})
    )
    env = {k: v for k, v in os.environ.items() if not k.startswith("MOEJOBS_")}
    env.update(
        MOEJOBS_SMOKE_MODEL_CONFIG=str(smoke_model),
        MOEJOBS_URL=url,
        MOEJOBS_TOKEN_CACHE=str(tmp_path / "token-cache"),
        PYTHONUNBUFFERED="1",
    )

    # A user's own data under the data root, referred to by relative paths in the config.
    data_root = home / "data"
    stdlib_text_files(data_root / "mytext" / "train", TRAIN_MODULES)
    stdlib_text_files(data_root / "mytext" / "val", VAL_MODULES)
    train_tokenizer(
        [data_root / "mytext" / "train"], data_root / "tokenizers" / "mytok", vocab_size=1024
    )
    train_doc = yaml.safe_load((REPO / "configs" / "train_config.yaml").read_text())
    train_doc.update(tokenizer_dir="tokenizers/mytok", precision="32-true", devices=1)
    train_doc["data"]["init_args"].update(
        train_data_path="./mytext/train", val_data_path="./mytext/val", num_workers=0
    )
    train_doc["train"].update(
        micro_batch_size=2,
        global_batch_size=4,
        max_seq_length=32,
        max_tokens=4 * 32 * 8,
        save_interval=3,
        lr_warmup_steps=2,
    )
    train_doc["eval"].update(final_validation=True, max_iters=2)
    train_doc["optimization"]["compile"] = False
    (tmp_path / "train.yaml").write_text(yaml.safe_dump(train_doc))
    (tmp_path / "model.yaml").write_text(yaml.safe_dump(TINY_MODEL))

    log = open(tmp_path / "up.log", "wb")
    up = subprocess.Popen(
        [sys.executable, "-m", "cli.main", "up", "--home", str(home), "--port", str(port)],
        cwd=REPO,
        env=env,
        stdout=log,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    try:
        deadline = time.monotonic() + 240
        while True:
            assert up.poll() is None, (tmp_path / "up.log").read_text()
            try:
                if httpx.get(f"{url}/readyz", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            assert time.monotonic() < deadline, "moejobs up was not ready in 240 s"
            time.sleep(1)
        assert (home / "moejobs.sqlite3").is_file() and (home / "broker.sqlite3").is_file()

        submitted = moejobs(
            "submit",
            str(tmp_path / "train.yaml"),
            str(tmp_path / "model.yaml"),
            "--name",
            "e2e-embedded",
            env=env,
        )
        assert submitted.returncode == 0, submitted.stdout + submitted.stderr
        run_id = re.search(r"submitted run ([0-9a-f-]{36})", submitted.stdout).group(1)

        followed = moejobs("status", run_id, "--follow", env=env)
        assert followed.returncode == 0, followed.stdout + followed.stderr
        run = httpx.get(f"{url}/runs/{run_id}").json()
        assert run["status"] == "succeeded"

        events = httpx.get(f"{url}/runs/{run_id}/events").json()
        events = events["items"] if isinstance(events, dict) else events
        assert [e["to_status"] for e in events] == ["queued", "running", "succeeded"]

        out_dir = home / "runs" / run_id / "out"
        with open(out_dir / "metrics.csv", newline="") as f:
            file_rows = list(csv.DictReader(f))
        api = httpx.get(f"{url}/runs/{run_id}/metrics", params={"limit": 10_000}).json()
        api_rows = api["items"] if isinstance(api, dict) else api
        assert (
            [int(r["step"]) for r in file_rows]
            == [r["step"] for r in api_rows]
            == list(range(1, 9))
        )
        for f_row, a_row in zip(file_rows, api_rows, strict=True):
            assert float(f_row["loss"]) == pytest.approx(a_row["loss"], rel=1e-6)
        assert api_rows[-1]["val_loss"] is not None

        router = httpx.get(f"{url}/runs/{run_id}/router", params={"limit": 10_000}).json()
        router_rows = router["items"] if isinstance(router, dict) else router
        with open(out_dir / "router.csv", newline="") as f:
            router_file = list(csv.DictReader(f))
        assert (
            len(router_rows)
            == len(router_file)
            == 8 * TINY_MODEL["n_layer"] * TINY_MODEL["n_expert"]
        )

        checkpoints = httpx.get(f"{url}/runs/{run_id}/checkpoints").json()
        checkpoints = checkpoints["items"] if isinstance(checkpoints, dict) else checkpoints
        on_disk = sorted(
            p.name for p in out_dir.iterdir() if p.is_dir() and not p.name.startswith(".")
        )
        assert (
            sorted(c["name"] for c in checkpoints)
            == on_disk
            == ["final", "step-00000003", "step-00000006"]
        )

        model_dir = tmp_path / "downloaded"
        downloaded = moejobs("download", run_id, "--out", str(model_dir), env=env)
        assert downloaded.returncode == 0, downloaded.stdout + downloaded.stderr
        assert (model_dir / "lit_model.pth").is_file() and (model_dir / "tokenizer.json").is_file()
        text = generate_sample(model_dir, "def ", max_new_tokens=12)
        assert text.startswith("def ") and len(text) > len("def ")

        smoke = moejobs("smoke-test", "--wait", "900", env=env, timeout=960)
        assert smoke.returncode == 0, smoke.stdout + smoke.stderr
        assert "passed" in smoke.stdout
    finally:
        os.killpg(up.pid, signal.SIGINT)  # what Ctrl-C does in the terminal
        try:
            code = up.wait(timeout=180)
        except subprocess.TimeoutExpired:
            os.killpg(up.pid, signal.SIGKILL)
            raise
        log.close()
    assert code == 0, (tmp_path / "up.log").read_text()[-3000:]
    with pytest.raises(httpx.HTTPError):
        httpx.get(f"{url}/healthz", timeout=2)
