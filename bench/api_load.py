"""Benchmark: the API under many concurrent readers, against a bare FastAPI app.

For each database backend (SQLite file, PostgreSQL) the real app (``service.main.create_app``)
runs under uvicorn in a process of its own, on a migrated database holding what a dashboard
reads: ``--runs`` runs (the first with ``--steps`` metric rows and router rows every 10th step,
4 layers x 8 experts; the others with 10 metric rows each) and one registered worker. Each
endpoint the dashboard polls is measured alone:

* ``/runs`` (one page, default ``limit=50``), ``/runs/{id}``, ``/runs/{id}/metrics`` (default
  query: every row of the first run), ``/runs/{id}/router`` (every router row), ``/workers``

at each ``--clients`` level, and a bare FastAPI app (one ``async def`` route returning a small
JSON object, same uvicorn options) is measured in the same run as the baseline: the table gives
each endpoint's requests/s, its p50/p99 latency and the ratio of its requests/s to the bare
app's at the same client count. The servers run with ``log_level=warning`` (no access log),
one process each, h11 and asyncio as installed.

How the load is generated, so that it is not what is measured: ``--client-procs`` separate
processes (default 2), each driving its share of the clients from one asyncio loop over raw
keep-alive HTTP/1.1 sockets (a client is one connection sending its next request when the
previous answer is complete: closed loop). No HTTP library is involved: a request costs the
client a ``write`` and a header scan, a few tens of microseconds, against a millisecond or more
on the server. The client processes report their CPU time; ``client_cpu`` is the share of one
core they used together during the measurement (near 100% per process would mean the client
limits the figure; it is printed so that one can check).

All clients connect, then start together; ``--warmup`` seconds are not counted, then requests
completed within ``--duration`` seconds are. Then no new request is sent and those in flight
are waited for (at most ``--timeout``): an answer slower than ``--timeout`` counts as a timeout,
a status >= 500 as a 5xx (both over the whole run, warm-up and drain included).

    uv run python bench/api_load.py                         # both backends, 50 and 500 clients
    uv run python bench/api_load.py --backends sqlite --clients 50 --duration 3
    uv run python bench/api_load.py --json                  # one JSON document

PostgreSQL: a database ``moejobs_bench_<random>`` is created through ``--postgres-url`` (an admin
connection, default ``postgresql://postgres@127.0.0.1:5432/postgres``) and dropped at the end.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import os
import platform
import random
import resource
import socket
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

ENDPOINTS = ("/runs", "/runs/{id}", "/runs/{id}/metrics", "/runs/{id}/router", "/workers")
BARE_PATH = "/ping"

# A small valid config pair (the same as the tests' live server): 200 optimizer steps.
_TRAIN: dict[str, Any] = {
    "out_dir": "out",
    "precision": "32-true",
    "devices": 1,
    "tokenizer_dir": "tok",
    "data": {
        "class_path": "TextFiles",
        "init_args": {"train_data_path": "ds/train", "val_data_path": "ds/val"},
    },
    "train": {
        "micro_batch_size": 2,
        "global_batch_size": 4,
        "max_seq_length": 32,
        "max_tokens": 25_600,
        "lr_warmup_steps": 10,
        "save_interval": 50,
        "min_lr": 1e-4,
    },
    "eval": {"interval": 25, "max_iters": 2},
    "optimizer": {"class_path": "torch.optim.AdamW", "init_args": {"lr": 1e-3}},
    "optimization": {"compile": False},
}
_MODEL: dict[str, Any] = {
    "name": "tiny-moe",
    "block_size": 64,
    "n_layer": 4,
    "n_embd": 64,
    "n_head": 4,
    "n_query_groups": 2,
    "mlp_class_name": "LLaMAMoE",
    "n_expert": 8,
    "n_expert_per_token": 2,
    "moe_intermediate_size": 128,
    "vocab_size": 256,
    "padded_vocab_size": 256,
    "norm_class_name": "RMSNorm",
    "bias": False,
    "parallel_residual": False,
    "rotary_percentage": 1.0,
}


def raise_open_files() -> None:
    """Raise the soft RLIMIT_NOFILE to the hard limit (500 sockets need more than 1024 fds
    on some systems)."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard == resource.RLIM_INFINITY or soft < hard:
        resource.setrlimit(
            resource.RLIMIT_NOFILE, (hard if hard != resource.RLIM_INFINITY else 65536, hard)
        )


