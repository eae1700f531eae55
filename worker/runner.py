"""Run one claimed attempt of a run: the training subprocess and everything the worker does
while it lives. No Celery in here (``worker.tasks`` is the thin Celery layer around it).

What :func:`execute_attempt` does for a run that :func:`service.runs.claim_run` just gave us:

1. writes the run's resolved configs to ``RUN_DIR/train_config.yaml`` and
   ``RUN_DIR/model_config.yaml`` (``RUN_DIR = settings.run_dir(run.id)``);
2. records the claim in ``out_dir/.owner.json`` (``service.contract.write_owner``), removes
   a stale ``out_dir/result.json``, and starts ``python -m worker.entry --train-config ...
   --model-config ... [--no-checkpoints]`` (``--no-checkpoints`` when the run's
   ``write_checkpoints`` is false) in its own session/process group, environment =
   this process's plus ``settings.to_env()``, the attempt (``MOEJOBS_ATTEMPT``) and the read
   end of a heartbeat pipe (``MOEJOBS_WATCHDOG_FD``); stdout and stderr go to
   ``RUN_DIR/train.log`` (the run's log; each attempt appends a ``[moejobs]`` header and
   trailer line). The child gets a parent-death signal (``worker.launch.die_with_parent``,
   Linux ``PR_SET_PDEATHSIG``). Its pid is in ``RUN_DIR/train.pid``;
3. until the child exits, every ``POLL_SECONDS``: stores the new rows of ``out_dir/metrics.csv``
   and ``out_dir/router.csv`` (``worker.ingest``), records each complete checkpoint folder and
   applies ``settings.keep_checkpoints`` (``worker.retention``), renews the run's lease every
   ``settings.heartbeat_seconds`` and watches ``cancel_requested`` and the worker's shutdown
   flag (SIGTERM to the process group; SIGKILL after ``settings.cancel_grace_seconds``).
   Provenance is recorded once, from a helper thread (``worker.provenance``: the data hash
   reads every input file);
4. after the exit: a last drain of metrics and checkpoints, then
   ``worker.outcome.classify_exit`` from the engine's ``result.json`` and the exit code
   (``service.contract``; never from log text).

With an object store (``settings.artifact_url``): before step 1, an ``out_dir`` without a
checkpoint gets the run's newest recorded one from the store (``worker.artifacts``), and an
``initial_checkpoint_dir`` (another run's recorded checkpoint) whose folder this machine lacks
is fetched into ``RUN_DIR/initial_checkpoint``, which the written ``train_config.yaml`` then
names (the run's resolved config in the database keeps the recorded path); in step 3
each checkpoint is uploaded before it is recorded (``worker.retention``) and the run's files are
synced every ``settings.artifact_sync_seconds``; in step 4 the uploads left are waited for and
the files synced once more.

The outcome is written by ``worker.outcome.finish_attempt``, the only place that maps an
outcome to ``service.runs``' status functions.

Fencing: every write passes the claimed ``attempt``. When ``heartbeat_run`` raises
``LeaseLost`` (the reconciler gave the run to another attempt) the child is SIGKILLed at once
and nothing more is written. A watchdog thread (:func:`_watchdog`), beside the runner loop so
that a database call that hangs cannot delay it, vouches for the lease to the training
process: it writes a byte to the heartbeat pipe every half second while the last successful
renewal is less than ``settings.vouch_seconds`` old. The training process (``worker.fence``)
stops itself when no byte came for ``TRAINER_DEADLINE_SECONDS``, so a frozen worker (SIGSTOP,
a stalled host) cannot leave its training running past its lease. When the lease cannot be
renewed (database unreachable) the watchdog stops vouching and SIGTERMs the training (it
checkpoints and exits 75; the run is re-queued if the database answers again, else the
reconciler re-queues it once its lease expires); after ``lease_seconds - heartbeat_seconds``
it SIGKILLs whatever is left, before the lease can expire.
"""

from __future__ import annotations

import errno
import logging
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, NamedTuple

import yaml
from sqlalchemy.exc import SQLAlchemyError

