"""The embedded stack that ``moejobs up`` and ``moejobs demo`` run on one machine.

It migrates the database, then starts the API (``moejobs serve``, as ``python -m cli.main
serve``), one training worker (``python -m worker.celery_app --role train``) and one aux worker
(``--role aux``: tokenizers and data preparation, so that a training never waits behind them)
as child processes that see exactly this process's settings (passed as ``MOEJOBS_*``
variables). Separate processes rather than threads: the worker's Celery signal handlers and the
training subprocesses it starts need a main thread of their own, and each can be stopped cleanly
with SIGTERM (the worker then checkpoints a running training and puts the run back in the
queue).

Part of the command line rather than of the service: only those two commands start it, and it
starts the API through the command line, so ``service`` never names the CLI.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from urllib.parse import urlsplit, urlunsplit

import httpx

from service.settings import Settings


class StackError(RuntimeError):
    """A child process died or the API did not become ready in time; the message says which."""


#: Seconds between "still waiting" lines while the stack is not ready.
PROGRESS_EVERY_S = 15.0


def redact_url(url: str) -> str:
    """``url`` with the password of its user part replaced by ``***`` (``redis://:pw@h/0`` ->
    ``redis://:***@h/0``); other URLs unchanged."""
    try:
        parts = urlsplit(url)
    except ValueError:
        return "<unparsable URL>"
    userinfo, at, host = parts.netloc.rpartition("@")
    if not at or ":" not in userinfo:
        return url
    user = userinfo.split(":", 1)[0]
    return urlunsplit(parts._replace(netloc=f"{user}:***@{host}"))


class LocalStack:
    """API, a training worker and an aux worker under ``settings`` (call :meth:`start`, then
    :meth:`stop`).

    The children's output goes to ``HOME/logs/api.log``, ``HOME/logs/worker.log`` and
    ``HOME/logs/aux.log``.
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
            [sys.executable, *argv],
            env=env,
            stdout=log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            start_new_session=True,
        )
        log.close()

    def start(
        self, ready_timeout: float = 180.0, progress: Callable[[str], None] | None = None
    ) -> None:
        """Migrate, start both children, and wait until ``GET /readyz`` answers 200.

        ``progress`` (e.g. ``print``) gets a line whenever what the stack waits for changes
        (the API to answer; the broker, the database or the worker, as /readyz names them) and
        a "still waiting" line every :data:`PROGRESS_EVERY_S` seconds.

        Raises:
            StackError: the database could not be migrated (names MOEJOBS_DATABASE_URL), a
                child exited, or readiness did not come within ``ready_timeout`` s: the message
                names the setting of what was down (MOEJOBS_BROKER_URL for the broker) or
                quotes the last lines of that child's log and of /readyz.
        """
        import sqlalchemy as sa

        from service.db import migrate

        say = progress or (lambda line: None)
        self.settings.ensure_dirs()
        try:
            migrate(self.settings)
        except (sa.exc.OperationalError, sa.exc.InterfaceError) as exc:
            reason = " ".join((str(exc.orig or exc).strip().splitlines() or [""])[0].split())
            raise StackError(
                f"cannot migrate the database of MOEJOBS_DATABASE_URL "
                f"({redact_url(self.settings.database_url or '')}): {reason}"
            ) from None
        # Declare both queues here first: two workers declaring them at once on the embedded
        # broker (kombu's SQLAlchemy transport: look up, then insert) can both insert one and
        # the loser dies on the unique name. Declaring is idempotent; a broker that is down is
        # reported by /readyz below.
        from service.queue import aux_queue, check_broker, make_celery, train_queue

        app = make_celery(self.settings)
        for queue in (train_queue(self.settings), aux_queue(self.settings)):
            check_broker(app, queue)
        self._spawn("worker", ["-m", "worker.celery_app", "--role", "train"])
        self._spawn("aux", ["-m", "worker.celery_app", "--role", "aux"])
        self._spawn("api", ["-m", "cli.main", "serve"])
        started = time.monotonic()
        deadline = started + ready_timeout
        last, down = "no answer", ["api"]
        errors: dict[str, str] = {}
        shown: list[str] = []
        shown_at = started
        while time.monotonic() < deadline:
            for name, proc in self.procs.items():
                if proc.poll() is not None:
                    raise StackError(
                        f"the {name} exited with code {proc.returncode}:\n{self.tail(name)}"
                    )
            try:
                response = httpx.get(f"{self.base_url}/readyz", timeout=2.0, headers=self._auth())
                if response.status_code == 200:
                    return
                last = response.text
                down, errors = self._down(response)
            except httpx.HTTPError as exc:
                last, down, errors = str(exc), ["api"], {}
            now = time.monotonic()
            if down != shown:  # a line when what is down changes, not for every new error text
                say(f"waiting for {self._waiting_for(down, errors)}")
                shown, shown_at = down, now
            elif now - shown_at >= PROGRESS_EVERY_S:
                say(
                    f"still waiting ({now - started:.0f} s of {ready_timeout:.0f} s) for "
                    f"{self._waiting_for(down, {})}"
                )
                shown_at = now
            time.sleep(0.5)
        raise StackError(self._gave_up(ready_timeout, down, errors, last))

    @staticmethod
    def _down(response: httpx.Response) -> tuple[list[str], dict[str, str]]:
        """The components a 503 from /readyz names as down, and their errors."""
        try:
            body = response.json()
        except ValueError:
            return ["api"], {}
        if not isinstance(body, dict) or not isinstance(body.get("down"), list):
            return ["api"], {}
        checks = body.get("checks")
        if not isinstance(checks, dict):
            checks = {}
        errors = {name: str((checks.get(name) or {}).get("error") or "") for name in body["down"]}
        return [str(name) for name in body["down"]], errors

    def _what(self, name: str) -> str:
        if name == "broker":
            return f"the broker at MOEJOBS_BROKER_URL={redact_url(self.settings.broker_url or '')}"
        if name == "database":
            return f"the database at MOEJOBS_DATABASE_URL={redact_url(self.settings.database_url or '')}"
        if name == "workers":
            return f"the worker to register (log: {self.log_dir / 'worker.log'})"
        if name == "api":
            return f"the API to answer at {self.base_url}"
        return name

    def _waiting_for(self, down: list[str], errors: dict[str, str]) -> str:
        return "; ".join(
            self._what(name) + (f" ({_brief(errors[name])})" if errors.get(name) else "")
            for name in down
        )

    def _gave_up(self, timeout: float, down: list[str], errors: dict[str, str], last: str) -> str:
        if "broker" in down:
            return (
                f"gave up after {timeout:.0f} s: {self._what('broker')} did not answer"
                + (f" ({errors['broker']})" if errors.get("broker") else "")
                + "; start that broker, or set MOEJOBS_BROKER_URL to one that runs (unset, it "
                "is the embedded SQLite broker under MOEJOBS_HOME)"
            )
        if "database" in down:
            return f"gave up after {timeout:.0f} s: {self._what('database')} is not ready" + (
                f" ({errors['database']})" if errors.get("database") else ""
            )
        if "workers" in down:
            return (
                f"gave up after {timeout:.0f} s: the worker did not register; its log ends:\n"
                f"{self.tail('worker')}"
            )
        return f"the API at {self.base_url} was not ready after {timeout:.0f} s: {last}\n{self.tail('api')}"

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
        """SIGTERM every child (the worker checkpoints a running training and requeues it),
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


def _brief(error: str, limit: int = 160) -> str:
    """One short line of a component's error for the start-up progress: its first line, without
    SQLAlchemy's ``[SQL: ...]`` statement, at most ``limit`` characters (``GET /readyz`` keeps
    the whole text)."""
    line = (error.strip().splitlines() or [""])[0].split(" [SQL:", 1)[0].rstrip()
    return line if len(line) <= limit else line[: limit - 3] + "..."
