"""Run one claimed attempt of a run: the training subprocess and everything the worker does
while it lives. No Celery in here (``worker.tasks`` is the thin Celery layer around it).

What :func:`execute_attempt` does for a run that :func:`service.runs.claim_run` just gave us:

1. writes the run's resolved configs to ``RUN_DIR/train_config.yaml`` and
   ``RUN_DIR/model_config.yaml`` (``RUN_DIR = settings.run_dir(run.id)``);
2. records the claim in ``out_dir/.owner.json`` (``service.contract.write_owner``), removes
   a stale ``out_dir/result.json``, and starts ``python -m worker.entry --train-config ...
   --model-config ... [--no-checkpoints]`` in its own session/process group, environment =
   this process's plus ``settings.to_env()``, the attempt (``MOEJOBS_ATTEMPT``) and the read
   end of a heartbeat pipe (``MOEJOBS_WATCHDOG_FD``); stdout and stderr go to
   ``RUN_DIR/train.log`` (the run's log; each attempt appends a ``[moejobs]`` header and
   trailer line). The child gets a parent-death signal (``worker.launch.die_with_parent``,
   Linux ``PR_SET_PDEATHSIG``). Its pid is in ``RUN_DIR/train.pid``;
3. until the child exits, every ``POLL_SECONDS``: tails ``out_dir/metrics.csv`` (complete lines
   only) into metric rows and ``out_dir/router.csv`` (when the engine writes one) into router
   rows, records each complete checkpoint folder (``step-XXXXXXXX``/``final``: the engine
   renames them into place when complete), applies ``settings.keep_checkpoints``, renews the
   run's lease every ``settings.heartbeat_seconds`` and watches ``cancel_requested`` and the
   worker's shutdown flag (SIGTERM to the process group; SIGKILL after
   ``settings.cancel_grace_seconds``). Provenance is recorded once, from a helper thread (the
   data hash reads every input file);
4. after the exit: a last drain of metrics and checkpoints, then :func:`classify_exit` from
   the engine's ``result.json`` and the exit code (``service.contract``; never from log text).

The outcome is written by :func:`finish_attempt`, the only place that maps an outcome to
``service.runs``' status functions (``transition`` / ``retry_or_fail``).

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

import csv
import errno
import hashlib
import io
import logging
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import yaml
from sqlalchemy.exc import SQLAlchemyError

from service import contract, reads, runs
from service.contract import EngineResult, ExitCode, FailureReason
from service.db import Database
from service.models import METRIC_COLUMNS, Run, RunStatus
from service.settings import Settings

log = logging.getLogger("moejobs.runner")

#: Repository root (holds the ``worker`` package); put on the child's PYTHONPATH.
REPO_ROOT = Path(__file__).resolve().parents[1]

#: How often the runner loop looks at the child, the files and the cancel flag, in seconds.
POLL_SECONDS = 0.5


#: Environment variable that makes ``worker.launch.die_with_parent`` arm PR_SET_PDEATHSIG in
#: the training process (value: the pid of its parent, this worker).
PARENT_ENV = "MOEJOBS_RANK_PARENT"

_LOG_TAIL_BYTES = 64 * 1024

#: Exit codes that mean "stopped on a signal": the engine's own (a checkpoint at a step
#: boundary, or before training started) and the shell's 128 + N.
_STOPPED = frozenset(
    {ExitCode.INTERRUPTED, ExitCode.SIGINT_BEFORE_START, ExitCode.SIGTERM_BEFORE_START}
)


# -- outcome ------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Outcome:
    """How an attempt ended, before it is written.

    ``kind``:
      - ``"succeeded"`` / ``"cancelled"``: that terminal status;
      - ``"failed"``: failed with ``reason`` (``killed`` goes through ``retry_or_fail``: it is
        re-queued while attempts remain);
      - ``"requeue"``: the worker is shutting down; the run goes back to queued and resumes
        from its latest checkpoint on the next claim;
      - ``"lease_lost"``: another attempt owns the run; nothing may be written.
    ``message`` is a one-line human reason; ``exit_code`` the child's return code (negative:
    killed by that signal), None when it never started.
    """

    kind: str
    message: str
    reason: FailureReason | None = None
    exit_code: int | None = None

    @property
    def status(self) -> RunStatus | None:
        """The status this outcome asks for (queued for a requeue; None when lease lost).
        ``killed`` may still end in queued: see :func:`finish_attempt`."""
        return {
            "succeeded": RunStatus.succeeded,
            "cancelled": RunStatus.cancelled,
            "failed": RunStatus.failed,
            "requeue": RunStatus.queued,
        }.get(self.kind)


def _signal_of(returncode: int) -> int | None:
    """The signal that ended a process: ``-N`` from ``subprocess`` or ``128 + N`` from a shell."""
    if returncode < 0:
        return -returncode
    if 128 < returncode < 128 + 65:
        return returncode - 128
    return None


def _signal_name(number: int) -> str:
    try:
        return signal.Signals(number).name
    except ValueError:
        return f"signal {number}"


def _last_line(lines: list[str]) -> str:
    for line in reversed(lines):
        if line.strip() and not line.startswith("[moejobs]"):
            return line.strip()
    return ""


def classify_exit(
    returncode: int,
    result: EngineResult | None,
    log_lines: list[str],
    *,
    cancel_requested: bool = False,
    shutting_down: bool = False,
    lease_lost: bool = False,
    oom_killed: bool = False,
) -> Outcome:
    """Classify the end of a training process from the contract (``service.contract``).

    Args:
        returncode: ``Popen.returncode`` (negative = killed by that signal; ``128 + N`` is
            read as signal N too).
        result: the engine's ``out_dir/result.json`` of this attempt, None when it wrote none
            (killed, fenced, or died before it could).
        log_lines: the last lines of this attempt's output, oldest first; only the last
            non-empty one is used, as the message when there is no result.
        cancel_requested: the run's cancel flag was set (we sent SIGTERM, maybe SIGKILL).
        shutting_down: the worker is stopping, or stopped the training because the database
            did not answer (we sent SIGTERM to let it checkpoint).
        lease_lost: another attempt owns the run (we SIGKILLed the child).
        oom_killed: the kernel's OOM killer killed a process of our cgroup meanwhile.

    Rules, first match wins: lease lost -> ``lease_lost``; exit 0 -> succeeded; cancel
    requested -> cancelled; shutting down and stopped (75, 130, 143 or a signal) ->
    ``requeue`` (a graceful stop, no failure); exit 76 (the trainer fenced itself: its worker
    went silent) -> failed ``lost_worker`` (retried); a result with outcome failed -> its
    reason and message (``invalid_config``, ``invalid_data``, ``out_of_memory``,
    ``no_space``, ``crashed``); exit 2 -> ``invalid_config``; exit 1 -> ``crashed``; a signal
    -> ``out_of_memory`` when the OOM killer acted, else ``killed`` (retried); 75/130/143
    without a stop of ours -> ``killed``; anything else -> ``crashed``.
    """
    last = _last_line(log_lines)
    if lease_lost:
        return Outcome("lease_lost", "another attempt owns the run", exit_code=returncode)
    if returncode == ExitCode.OK:
        text = result.message if result is not None and result.message else "training finished"
        return Outcome("succeeded", text, exit_code=returncode)
    sig = _signal_of(returncode)
    if cancel_requested:
        how = f" ({_signal_name(sig)})" if sig and returncode not in _STOPPED else ""
        return Outcome("cancelled", f"training stopped on request{how}", exit_code=returncode)
    if shutting_down and (returncode in _STOPPED or sig is not None):
        if returncode == ExitCode.INTERRUPTED:
            where = (
                f" ({result.checkpoint}, step {result.steps})"
                if result is not None and result.checkpoint
                else ""
            )
            text = f"graceful stop: worker shutting down, training checkpointed{where}"
        elif returncode in _STOPPED:
            text = "graceful stop: worker shutting down before training started"
        else:
            text = f"worker shutting down: training stopped by {_signal_name(sig or 0)}"
        return Outcome("requeue", text, exit_code=returncode)
    if returncode == ExitCode.FENCED:
        return Outcome(
            "failed",
            "the training stopped itself: " + (last or "its worker went silent"),
            FailureReason.lost_worker,
            returncode,
        )
    if result is not None and result.outcome == contract.Outcome.failed and result.reason:
        return Outcome(
            "failed", result.message or last or result.reason.value, result.reason, returncode
        )
    if returncode == ExitCode.INVALID_CONFIG:
        return Outcome(
            "failed",
            (result.message if result else "") or last or "invalid config",
            FailureReason.invalid_config,
            returncode,
        )
    if returncode == ExitCode.FAILED:
        return Outcome(
            "failed", last or "training exited with code 1", FailureReason.crashed, returncode
        )
    if sig is not None and returncode not in _STOPPED:
        if oom_killed:
            return Outcome(
                "failed",
                f"killed by {_signal_name(sig)}: out of memory (OOM killer)",
                FailureReason.out_of_memory,
                returncode,
            )
        return Outcome(
            "failed",
            f"training process killed by {_signal_name(sig)}",
            FailureReason.killed,
            returncode,
        )
    if returncode in _STOPPED:
        return Outcome(
            "failed",
            f"training stopped by {_signal_name(sig or signal.SIGTERM)} from outside the worker",
            FailureReason.killed,
            returncode,
        )
    return Outcome(
        "failed",
        last or f"training exited with code {returncode}",
        FailureReason.crashed,
        returncode,
    )


def finish_attempt(
    db: Database,
    run_id: uuid.UUID,
    attempt: int,
    outcome: Outcome,
    *,
    settings: Settings,
    worker_id: str,
) -> Run | None:
    """Write ``outcome`` for ``attempt`` of the run: the one place where an attempt's end
    becomes a status, through ``service.runs`` (which writes the event row).

    succeeded / cancelled / failed (permanent reasons) -> ``runs.transition``; failed
    ``killed`` -> ``runs.retry_or_fail`` (queued again while fewer than
    ``settings.max_attempts`` attempts were made); requeue (worker shutdown) ->
    ``runs.transition`` to queued (cancelled instead when a cancel was requested meanwhile);
    lease lost -> nothing. A run that is no longer this attempt's (LeaseLost) is left alone.

    Returns the updated run (the caller enqueues it again when it is queued), or None when
    nothing was written. Database errors propagate.
    """
    if outcome.kind == "lease_lost":
        return None
    actor = f"worker:{worker_id}"
    with db.session() as session:
        try:
            if outcome.kind == "failed" and outcome.reason in runs.RETRYABLE_REASONS:
                return runs.retry_or_fail(
                    session,
                    run_id,
                    outcome.reason,
                    outcome.message,
                    max_attempts=settings.max_attempts,
                    attempt=attempt,
                    actor=actor,
                    exit_code=outcome.exit_code,
                )
            if outcome.kind == "requeue":
                try:
                    return runs.transition(
                        session,
                        run_id,
                        RunStatus.queued,
                        outcome.message,
                        exit_code=outcome.exit_code,
                        attempt=attempt,
                        actor=actor,
                    )
                except runs.InvalidTransition:  # a cancel request came in meanwhile
                    return runs.transition(
                        session,
                        run_id,
                        RunStatus.cancelled,
                        "cancelled while the worker was shutting down",
                        exit_code=outcome.exit_code,
                        attempt=attempt,
                        actor=actor,
                    )
            status = outcome.status
            assert status is not None
            return runs.transition(
                session,
                run_id,
                status,
                outcome.message,
                reason=outcome.reason,
                exit_code=outcome.exit_code,
                attempt=attempt,
                actor=actor,
            )
        except runs.LeaseLost:
            log.warning(
                "run %s attempt %d: lease lost before the outcome (%s) was written",
                run_id,
                attempt,
                outcome.kind,
            )
            return None


# -- files --------------------------------------------------------------------------------------


class CsvTail:
    """Reads the rows appended to a CSV file since the last call, complete lines only.

    The first line is the header. A file that was replaced (other inode, e.g. the engine
    rewrote metrics.csv when resuming) or truncated is read again from the start; callers'
    inserts are idempotent, so rows read twice do no harm. After a :meth:`read` that began a
    file (it read the header), :attr:`rewound` is True: the rows returned are then the whole
    file so far, and a caller can drop what it stored past them."""

    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        self.rewound = False
        self._reset(None)

    def _reset(self, inode: int | None) -> None:
        self._inode, self._offset, self._header, self._partial = inode, 0, None, b""

    def read(self) -> list[dict[str, str]]:
        """New complete rows as dicts keyed by the header (empty list when none or no file)."""
        try:
            fh = open(self.path, "rb")
        except FileNotFoundError:
            return []
        with fh:
            stat = os.fstat(fh.fileno())
            if stat.st_ino != self._inode or stat.st_size < self._offset:
                self._reset(stat.st_ino)
            fh.seek(self._offset)
            data = fh.read()
        self._offset += len(data)
        lines = (self._partial + data).split(b"\n")
        self._partial = lines.pop()  # b"" after a final newline, else an unfinished line
        rows: list[dict[str, str]] = []
        self.rewound = False
        for record in csv.reader(io.StringIO(b"\n".join(lines).decode("utf-8", "replace"))):
            if not record:
                continue
            if self._header is None:
                self._header = [name.strip() for name in record]
                self.rewound = True
                continue
            if len(record) == len(self._header):
                rows.append(dict(zip(self._header, record)))
        return rows


def _last_step(rows: list[dict[str, str]]) -> int:
    """The largest integer ``step`` among CSV rows (0 when there is none)."""
    steps = [int(r["step"]) for r in rows if (r.get("step") or "").strip().isdigit()]
    return max(steps, default=0)


def folder_size(path: Path) -> int:
    """Total size in bytes of the regular files under ``path``."""
    total = 0
    for root, _dirs, files in os.walk(path):
        for name in files:
            try:
                total += os.lstat(os.path.join(root, name)).st_size
            except OSError:
                pass
    return total


def checkpoint_folders(out_dir: Path) -> list[tuple[str, Path]]:
    """Complete checkpoint folders in ``out_dir`` as ``(name, path)``: ``step-XXXXXXXX`` by
    step, then ``final``. The engine writes a folder under a temporary name and renames it,
    so these names only ever denote complete folders."""
    found: list[tuple[int, str, Path]] = []
    try:
        entries = list(os.scandir(out_dir))
    except (FileNotFoundError, NotADirectoryError):
        return []
    for entry in entries:
        if not entry.is_dir(follow_symlinks=False):
            continue
        step = contract.checkpoint_step(entry.name)
        if step is not None:
            found.append((step, entry.name, Path(entry.path)))
        elif entry.name == "final":
            found.append((sys.maxsize, entry.name, Path(entry.path)))
    return [(name, path) for _, name, path in sorted(found)]


def _final_step(path: Path) -> int | None:
    import json

    try:
        return int(json.loads((path / "training_state.json").read_text(encoding="utf-8"))["step"])
    except (OSError, ValueError, KeyError, TypeError):
        return None


def hash_files(folders: Iterable[Path | str | None], pattern: str = "*.txt") -> str | None:
    """sha256 hex over the files matching ``pattern`` at the top level of each folder (file
    names and bytes, sorted by name); None when no folder exists."""
    digest = hashlib.sha256()
    seen = False
    for folder in folders:
        if not folder or not Path(folder).is_dir():
            continue
        seen = True
        for path in sorted(Path(folder).glob(pattern)):
            if not path.is_file():
                continue
            digest.update(path.name.encode() + b"\0")
            with open(path, "rb") as fh:
                for chunk in iter(lambda: fh.read(1 << 20), b""):
                    digest.update(chunk)
            digest.update(b"\0")
    return digest.hexdigest() if seen else None


def _git_commit() -> str | None:
    if not (REPO_ROOT / ".git").exists():
        return None
    try:
        out = subprocess.run(
            ["git", "-C", str(REPO_ROOT), "rev-parse", "HEAD"],
            capture_output=True,
            text=True,
            timeout=10,
        )
    except (OSError, subprocess.SubprocessError):
        return None
    commit = out.stdout.strip()
    return (
        commit
        if out.returncode == 0 and len(commit) == 40 and set(commit) <= set("0123456789abcdef")
        else None
    )


def _package_versions() -> dict[str, str]:
    from importlib import metadata

    versions = {"python": sys.version.split()[0]}
    for name in (
        "moejobs",
        "torch",
        "litgpt",
        "lightning",
        "litdata",
        "tokenizers",
        "numpy",
        "celery",
        "sqlalchemy",
    ):
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            pass
    return versions


def provenance(train_doc: dict[str, Any], hardware: dict[str, Any]) -> dict[str, Any]:
    """Keyword arguments for ``runs.record_provenance`` from a resolved train config: package
    versions, git commit of this code (None outside a git checkout), seed, ``hardware`` as
    given, sha256 of the training and validation text files and of the tokenizer files
    (``worker.tokenizer.tokenizer_hash``)."""
    from worker.tokenizer import tokenizer_hash

    args = (train_doc.get("data") or {}).get("init_args") or {}
    tokenizer_dir = train_doc.get("tokenizer_dir") or train_doc.get("initial_checkpoint_dir")
    return {
        "package_versions": _package_versions(),
        "git_commit": _git_commit(),
        "seed": train_doc.get("seed"),
        "hardware": hardware,
        "data_hash": hash_files([args.get("train_data_path"), args.get("val_data_path")]),
        "tokenizer_hash": (
            tokenizer_hash(Path(tokenizer_dir))
            if tokenizer_dir and Path(tokenizer_dir).is_dir()
            else None
        ),
    }


def _read_tail(path: Path, start: int) -> list[str]:
    """The lines of ``path`` after byte ``start`` (at most the last 64 KiB)."""
    try:
        with open(path, "rb") as fh:
            size = os.fstat(fh.fileno()).st_size
            fh.seek(max(start, size - _LOG_TAIL_BYTES))
            return fh.read().decode("utf-8", "replace").splitlines()
    except OSError:
        return []


def _cgroup_oom_kills() -> int | None:
    """The kernel's OOM-kill count for this process's cgroup (v2 ``memory.events``, v1
    ``memory.oom_control``), None when unreadable."""
    try:
        lines = Path("/proc/self/cgroup").read_text().splitlines()
    except OSError:
        return None
    candidates = []
    for line in lines:
        parts = line.split(":", 2)
        if len(parts) != 3:
            continue
        if parts[0] == "0":
            candidates.append(Path("/sys/fs/cgroup") / parts[2].lstrip("/") / "memory.events")
        elif "memory" in parts[1].split(","):
            candidates.append(
                Path("/sys/fs/cgroup/memory") / parts[2].lstrip("/") / "memory.oom_control"
            )
    for path in candidates:
        try:
            for line in path.read_text().splitlines():
                key, _, value = line.partition(" ")
                if key == "oom_kill":
                    return int(value)
        except (OSError, ValueError):
            continue
    return None


# -- the attempt --------------------------------------------------------------------------------


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


def _utc() -> datetime:
    return datetime.now(UTC)


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
    variables when given."""
    env = dict(os.environ)
    for name in (contract.ENV_ATTEMPT, contract.ENV_WATCHDOG_FD):
        env.pop(name, None)
    env.update(settings.to_env())
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


