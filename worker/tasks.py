"""The worker's tasks, thin: claim -> run -> record. Registered by ``worker.celery_app`` under
``service.queue.TRAIN_TASK``, ``PREPARE_TASK`` and ``TOKENIZER_TASK``; plain functions,
callable without Celery.

Nothing here imports torch; the training happens in a subprocess (``worker.runner``).
"""

from __future__ import annotations

import logging
import os
import uuid
from pathlib import Path
from typing import TYPE_CHECKING, Any

from sqlalchemy.exc import SQLAlchemyError

from service import reads, runs
from service.models import FailureReason, RunStatus, Worker
from worker import prepare
from worker.outcome import Outcome, OutcomeKind, finish_attempt
from worker.registry import current_runtime
from worker.runner import execute_attempt

if TYPE_CHECKING:  # pragma: no cover - typing only
    from service.settings import Settings

log = logging.getLogger("moejobs.tasks")


def _devices(train_doc: dict[str, Any]) -> int:
    devices = train_doc.get("devices", 1)
    try:
        return 1 if devices == "auto" else int(devices)
    except (TypeError, ValueError):
        return 1


def train_run(run_id: str) -> dict[str, Any]:
    """Train run ``run_id`` (a UUID string) on this worker.

    A worker that is shutting down claims nothing: the run stays queued and its message is
    sent again once this worker's consumer has stopped (``WorkerRuntime.stop``), so another
    worker takes it at once instead of this one starting a training only to stop it.

    Claims the run atomically (``runs.claim_run``); when the run is not queued any more (a
    duplicate or late delivery, a cancelled or finished run) or does not exist, does nothing.
    A run asking for more devices than this worker owns is left queued for another worker
    (the reconciler sends it again later). A run whose corpus is not tokenized yet is left
    queued too, its preparation sent to the aux queue (``worker.prepare.decide``): the
    preparation sends this task again when the token cache is ready. Otherwise runs the attempt
    (``worker.runner.execute_attempt``), writes its outcome (``worker.outcome.finish_attempt``,
    the one place that ends an attempt) and, when the run went back to queued, enqueues it
    again: at once after a failure with attempts left; at the worker's exit after a graceful
    stop of this (stopping) worker.

    Returns a small JSON-able summary (Celery stores no results; for logs and tests).
    """
    runtime = current_runtime()
    try:
        rid = uuid.UUID(str(run_id))
    except ValueError:
        log.error("task for %r: not a run id, ignored", run_id)
        return {"run_id": run_id, "claimed": False, "why": "not a run id"}
    db, settings = runtime.database(), runtime.settings
    if runtime.shutdown.is_set():
        runtime.resend_at_exit(rid)
        log.info(
            "run %s: this worker is stopping; left queued and sent again when it has stopped", rid
        )
        return {"run_id": str(rid), "claimed": False, "why": "worker stopping"}

    with db.session() as session:
        try:
            run = reads.get_run(session, rid)
        except reads.RunNotFound:
            log.warning("run %s: not found (deleted?), message ignored", rid)
            return {"run_id": str(rid), "claimed": False, "why": "not found"}
        if run.status != RunStatus.queued:
            log.info(
                "run %s is %s: message ignored (duplicate or late delivery)", rid, run.status.value
            )
            return {"run_id": str(rid), "claimed": False, "why": run.status.value}
        devices = _devices(run.resolved_train)
        if not reads.worker_can_serve(
            Worker(id=runtime.worker_id, host="", gpu_count=len(runtime.gpus)), devices
        ):
            log.warning(
                "run %s asks for %d device(s); this worker owns %d GPU(s): left queued "
                "for another worker",
                rid,
                devices,
                len(runtime.gpus),
            )
            return {"run_id": str(rid), "claimed": False, "why": "not enough devices"}
        decision = prepare.decide(
            run,
            settings,
            lambda: bool(reads.live_workers(session, settings.worker_stale_seconds, role="aux")),
        )
        if decision.action == "prepare":
            try:
                prepare.write_marker(settings.run_dir(rid), "sent", worker=runtime.worker_id)
            except OSError as error:  # the run folder cannot be written: the training says so
                decision = prepare.Decision("train", f"run folder: {error}")
            else:
                from service.queue import enqueue_prepare

                sent = enqueue_prepare(runtime.app(), str(rid))
                if not sent.ok:  # the reconciler sends the run again; this worker asks again
                    prepare.write_marker(
                        settings.run_dir(rid), "failed-to-send", message=sent.error
                    )
        if decision.action != "train":
            log.info("run %s left queued: %s", rid, decision.why)
            return {"run_id": str(rid), "claimed": False, "why": decision.why}
        log.info("run %s: %s", rid, decision.why)
        claimed = runs.claim_run(session, rid, runtime.worker_id, settings.lease_seconds)
    if claimed is None:
        log.info("run %s: claimed by someone else or no longer queued", rid)
        return {"run_id": str(rid), "claimed": False, "why": "claim lost"}
    run = claimed
    attempt = run.attempt
    log.info("run %s attempt %d claimed by %s", rid, attempt, runtime.worker_id)

    try:
        outcome = execute_attempt(run, db, settings, runtime.info)
    except Exception as error:  # a bug of ours: the run must not stay running
        log.exception("run %s: worker error", rid)
        outcome = Outcome(
            OutcomeKind.failed,
            f"worker error: {type(error).__name__}: {error}",
            FailureReason.crashed,
        )
    except BaseException:  # Celery's hard shutdown: the child is dead; give the run back
        _finish_and_requeue(
            runtime,
            rid,
            attempt,
            Outcome(OutcomeKind.requeue, "worker terminated: training killed"),
        )
        raise
    moved = _finish_and_requeue(runtime, rid, attempt, outcome)
    if moved is not None and moved.sweep_id is not None and moved.status != RunStatus.queued:
        from worker.sweeper import tick_after_run  # a slot is free: the next trial goes now

        tick_after_run(settings, db, runtime.app(), runtime.worker_id, moved.sweep_id)
    status = moved.status.value if moved is not None else "not recorded"
    log.info("run %s attempt %d: %s (%s)", rid, attempt, status, outcome.message)
    return {
        "run_id": str(rid),
        "claimed": True,
        "attempt": attempt,
        "status": status,
        "reason": outcome.reason.value if outcome.reason else None,
    }


