"""Helpers for the tests that start real worker processes (no tests here): settings for a
test deployment on the real Redis (a unique queue per use), a worker subprocess
(``python -m worker.celery_app``), tiny runs and waiting for their states.

The Redis server is the session's (``tests.support.servers.redis_url``: ``MOEJOBS_TEST_REDIS_URL``,
else the machine's on 127.0.0.1:6379, else a throwaway server); tests that cannot reach it fail
with a message saying so, they are never skipped.
"""

from __future__ import annotations

import copy
import csv
import os
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path
from typing import Any

import pytest

from service import reads, runs
from service.db import Database
from service.models import Run, RunStatus
from service.settings import ENV_PREFIX, Settings
from tests.support import REPO
from tests.support.servers import redis_url
from tests.support.tiny import TINY_MODEL, stdlib_text_files, tiny_train_config

#: Standard-library modules of the workers' tiny corpus (about 250 KB: fast to tokenize).
CORPUS_TRAIN = ["argparse", "calendar", "csv", "textwrap"]
CORPUS_VAL = ["heapq"]


def require_redis(url: str | None = None) -> str:
    """``url`` (the session's Redis by default) when a Redis server answers there; fails the
    test with a message otherwise."""
    import redis

    url = url or redis_url()

    try:
        redis.Redis.from_url(url, socket_connect_timeout=3).ping()
    except redis.RedisError as error:
        pytest.fail(
            f"Redis is not reachable at {url}: {error}\nThese tests need a real Redis "
            "server: start it (e.g. `redis-server --daemonize yes`), set "
            "MOEJOBS_TEST_REDIS_URL, or unset it to let the tests start their own.",
            pytrace=False,
        )
    return url


def worker_settings(home: Path, database_url: str, broker_url: str, **overrides: Any) -> Settings:
    """Settings of a test deployment rooted at ``home`` with a unique Celery queue, short
    heartbeats, all checkpoints kept and no checkpoint samples; ``overrides`` win."""
    values: dict[str, Any] = dict(
        home=home,
        database_url=database_url,
        broker_url=broker_url,
        data_root=home / "data",
        runs_dir=home / "runs",
        host="127.0.0.1",
        api_token=None,
        celery_queue=f"test-{uuid.uuid4().hex[:12]}",
        heartbeat_seconds=1.0,
        lease_seconds=30.0,
        worker_stale_seconds=5.0,
        queued_stale_seconds=600.0,
        cancel_grace_seconds=60.0,
        keep_checkpoints=0,
        # no sampler processes beside the trainings unless a test asks ("" would not reach the
        # worker process: an empty environment variable is ignored)
        sample_prompts="none",
    )
    values.update(overrides)
    return Settings(**values)


def build_data(data_root: Path) -> tuple[Path, Path]:
    """``data_root/tiny/{train,val}`` (standard-library text) and a 1024-id tokenizer
    ``data_root/tiny-tokenizer``; returns (corpus folder, tokenizer folder)."""
    from worker.tokenizer import train_tokenizer

    corpus = data_root / "tiny"
    stdlib_text_files(corpus / "train", CORPUS_TRAIN)
    stdlib_text_files(corpus / "val", CORPUS_VAL)
    tokenizer = train_tokenizer([corpus / "train"], data_root / "tiny-tokenizer", vocab_size=1024)
    return corpus, tokenizer


def tiny_configs(
    settings: Settings,
    run_id: uuid.UUID,
    corpus: Path,
    tokenizer: Path,
    steps: int,
    save_interval: int | None = 5,
) -> tuple[dict, dict]:
    """Resolved (train, model) documents of a tiny MoE run of ``steps`` optimizer steps
    (4 samples of 32 tokens a step) writing into ``RUN_DIR/out``."""
    train = tiny_train_config(
        settings.run_dir(run_id) / "out",
        corpus,
        tokenizer,
        max_tokens=4 * 32 * steps,
        save_interval=save_interval,
    )
    return train, copy.deepcopy(TINY_MODEL)


def create_tiny_run(
    db: Database,
    settings: Settings,
    corpus: Path,
    tokenizer: Path,
    *,
    steps: int,
    save_interval: int | None = 5,
    name: str = "tiny",
) -> Run:
    """Insert a queued tiny run (as the API would after resolving its configs)."""
    run_id = uuid.uuid4()
    train, model = tiny_configs(settings, run_id, corpus, tokenizer, steps, save_interval)
    with db.session() as session:
        run, _ = runs.create_run(
            session,
            name=name,
            submitted_train=train,
            submitted_model=model,
            resolved_train=train,
            resolved_model=model,
            run_id=run_id,
        )
    return run