def write_configs(run: Run, run_dir: Path) -> tuple[Path, Path]:
    """Write ``run_dir/train_config.yaml`` and ``run_dir/model_config.yaml`` from the run's
    resolved configs. From the second attempt on, ``resume`` becomes ``"auto"`` when the
    output folder holds a checkpoint of an earlier attempt (continue it rather than refuse to
    overwrite it, or restart from an older explicit checkpoint)."""
    run_dir.mkdir(parents=True, exist_ok=True)
    train_doc = dict(run.resolved_train)
    out_dir = train_doc.get("out_dir")
    if run.attempt > 1 and out_dir and checkpoint_folders(Path(out_dir)):
        train_doc["resume"] = "auto"
    paths = (run_dir / "train_config.yaml", run_dir / "model_config.yaml")
    for path, doc in zip(paths, (train_doc, run.resolved_model)):
        tmp = path.with_name(f".{path.name}.tmp")
        tmp.write_text(yaml.safe_dump(doc, sort_keys=False), encoding="utf-8")
        os.replace(tmp, path)
    return paths


class _Attempt:
    """State of one attempt while the child runs (see :func:`execute_attempt`)."""

    def __init__(self, run: Run, db: Database, settings: Settings, info: WorkerInfo) -> None:
        self.run, self.db, self.settings, self.info = run, db, settings, info
        self.run_id, self.attempt = run.id, run.attempt
        self.run_dir = settings.run_dir(run.id)
        self.out_dir = Path(run.resolved_train.get("out_dir") or self.run_dir / "out")
        self.metrics = CsvTail(self.out_dir / "metrics.csv")
        self.router = CsvTail(self.out_dir / "router.csv")
        self.pending_metrics: list[dict[str, str]] = []
        self.pending_router: list[dict[str, str]] = []
        # the last step of a rewritten metrics.csv / router.csv, until stored rows past it
        # are deleted (a resumed attempt re-trains those steps)
        self.metrics_keep_through: int | None = None
        self.router_keep_through: int | None = None
        self.recorded: dict[str, int] = {}  # checkpoint name -> folder mtime (ns) recorded
        self.lease_lost = False
        self.cancel_requested = False
        self.stop_sent_at: float | None = None
        self.killed = False
        self.last_heartbeat_ok = time.monotonic()
        self.self_fenced = False  # the watchdog stopped the training (no heartbeat)
        self._warned_columns: set[str] = set()

    # -- database writes, tolerant of a database hiccup (retried on the next poll) ------------

    def _write(self, what: str, fn: Callable[[Any], Any]) -> Any:
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

    def ingest(self) -> None:
        """Metric rows, router rows and checkpoint folders that appeared since the last call.

        When the engine rewrote metrics.csv or router.csv (a resumed attempt keeps the rows up
        to its checkpoint and re-trains the rest), rows still pending from the old file are
        dropped and the database's rows past the new file's last step are deleted with the
        next write, so the database always mirrors the files (last write of a step wins)."""
        rows = self.metrics.read()
        if self.metrics.rewound:
            self.pending_metrics = []
            self.metrics_keep_through = _last_step(rows)
        for row in rows:
            unknown = set(row) - {"step", *METRIC_COLUMNS}
            if unknown - self._warned_columns:
                log.warning("metrics.csv columns ignored: %s", sorted(unknown))
                self._warned_columns |= unknown
            if row.get("step", "").strip():
                self.pending_metrics.append({k: v for k, v in row.items() if k not in unknown})
        if self.pending_metrics or self.metrics_keep_through is not None:
            rows, keep = self.pending_metrics, self.metrics_keep_through
            try:
                done = self._write(
                    "metrics",
                    lambda s: runs.record_metrics(
                        s, self.run_id, rows, attempt=self.attempt, keep_through=keep
                    ),
                )
            except ValueError as error:  # a malformed row: skip the batch, keep training
                log.warning("run %s: metric rows skipped: %s", self.run_id, error)
                done = 0
            if done is not None:
                self.pending_metrics, self.metrics_keep_through = [], None
        rows = self.router.read()
        if self.router.rewound:
            self.pending_router = []
            self.router_keep_through = _last_step(rows)
        self.pending_router.extend(
            r for r in rows if {"step", "layer", "expert", "fraction"} <= set(r)
        )
        if self.pending_router or self.router_keep_through is not None:
            rows, keep = self.pending_router, self.router_keep_through
            try:
                done = self._write(
                    "router stats",
                    lambda s: runs.record_router_stats(
                        s, self.run_id, rows, attempt=self.attempt, keep_through=keep
                    ),
                )
            except (ValueError, KeyError) as error:
                log.warning("run %s: router rows skipped: %s", self.run_id, error)
                done = 0
            if done is not None:
                self.pending_router, self.router_keep_through = [], None
        self.record_checkpoints()

    def record_checkpoints(self) -> None:
        folders = checkpoint_folders(self.out_dir)
        for name, path in folders:
            try:
                mtime = path.stat().st_mtime_ns
            except OSError:
                continue  # renamed away meanwhile (final/ being replaced)
            if self.recorded.get(name) == mtime:
                continue  # recorded already (a replaced final/ is a new folder: new mtime)
            size = folder_size(path)
            step = runs.checkpoint_step(name)
            if step is None:
                step = _final_step(path)
            result = self._write(
                f"checkpoint {name}",
                lambda s, name=name, path=path, step=step, size=size: runs.record_checkpoint(
                    s,
                    self.run_id,
                    name,
                    str(path),
                    step=step,
                    size_bytes=size,
                    attempt=self.attempt,
                ),
            )
            if result is not None:
                self.recorded[name] = mtime
                log.info("run %s: checkpoint %s recorded (%d bytes)", self.run_id, name, size)
        self.apply_retention(folders)

    def apply_retention(self, folders: list[tuple[str, Path]]) -> None:
        keep = self.settings.keep_checkpoints
        steps = [(name, path) for name, path in folders if name != "final"]
        if keep <= 0 or len(steps) <= keep or self.lease_lost:
            return
        for name, path in steps[:-keep]:
            shutil.rmtree(path, ignore_errors=True)
            if path.exists():
                continue
            self.recorded.pop(name, None)
            try:
                with self.db.session() as session:
                    runs.remove_checkpoint(session, self.run_id, name)
                log.info(
                    "run %s: checkpoint %s removed (keep_checkpoints=%d)", self.run_id, name, keep
                )
            except SQLAlchemyError as error:
                log.warning("run %s: forgetting checkpoint %s failed: %s", self.run_id, name, error)