def _finish_and_requeue(runtime, rid: uuid.UUID, attempt: int, outcome: Outcome):
    try:
        moved = finish_attempt(
            runtime.database(),
            rid,
            attempt,
            outcome,
            settings=runtime.settings,
            worker_id=runtime.worker_id,
        )
    except SQLAlchemyError as error:  # database down: the run keeps its (expiring) lease
        log.error(
            "run %s attempt %d: outcome %s not recorded (%s); the reconciler re-queues "
            "the run once its lease expires",
            rid,
            attempt,
            outcome.kind,
            str(error).splitlines()[0],
        )
        return None
    if moved is not None and moved.status == RunStatus.queued:
        if outcome.kind == OutcomeKind.requeue and runtime.shutdown.is_set():
            runtime.resend_at_exit(rid)  # our own consumer must not take it again
            return moved
        from service.queue import enqueue_run

        result = enqueue_run(runtime.app(), str(rid))
        if not result.ok:  # the reconciler sends it once the broker is back
            log.warning("run %s re-queued but not enqueued: %s", rid, result.error)
    return moved


def prepare_data(run_id: str) -> dict[str, Any]:
    """The :data:`service.queue.PREPARE_TASK` task: tokenize run ``run_id``'s corpus while it
    waits queued (``worker.prepare.prepare_run``), then send it to training. Runs on a worker
    that consumes the aux queue. Returns a small JSON-able summary."""
    from service.queue import enqueue_prepare, enqueue_run
    from worker.runner import training_env

    runtime = current_runtime()
    try:
        rid = uuid.UUID(str(run_id))
    except ValueError:
        log.error("preparation for %r: not a run id, ignored", run_id)
        return {"run_id": run_id, "state": "skipped"}

    def send(enqueue):
        def go(target: uuid.UUID) -> None:
            result = enqueue(runtime.app(), str(target))
            if not result.ok:  # the reconciler re-sends queued runs
                log.warning("run %s: message not sent: %s", target, result.error)

        return go

    outcome = prepare.prepare_run(
        rid,
        db=runtime.database(),
        settings=runtime.settings,
        worker_id=runtime.worker_id,
        send_train=send(enqueue_run),
        send_prepare=send(enqueue_prepare),
        shutdown=runtime.shutdown.is_set,
        env=training_env(runtime.settings, runtime.info),
    )
    log.info("run %s data preparation: %s (%s)", rid, outcome.state, outcome.message)
    return {"run_id": str(rid), "state": outcome.state, "message": outcome.message}


