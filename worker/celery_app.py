"""The worker's Celery app and how to start a worker. Never imports torch.

Start a worker::

    python -m worker.celery_app [--role all|train|aux] [--loglevel INFO] [--hostname NAME]
    celery -A worker.celery_app worker --pool=solo --concurrency=1 --prefetch-multiplier=1 \\
        -Q <CELERY_QUEUE>,<CELERY_QUEUE>.aux          # role all, by hand

The role (``MOEJOBS_WORKER_ROLE``) says which queues it consumes (``service.queue``): ``all``
(default) trains runs and takes the short CPU jobs when idle; ``train`` only trains; ``aux``
only prepares data and trains tokenizers, so that a training worker is never held by them.

or from Python (what ``moejobs worker`` / ``moejobs up`` call)::

    from worker.celery_app import run_worker
    run_worker(settings)          # blocks until the worker stops; returns its exit code

Settings come from ``MOEJOBS_*`` (``service.settings``); :func:`run_worker` installs the
given ones first.

The app is ``service.queue.make_celery(settings)`` (JSON only, prefetch 1, early ack; see
``worker.reconciler`` for the delivery strategy) with the tasks of ``worker.tasks`` registered
under ``service.queue.TRAIN_TASK``, ``PREPARE_TASK`` and ``TOKENIZER_TASK``. A worker runs one
task at a time: the ``solo`` pool, concurrency 1, so the training subprocess is the child of the
worker's own (non-daemonic) main process: prefork children are daemonic, and a daemonic process
may not start children, so PyTorch's DataLoader workers could not start inside one. One worker
process per GPU slot; ``MOEJOBS_WORKER_GPUS`` says which GPUs it owns.

Life cycle (Celery signals):

- ``worker_init`` (before consuming): ``worker.registry.WorkerRuntime.start``: the database
  must be migrated (else the worker refuses to start), the smoke test's sample data is seeded
  if absent, GPUs are detected, the worker registers in the ``workers`` table, and the
  heartbeat and reconciler threads start.
- ``worker_shutting_down`` (SIGTERM/SIGINT/SIGQUIT received): the runner sends SIGTERM to the
  training process, which writes a checkpoint and exits 75; the run goes back to queued
  (and resumes later, anywhere). Celery waits for the task to return (warm shutdown).
- ``worker_shutdown``: threads stopped, the worker's row removed.
"""

from __future__ import annotations

import argparse
import logging
import os
import socket
import sys
import threading
from typing import Any

from celery import Celery, signals

from service.queue import PREPARE_TASK, TOKENIZER_TASK, TRAIN_TASK, make_celery, worker_queues
from service.settings import Settings, get_settings, use_settings

log = logging.getLogger("moejobs.worker")

_lock = threading.Lock()
_app: Celery | None = None
_signals_connected = False


def create_app(settings: Settings) -> Celery:
    """A Celery app for ``settings`` with the worker's tasks registered by name."""
    from worker import tasks

    app = make_celery(settings)
    app.task(name=TRAIN_TASK, ignore_result=True)(tasks.train_run)
    app.task(name=TOKENIZER_TASK, ignore_result=True)(tasks.train_tokenizer)
    app.task(name=PREPARE_TASK, ignore_result=True)(tasks.prepare_data)
    _connect_signals()
    return app


def get_app() -> Celery:
    """This process's worker app, built on first use from ``get_settings()``."""
    global _app
    with _lock:
        if _app is None:
            _app = create_app(get_settings())
        return _app


def __getattr__(name: str) -> Any:
    # `celery -A worker.celery_app` looks up `app` (then `celery`): build it lazily, so that
    # importing this module reads no settings and connects to nothing.
    if name in ("app", "celery"):
        return get_app()
    raise AttributeError(name)


# -- worker life cycle --------------------------------------------------------------------------


def _on_worker_init(sender: Any = None, **_: Any) -> None:
    from worker.registry import current_runtime

    app = getattr(sender, "app", None)
    current_runtime(get_settings(), celery_app=app)


def _on_shutting_down(sig: str | None = None, how: str | None = None, **_: Any) -> None:
    # Runs inside a signal handler: only set a flag; the runner loop does the rest.
    from worker import registry

    runtime = registry._runtime
    if runtime is not None:
        runtime.shutdown.set()