# -- the data -----------------------------------------------------------------------------------


def _metric_rows(first: int, last: int, seed: int) -> list[dict[str, Any]]:
    rng = random.Random(seed)
    rows = []
    for step in range(first, last + 1):
        row = {
            "step": step,
            "tokens": step * 128,
            "loss": 2.6 + 3 * math.exp(-step / 40) + 0.08 * rng.gauss(0, 1),
            "learning_rate": 1e-3,
            "grad_norm": 0.7 + rng.random(),
            "tokens_per_sec": 52_000 + 2_500 * rng.gauss(0, 1),
            "mfu": 0.41,
            "elapsed_s": 0.35 * step,
        }
        if step % 25 == 0:
            row["val_loss"] = 2.6 + 3 * math.exp(-step / 40)
            row["val_ppl"] = math.exp(row["val_loss"])
        rows.append(row)
    return rows


def populate(settings: Any, *, n_runs: int, steps: int) -> uuid.UUID:
    """Fill a migrated database (see the module docstring); returns the first run's id."""
    from service import runs
    from service.config.validate import validate_configs
    from service.db import open_database
    from service.estimate import estimate

    db = open_database(settings)
    validated = validate_configs(_TRAIN, _MODEL)
    resolved_model = validated.model.model_dump(mode="json")
    doc_estimate = estimate(validated.train, validated.model).to_dict()
    first = None
    try:
        with db.session() as s:
            runs.register_worker(
                s,
                "bench-w1",
                "gpu-host-1",
                pid=4242,
                gpus=[{"index": 0, "name": "NVIDIA H100 80GB HBM3", "memory_bytes": 80 << 30}],
            )
        for i in range(n_runs):
            run_id = uuid.uuid4()
            resolved_train = validated.train.model_dump(mode="json")
            resolved_train["out_dir"] = str(settings.run_dir(run_id) / "out")
            with db.session() as s:
                runs.create_run(
                    s,
                    name=f"bench-{i}",
                    submitted_train=_TRAIN,
                    submitted_model=_MODEL,
                    resolved_train=resolved_train,
                    resolved_model=resolved_model,
                    estimate=doc_estimate,
                    warnings=[],
                    run_id=run_id,
                )
                run = runs.claim_run(s, run_id, "bench-w1", lease_seconds=3600)
                assert run is not None  # just created, queued, nobody else claims
                runs.record_metrics(
                    s, run_id, _metric_rows(1, steps if i == 0 else 10, i), attempt=run.attempt
                )
                if i == 0:
                    for step in range(10, steps + 1, 10):
                        matrix = [
                            [(1 + 0.1 * ((e + layer + step) % 3)) for e in range(8)]
                            for layer in range(4)
                        ]
                        matrix = [[w / sum(row) for w in row] for row in matrix]
                        runs.record_router_stats(
                            s, run_id, runs.router_rows(step, matrix), attempt=run.attempt
                        )
                elif i % 2:
                    runs.transition(
                        s, run_id, "succeeded", "exit 0", attempt=run.attempt, exit_code=0
                    )
            first = first or run_id
    finally:
        db.dispose()
    assert first is not None
    return first


# -- servers ------------------------------------------------------------------------------------


def bare_app() -> Any:
    """The baseline: FastAPI with one trivial JSON route."""
    from fastapi import FastAPI

    app = FastAPI()

    @app.get(BARE_PATH)
    async def ping() -> dict[str, str]:
        return {"status": "ok"}

    return app


