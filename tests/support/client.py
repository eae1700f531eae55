"""Support for the client and dashboard tests (no tests here): the real app served by uvicorn
in a thread on a free port, over a migrated SQLite file under a temporary HOME, and helpers
that write runs, metrics, router rows, checkpoints and logs through ``service.runs`` the way a
worker does.

Use with ``from tests.support.client import LiveServer, live_server, make_run, ...``.
"""

from __future__ import annotations

import contextlib
import math
import random
import socket
import threading
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import uvicorn
from fastapi import FastAPI
from fastapi.responses import FileResponse
from fastapi.staticfiles import StaticFiles
from pydantic import SecretStr

from service import reads, runs
from service.config.validate import validate_configs
from service.db import Database, migrate, open_database
from service.estimate import estimate
from service.main import create_app
from service.models import RunStatus
from service.settings import Settings
from tests.support import REPO, configs
from tests.support.db import settings_for

STATIC_DIR = REPO / "service" / "static"

# A small valid pair: 2 micro-batches of 2 x 32 tokens per step, 200 optimizer steps.
TRAIN: dict[str, Any] = configs.load("valid_train_200_steps")
MODEL: dict[str, Any] = configs.load("valid_model_8_experts")


def dashboard_is_mounted(app: FastAPI) -> bool:
    """Whether ``app`` already serves the dashboard (GET / and /static)."""
    paths = {getattr(route, "path", None) for route in app.routes}
    return "/" in paths and "/static" in paths


def mount_dashboard(app: FastAPI) -> None:
    """What ``create_app`` has to do for the dashboard: GET / -> index.html, /static/* -> the
    files of service/static/. Used here only while create_app does not do it itself."""
    app.mount("/static", StaticFiles(directory=STATIC_DIR), name="static")

    @app.get("/", include_in_schema=False)
    def index() -> FileResponse:
        return FileResponse(STATIC_DIR / "index.html", media_type="text/html")


@dataclass
class LiveServer:
    """A running app: its base URL, settings and a database handle for the test's own writes."""

    url: str
    settings: Settings
    db: Database
    app: FastAPI

    def session(self):
        return self.db.session()


def server_settings(tmp: Path, *, token: str | None = None, **overrides: Any) -> Settings:
    """Settings under ``tmp`` (SQLite, embedded broker) that queue runs without a live worker."""
    settings = settings_for(tmp, allow_unschedulable=True, **overrides)
    if token is not None:
        settings = settings.model_copy(update={"api_token": SecretStr(token)})
    return settings


@contextlib.contextmanager
def live_server(
    tmp: Path, *, token: str | None = None, wrap: Any = None, **overrides: Any
) -> Iterator[LiveServer]:
    """Migrate a fresh SQLite database under ``tmp``, start ``create_app`` with uvicorn on a free
    loopback port in a thread, yield a :class:`LiveServer`, stop it afterwards. ``wrap``, when
    given, maps the app to the ASGI app uvicorn serves (a test's own outer middleware)."""
    settings = server_settings(tmp, token=token, **overrides)
    migrate(settings)
    app = create_app(settings)
    if not dashboard_is_mounted(app):
        mount_dashboard(app)
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    served = wrap(app) if wrap is not None else app
    server = uvicorn.Server(uvicorn.Config(served, log_level="warning", lifespan="on"))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.monotonic() + 60
    while not server.started:
        if not thread.is_alive() or time.monotonic() > deadline:
            raise RuntimeError("the API server did not start (see the log above)")
        time.sleep(0.05)
    db = open_database(settings)
    try:
        yield LiveServer(url=f"http://127.0.0.1:{port}", settings=settings, db=db, app=app)
    finally:
        server.should_exit = True
        thread.join(timeout=30)
        sock.close()
        db.dispose()


