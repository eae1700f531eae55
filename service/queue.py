"""The only Celery configuration of moejobs, and how the API sends work to the workers.

The API and the worker both build their Celery app with :func:`make_celery`; the worker
(``worker/celery_app.py``) registers its tasks under the names below. The API sends tasks *by
name* (:func:`enqueue_run`, :func:`enqueue_tokenizer`), so it never imports ``worker`` or torch.

Tasks and their arguments (JSON only)
-------------------------------------
:data:`TRAIN_TASK` ``"moejobs.train_run"``, args ``[run_id]`` (the run's UUID as a string).
    The database row is the whole job description (resolved configs, attempt, cancel flag);
    the message carries only the id.
:data:`PREPARE_TASK` ``"moejobs.prepare_data"``, args ``[run_id]``: tokenize the run's corpus
    into the shared token cache (``worker.prepare``) while the run waits ``queued``; a training
    worker sends it (never the API) when it receives a run whose data is not prepared, and the
    task sends :data:`TRAIN_TASK` again when the cache is ready.
:data:`TOKENIZER_TASK` ``"moejobs.train_tokenizer"``, kwargs ``{"name", "dataset_dir",
    "out_dir", "vocab_size"}``: train a tokenizer on the ``.txt`` files under ``dataset_dir``
    (absolute, inside DATA_ROOT) and write it to ``out_dir`` (absolute,
    ``DATA_ROOT/tokenizers/<name>``), atomically (a temporary folder renamed into place), so
    that a folder holding ``tokenizer.json`` is complete. The API writes a request marker
    ``DATA_ROOT/tokenizers/.pending/<name>.json`` before sending; the task may write
    ``DATA_ROOT/tokenizers/.pending/<name>.error`` (plain text: the reason) when it fails, and
    should remove the marker (and any old ``.error``) when it succeeds. The finished folder
    holds :data:`TOKENIZER_RECORD`, the request's record (``dataset`` and ``requested_at`` from
    the marker, ``requested_vocab_size``, the learned ``vocab_size``, ``warnings``), so the
    ready tokenizer keeps them. See :func:`tokenizer_marker_paths`.

Queues
------
``settings.celery_queue`` (default ``moejobs``) carries training runs; ``<queue>.aux`` carries
short CPU jobs (tokenizers, data preparation), so that they do not wait behind an hours-long
run. Which a worker consumes depends on its role (``settings.worker_role``,
:func:`worker_queues`): ``all`` both (a lone worker), ``train`` the runs only (a GPU slot),
``aux`` the short jobs only (a CPU process beside the GPU slots). Tests use a unique queue name
per test on a shared Redis.

Delivery strategy: early ack + database lease + reconciler
----------------------------------------------------------
Training runs last hours; a broker cannot be trusted to hold an unacknowledged message that
long (Redis' visibility timeout would redeliver it to a second worker mid-run; a dead worker's
prefetched messages would wait for the timeout). So:

1. ``task_acks_late = False``: the message is acknowledged when the worker *receives* it.
   ``worker_prefetch_multiplier = 1``: a worker reserves one message at a time, so a busy
   worker never sits on messages another worker could start.
2. The database row, not the message, is the source of truth. The task claims the run with
   ``service.runs.claim_run`` (an atomic ``UPDATE ... WHERE status='queued'``): a duplicate
   delivery claims nothing and does nothing. While it trains, the worker renews the run's
   lease (``heartbeat_run``) every ``HEARTBEAT_SECONDS``.
3. A reconciler (``worker/reconciler.py``) repairs the two ways the early ack can lose work:
   a message acknowledged by a worker that died before claiming, or lost by the broker
   (``stale_queued_runs`` older than ``QUEUED_STALE_SECONDS`` are re-sent with
   :func:`enqueue_run`, then ``mark_enqueued``), and a worker that died mid-run
   (``expired_runs`` whose lease ran out are re-queued by ``recover_expired_run`` and re-sent).

Hence no run is lost (the reconciler re-sends) and none runs twice at once (the claim is atomic
and fenced by ``runs.attempt``). ``visibility_timeout`` plays no part: messages are acked at once.
Results are not stored (``task_ignore_result``): outcomes live in the database.

If the broker is unreachable when the API enqueues, the run stays ``queued`` in the database
(it was committed first) and the reconciler sends it later; :func:`enqueue_run` reports the
failure instead of raising, after a bounded number of quick retries.

This module imports neither torch nor ``worker``.
"""

