"""The API under many readers and with its database gone, on a real server: uvicorn in a
subprocess serving ``create_app`` on a migrated database (SQLite file, or PostgreSQL) with a
few runs, metric rows and router rows.

- 300 concurrent readers poll the dashboard's endpoints: every answer is a 200 within 10 s.
- PostgreSQL stopped (the server reaches it through a TCP relay this test stops: then nothing
  listens on that port): database routes answer 503 naming the database, with Retry-After,
  and 200 again once it is back.
- Every database connection busy (a PostgreSQL lock holds the queries): the requests beyond
  the pool's capacity answer 503 ``database_busy`` after MOEJOBS_DB_WAIT_SECONDS instead of
  waiting; the held ones finish with 200 when the lock goes.
"""

from __future__ import annotations

import asyncio
import math
import os
import resource
import signal
import socket
import subprocess
import sys
import threading
import time
import uuid
from collections import Counter
from pathlib import Path

import httpx
import psycopg
import pytest
import sqlalchemy as sa

from service import runs
from service.config.validate import validate_configs
from service.db import migrate, open_database
from service.estimate import estimate
from service.settings import ENV_PREFIX
from tests.support import REPO
from tests.support.api import MODEL, TRAIN
from tests.support.db import settings_for, truncate_all

READERS = 300
#: What the dashboard polls (``{id}``: a run with metric and router rows).
DASHBOARD_PATHS = ("/runs", "/runs/{id}", "/runs/{id}/metrics", "/runs/{id}/router", "/workers")


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture(scope="module", autouse=True)
def _open_files():
    """300 client sockets in this process: raise the soft open-file limit if it is low."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    want = 4096 if hard == resource.RLIM_INFINITY else min(4096, hard)
    if soft < want:
        resource.setrlimit(resource.RLIMIT_NOFILE, (want, hard))
    yield
    resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))


def populate(settings, n_runs: int = 4, steps: int = 60) -> uuid.UUID:
    """Runs with metric rows (the first with router rows too) and a live worker; returns the
    first run's id."""
    db = open_database(settings)
    validated = validate_configs(TRAIN, MODEL)
    first = None
    try:
        with db.session() as s:
            runs.register_worker(s, "w-load", "host", pid=1, gpus=[])
        for i in range(n_runs):
            run_id = uuid.uuid4()
            resolved = validated.train.model_dump(mode="json")
            resolved["out_dir"] = str(settings.run_dir(run_id) / "out")
            with db.session() as s:
                runs.create_run(
                    s,
                    name=f"load-{i}",
                    submitted_train=TRAIN,
                    submitted_model=MODEL,
                    resolved_train=resolved,
                    resolved_model=validated.model.model_dump(mode="json"),
                    estimate=estimate(validated.train, validated.model).to_dict(),
                    warnings=[],
                    run_id=run_id,
                )
                claimed = runs.claim_run(s, run_id, "w-load", 600)
                assert claimed is not None
                attempt = claimed.attempt
                runs.record_metrics(
                    s,
                    run_id,
                    [
                        {
                            "step": k,
                            "tokens": 64 * k,
                            "loss": 5 * math.exp(-k / 30),
                            "elapsed_s": k / 3,
                        }
                        for k in range(1, steps + 1)
                    ],
                    attempt=attempt,
                )
                if i == 0:
                    for step in range(5, steps + 1, 5):
                        runs.record_router_stats(
                            s,
                            run_id,
                            runs.router_rows(step, [[0.25] * 4, [0.4, 0.2, 0.2, 0.2]]),
                            attempt=attempt,
                        )
            first = first or run_id
    finally:
        db.dispose()
    assert first is not None
    return first


class Server:
    """``uvicorn --factory service.main:create_app`` in a subprocess with these settings."""

    def __init__(self, settings, log: Path, **env_extra: str):
        self.port = _free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log = log
        env = {k: v for k, v in os.environ.items() if not k.startswith(ENV_PREFIX)}
        env.update(settings.to_env(), **env_extra)
        env["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO), env.get("PYTHONPATH")) if p)
        with open(log, "ab") as fh:
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
                    str(self.port),
                    "--log-level",
                    "warning",
                ],
                cwd=REPO,
                env=env,
                stdout=fh,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
            )
        deadline = time.monotonic() + 60
        while True:
            if self.proc.poll() is not None:
                raise AssertionError(f"the API exited ({self.proc.returncode}):\n{self.text()}")
            try:
                if httpx.get(self.url + "/healthz", timeout=2).status_code == 200:
                    return
            except httpx.TransportError:
                pass
            if time.monotonic() > deadline:
                raise AssertionError(f"the API did not answer:\n{self.text()}")
            time.sleep(0.1)

    def text(self) -> str:
        return self.log.read_text(errors="replace")

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