def wait_for(predicate, timeout: float, what: str, poll: float = 0.25, on_fail=None):
    """Poll ``predicate`` until it returns something truthy (returned) or fail after
    ``timeout`` seconds naming ``what`` (plus ``on_fail()`` text, e.g. a worker log)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(poll)
    extra = f"\n{on_fail()}" if on_fail else ""
    raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}{extra}")


def get_run(db: Database, run_id) -> Run:
    with db.session() as session:
        return reads.get_run(session, run_id)


def csv_rows(path: Path) -> list[dict[str, str]]:
    with open(path, newline="", encoding="utf-8") as fh:
        return list(csv.DictReader(fh))


def pid_gone(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    return False


class WorkerProcess:
    """A real worker: ``python -m worker.celery_app`` with ``settings`` in its environment
    (and nothing else from the shell's MOEJOBS_* variables, except ``extra_env``, e.g. the
    stub engine's ``MOEJOBS_STUB_*``), output in ``log_path``."""

    def __init__(
        self,
        settings: Settings,
        log_path: Path,
        token_cache: Path,
        extra_env: dict[str, str] | None = None,
    ) -> None:
        self.settings, self.log_path, self.token_cache = settings, log_path, token_cache
        self.extra_env = dict(extra_env or {})
        self.proc: subprocess.Popen | None = None

    def start(self) -> WorkerProcess:
        env = {k: v for k, v in os.environ.items() if not k.startswith(ENV_PREFIX)}
        env.update(self.settings.to_env())
        env["MOEJOBS_TOKEN_CACHE"] = str(self.token_cache)
        env.update(self.extra_env)
        env["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO), env.get("PYTHONPATH")) if p)
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.log_path, "ab") as log:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "worker.celery_app", "--loglevel", "INFO"],
                cwd=str(REPO),
                env=env,
                stdout=log,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
            )
        return self

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    @property
    def worker_id_suffix(self) -> str:
        return f"-{self.pid}"

    def log(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")
        except OSError:
            return ""

    def wait_registered(self, db: Database, timeout: float = 120.0) -> str:
        """Wait until the worker's row is live and Celery says ready; returns its id."""

        def ready():
            assert self.proc is not None
            if self.proc.poll() is not None:
                raise AssertionError(f"worker exited with {self.proc.returncode}:\n{self.log()}")
            with db.session() as session:
                mine = [
                    w.id
                    for w in reads.live_workers(session, 60)
                    if w.id.endswith(self.worker_id_suffix)
                ]
            return mine[0] if mine and " ready." in self.log() else None

        return wait_for(ready, timeout, "the worker to register", on_fail=self.log)

    def stop(self, timeout: float = 90.0) -> int | None:
        """SIGTERM (warm shutdown), SIGKILL after ``timeout`` seconds; returns the exit code."""
        if self.proc is None or self.proc.poll() is not None:
            return None if self.proc is None else self.proc.returncode
        self.proc.send_signal(signal.SIGTERM)
        try:
            return self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.kill()
            return self.proc.returncode

    def kill(self) -> None:
        """SIGKILL: the worker dies at once, as on a lost machine."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()


def assert_ingested(db: Database, run: Run) -> None:
    """Metric rows equal the rows of metrics.csv (every column), and every checkpoint folder
    on disk is recorded with its path, step and size."""
    from worker.retention import checkpoint_folders, folder_size

    out = Path(run.resolved_train["out_dir"])
    with db.session() as session:
        points = reads.list_metrics(session, run.id)
        checkpoints = reads.list_checkpoints(session, run.id)
    rows = csv_rows(out / "metrics.csv")
    assert [p.step for p in points] == [int(r["step"]) for r in rows]
    for point, row in zip(points, rows, strict=True):
        for column, text in row.items():
            value = getattr(point, column)
            if text == "":
                assert value is None, (column, point.step)
            else:
                assert value == pytest.approx(float(text)), (column, point.step)
    on_disk = checkpoint_folders(out)
    assert [c.name for c in checkpoints] == [name for name, _ in on_disk]
    for c, (_name, path) in zip(checkpoints, on_disk, strict=True):
        assert Path(c.path) == path and c.size_bytes == folder_size(path)


def statuses(db: Database, run_id) -> list[tuple[str | None, str]]:
    with db.session() as session:
        return [
            (e.from_status.value if e.from_status else None, e.to_status.value)
            for e in reads.list_events(session, run_id)
        ]


TERMINAL = {RunStatus.succeeded, RunStatus.failed, RunStatus.cancelled}