def free_port() -> int:
    """A loopback port nothing listens on (bound and released)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


# -- writing what a worker would -------------------------------------------------------------------


def make_run(
    server: LiveServer,
    name: str = "run",
    *,
    train: dict | None = None,
    model: dict | None = None,
    preset: str | None = None,
) -> uuid.UUID:
    """A queued run created directly through ``service.runs`` (with its estimate)."""
    train = train or TRAIN
    model = model or MODEL
    validated = validate_configs(train, model)
    resolved_train = validated.train.model_dump(mode="json")
    run_id = uuid.uuid4()
    resolved_train["out_dir"] = str(server.settings.run_dir(run_id) / "out")
    with server.session() as s:
        run, _ = runs.create_run(
            s,
            name=name,
            submitted_train=train,
            submitted_model=model,
            resolved_train=resolved_train,
            resolved_model=validated.model.model_dump(mode="json"),
            estimate=estimate(validated.train, validated.model).to_dict(),
            warnings=[{"loc": list(w.loc), "msg": w.message} for w in validated.warnings],
            preset=preset,
            run_id=run_id,
        )
    return run.id


def start_run(server: LiveServer, run_id: uuid.UUID, worker: str = "w-test") -> int:
    """Claim the run for ``worker`` (registered with one GPU); returns the attempt."""
    with server.session() as s:
        runs.register_worker(
            s,
            worker,
            "gpu-host-1",
            pid=4242,
            gpus=[{"index": 0, "name": "NVIDIA H100 80GB HBM3", "memory_bytes": 80 << 30}],
        )
        run = runs.claim_run(s, run_id, worker, lease_seconds=600)
    assert run is not None
    return run.attempt


def finish_run(
    server: LiveServer,
    run_id: uuid.UUID,
    status: str = "succeeded",
    *,
    attempt: int | None = None,
    reason: str | None = None,
    message: str = "",
) -> None:
    """Move a running run to a terminal status through ``runs.transition``."""
    with server.session() as s:
        runs.transition(
            s,
            run_id,
            status,
            message or f"training {status}",
            reason=reason,
            attempt=attempt,
            exit_code=0 if status == "succeeded" else 1,
        )


def metric_rows(first: int, last: int, *, total: int = 200, seed: int = 0) -> list[dict]:
    """Plausible metrics.csv rows for steps first..last: a decaying noisy loss, validation
    every 25 steps, warm-up then cosine learning rate, ~52k tokens/s."""
    rng = random.Random(seed * 100_003 + first)
    rows = []
    for step in range(first, last + 1):
        loss = 2.6 + 3.0 * math.exp(-step / 40) + 0.08 * rng.gauss(0, 1)
        lr = (
            1e-3 * step / 10
            if step <= 10
            else (1e-4 + 0.5 * (1e-3 - 1e-4) * (1 + math.cos(math.pi * (step - 10) / (total - 10))))
        )
        row = {
            "step": step,
            "tokens": step * 128,
            "loss": loss,
            "learning_rate": lr,
            "grad_norm": 0.6 + 2.5 * math.exp(-step / 30) + 0.05 * rng.random(),
            "tokens_per_sec": 52_000 + 2_500 * rng.gauss(0, 1),
            "mfu": 0.41,
            "elapsed_s": 0.35 * step,
        }
        if step % 25 == 0:
            row["val_loss"] = 2.55 + 3.0 * math.exp(-step / 40) + 0.05
            row["val_ppl"] = math.exp(row["val_loss"])
        rows.append(row)
    return rows


def record_metrics(
    server: LiveServer, run_id: uuid.UUID, rows: list[dict], attempt: int | None = None
) -> None:
    with server.session() as s:
        runs.record_metrics(s, run_id, rows, attempt=attempt)


def record_router(
    server: LiveServer,
    run_id: uuid.UUID,
    steps: list[int],
    *,
    n_layer: int = 4,
    n_expert: int = 8,
    collapse_layer: int | None = 2,
) -> None:
    """Router fractions per (step, layer, expert): balanced layers, and one layer whose expert
    0 takes over (collapse) as steps go on."""
    with server.session() as s:
        for step in steps:
            matrix = []
            for layer in range(n_layer):
                weights = [1.0 + 0.15 * math.sin(step / 7 + e + layer) for e in range(n_expert)]
                if layer == collapse_layer:
                    weights[0] += step / 12
                total = sum(weights)
                matrix.append([w / total for w in weights])
            runs.record_router_stats(s, run_id, runs.router_rows(step, matrix))


def write_checkpoint(
    server: LiveServer, run_id: uuid.UUID, name: str = "final", step: int | None = None
) -> Path:
    """A LitGPT-like checkpoint folder in the run's out/ folder, recorded in the database."""
    folder = server.settings.run_dir(run_id) / "out" / name
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "lit_model.pth").write_bytes(bytes(range(256)) * 64)
    (folder / "model_config.yaml").write_text("name: tiny-moe\nn_layer: 4\n")
    (folder / "tokenizer.json").write_text('{"model": {}}')
    size = sum(p.stat().st_size for p in folder.iterdir())
    with server.session() as s:
        runs.record_checkpoint(s, run_id, name, str(folder), step=step, size_bytes=size)
    return folder


def write_log(server: LiveServer, run_id: uuid.UUID, lines: list[str]) -> None:
    path = server.settings.run_dir(run_id) / "train.log"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(lines) + "\n")


def get_json(server: LiveServer, path: str, token: str | None = None) -> Any:
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    response = httpx.get(server.url + path, headers=headers, timeout=30)
    response.raise_for_status()
    return response.json()


def run_status(server: LiveServer, run_id: uuid.UUID) -> RunStatus:
    with server.session() as s:
        return reads.get_run(s, run_id).status