from service import artifacts, contract, reads, runs
from service.artifacts import StoreError
from service.contract import EngineResult, FailureReason
from service.db import Database
from service.models import Run, RunStatus
from service.settings import Settings
from worker import provenance, sample
from worker.artifacts import FileSync, fetch_checkpoint, fetch_initial_checkpoint, synced_files
from worker.ingest import metrics_ingest, router_ingest
from worker.launch import PARENT_ENV, REPO_ROOT
from worker.outcome import Outcome, OutcomeKind, cgroup_oom_kills, classify_exit
from worker.retention import Checkpoints, checkpoint_folders

log = logging.getLogger("moejobs.runner")

#: How often the runner loop looks at the child, the files and the cancel flag, in seconds.
POLL_SECONDS = 0.5

_LOG_TAIL_BYTES = 64 * 1024


@dataclass
class WorkerInfo:
    """What the runner needs to know about the worker it runs in."""

    worker_id: str
    #: CUDA_VISIBLE_DEVICES for the training process; None = leave the environment alone.
    cuda_visible_devices: str | None = None
    #: Hardware description stored in the run's provenance.
    hardware: dict[str, Any] = field(default_factory=dict)
    #: Set when the worker is shutting down: stop the child so it checkpoints, then requeue.
    shutdown: threading.Event = field(default_factory=threading.Event)


def execute_attempt(
    run: Run,
    db: Database,
    settings: Settings,
    info: WorkerInfo,
    *,
    poll_seconds: float = POLL_SECONDS,
    command: list[str] | None = None,
) -> Outcome:
    """Run the claimed attempt ``run.attempt`` of ``run`` to its end and classify it (see the
    module docstring). Blocks until the training process has exited; it is never left
    running when this returns or raises. Does not write the final status: pass the
    outcome to ``worker.outcome.finish_attempt``.

    ``command`` replaces the engine's command line (:func:`training_command`), e.g. a small
    script in tests; it runs the same way (run folder as working directory, same environment,
    output to the log).

    Errors starting the process (unwritable run folder, missing interpreter) give a
    ``crashed`` outcome (``no_space`` on a full disk). A BaseException raised into this
    function (e.g. Celery's hard shutdown) SIGKILLs the child group and propagates.
    """
    att = _Attempt(run, db, settings, info)
    fetch_failed = _fetch_checkpoint(att)
    if fetch_failed is not None:
        return fetch_failed
    try:
        started = _start(att, command)
    except OSError as error:
        log.exception("run %s: could not start training", run.id)
        reason = FailureReason.no_space if error.errno == errno.ENOSPC else FailureReason.crashed
        return Outcome(OutcomeKind.failed, f"could not start training: {error}", reason)
    proc = started.proc
    (att.run_dir / "train.pid").write_text(f"{proc.pid}\n", encoding="utf-8")
    log.info("run %s attempt %d: training pid %d", run.id, run.attempt, proc.pid)
    train_doc = dict(run.resolved_train)
    if att.initial_dir is not None:  # the tokenizer files hashed are the fetched copy's
        train_doc["initial_checkpoint_dir"] = str(att.initial_dir)
    provenance_thread = provenance.record_later(db, run.id, train_doc, info.hardware)
    _watch(att, proc, started.beat_fd, poll_seconds)
    return _conclude(att, proc.returncode, started, provenance_thread)