def _signal_group(proc: subprocess.Popen, sig: int) -> None:
    """Send ``sig`` to the child's process group (its own session: pgid == pid)."""
    try:
        os.killpg(proc.pid, sig)
    except (ProcessLookupError, PermissionError):
        pass


def _log_line(log_path: Path, text: str) -> None:
    with open(log_path, "a", encoding="utf-8") as fh:
        fh.write(f"[moejobs] {_utc().isoformat(timespec='seconds')} {text}\n")


def _record_provenance_later(att: _Attempt, train_doc: dict[str, Any]) -> threading.Thread:
    def work() -> None:
        try:
            values = provenance(train_doc, att.info.hardware)
            with att.db.session() as session:
                runs.record_provenance(session, att.run_id, **values)
        except Exception as error:  # provenance is informational; never fail a run for it
            log.warning("run %s: provenance not recorded: %s", att.run_id, error)

    thread = threading.Thread(target=work, name=f"provenance-{att.run_id}", daemon=True)
    thread.start()
    return thread


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
        if pipe_open and silent < vouch and not att.lease_lost:
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
    outcome to :func:`finish_attempt`.

    ``command`` replaces the engine's command line (:func:`training_command`), e.g. a small
    script in tests; it runs the same way (run folder as working directory, same environment,
    output to the log).

    Errors starting the process (unwritable run folder, missing interpreter) give a
    ``crashed`` outcome. A BaseException raised into this function (e.g. Celery's hard
    shutdown) SIGKILLs the child group and propagates.
    """
    att = _Attempt(run, db, settings, info)
    run_dir = att.run_dir
    log_path = run_dir / "train.log"
    checkpoints = run.preset != "smoke-test"
    read_fd = beat_fd = None
    try:
        train_path, model_path = write_configs(run, run_dir)
        cmd = command or training_command(train_path, model_path, checkpoints=checkpoints)
        # The claim, where the engine can see it: it renames a checkpoint into out_dir only
        # while this file names its attempt. Then no result of an earlier attempt may pass
        # for this one's.
        contract.write_owner(att.out_dir, run.attempt, info.worker_id)
        (att.out_dir / contract.RESULT_FILE).unlink(missing_ok=True)
        _log_line(log_path, f"attempt {run.attempt} on worker {info.worker_id}: {' '.join(cmd)}")
        log_start = log_path.stat().st_size
        oom_before = _cgroup_oom_kills()
        read_fd, beat_fd = os.pipe()
        os.set_blocking(beat_fd, False)
        log_file = open(log_path, "ab")
        try:
            proc = subprocess.Popen(
                cmd,
                cwd=str(run_dir),
                stdin=subprocess.DEVNULL,
                stdout=log_file,
                stderr=subprocess.STDOUT,
                start_new_session=True,
                pass_fds=(read_fd,),
                env=training_env(settings, info, attempt=run.attempt, watchdog_fd=read_fd),
            )
        finally:
            log_file.close()
            os.close(read_fd)
    except OSError as error:
        if beat_fd is not None:
            os.close(beat_fd)
        log.exception("run %s: could not start training", run.id)
        reason = FailureReason.no_space if error.errno == errno.ENOSPC else FailureReason.crashed
        return Outcome("failed", f"could not start training: {error}", reason)
    (run_dir / "train.pid").write_text(f"{proc.pid}\n", encoding="utf-8")
    log.info("run %s attempt %d: training pid %d", run.id, run.attempt, proc.pid)
    provenance_thread = _record_provenance_later(att, dict(run.resolved_train))

    grace = settings.cancel_grace_seconds
    heartbeat_every = settings.heartbeat_seconds
    watchdog_done = threading.Event()
    watchdog = threading.Thread(
        target=_watchdog,
        args=(proc, att, log_path, watchdog_done, beat_fd),
        name=f"lease-watchdog-{run.id}",
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

    returncode = proc.returncode
    att.ingest()  # the last rows and the final checkpoint
    if not att.lease_lost:
        att.check_cancel()
    provenance_thread.join(timeout=30)
    oom_after = _cgroup_oom_kills()
    result = EngineResult.read(att.out_dir)
    if result is not None and result.attempt not in (None, run.attempt):
        result = None  # not this attempt's (cannot happen while the owner file is respected)
    outcome = classify_exit(
        returncode,
        result,
        _read_tail(log_path, log_start),
        cancel_requested=att.cancel_requested,
        shutting_down=info.shutdown.is_set() or att.self_fenced,
        lease_lost=att.lease_lost,
        oom_killed=oom_before is not None and oom_after is not None and oom_after > oom_before,
    )
    if att.self_fenced and outcome.kind == "requeue" and not info.shutdown.is_set():
        outcome = Outcome(
            "requeue",
            "graceful stop: database unreachable, training stopped to keep the lease safe",
            exit_code=returncode,
        )
    if att.pending_metrics and outcome.kind != "lease_lost":
        log.warning("run %s: %d metric rows could not be stored", run.id, len(att.pending_metrics))
    _log_line(
        log_path,
        f"exit code {returncode}: {outcome.kind}"
        + (f" ({outcome.reason.value})" if outcome.reason else "")
        + f": {outcome.message}",
    )
    return outcome