def _serve(kind: str, port: int) -> None:
    import uvicorn

    raise_open_files()
    if kind == "bare":
        app = bare_app()
    else:
        from service.main import create_app

        app = create_app()
    uvicorn.run(app, host="127.0.0.1", port=port, log_level="warning", lifespan="on")


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class Server:
    """A uvicorn process serving ``kind`` ("bare" or "app", the latter with ``env``)."""

    def __init__(self, kind: str, env: dict[str, str] | None, log: Path):
        self.port = _free_port()
        full_env = {k: v for k, v in os.environ.items() if not k.startswith("MOEJOBS_")}
        full_env.update(env or {})
        self.log = log
        with open(log, "ab") as fh:
            self.proc = subprocess.Popen(
                [sys.executable, __file__, "--serve", kind, "--port", str(self.port)],
                cwd=REPO,
                env=full_env,
                stdout=fh,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
            )
        deadline = time.monotonic() + 60
        while True:
            if self.proc.poll() is not None:
                raise RuntimeError(f"the {kind} server exited: {log.read_text()[-3000:]}")
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=1) as sock:
                    path = BARE_PATH if kind == "bare" else "/healthz"
                    sock.sendall(f"GET {path} HTTP/1.1\r\nHost: b\r\n\r\n".encode())
                    if sock.recv(64).startswith(b"HTTP/1.1 200"):
                        break
            except OSError:
                pass
            if time.monotonic() > deadline:
                raise RuntimeError(f"the {kind} server did not answer: {log.read_text()[-3000:]}")
            time.sleep(0.1)

    def stop(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()


# -- the load generator (runs in its own processes) ----------------------------------------------


class _Conn:
    def __init__(self, port: int):
        self.port = port
        self.reader: asyncio.StreamReader | None = None
        self.writer: asyncio.StreamWriter | None = None

    async def open(self) -> None:
        self.reader, self.writer = await asyncio.open_connection("127.0.0.1", self.port)
        self.writer.get_extra_info("socket").setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
        self.reader = self.writer = None

    async def request(self, raw: bytes) -> int:
        """Send one GET, read the whole answer; returns the status."""
        if self.writer is None:
            await self.open()
        assert self.reader is not None and self.writer is not None
        self.writer.write(raw)
        head = await self.reader.readuntil(b"\r\n\r\n")
        status = int(head[9:12])
        lower = head.lower()
        at = lower.find(b"\r\ncontent-length:")
        if at >= 0:
            end = lower.index(b"\r\n", at + 2)
            await self.reader.readexactly(int(lower[at + 17 : end]))
        elif b"transfer-encoding: chunked" in lower:
            while True:
                size = int((await self.reader.readuntil(b"\r\n")).split(b";")[0], 16)
                await self.reader.readexactly(size + 2)
                if size == 0:
                    break
        else:
            raise RuntimeError("answer without Content-Length")
        if b"\r\nconnection: close" in lower:
            self.close()
        return status


async def _client_main(spec: dict[str, Any]) -> dict[str, Any]:
    raw = f"GET {spec['path']} HTTP/1.1\r\nHost: 127.0.0.1\r\nAccept: */*\r\n\r\n".encode()
    conns = [_Conn(spec["port"]) for _ in range(spec["clients"])]
    sem = asyncio.Semaphore(64)

    async def connect(c: _Conn) -> None:
        async with sem:
            for _ in range(50):
                try:
                    await c.open()
                    return
                except OSError:
                    await asyncio.sleep(0.1)
            await c.open()

    await asyncio.gather(*(connect(c) for c in conns))
    loop = asyncio.get_running_loop()
    start_wall = spec["start_at"]
    await asyncio.sleep(max(0.0, start_wall - time.time()))
    t0 = loop.time()
    measure_from = t0 + spec["warmup"]
    measure_to = measure_from + spec["duration"]
    timeout = spec["timeout"]
    latencies: list[float] = []
    statuses: dict[str, int] = {}
    counts = {"timeouts": 0, "errors": 0}
    cpu = {}

    async def client(c: _Conn) -> None:
        while loop.time() < measure_to:
            began = loop.time()
            try:
                status = await asyncio.wait_for(c.request(raw), timeout)
            except TimeoutError:
                counts["timeouts"] += 1
                c.close()
                continue
            except (OSError, asyncio.IncompleteReadError, ValueError, RuntimeError):
                counts["errors"] += 1
                c.close()
                await asyncio.sleep(0.05)
                continue
            done = loop.time()
            statuses[str(status)] = statuses.get(str(status), 0) + 1
            if measure_from <= done <= measure_to:
                latencies.append(done - began)

    async def cpu_marks() -> None:
        await asyncio.sleep(max(0.0, measure_from - loop.time()))
        cpu["from"] = time.process_time()
        await asyncio.sleep(max(0.0, measure_to - loop.time()))
        cpu["to"] = time.process_time()

    await asyncio.gather(cpu_marks(), *(client(c) for c in conns))
    for c in conns:
        c.close()
    return {
        "latencies": latencies,
        "statuses": statuses,
        **counts,
        "cpu_s": cpu.get("to", 0.0) - cpu.get("from", 0.0),
    }


def _client_process(spec_json: str) -> None:
    raise_open_files()
    result = asyncio.run(_client_main(json.loads(spec_json)))
    sys.stdout.write(json.dumps(result))


def measure(port: int, path: str, clients: int, args: argparse.Namespace) -> dict[str, Any]:
    """Drive ``clients`` closed-loop clients at ``path`` from ``args.client_procs`` processes."""
    procs = max(1, min(args.client_procs, clients))
    shares = [clients // procs + (1 if i < clients % procs else 0) for i in range(procs)]
    start_at = time.time() + 1.0 + clients / 500
    children = []
    for share in shares:
        spec = {
            "port": port,
            "path": path,
            "clients": share,
            "start_at": start_at,
            "warmup": args.warmup,
            "duration": args.duration,
            "timeout": args.timeout,
        }
        children.append(
            subprocess.Popen(
                [sys.executable, __file__, "--client", json.dumps(spec)],
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                cwd=REPO,
            )
        )
    parts = []
    for child in children:
        out, err = child.communicate(timeout=args.warmup + args.duration + args.timeout + 120)
        if child.returncode != 0:
            raise RuntimeError(f"a client process failed: {err.decode()[-2000:]}")
        parts.append(json.loads(out))
    lat = sorted(x for p in parts for x in p["latencies"])
    statuses: dict[str, int] = {}
    for p in parts:
        for k, v in p["statuses"].items():
            statuses[k] = statuses.get(k, 0) + v

    def pct(q: float) -> float | None:
        return round(1000 * lat[min(len(lat) - 1, int(q * len(lat)))], 2) if lat else None

    return {
        "clients": clients,
        "path": path,
        "requests": len(lat),
        "rps": round(len(lat) / args.duration, 1),
        "p50_ms": pct(0.50),
        "p99_ms": pct(0.99),
        "status": statuses,
        "errors_5xx": sum(v for k, v in statuses.items() if k.startswith("5")),
        "timeouts": sum(p["timeouts"] for p in parts),
        "connection_errors": sum(p["errors"] for p in parts),
        "client_cpu": round(sum(p["cpu_s"] for p in parts) / args.duration, 2),
    }


# -- orchestration --------------------------------------------------------------------------------


def _pg_create(admin_url: str) -> str:
    import psycopg
    import sqlalchemy as sa
    from psycopg import sql

    name = f"moejobs_bench_{uuid.uuid4().hex[:10]}"
    with psycopg.connect(admin_url, autocommit=True, connect_timeout=5) as conn:
        conn.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name)))
    return (
        sa.make_url(admin_url)
        .set(drivername="postgresql+psycopg", database=name)
        .render_as_string(hide_password=False)
    )