def _fetch_checkpoint(att: _Attempt) -> Outcome | None:
    """With an object store, before the start: the run's newest recorded checkpoint into an
    ``out_dir`` that has none (another machine trained the earlier attempts), renewing the
    lease while it downloads (``worker.artifacts.fetch_checkpoint``); then the checkpoint that
    ``initial_checkpoint_dir`` names when its folder is not here
    (``worker.artifacts.fetch_initial_checkpoint``, into :attr:`_Attempt.initial_dir`). None
    when the attempt
    may start; else its outcome: ``lease_lost``, or a retryable ``lost_worker`` failure when
    the store or the database failed (starting from scratch would discard the run's
    progress)."""
    if att.store is None:
        return None
    store = att.store
    initial = att.run.resolved_train.get("initial_checkpoint_dir")

    def fetch() -> None:
        fetch_checkpoint(
            store,
            att.db,
            att.run_id,
            att.out_dir,
            lambda folder: bool(checkpoint_folders(folder)),
            synced_files(att.out_dir, att.run_dir),
        )
        if isinstance(initial, str):
            att.initial_dir = fetch_initial_checkpoint(store, att.db, initial, att.run_dir)
            if att.initial_dir is not None:
                _log_line(
                    att.log_path,
                    f"initial_checkpoint_dir {initial} is not on this machine: "
                    f"using its copy from the object store in {att.initial_dir}",
                )

    with ThreadPoolExecutor(1, thread_name_prefix=f"fetch-{att.run_id}") as pool:
        future = pool.submit(fetch)
        while True:
            try:
                error = future.exception(timeout=att.settings.heartbeat_seconds)
                break
            except TimeoutError:
                att.heartbeat()
    if att.lease_lost:
        return Outcome(OutcomeKind.lease_lost, "lease lost while fetching the checkpoint")
    if error is None:
        return None
    if not isinstance(error, (StoreError, SQLAlchemyError, OSError)):
        raise error
    log.error("run %s: fetching its checkpoint failed: %s", att.run_id, error)
    _log_line(att.log_path, f"fetching the run's checkpoint from the object store failed: {error}")
    return Outcome(
        OutcomeKind.failed,
        f"could not fetch the run's checkpoint from the object store: {error}",
        FailureReason.lost_worker,
    )


class _Started(NamedTuple):
    """A started training process and what the runner noted at its start."""

    proc: subprocess.Popen
    #: the write end of the heartbeat pipe (the watchdog's; closed by :func:`_watch`)
    beat_fd: int
    #: the size of train.log before this attempt's output (where its tail begins)
    log_start: int
    #: the cgroup's OOM-kill count before the start (``worker.outcome.cgroup_oom_kills``)
    oom_before: int | None


def _start(att: _Attempt, command: list[str] | None) -> _Started:
    """Write the configs and the owner file, then start the training process (module
    docstring, steps 1 and 2). Raises OSError when it cannot, with nothing left open."""
    run, info = att.run, att.info
    read_fd = beat_fd = None
    try:
        train_path, model_path = write_configs(run, att.run_dir, initial_dir=att.initial_dir)
        cmd = command or training_command(train_path, model_path, checkpoints=run.write_checkpoints)
        # The claim, where the engine can see it: it renames a checkpoint into out_dir only
        # while this file names its attempt. Then no result of an earlier attempt may pass
        # for this one's.
        contract.write_owner(att.out_dir, run.attempt, info.worker_id)
        (att.out_dir / contract.RESULT_FILE).unlink(missing_ok=True)
        _log_line(
            att.log_path, f"attempt {run.attempt} on worker {info.worker_id}: {' '.join(cmd)}"
        )
        log_start = att.log_path.stat().st_size
        oom_before = cgroup_oom_kills()
        read_fd, beat_fd = os.pipe()
        os.set_blocking(beat_fd, False)
        log_file = open(att.log_path, "ab")
        try:
            proc = subprocess.Popen(
                cmd,
                cwd=str(att.run_dir),
                stdin=subprocess.DEVNULL,
                stdout=log_file,
                stderr=subprocess.STDOUT,
                start_new_session=True,
                pass_fds=(read_fd,),
                env=training_env(att.settings, info, attempt=run.attempt, watchdog_fd=read_fd),
            )
        finally:
            log_file.close()
            os.close(read_fd)
    except OSError:
        if beat_fd is not None:
            os.close(beat_fd)
        raise
    return _Started(proc, beat_fd, log_start, oom_before)