class _Connection:
    """One keep-alive HTTP/1.1 connection (a reader of the dashboard): GET, read the status
    and the whole body. A client library would cost this process more CPU than the server
    spends, on the same two cores."""

    def __init__(self, port: int):
        self.port = port
        self.reader: asyncio.StreamReader | None = None
        self.writer: asyncio.StreamWriter | None = None

    async def get(self, path: str) -> int:
        if self.writer is None:
            self.reader, self.writer = await asyncio.open_connection("127.0.0.1", self.port)
        assert self.reader is not None
        self.writer.write(f"GET {path} HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n".encode())
        head = (await self.reader.readuntil(b"\r\n\r\n")).lower()
        at = head.index(b"\r\ncontent-length:") + len(b"\r\ncontent-length:")
        await self.reader.readexactly(int(head[at : head.index(b"\r\n", at)]))
        return int(head[9:12])

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()


async def _readers(
    port: int, paths: list[str], readers: int, per_request_s: float
) -> list[tuple[str, int | str]]:
    """``readers`` clients at once, each on its own connection GETting every path in turn;
    ``(path, status)``, the status ``"timeout"`` when an answer took longer than
    ``per_request_s`` (or ``"error: ..."``)."""
    results: list[tuple[str, int | str]] = []
    start = asyncio.Event()

    async def reader(k: int) -> None:
        conn = _Connection(port)
        await start.wait()
        try:
            for i in range(len(paths)):
                path = paths[(k + i) % len(paths)]  # readers start on different endpoints
                try:
                    results.append((path, await asyncio.wait_for(conn.get(path), per_request_s)))
                except TimeoutError:
                    results.append((path, "timeout"))
                    return
                except (OSError, ValueError, asyncio.IncompleteReadError) as error:
                    results.append((path, f"error: {type(error).__name__}: {error}"))
                    return
        finally:
            conn.close()

    tasks = [asyncio.create_task(reader(k)) for k in range(readers)]
    await asyncio.sleep(0.1)
    start.set()
    await asyncio.gather(*tasks)
    return results


@pytest.mark.parametrize("backend", ["sqlite", "postgresql"])
def test_300_concurrent_readers_get_200s_within_10_s(backend, request, tmp_path):
    url = request.getfixturevalue("postgres_migrated") if backend == "postgresql" else None
    settings = settings_for(tmp_path, url)
    if url is None:
        migrate(settings)
    run_id = populate(settings)
    server = Server(settings, tmp_path / "api.log")
    try:
        paths = [p.replace("{id}", str(run_id)) for p in DASHBOARD_PATHS]
        results = asyncio.run(_readers(server.port, paths, READERS, per_request_s=10.0))
        bad = Counter((path, status) for path, status in results if status != 200)
        assert not bad, (
            f"{sum(bad.values())} answers not a 200 within 10 s: {dict(bad)}\n"
            f"{server.text()[-3000:]}"
        )
        assert len(results) == READERS * len(paths)
        # and what they read is the data: the list's run carries its newest metric row
        page = httpx.get(server.url + "/runs", timeout=10).json()
        first = next(r for r in page["items"] if r["id"] == str(run_id))
        assert first["latest_metrics"]["step"] == 60
    finally:
        server.stop()
        if url is not None:
            db = open_database(settings)
            truncate_all(db)
            db.dispose()


# -- PostgreSQL stopped -------------------------------------------------------------------------


class Relay:
    """A TCP relay on a loopback port to ``target_port``; :meth:`stop` closes the port and
    every relayed connection (nothing listens there until :meth:`start` again)."""

    def __init__(self, target_port: int):
        self.target_port = target_port
        self.port = _free_port()
        self._listener: socket.socket | None = None
        self._conns: list[socket.socket] = []
        self._lock = threading.Lock()

    def start(self) -> None:
        listener = socket.socket()
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        listener.bind(("127.0.0.1", self.port))
        listener.listen(64)
        self._listener = listener
        threading.Thread(target=self._accept, args=(listener,), daemon=True).start()

    def _accept(self, listener: socket.socket) -> None:
        while True:
            try:
                client, _ = listener.accept()
            except OSError:
                return
            try:
                upstream = socket.create_connection(("127.0.0.1", self.target_port))
            except OSError:
                client.close()
                continue
            with self._lock:
                self._conns += [client, upstream]
            for a, b in ((client, upstream), (upstream, client)):
                threading.Thread(target=self._pump, args=(a, b), daemon=True).start()

    @staticmethod
    def _pump(src: socket.socket, dst: socket.socket) -> None:
        try:
            while data := src.recv(65536):
                dst.sendall(data)
        except OSError:
            pass
        for s in (src, dst):
            try:
                s.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass

    def stop(self) -> None:
        if self._listener is not None:
            try:  # wakes the accept() under way (a bare close() would not stop listening)
                self._listener.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
            self._listener.close()
            self._listener = None
        with self._lock:
            conns, self._conns = self._conns, []
        for s in conns:
            try:
                s.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
            s.close()


