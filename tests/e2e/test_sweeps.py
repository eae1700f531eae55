"""Sweeps end to end with the stub engine: the API (FastAPI's TestClient), two real worker
processes (``python -m worker.celery_app``, ``MOEJOBS_ENGINE=stub``) on Redis and a fresh
PostgreSQL database. The controller runs in the API after a create and in the workers
(every 0.5 s and when a trial's run ends).

- a 2x2 grid: four runs, each with its parameters in its resolved config, never more than
  ``max_concurrent`` queued or running, the best trial right; the API is restarted (a new app
  on the same database) right after the create, so the sweep goes on without it;
- a TPE sweep of 8 trials never has more than ``max_concurrent`` runs queued or training;
- a worker killed (SIGKILL) in the middle of a trial: the trial's run is recovered by the other
  worker's reconciler (leases of 7 s, ``tests.support.faults.TIMING``) and the sweep finishes;
- median early stopping prunes the trial whose learning rate is far too small (the stub's
  loss is higher below lr 1e-3, ``worker.stub``): it stops at a step boundary with a
  checkpoint and ends ``cancelled`` with reason ``pruned``.
"""

from __future__ import annotations

import copy
import time
from collections.abc import Iterator
from datetime import datetime
from pathlib import Path
from typing import Any

import pytest
import yaml
from fastapi.testclient import TestClient

from service import reads
from service.db import Database, migrate, open_database
from service.main import create_app
from service.models import Run
from service.settings import Settings
from tests.support.api import MODEL, TRAIN
from tests.support.db import create_pg_database, drop_pg_database
from tests.support.faults import TIMING
from tests.support.tiny import stdlib_text_files
from tests.support.worker import WorkerProcess, require_redis, worker_settings

LR = "train_config.optimizer.init_args.lr"
EXPERTS = "model_config.n_expert"


class Stack:
    def __init__(self, settings: Settings, db: Database, workers: list[WorkerProcess]):
        self.settings, self.db, self.workers = settings, db, workers

    def logs(self) -> str:
        return "\n".join(w.log()[-3000:] for w in self.workers)


def _end(run: Run) -> datetime:
    """When ``run`` finished (every run of an ended sweep has)."""
    assert run.finished_at is not None, run.name
    return run.finished_at


def _start(run: Run) -> datetime:
    """When ``run`` started training (every trial of a finished sweep did)."""
    assert run.started_at is not None, run.name
    return run.started_at


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    root = tmp_path_factory.mktemp("sweeps")
    url = create_pg_database("moejobs_sweeps")
    settings = worker_settings(
        root / "home", url, require_redis(), engine="stub", sweep_tick_seconds=0.5, **TIMING
    )
    migrate(settings)
    data = settings.data_root
    assert data is not None
    stdlib_text_files(data / "ds" / "train", ["textwrap"])
    stdlib_text_files(data / "ds" / "val", ["heapq"])
    (data / "tok").mkdir(parents=True)
    db = open_database(settings)
    workers = [
        WorkerProcess(
            settings,
            root / f"worker-{i}.log",
            root / "token-cache",
            extra_env={"MOEJOBS_STUB_STEP_SECONDS": "0.05"},
        ).start()
        for i in range(2)
    ]
    try:
        for worker in workers:
            worker.wait_registered(db)
        yield Stack(settings, db, workers)
    finally:
        for worker in workers:
            worker.stop(timeout=30)
        db.dispose()
        drop_pg_database(url)


def sweep_doc(**extra: Any) -> dict[str, Any]:
    doc: dict[str, Any] = {
        "name": "grid",
        "base": {"train_config": copy.deepcopy(TRAIN), "model_config": copy.deepcopy(MODEL)},
        "method": "grid",
        "metric": {"name": "val_loss", "goal": "minimize"},
        "parameters": {LR: {"values": [1e-4, 1e-3]}, EXPERTS: {"values": [4, 8]}},
        "max_concurrent": 2,
        "seed": 0,
    }
    doc.update(extra)
    return doc


def wait_ended(client: TestClient, sweep_id: str, stack: Stack, timeout: float) -> dict:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        sweep = client.get(f"/sweeps/{sweep_id}").json()
        if sweep["status"] != "running":
            return sweep
        time.sleep(0.3)
    raise AssertionError(f"sweep still running after {timeout} s: {sweep}\n{stack.logs()}")


def sweep_runs(stack: Stack, sweep_id: str) -> list[Run]:
    with stack.db.session() as session:
        rows = [r for r in reads.list_runs(session, limit=100)[0] if str(r.sweep_id) == sweep_id]
        for r in rows:
            session.expunge(r)
    return sorted(rows, key=lambda r: r.name)


def test_a_grid_runs_every_point_within_max_concurrent_across_an_api_restart(stack: Stack):
    with TestClient(create_app(stack.settings)) as first:
        r = first.post("/sweeps", json=sweep_doc())
        assert r.status_code == 201, r.text
        sweep_id = r.json()["id"]
    with TestClient(create_app(stack.settings)) as client:  # a new API process, same database
        sweep = wait_ended(client, sweep_id, stack, timeout=120)
        assert sweep["status"] == "finished", sweep
        assert [t["status"] for t in sweep["trials"]] == ["succeeded"] * 4
        runs = sweep_runs(stack, sweep_id)
        assert [r.name for r in runs] == [f"grid-{n}" for n in range(4)]
        for trial, run in zip(sweep["trials"], runs, strict=True):
            assert run.sweep_params == trial["params"]
            config = yaml.safe_load(client.get(f"/runs/{run.id}/config").text)
            assert config["train_config"]["optimizer"]["init_args"]["lr"] == trial["params"][LR]
            assert config["model_config"]["n_expert"] == trial["params"][EXPERTS]
        best = sweep["best_trial"]
        values = [t["best_value"] for t in sweep["trials"]]
        assert best["best_value"] == min(values) and best["params"][LR] == 1e-3
        assert best["number"] == 2  # lr 1e-3 with 4 experts: the first of the two equal ones
        assert values[0] > values[2]  # lr 1e-4 trains worse (the stub: + log10(1e-3 / lr))
    # never more than max_concurrent queued or running: at each run's creation, count the
    # sweep's runs created before it that had not finished yet
    for run in runs:
        assert run.finished_at is not None
        alive = [o for o in runs if o.created_at <= run.created_at < _end(o)]
        assert len(alive) <= 2, [(o.name, o.created_at, o.finished_at) for o in runs]