def _watch(att: _Attempt, proc: subprocess.Popen, beat_fd: int, poll_seconds: float) -> None:
    """Until the child exits (module docstring, step 3): store its rows and checkpoints, renew
    the lease, follow the cancel flag and the worker's shutdown, with the watchdog thread
    beside. On return (or a BaseException, which SIGKILLs the child first and propagates) the
    child's group is SIGKILLed (leftover rank processes) and ``beat_fd`` is closed."""
    settings, info, log_path = att.settings, att.info, att.log_path
    grace = settings.cancel_grace_seconds
    heartbeat_every = settings.heartbeat_seconds
    watchdog_done = threading.Event()
    watchdog = threading.Thread(
        target=_watchdog,
        args=(proc, att, log_path, watchdog_done, beat_fd),
        name=f"lease-watchdog-{att.run_id}",
        daemon=True,
    )
    watchdog.start()
    next_heartbeat = time.monotonic() + heartbeat_every
    next_cancel_check = time.monotonic()
    stop_reason = ""
    try:
        while proc.poll() is None:
            now = time.monotonic()
            att.ingest()
            if att.sync is not None and not att.lease_lost:
                att.sync.tick(now)
            if now >= next_heartbeat:
                att.heartbeat()
                next_heartbeat = now + heartbeat_every
            if now >= next_cancel_check:
                att.check_cancel()
                next_cancel_check = now + min(1.0, heartbeat_every)
            if att.lease_lost and not att.killed:
                _log_line(log_path, "lease lost: another attempt owns the run; killing training")
                _signal_group(proc, signal.SIGKILL)
                att.killed = True
            elif att.stop_sent_at is None and (att.cancel_requested or info.shutdown.is_set()):
                stop_reason = "cancel requested" if att.cancel_requested else "worker shutting down"
                _log_line(log_path, f"{stop_reason}: SIGTERM to the training process")
                _signal_group(proc, signal.SIGTERM)
                att.stop_sent_at = now
            elif att.stop_sent_at is not None and not att.killed and now - att.stop_sent_at > grace:
                _log_line(log_path, f"{stop_reason}: no exit after {grace:.0f} s: SIGKILL")
                _signal_group(proc, signal.SIGKILL)
                att.killed = True
            time.sleep(poll_seconds)
    except BaseException:
        _signal_group(proc, signal.SIGKILL)
        proc.wait()
        raise
    finally:
        watchdog_done.set()
        _signal_group(proc, signal.SIGKILL)  # leftovers of the group (rank processes)
        watchdog.join(timeout=5)
        os.close(beat_fd)


def _conclude(
    att: _Attempt, returncode: int, started: _Started, provenance_thread: threading.Thread
) -> Outcome:
    """After the exit (module docstring, step 4): the last rows and the final checkpoint, the
    classification, and the attempt's trailer line in train.log."""
    run, info = att.run, att.info
    att.ingest()  # the last rows and the final checkpoint
    if att.checkpoints.store is not None:
        if not att.lease_lost:  # the uploads in flight and left, then their records
            before = dict(att.checkpoints.recorded)
            att.checkpoints.drain(att._write, att.heartbeat)
            folders = checkpoint_folders(att.out_dir)
            att.to_sample += [
                path
                for name, path in folders
                if name in att.checkpoints.recorded
                and att.checkpoints.recorded[name] != before.get(name)
            ]
            att.checkpoints.prune(folders)
        att.checkpoints.close()
    att.sample(last=True)  # after the last records: the final checkpoint's samples too
    if not att.lease_lost:
        att.check_cancel()
    provenance_thread.join(timeout=30)
    oom_after = cgroup_oom_kills()
    oom_before = started.oom_before
    result = EngineResult.read(att.out_dir)
    if result is not None and result.attempt not in (None, run.attempt):
        result = None  # not this attempt's (cannot happen while the owner file is respected)
    outcome = classify_exit(
        returncode,
        result,
        _read_tail(att.log_path, started.log_start),
        cancel_requested=att.cancel_requested,
        shutting_down=info.shutdown.is_set() or att.self_fenced,
        lease_lost=att.lease_lost,
        oom_killed=oom_before is not None and oom_after is not None and oom_after > oom_before,
    )
    if att.self_fenced and outcome.kind == OutcomeKind.requeue and not info.shutdown.is_set():
        outcome = Outcome(
            OutcomeKind.requeue,
            "graceful stop: database unreachable, training stopped to keep the lease safe",
            exit_code=returncode,
        )
    if att.metrics.pending and outcome.kind != OutcomeKind.lease_lost:
        log.warning("run %s: %d metric rows could not be stored", run.id, len(att.metrics.pending))
    _log_line(
        att.log_path,
        f"exit code {returncode}: {outcome.kind}"
        + (f" ({outcome.reason.value})" if outcome.reason else "")
        + f": {outcome.message}",
    )
    if att.sync is not None:  # the files as they end, the trailer line included
        if att.lease_lost:
            att.sync.close()
        else:
            att.sync.finish()
    return outcome