from __future__ import annotations

import logging
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from celery import Celery

from service.settings import Settings

log = logging.getLogger("moejobs.queue")

#: Task name of a training run; args ``[run_id: str]``.
TRAIN_TASK = "moejobs.train_run"
#: Task name of a run's data preparation; args ``[run_id: str]``.
PREPARE_TASK = "moejobs.prepare_data"
#: Task name of a tokenizer training; kwargs ``{name, dataset_dir, out_dir, vocab_size}``.
TOKENIZER_TASK = "moejobs.train_tokenizer"

#: File in a finished tokenizer folder: JSON ``{"dataset", "requested_at",
#: "requested_vocab_size", "vocab_size", "warnings": [str]}`` (the worker's
#: ``worker.tokenizer.RECORD_FILE``; named here too because the API never imports ``worker``).
TOKENIZER_RECORD = "moejobs_tokenizer.json"

#: Suffix of the queue for short CPU jobs (tokenizers), after ``settings.celery_queue``.
AUX_QUEUE_SUFFIX = ".aux"

#: How the API retries publishing before giving up (the reconciler covers the rest): at most
#: 2 retries, 0.2 s then 0.4 s apart. Seconds.
PUBLISH_RETRY_POLICY = {
    "max_retries": 2,
    "interval_start": 0.2,
    "interval_step": 0.2,
    "interval_max": 0.5,
}

#: Seconds to wait for a broker connection (publishing, readiness checks).
BROKER_CONNECT_TIMEOUT = 3.0


def train_queue(settings: Settings) -> str:
    """Queue name of training runs: ``settings.celery_queue``."""
    return settings.celery_queue


def aux_queue(settings: Settings) -> str:
    """Queue name of short CPU jobs (tokenizers): ``<celery_queue>.aux``."""
    return settings.celery_queue + AUX_QUEUE_SUFFIX


def worker_queues(settings: Settings) -> list[str]:
    """The queues a worker of ``settings.worker_role`` consumes, in priority order: training
    runs, then short jobs (role ``all``); training runs (``train``); short jobs (``aux``)."""
    role = settings.worker_role
    if role == "train":
        return [train_queue(settings)]
    if role == "aux":
        return [aux_queue(settings)]
    return [train_queue(settings), aux_queue(settings)]


def make_celery(settings: Settings, *, main: str = "moejobs") -> Celery:
    """A Celery app configured from ``settings`` (broker ``settings.broker_url``), with the
    delivery strategy of the module docstring. Connects to nothing until used. Tasks are not
    registered here: the worker registers them under :data:`TRAIN_TASK` and
    :data:`TOKENIZER_TASK`; the API sends by name."""
    app = Celery(main, broker=settings.broker_url, set_as_current=False)
    queue, aux = train_queue(settings), aux_queue(settings)
    app.conf.update(
        # JSON only: a message is data, never code (no pickle).
        task_serializer="json",
        result_serializer="json",
        accept_content=["json"],
        event_serializer="json",
        # Outcomes are recorded in the database, not in a result backend.
        task_ignore_result=True,
        result_backend=None,
        # Early ack + one message at a time (module docstring).
        task_acks_late=False,
        task_acks_on_failure_or_timeout=True,
        task_reject_on_worker_lost=False,
        worker_prefetch_multiplier=1,
        # A training task runs for hours: no Celery time limits (max_time lives in the
        # config; cancellation goes through the database).
        task_time_limit=None,
        task_soft_time_limit=None,
        # Routing: runs on the main queue, tokenizers on the aux queue.
        task_default_queue=queue,
        task_routes={
            TRAIN_TASK: {"queue": queue},
            TOKENIZER_TASK: {"queue": aux},
            PREPARE_TASK: {"queue": aux},
        },
        task_create_missing_queues=True,
        # Publishing from the API must not hang on a dead broker.
        broker_connection_timeout=BROKER_CONNECT_TIMEOUT,
        broker_connection_retry_on_startup=True,
        task_publish_retry=True,
        task_publish_retry_policy=PUBLISH_RETRY_POLICY,
        # No remote control/events: the embedded SQLite transport has no broadcast, and
        # worker liveness comes from the workers table.
        worker_enable_remote_control=False,
        worker_send_task_events=False,
        task_send_sent_event=False,
        worker_hijack_root_logger=False,
        enable_utc=True,
        timezone="UTC",
    )
    return app


