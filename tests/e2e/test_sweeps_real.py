"""One sweep end to end with the real engine: a 2-point grid over the tiny MoE's learning rate
(6 optimizer steps each on a CPU) through the API, a real worker (``MOEJOBS_ENGINE=litgpt``),
Redis and a fresh PostgreSQL database: both trials train, each with its learning rate in its
resolved config and in its metrics (the logged learning rate at the peak), the best trial is
the one with the lower loss."""

from __future__ import annotations

import copy
import time
from collections.abc import Iterator

import pytest
from fastapi.testclient import TestClient

from service import reads
from service.db import migrate, open_database
from service.main import create_app
from tests.support.db import create_pg_database, drop_pg_database
from tests.support.tiny import TINY_MODEL, tiny_train_config
from tests.support.worker import WorkerProcess, build_data, require_redis, worker_settings

pytestmark = pytest.mark.slow

LR = "train_config.optimizer.init_args.lr"


@pytest.fixture(scope="module")
def deployment(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple]:
    root = tmp_path_factory.mktemp("sweeps-real")
    url = create_pg_database("moejobs_sweeps_real")
    settings = worker_settings(root / "home", url, require_redis(), sweep_tick_seconds=1.0)
    migrate(settings)
    assert settings.data_root is not None
    corpus, tokenizer = build_data(settings.data_root)
    db = open_database(settings)
    worker = WorkerProcess(settings, root / "worker.log", root / "token-cache").start()
    try:
        worker.wait_registered(db)
        yield settings, db, worker, corpus, tokenizer
    finally:
        worker.stop(timeout=60)
        db.dispose()
        drop_pg_database(url)


def test_a_grid_sweep_trains_the_tiny_moe(deployment):
    settings, db, worker, corpus, tokenizer = deployment
    train = tiny_train_config(settings.runs_dir / "ignored", corpus, tokenizer)
    del train["out_dir"]  # the service puts each trial's output in its run's folder
    doc = {
        "name": "tiny-lr",
        "base": {"train_config": train, "model_config": copy.deepcopy(TINY_MODEL)},
        "method": "grid",
        "metric": {"name": "loss", "goal": "minimize"},
        "parameters": {LR: {"values": [3e-3, 3e-4]}},
        "max_concurrent": 1,
    }
    with TestClient(create_app(settings)) as client:
        r = client.post("/sweeps", json=doc)
        assert r.status_code == 201, r.text
        deadline = time.monotonic() + 400
        while (sweep := client.get(f"/sweeps/{r.json()['id']}").json())["status"] == "running":
            assert time.monotonic() < deadline, worker.log()[-5000:]
            time.sleep(1.0)
    assert sweep["status"] == "finished", (sweep, worker.log()[-5000:])
    assert [t["status"] for t in sweep["trials"]] == ["succeeded", "succeeded"]
    with db.session() as session:
        for trial in sweep["trials"]:
            run = reads.get_run(session, trial["run_id"])
            assert run.resolved_train["optimizer"]["init_args"]["lr"] == trial["params"][LR]
            peak = max(p.learning_rate for p in reads.list_metrics(session, run.id))
            assert peak == pytest.approx(trial["params"][LR])
    best = sweep["best_trial"]
    assert best["best_value"] == min(t["best_value"] for t in sweep["trials"])