def _pg_drop(admin_url: str, url: str) -> None:
    import psycopg
    import sqlalchemy as sa
    from psycopg import sql

    name = sa.make_url(url).database
    assert name is not None, url
    with psycopg.connect(admin_url, autocommit=True, connect_timeout=5) as conn:
        conn.execute(
            sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(name))
        )


def _app_settings(home: Path, database_url: str | None) -> Any:
    from service.settings import Settings

    return Settings(
        home=home,
        database_url=database_url or f"sqlite:///{home / 'moejobs.sqlite3'}",
        broker_url=f"sqla+sqlite:///{home / 'broker.sqlite3'}",
        data_root=home / "data",
        runs_dir=home / "runs",
        host="127.0.0.1",
        api_token=None,
    )


def run_backend(
    backend: str, args: argparse.Namespace, tmp: Path, log=print
) -> list[dict[str, Any]]:
    """Measure every endpoint at every client count on ``backend``."""
    from service.db import migrate

    home = tmp / backend
    pg_url = _pg_create(args.postgres_url) if backend == "postgresql" else None
    try:
        settings = _app_settings(home, pg_url)
        migrate(settings)
        run_id = populate(settings, n_runs=args.runs, steps=args.steps)
        server = Server("app", settings.to_env(), tmp / f"{backend}.log")
        rows = []
        try:
            for clients in args.clients:
                for endpoint in args.endpoints:
                    row = measure(server.port, endpoint.replace("{id}", str(run_id)), clients, args)
                    row.update(backend=backend, endpoint=endpoint)
                    log(_fmt_row(row))
                    rows.append(row)
        finally:
            server.stop()
        return rows
    finally:
        if pg_url:
            _pg_drop(args.postgres_url, pg_url)


