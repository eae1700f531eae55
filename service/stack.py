"""The embedded stack that ``moejobs up`` and ``moejobs demo`` run on one machine.

It migrates the database, then starts the API (``moejobs serve``) and one worker
(``python -m worker.celery_app``) as child processes that see exactly this process's settings
(passed as ``MOEJOBS_*`` variables). Separate processes rather than threads: the worker's
Celery signal handlers and the training subprocesses it starts need a main thread of their own,
and each can be stopped cleanly with SIGTERM (the worker then checkpoints a running training
and puts the run back in the queue).
"""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx

from service.settings import Settings


class StackError(RuntimeError):
    """A child process died or the API did not become ready in time; the message says which."""


class LocalStack:
    """API + one worker under ``settings`` (call :meth:`start`, then :meth:`stop`).

    The children's output goes to ``HOME/logs/api.log`` and ``HOME/logs/worker.log``.
    """

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.procs: dict[str, subprocess.Popen] = {}
        self.log_dir = Path(settings.home) / "logs"

    @property
    def base_url(self) -> str:
        host = self.settings.host
        if host in ("0.0.0.0", "::", ""):
            host = "127.0.0.1"
        return f"http://{host}:{self.settings.port}"

    def _spawn(self, name: str, argv: list[str]) -> None:
        self.log_dir.mkdir(parents=True, exist_ok=True)
        env = {**os.environ, **self.settings.to_env(), "PYTHONUNBUFFERED": "1"}
        log = open(self.log_dir / f"{name}.log", "ab")
        self.procs[name] = subprocess.Popen(
            [sys.executable, *argv], env=env, stdout=log, stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL, start_new_session=True,
        )
        log.close()

    def start(self, ready_timeout: float = 180.0) -> None:
        """Migrate, start both children, and wait until ``GET /readyz`` answers 200.

        Raises:
            StackError: a child exited, or readiness did not come within ``ready_timeout`` s
                (the message quotes the last lines of that child's log and of /readyz).
        """
        from service.db import migrate

        self.settings.ensure_dirs()
        migrate(self.settings)
        self._spawn("worker", ["-m", "worker.celery_app"])
        self._spawn("api", ["-m", "service.cli", "serve"])
        deadline = time.monotonic() + ready_timeout
        last = "no answer"
        while time.monotonic() < deadline:
            for name, proc in self.procs.items():
                if proc.poll() is not None:
                    raise StackError(f"the {name} exited with code {proc.returncode}:\n{self.tail(name)}")
            try:
                response = httpx.get(f"{self.base_url}/readyz", timeout=2.0,
                                     headers=self._auth())
                if response.status_code == 200:
                    return
                last = response.text
            except httpx.HTTPError as exc:
                last = str(exc)
            time.sleep(0.5)
        raise StackError(f"the API at {self.base_url} was not ready after {ready_timeout:.0f} s: {last}")

    def _auth(self) -> dict[str, str]:
        token = self.settings.api_token
        if token is None:
            return {}
        value = token.get_secret_value() if hasattr(token, "get_secret_value") else str(token)
        return {"Authorization": f"Bearer {value}"}

    def tail(self, name: str, lines: int = 20) -> str:
        path = self.log_dir / f"{name}.log"
        if not path.exists():
            return ""
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])

    def wait(self) -> int:
        """Block until a child exits (or Ctrl-C); returns the first exit code seen."""
        while True:
            for proc in self.procs.values():
                if proc.poll() is not None:
                    return proc.returncode
            time.sleep(0.5)

    def stop(self, timeout: float | None = None) -> None:
        """SIGTERM both children (the worker checkpoints a running training and requeues it),
        wait up to ``timeout`` s (default: the cancel grace period + 30 s), then SIGKILL."""
        if timeout is None:
            timeout = float(self.settings.cancel_grace_seconds) + 30.0
        for proc in self.procs.values():
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGTERM)
        deadline = time.monotonic() + timeout
        for proc in self.procs.values():
            try:
                proc.wait(timeout=max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