# -- the training process ---------------------------------------------------------------------


def training_command(train_path: Path, model_path: Path, *, checkpoints: bool) -> list[str]:
    """The engine's command line (``python -m worker.entry``, the thin entry that installs the
    signal handlers and the fence before the engine loads) for two resolved config files."""
    cmd = [
        sys.executable,
        "-m",
        "worker.entry",
        "--train-config",
        str(train_path),
        "--model-config",
        str(model_path),
    ]
    if not checkpoints:
        cmd.append("--no-checkpoints")
    return cmd


def training_env(
    settings: Settings,
    info: WorkerInfo,
    *,
    attempt: int | None = None,
    watchdog_fd: int | None = None,
) -> dict[str, str]:
    """Environment of the training process: this process's, ``settings.to_env()`` (the
    trainer deadline, checkpoint-write allowance and engine among them), the repository on
    PYTHONPATH, unbuffered output, the parent-death marker, the worker's GPUs in
    CUDA_VISIBLE_DEVICES when it owns a subset, and the contract's attempt and heartbeat-pipe
    variables when given. Not the webhook secret and URLs: the training sends nothing."""
    env = dict(os.environ)
    for name in (contract.ENV_ATTEMPT, contract.ENV_WATCHDOG_FD):
        env.pop(name, None)
    env.update(settings.to_env())
    for name in ("MOEJOBS_WEBHOOK_SECRET", "MOEJOBS_WEBHOOK_URLS"):  # the workers send them
        env.pop(name, None)
    if attempt is not None:
        env[contract.ENV_ATTEMPT] = str(attempt)
    if watchdog_fd is not None:
        env[contract.ENV_WATCHDOG_FD] = str(watchdog_fd)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO_ROOT), env.get("PYTHONPATH", "")) if p)
    env["PYTHONUNBUFFERED"] = "1"
    env[PARENT_ENV] = str(os.getpid())
    if info.cuda_visible_devices is not None:
        env["CUDA_VISIBLE_DEVICES"] = info.cuda_visible_devices
    return env


def write_configs(run: Run, run_dir: Path, *, initial_dir: Path | None = None) -> tuple[Path, Path]:
    """Write ``run_dir/train_config.yaml`` and ``run_dir/model_config.yaml`` from the run's
    resolved configs. From the second attempt on, ``resume`` becomes ``"auto"`` when the
    output folder holds a checkpoint of an earlier attempt (continue it rather than refuse to
    overwrite it, or restart from an older explicit checkpoint). ``initial_dir``: the local
    copy of ``initial_checkpoint_dir`` fetched from the object store, named instead."""
    run_dir.mkdir(parents=True, exist_ok=True)
    train_doc = dict(run.resolved_train)
    if initial_dir is not None:
        train_doc["initial_checkpoint_dir"] = str(initial_dir)
    out_dir = train_doc.get("out_dir")
    if run.attempt > 1 and out_dir and checkpoint_folders(Path(out_dir)):
        train_doc["resume"] = "auto"
    paths = (run_dir / "train_config.yaml", run_dir / "model_config.yaml")
    for path, doc in zip(paths, (train_doc, run.resolved_model), strict=True):
        tmp = path.with_name(f".{path.name}.tmp")
        tmp.write_text(yaml.safe_dump(doc, sort_keys=False), encoding="utf-8")
        os.replace(tmp, path)
    return paths


# -- the attempt's state and its database writes -----------------------------------------------