def _fmt_row(row: dict[str, Any]) -> str:
    ratio = f"{row['ratio']:.2f}x" if row.get("ratio") is not None else "-"
    return (
        f"{row['backend']:<10} {row['endpoint']:<20} {row['clients']:>5} {row['rps']:>9.1f} "
        f"{_ms(row['p50_ms']):>9} {_ms(row['p99_ms']):>9} {ratio:>7} {row['errors_5xx']:>5} "
        f"{row['timeouts']:>5} {row['connection_errors']:>5} {row['client_cpu']:>6.2f}"
    )


def _ms(v: float | None) -> str:
    return "-" if v is None else f"{v:.1f}"


HEADER = (
    f"{'backend':<10} {'endpoint':<20} {'conc':>5} {'req/s':>9} {'p50 ms':>9} {'p99 ms':>9} "
    f"{'vs bare':>7} {'5xx':>5} {'t/o':>5} {'conn':>5} {'clCPU':>6}"
)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--backends", default="sqlite,postgresql")
    p.add_argument("--clients", default="50,500", help="concurrent clients, comma-separated")
    p.add_argument("--endpoints", default=",".join(ENDPOINTS))
    p.add_argument("--duration", type=float, default=5.0, help="measured seconds per cell")
    p.add_argument("--warmup", type=float, default=1.0, help="uncounted seconds before")
    p.add_argument("--timeout", type=float, default=30.0, help="a slower answer is a timeout")
    p.add_argument("--client-procs", type=int, default=2, help="load-generator processes")
    p.add_argument("--runs", type=int, default=20)
    p.add_argument("--steps", type=int, default=100, help="metric rows of the measured run")
    p.add_argument(
        "--postgres-url",
        default=os.environ.get(
            "MOEJOBS_TEST_POSTGRES_URL", "postgresql://postgres@127.0.0.1:5432/postgres"
        ),
    )
    p.add_argument("--json", action="store_true", help="print one JSON document")
    p.add_argument("--serve", help=argparse.SUPPRESS)
    p.add_argument("--port", type=int, help=argparse.SUPPRESS)
    p.add_argument("--client", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    args.clients = [int(c) for c in str(args.clients).split(",") if c]
    args.backends = [b for b in args.backends.split(",") if b]
    args.endpoints = [e for e in args.endpoints.split(",") if e]
    for b in args.backends:
        if b not in ("sqlite", "postgresql"):
            p.error(f"--backends: unknown backend {b!r} (sqlite, postgresql)")
    for e in args.endpoints:
        if e not in ENDPOINTS:
            p.error(f"--endpoints: unknown endpoint {e!r} ({', '.join(ENDPOINTS)})")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.serve:
        _serve(args.serve, args.port)
        return 0
    if args.client:
        _client_process(args.client)
        return 0
    raise_open_files()
    out = sys.stderr if args.json else sys.stdout
    started = time.strftime("%Y-%m-%d %H:%M:%S %Z")
    load_start = os.getloadavg()

    def log(line: str) -> None:
        print(line, file=out, flush=True)

    log(HEADER)
    rows: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory(prefix="moejobs-api-load-") as tmp_name:
        tmp = Path(tmp_name)
        bare = Server("bare", None, tmp / "bare.log")
        bare_rows = {}
        try:
            for clients in args.clients:
                row = measure(bare.port, BARE_PATH, clients, args)
                row.update(backend="bare", endpoint=BARE_PATH, ratio=1.0)
                bare_rows[clients] = row
                log(_fmt_row(row))
                rows.append(row)
        finally:
            bare.stop()
        for backend in args.backends:
            for row in run_backend(backend, args, tmp, log=lambda _line: None):
                base = bare_rows[row["clients"]]["rps"]
                row["ratio"] = round(row["rps"] / base, 3) if base else None
                log(_fmt_row(row))
                rows.append(row)
    doc = {
        "started": started,
        "finished": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
        "machine": {
            "platform": platform.platform(),
            "cpus": os.cpu_count(),
            "python": platform.python_version(),
            "load_avg_start": load_start,
            "load_avg_end": os.getloadavg(),
        },
        "settings": {
            k: getattr(args, k)
            for k in ("duration", "warmup", "timeout", "client_procs", "runs", "steps")
        },
        "rows": rows,
    }
    if args.json:
        print(json.dumps(doc, indent=2))
    else:
        worst = [r for r in rows if r["errors_5xx"] or r["timeouts"] or r["connection_errors"]]
        bad = ", ".join(f"{r['backend']} {r['endpoint']} @{r['clients']}" for r in worst)
        print(f"\n{len(rows)} cells; with 5xx, timeouts or connection errors: {bad or 'none'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