def _text_folders(dataset_dir: Path) -> list[Path]:
    """``dataset_dir`` and every folder below it that holds ``.txt`` files at its top level."""
    found = []
    for root, dirs, files in os.walk(dataset_dir):
        dirs[:] = sorted(d for d in dirs if not d.startswith("."))
        if any(f.endswith(".txt") for f in files):
            found.append(Path(root))
    return found


def train_tokenizer(
    name: str, dataset_dir: str, out_dir: str, vocab_size: int = 4096
) -> dict[str, Any]:
    """The :data:`service.queue.TOKENIZER_TASK` task: :func:`tokenizer_job` with this worker's
    settings."""
    return tokenizer_job(
        current_runtime().settings,
        name=name,
        dataset_dir=dataset_dir,
        out_dir=out_dir,
        vocab_size=vocab_size,
    )


def tokenizer_job(
    settings: Settings, *, name: str, dataset_dir: str, out_dir: str, vocab_size: int = 4096
) -> dict[str, Any]:
    """Train tokenizer ``name`` on the ``.txt`` files in ``dataset_dir`` (and its sub-folders)
    into ``out_dir`` (``worker.tokenizer.train_tokenizer``: written under a temporary name and
    renamed, so a folder with ``tokenizer.json`` is complete; an earlier tokenizer there is
    replaced, a folder holding other files is refused).

    The folder gets the request's record (``service.queue.TOKENIZER_RECORD``: dataset and
    requested_at from the request marker, the requested and learned vocabulary sizes, warnings
    such as a vocabulary smaller than requested), so the finished tokenizer keeps them; without
    a marker (a duplicate delivery) they come from the record already in ``out_dir``. Success
    then removes the request marker and any earlier error file
    (``service.queue.tokenizer_marker_paths``); a failure writes the reason into the error file.
    Never raises for a failed training.

    Returns ``{"name", "ok", "path" and "warnings" | "error"}``."""
    from service.queue import TOKENIZER_RECORD, tokenizer_marker_paths
    from worker.tokenizer import train_tokenizer as train

    marker, error_file = tokenizer_marker_paths(settings, name)
    # a duplicate delivery finds the marker gone: the record of the first delivery has the request
    request = _read_request(marker) or _read_request(Path(out_dir) / TOKENIZER_RECORD)
    record = {
        "name": name,
        "dataset": request.get("dataset"),
        "dataset_dir": str(dataset_dir),
        "requested_at": request.get("requested_at"),
    }
    try:
        folders = _text_folders(Path(dataset_dir))
        if not folders:
            raise ValueError(f"{dataset_dir}: no .txt files in this folder or below it")
        path = train(folders, Path(out_dir), vocab_size=int(vocab_size), record=record)
    except Exception as error:
        log.warning("tokenizer %s failed: %s", name, error)
        error_file.parent.mkdir(parents=True, exist_ok=True)
        error_file.write_text(f"{error}\n", encoding="utf-8")
        return {"name": name, "ok": False, "error": str(error)}
    for leftover in (marker, error_file):
        leftover.unlink(missing_ok=True)
    warnings = _read_request(path / TOKENIZER_RECORD).get("warnings") or []
    log.info("tokenizer %s trained into %s", name, path)
    for warning in warnings:
        log.warning("tokenizer %s: %s", name, warning)
    return {"name": name, "ok": True, "path": str(path), "warnings": warnings}


def _read_request(path: Path) -> dict[str, Any]:
    """A JSON object file (request marker or tokenizer record); {} when missing or unreadable."""
    import json

    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}