def test_median_early_stopping_prunes_a_far_too_small_learning_rate(stack: Stack):
    doc = sweep_doc(
        name="prune",
        metric={"name": "loss", "goal": "minimize"},
        parameters={LR: {"values": [1e-3, 1e-5]}},
        max_concurrent=1,
        early_stopping={"type": "median", "min_steps": 10},
    )
    doc["base"]["train_config"]["train"].update(max_tokens=4 * 32 * 100, min_lr=1e-6)  # 100 steps
    with TestClient(create_app(stack.settings)) as client:
        r = client.post("/sweeps", json=doc)
        assert r.status_code == 201, r.text
        sweep = wait_ended(client, r.json()["id"], stack, timeout=120)
    assert sweep["status"] == "finished", sweep
    kept, pruned = sweep["trials"]
    assert kept["status"] == "succeeded" and kept["last_step"] == 100
    assert pruned["status"] == "cancelled" and pruned["cancel_reason"] == "pruned", pruned
    assert 10 <= pruned["last_step"] < 100
    assert sweep["best_trial"]["number"] == 0
    with stack.db.session() as session:
        run = reads.get_run(session, pruned["run_id"])
        checkpoints = reads.list_checkpoints(session, run.id)
        events = [e.message for e in reads.list_events(session, run.id)]
    assert run.cancel_reason is not None and run.cancel_reason.value == "pruned"
    # stopped at a step boundary with a checkpoint of its last logged step
    assert checkpoints and checkpoints[-1].step == pruned["last_step"], checkpoints
    assert any("pruned by its sweep's median early stopping" in m for m in events), events
    assert Path(checkpoints[-1].path).is_dir()


def test_a_tpe_sweep_on_two_workers_keeps_max_concurrent(stack: Stack):
    doc = sweep_doc(
        name="tpe",
        method="tpe",
        metric={"name": "loss", "goal": "minimize"},
        parameters={LR: {"min": 1e-5, "max": 1e-2, "distribution": "log_uniform"}},
        max_runs=8,
        max_concurrent=2,
        seed=3,
    )
    doc["base"]["train_config"]["train"]["min_lr"] = 1e-6
    with TestClient(create_app(stack.settings)) as client:
        r = client.post("/sweeps", json=doc)
        assert r.status_code == 201, r.text
        first = r.json()["trials"]  # two slots: two trials at once, the rest as slots free up
        assert len(first) == 2 and {t["status"] for t in first} <= {"queued", "running"}
        sweep = wait_ended(client, r.json()["id"], stack, timeout=150)
    assert sweep["status"] == "finished", sweep
    assert [t["status"] for t in sweep["trials"]] == ["succeeded"] * 8
    assert sweep["best_trial"]["best_value"] == min(t["best_value"] for t in sweep["trials"])
    runs = sweep_runs(stack, sweep["id"])
    for run in runs:  # at each run's creation, at most 2 of the sweep's runs were unfinished
        alive = [o for o in runs if o.created_at <= run.created_at < _end(o)]
        assert len(alive) <= 2, [(o.name, o.created_at, o.finished_at) for o in runs]
    # and at no moment did more than 2 train at once
    for run in runs:
        assert run.started_at is not None
        training = [o for o in runs if _start(o) <= run.started_at < _end(o)]
        assert len(training) <= 2


def test_a_sweep_survives_a_worker_killed_in_the_middle(stack: Stack):
    doc = sweep_doc(
        name="kill",
        metric={"name": "loss", "goal": "minimize"},
        parameters={LR: {"values": [1e-3, 2e-3]}},
    )
    doc["base"]["train_config"]["train"]["max_tokens"] = 4 * 32 * 100  # 100 steps, 5 s
    with TestClient(create_app(stack.settings)) as client:
        r = client.post("/sweeps", json=doc)
        assert r.status_code == 201, r.text
        run_id = r.json()["trials"][0]["run_id"]

        def running_somewhere():
            with stack.db.session() as session:
                run = reads.get_run(session, run_id)
            return run.worker_id if run.status.value == "running" and run.attempt == 1 else None

        deadline = time.monotonic() + 60
        while (owner := running_somewhere()) is None:
            assert time.monotonic() < deadline, stack.logs()
            time.sleep(0.1)
        victim = next(w for w in stack.workers if owner.endswith(w.worker_id_suffix))
        time.sleep(1.0)  # a few steps and a checkpoint in
        victim.kill()
        sweep = wait_ended(client, r.json()["id"], stack, timeout=120)
    stack.workers.remove(victim)
    assert sweep["status"] == "finished", sweep
    assert [t["status"] for t in sweep["trials"]] == ["succeeded", "succeeded"]
    with stack.db.session() as session:
        run = reads.get_run(session, run_id)
    assert run.attempt >= 2 and run.worker_id != owner  # recovered on the other worker
    assert sweep["trials"][0]["last_step"] == 100