class _Attempt:
    """State of one attempt while the child runs (see :func:`execute_attempt`)."""

    def __init__(self, run: Run, db: Database, settings: Settings, info: WorkerInfo) -> None:
        self.run, self.db, self.settings, self.info = run, db, settings, info
        self.run_id, self.attempt = run.id, run.attempt
        self.run_dir = settings.run_dir(run.id)
        self.log_path = self.run_dir / "train.log"
        self.out_dir = Path(run.resolved_train.get("out_dir") or self.run_dir / "out")
        self.metrics = metrics_ingest(self.out_dir, run.id, run.attempt)
        self.router = router_ingest(self.out_dir, run.id, run.attempt)
        self.store = artifacts.store_for(settings)
        self.sync = (
            None
            if self.store is None
            else FileSync(
                self.store,
                run.id,
                synced_files(self.out_dir, self.run_dir),
                every=settings.artifact_sync_seconds,
            )
        )
        self.checkpoints = Checkpoints(
            db,
            self.out_dir,
            run.id,
            run.attempt,
            settings.keep_checkpoints,
            store=self.store,
            fenced_out=self.fenced_out,
        )
        self.lease_lost = False
        self.cancel_requested = False
        self.stop_sent_at: float | None = None
        self.killed = False
        self.last_heartbeat_ok = time.monotonic()
        self.self_fenced = False  # the watchdog stopped the training (no heartbeat)
        self.to_sample: list[Path] = []  # recorded checkpoints waiting for their samples
        #: the fetched copy of initial_checkpoint_dir (``worker.artifacts``), None: not fetched
        self.initial_dir: Path | None = None
        self.sampler: subprocess.Popen[bytes] | None = None

    def ingest(self) -> None:
        """Metric rows, router rows and checkpoint folders that appeared since the last call
        (``worker.ingest``, ``worker.retention``); then the step folders past
        ``keep_checkpoints`` are removed, unless the lease is lost."""
        self.metrics.ingest(self._write)
        self.router.ingest(self._write)
        before = dict(self.checkpoints.recorded)
        folders = self.checkpoints.record(self._write)
        for name, path in folders:
            if name in self.checkpoints.recorded and self.checkpoints.recorded[name] != before.get(
                name
            ):
                self.to_sample.append(path)
        self.sample(last=False)
        if not self.lease_lost:
            self.checkpoints.prune(folders)

    def sample(self, *, last: bool) -> None:
        """Start one sampler (``worker.sample``, off the training path; output in
        ``RUN_DIR/samples.log``) for the newly recorded checkpoints waiting in
        :attr:`to_sample`, unless this attempt's previous sampler still runs: so one at a time,
        each taking every folder that waited. ``last`` (the attempt is over): start it anyway,
        nothing would start it later. A failure to start is logged only."""
        if not self.to_sample:
            return
        if self.settings.engine == "stub":  # its checkpoints hold no model to sample
            self.to_sample = []
            return
        if not last and self.sampler is not None and self.sampler.poll() is None:
            return
        folders, self.to_sample = self.to_sample, []
        try:
            self.sampler = sample.start_sampler(
                folders,
                self.settings.sample_prompt_list,
                self.settings.sample_max_new_tokens,
                self.run_dir / "samples.log",
            )
        except OSError as error:
            log.warning("run %s: the sampler of %s did not start: %s", self.run_id, folders, error)

    def heartbeat(self) -> None:
        def beat(session):
            return runs.heartbeat_run(
                session, self.run_id, self.info.worker_id, self.attempt, self.settings.lease_seconds
            )

        # The lease runs from the moment the renewal was asked for, not from its answer: a
        # slow database must not make the watchdog vouch for longer than the lease lasts.
        asked = time.monotonic()
        result = self._write("heartbeat", beat)
        if result is not None:
            self.last_heartbeat_ok = max(self.last_heartbeat_ok, asked)
            self.cancel_requested = self.cancel_requested or bool(result.cancel_requested)

    def fenced_out(self) -> bool:
        """Whether this attempt may no longer write the run's artifacts, read from the database
        now (before an upload): the run is not running or another attempt holds it (then
        ``lease_lost``), or the database cannot tell (True: not now; asked again later)."""
        if self.lease_lost:
            return True
        try:
            with self.db.session() as session:
                run = reads.get_run(session, self.run_id)
        except (SQLAlchemyError, reads.RunNotFound) as error:
            log.warning("run %s: reading the fence failed: %s", self.run_id, error)
            return True
        if run.status != RunStatus.running or run.attempt != self.attempt:
            self.lease_lost = True
        return self.lease_lost

    def check_cancel(self) -> None:
        if self.cancel_requested or self.lease_lost:
            return
        try:
            with self.db.session() as session:
                run = reads.get_run(session, self.run_id)
        except (SQLAlchemyError, reads.RunNotFound) as error:
            log.warning("run %s: reading the cancel flag failed: %s", self.run_id, error)
            return
        if run.status != RunStatus.running or run.attempt != self.attempt:
            self.lease_lost = True
        elif run.cancel_requested:
            self.cancel_requested = True

    def _write(self, what: str, fn: Callable[[Any], Any]) -> Any:
        """``fn(session)`` in a transaction, tolerant of a database hiccup: None when the lease
        is lost (then or before) or the database failed (retried on the next poll)."""
        if self.lease_lost:
            return None
        try:
            with self.db.session() as session:
                return fn(session)
        except runs.LeaseLost:
            log.warning("run %s attempt %d: lease lost (%s)", self.run_id, self.attempt, what)
            self.lease_lost = True
        except SQLAlchemyError as error:
            log.warning(
                "run %s: %s failed, retrying later: %s",
                self.run_id,
                what,
                str(error).splitlines()[0],
            )
        return None