def test_a_stopped_database_is_a_503_naming_it_then_service_resumes(postgres_migrated, tmp_path):
    target = sa.make_url(postgres_migrated)
    relay = Relay(target.port or 5432)
    relay.start()
    url = target.set(host="127.0.0.1", port=relay.port).render_as_string(hide_password=False)
    settings = settings_for(tmp_path, url)
    run_id = populate(settings, n_runs=1, steps=5)
    server = Server(settings, tmp_path / "api.log")
    try:
        http = httpx.Client(base_url=server.url, timeout=30)
        assert http.get("/runs").status_code == 200
        relay.stop()  # PostgreSQL is gone: its port refuses connections
        for method, path, kwargs in [
            ("GET", "/runs", {}),
            ("GET", f"/runs/{run_id}", {}),
            ("GET", f"/runs/{run_id}/metrics", {}),
            ("GET", f"/runs/{run_id}/router", {}),
            ("GET", "/workers", {}),
            ("GET", f"/runs/{run_id}/engine-events", {}),
            ("POST", f"/runs/{run_id}/cancel", {}),
            (
                "POST",
                "/runs",
                {"json": {"name": "x", "train_config": TRAIN, "model_config": MODEL}},
            ),
        ]:
            r = http.request(method, path, **kwargs)
            assert r.status_code == 503, (method, path, r.status_code, r.text)
            doc = r.json()
            assert doc["code"] == "database_unavailable" and doc["dependency"] == "database"
            assert "database is unavailable" in doc["message"], doc
            assert int(r.headers["Retry-After"]) > 0
        ready = http.get("/readyz")
        assert ready.status_code == 503 and "database" in ready.json()["down"]
        assert int(ready.headers["Retry-After"]) > 0
        metrics = http.get("/metrics").text
        assert "moejobs_database_up 0.0" in metrics
        relay.start()  # back
        assert http.get("/runs").status_code == 200
        assert http.get(f"/runs/{run_id}").json()["latest_metrics"]["step"] == 5
        assert "Traceback" not in server.text()
    finally:
        server.stop()
        relay.stop()
        db = open_database(settings_for(tmp_path, postgres_migrated))
        truncate_all(db)
        db.dispose()


def test_requests_beyond_the_pool_get_a_fast_503_not_a_stall(postgres_migrated, tmp_path):
    settings = settings_for(tmp_path, postgres_migrated)
    populate(settings, n_runs=1, steps=3)
    server = Server(settings, tmp_path / "api.log", MOEJOBS_DB_WAIT_SECONDS="0.5")
    lock = psycopg.connect(
        sa.make_url(postgres_migrated)
        .set(drivername="postgresql")
        .render_as_string(hide_password=False)
    )
    try:
        lock.execute("LOCK TABLE runs IN ACCESS EXCLUSIVE MODE")  # every read of runs waits

        async def scenario() -> list[tuple[int, dict, dict]]:
            limits = httpx.Limits(max_connections=40)
            async with httpx.AsyncClient(base_url=server.url, limits=limits, timeout=60) as c:
                tasks = [asyncio.create_task(c.get("/runs")) for _ in range(40)]
                done: list = []
                while len(done) < 25:  # those beyond the 15 held ones answer on their own
                    finished, _ = await asyncio.wait(
                        tasks, timeout=30, return_when=asyncio.FIRST_COMPLETED
                    )
                    assert finished, "no answer while the lock is held: the API stalls"
                    done += [t for t in finished if t not in done]
                    tasks = [t for t in tasks if t not in finished]
                early = [await t for t in done]
                assert len(tasks) == 15  # the pool's 15 connections are held by the lock
                lock.rollback()  # the lock goes: the held queries finish
                late = [await t for t in tasks]
            return [(r.status_code, dict(r.headers), r.json()) for r in early + late]

        answers = asyncio.run(scenario())
        early, late = answers[:25], answers[25:]
        assert {(s, d["code"], d["dependency"]) for s, _h, d in early} == {
            (503, "database_busy", "database")
        }
        assert all(int(h["retry-after"]) >= 1 for _s, h, _d in early)
        assert "MOEJOBS_DB_WAIT_SECONDS" in early[0][2]["message"]
        assert [s for s, _h, _d in late] == [200] * 15
    finally:
        lock.close()
        server.stop()
        db = open_database(settings)
        truncate_all(db)
        db.dispose()