@dataclass(frozen=True)
class EnqueueResult:
    """Outcome of sending a task. ``ok`` False means the broker could not be reached; the
    database row is unchanged (still queued) and ``error`` says why."""

    ok: bool
    task_id: str | None = None
    error: str | None = None


def _send(
    app: Celery,
    name: str,
    *,
    args: list[Any] | None = None,
    kwargs: dict[str, Any] | None = None,
    task_id: str | None = None,
) -> EnqueueResult:
    try:
        result = app.send_task(
            name,
            args=args,
            kwargs=kwargs,
            task_id=task_id,
            retry=True,
            retry_policy=PUBLISH_RETRY_POLICY,
        )
    except Exception as error:  # kombu raises OperationalError and friends
        reason = f"{type(error).__name__}: {error}"
        log.warning("could not send %s to the broker: %s", name, reason)
        return EnqueueResult(ok=False, error=reason)
    return EnqueueResult(ok=True, task_id=result.id)


def enqueue_run(app: Celery, run_id: uuid.UUID | str) -> EnqueueResult:
    """Send :data:`TRAIN_TASK` for ``run_id`` by name (call it after the run's row is
    committed). Never raises for broker trouble: returns ``EnqueueResult(ok=False, error=...)``
    and the reconciler re-sends the still-queued run later. A duplicate message is harmless
    (the claim is atomic)."""
    return _send(app, TRAIN_TASK, args=[str(run_id)])


def enqueue_prepare(app: Celery, run_id: uuid.UUID | str) -> EnqueueResult:
    """Send :data:`PREPARE_TASK` for ``run_id`` to the aux queue. Never raises for broker
    trouble (see :func:`enqueue_run`); a duplicate is harmless (the preparation is locked per
    run, and a prepared cache is found in milliseconds)."""
    return _send(app, PREPARE_TASK, args=[str(run_id)])


def enqueue_tokenizer(
    app: Celery, *, name: str, dataset_dir: Path, out_dir: Path, vocab_size: int
) -> EnqueueResult:
    """Send :data:`TOKENIZER_TASK` (kwargs as in the module docstring; paths absolute).
    Never raises for broker trouble (see :func:`enqueue_run`)."""
    return _send(
        app,
        TOKENIZER_TASK,
        kwargs={
            "name": name,
            "dataset_dir": str(dataset_dir),
            "out_dir": str(out_dir),
            "vocab_size": int(vocab_size),
        },
    )


def tokenizer_marker_paths(settings: Settings, name: str) -> tuple[Path, Path]:
    """``(request marker, error file)`` of tokenizer ``name``:
    ``DATA_ROOT/tokenizers/.pending/<name>.json`` and ``.../<name>.error``."""
    assert settings.data_root is not None
    pending = settings.data_root / "tokenizers" / ".pending"
    return pending / f"{name}.json", pending / f"{name}.error"


def check_broker(app: Celery, queue: str, timeout: float = BROKER_CONNECT_TIMEOUT) -> str | None:
    """Connect to the broker and declare ``queue`` (idempotent; what sending a task does
    first). Returns None when that works, else a one-line reason. Blocks at most about
    ``timeout`` seconds. A real round trip: for kombu's SQLAlchemy transport, merely
    "connecting" opens nothing."""
    try:
        with app.connection_for_write() as conn:
            conn.ensure_connection(
                max_retries=1, interval_start=0, interval_step=0, timeout=timeout
            )
            conn.default_channel.queue_declare(
                queue=queue, passive=False, durable=True, auto_delete=False
            )
    except Exception as error:
        return " ".join(f"{type(error).__name__}: {error}".split())
    return None


def queue_depth(app: Celery, queue: str, timeout: float = BROKER_CONNECT_TIMEOUT) -> int | None:
    """Messages waiting in ``queue`` (not yet received by a worker), or None when the broker
    cannot say (unreachable). Declares the queue if it does not exist (it then has 0)."""
    try:
        with app.connection_for_write() as conn:
            conn.ensure_connection(
                max_retries=1, interval_start=0, interval_step=0, timeout=timeout
            )
            channel = conn.default_channel
            return int(
                channel.queue_declare(
                    queue=queue, passive=False, durable=True, auto_delete=False
                ).message_count
            )
    except Exception as error:
        log.debug("queue depth of %s unavailable: %s", queue, error)
        return None