def _on_worker_shutdown(**_: Any) -> None:
    from worker.registry import stop_runtime

    stop_runtime()


def _connect_signals() -> None:
    global _signals_connected
    if _signals_connected:
        return
    signals.worker_init.connect(_on_worker_init, weak=False)
    signals.worker_shutting_down.connect(_on_shutting_down, weak=False)
    signals.worker_shutdown.connect(_on_worker_shutdown, weak=False)
    _signals_connected = True


# -- starting a worker --------------------------------------------------------------------------


def worker_argv(
    settings: Settings, *, loglevel: str = "INFO", hostname: str | None = None
) -> list[str]:
    """The ``celery worker`` arguments of a moejobs worker: solo pool, concurrency 1,
    prefetch 1, the deployment's queues, no gossip/mingle/broker heartbeat (liveness comes
    from the workers table)."""
    return [
        "worker",
        "--pool=solo",
        "--concurrency=1",
        "--prefetch-multiplier=1",
        "--without-gossip",
        "--without-mingle",
        "--without-heartbeat",
        "-Q",
        ",".join(worker_queues(settings)),
        f"--loglevel={loglevel}",
        "-n",
        hostname or f"moejobs-{os.getpid()}@{socket.gethostname()}",
    ]


def run_worker(
    settings: Settings | None = None, *, loglevel: str = "INFO", hostname: str | None = None
) -> int:
    """Run a worker in this process until it is stopped (SIGTERM/SIGINT); returns its exit
    code. ``settings`` (default: from the environment) are installed process-wide first.
    Raises nothing for a normal stop. A database that is unreachable or not migrated is
    checked before Celery starts: one ``error:`` line on stderr and exit code 2. A broker that
    cannot be reached is Celery's to report (it retries)."""
    global _app
    if settings is not None:
        use_settings(settings)
    settings = get_settings()
    settings.ensure_dirs()
    problem = _database_problem(settings)
    if problem is not None:  # Celery would log an exception raised in worker_init and go on
        print(f"error: {problem}", file=sys.stderr)
        return 2
    logging.basicConfig(
        level=getattr(logging, loglevel.upper(), logging.INFO),
        format="[%(asctime)s: %(levelname)s/%(name)s] %(message)s",
    )
    with _lock:
        _app = create_app(settings)
    try:
        _app.worker_main(worker_argv(settings, loglevel=loglevel, hostname=hostname))
    except SystemExit as stop:
        return int(stop.code or 0) if not isinstance(stop.code, str) else 1
    return 0


def _database_problem(settings: Settings) -> str | None:
    """Why this worker cannot use the database (unreachable, or not migrated to the code's
    revision: the message says to run ``moejobs migrate``), or None."""
    from service.db import StartupError, check_schema, open_database

    db = open_database(settings)
    try:
        check_schema(db, settings, process="worker")
    except StartupError as error:
        return str(error)
    finally:
        db.dispose()
    return None


def main(argv: list[str] | None = None) -> int:
    """``python -m worker.celery_app [--role ROLE] [--loglevel LEVEL] [--hostname NAME]``."""
    parser = argparse.ArgumentParser(
        prog="python -m worker.celery_app",
        description="Run one moejobs worker (settings: MOEJOBS_*).",
    )
    parser.add_argument(
        "--role",
        choices=["all", "train", "aux"],
        default=None,
        help="queues to consume (default MOEJOBS_WORKER_ROLE, else all)",
    )
    parser.add_argument("--loglevel", default="INFO")
    parser.add_argument(
        "--hostname", default=None, help="Celery node name (default moejobs-<pid>@<host>)"
    )
    args = parser.parse_args(argv)
    settings = None
    if args.role is not None:
        settings = get_settings().model_copy(update={"worker_role": args.role})
    return run_worker(settings, loglevel=args.loglevel, hostname=args.hostname)


if __name__ == "__main__":
    # Delegate to the importable module so that there is one app and one set of signal
    # receivers (this file also runs as __main__).
    from worker import celery_app as _module

    sys.exit(_module.main())