# -- the lease watchdog and small helpers ------------------------------------------------------


def _watchdog(
    proc: subprocess.Popen,
    att: _Attempt,
    log_path: Path,
    done: threading.Event,
    beat_fd: int | None,
) -> None:
    """Vouch for the lease to the training process and stop it when the lease is at risk
    (module docstring). While the last successful renewal is younger than
    ``settings.vouch_seconds`` a byte goes to the heartbeat pipe every poll; past that (the
    database does not answer) the training gets SIGTERM (a checkpoint and exit 75, then its
    own deadline fences it); after ``lease_seconds - heartbeat_seconds`` SIGKILL, before the
    lease can expire and the run be handed to another attempt that would write the same
    folder."""
    settings = att.settings
    vouch = settings.vouch_seconds
    kill_after = settings.lease_seconds - settings.heartbeat_seconds
    poll = max(0.05, min(0.5, (settings.trainer_deadline_seconds or 30.0) / 4))
    terminated = killed = False
    pipe_open = beat_fd is not None
    while proc.poll() is None:
        silent = time.monotonic() - att.last_heartbeat_ok
        if pipe_open and beat_fd is not None and silent < vouch and not att.lease_lost:
            pipe_open = _beat(beat_fd)
        elif silent >= vouch and not terminated and not att.lease_lost:
            terminated = att.self_fenced = True
            log.error(
                "run %s: lease not renewed for %.0f s: stopping the training", att.run_id, silent
            )
            _log_line(
                log_path,
                f"lease not renewed for {silent:.0f} s (database unreachable?): "
                "SIGTERM to the training process",
            )
            _signal_group(proc, signal.SIGTERM)
        if silent > kill_after and not killed:
            killed = True
            _log_line(
                log_path, f"lease not renewed for {silent:.0f} s: SIGKILL before the lease expires"
            )
            _signal_group(proc, signal.SIGKILL)
        if done.wait(poll):
            return


def _beat(fd: int) -> bool:
    """Write one heartbeat byte; False when the training process is gone (broken pipe). A full
    pipe (the child reads none) counts as written: it has bytes to read."""
    try:
        os.write(fd, b".")
    except BlockingIOError:
        pass
    except OSError:
        return False
    return True


def _signal_group(proc: subprocess.Popen, sig: int) -> None:
    """Send ``sig`` to the child's process group (its own session: pgid == pid)."""
    try:
        os.killpg(proc.pid, sig)
    except (ProcessLookupError, PermissionError):
        pass


def _log_line(log_path: Path, text: str) -> None:
    with open(log_path, "a", encoding="utf-8") as fh:
        fh.write(f"[moejobs] {_utc().isoformat(timespec='seconds')} {text}\n")


def _read_tail(path: Path, start: int) -> list[str]:
    """The lines of ``path`` after byte ``start`` (at most the last 64 KiB)."""
    try:
        with open(path, "rb") as fh:
            size = os.fstat(fh.fileno()).st_size
            fh.seek(max(start, size - _LOG_TAIL_BYTES))
            return fh.read().decode("utf-8", "replace").splitlines()
    except OSError:
        return []


def _utc() -> datetime:
    return datetime.now(UTC)
