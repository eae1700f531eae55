"""Data preparation ahead of training: a run's corpus is tokenized into the shared token cache
by a worker that consumes the aux queue while the run waits ``queued``, so that a training
worker (a GPU) never idles through tokenization.

How a run gets there (``service.queue``: ``TRAIN_TASK``, ``PREPARE_TASK``):

1. A training worker receives the run (``worker.tasks.train_run``) and asks :func:`decide`
   before claiming it. ``train`` (claim it now): the stub engine; a corpus under
   ``MOEJOBS_PREPARE_MIN_BYTES`` (seconds to tokenize); the token caches named by a finished
   preparation exist; the preparation failed in a way the training process should report
   itself; no live worker consumes the aux queue. ``wait``: a preparation holds the run's lock,
   or was sent less than ``MOEJOBS_QUEUED_STALE_SECONDS`` ago. ``prepare``: the worker sends
   ``PREPARE_TASK`` and leaves the run queued. It claims nothing in the last two cases.
   The API sends ``PREPARE_TASK`` already when it queues a run (before ``TRAIN_TASK``), so
   tokenizing starts at once even while every training worker is busy; the training worker's
   own message covers a lost one. Duplicates are harmless.
2. A worker of role ``aux`` (or ``all``) runs :func:`prepare_run` for it (nothing for the stub
   engine or a corpus under ``MOEJOBS_PREPARE_MIN_BYTES``): it takes the run's
   lock (``RUN_DIR/prep.lock``, an ``flock`` released if the worker dies), looks for the caches
   by content key (torch-free; a corpus another run prepared is found in the time it takes to
   hash it), else starts ``python -m worker.prepare`` (this module's :func:`main`: LitGPT's
   tokenizer, ``worker.data.prepare_data``) with its output appended to the run's
   ``train.log`` and its progress written as ``data_progress`` events to ``out/events.jsonl``.
   It watches the run meanwhile: a cancelled run or a stopping worker ends the process.
3. When the caches are ready the marker ``RUN_DIR/prep.json`` says ``done`` with their paths,
   the run gets a history note and ``TRAIN_TASK`` is sent again; the training process then
   finds the caches and starts training at once. Data the engine would refuse (not UTF-8, too
   short for one micro-batch, ...) fails the run with ``invalid_data`` as the engine would, and
   a full disk with ``no_space``; any other failure of the preparation (a crash, a kill) is
   noted and the training process tokenizes as before.

The marker is advice, never the truth: the training process always checks the cache by content
key itself (``worker.data.tokenize_files``), so a corpus edited after its preparation is
tokenized again, and a lost marker costs one more preparation message.
"""

from __future__ import annotations

import argparse
import contextlib
import fcntl
import json
import logging
import os
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal, overload

from worker.errors import DataError

if TYPE_CHECKING:  # pragma: no cover
    from service.models import Run
    from service.settings import Settings

log = logging.getLogger("moejobs.prepare")

#: ``RUN_DIR/prep.json``: JSON ``{"state", "at", "worker", "caches", "message", ...}``;
#: ``state`` is sent, running, done, failed or stopped.
MARKER_FILE = "prep.json"
#: ``RUN_DIR/prep.lock``: held (``flock``) by the worker preparing the run.
LOCK_FILE = "prep.lock"
#: ``RUN_DIR/prep-result.json``: what the preparation process reports (:func:`main`).
RESULT_FILE = "prep-result.json"
#: Seconds between two looks at the run (cancelled?) while its preparation process runs.
POLL_SECONDS = 1.0


def _utc() -> datetime:
    return datetime.now(UTC)


# -- what a run will tokenize (torch-free) -------------------------------------------------------


@dataclass(frozen=True)
class DataNeed:
    """The text a run's training process will tokenize.

    Attributes:
        train_files, val_files: the files in reading order (``worker.data.split_files``);
            ``val_files`` empty when no validation is configured (it is then not tokenized).
        tokenizer_dir: ``tokenizer_dir`` (or ``initial_checkpoint_dir``) of the config.
        n_bytes: total size of the files, in bytes.
    """

    train_files: tuple[Path, ...]
    val_files: tuple[Path, ...]
    tokenizer_dir: Path
    n_bytes: int

    def describe(self) -> str:
        """``"24 files, 99.0 MB"``."""
        n = len(self.train_files) + len(self.val_files)
        return f"{n} file{'s' if n != 1 else ''}, {self.n_bytes / 1e6:.1f} MB"


def data_need(
    train_doc: dict[str, Any], model_doc: dict[str, Any], run_dir: Path
) -> DataNeed | None:
    """What the run of these resolved documents will tokenize, or None when that cannot be said
    (invalid config, no tokenizer, missing folder or file): the training process then reports
    the problem with its own classification. Relative paths resolve against ``run_dir`` (the
    training process' working directory). Reads sizes, not contents."""
    from service.config.issues import ConfigError
    from service.config.validate import validate_configs
    from worker.data import split_files

    try:
        train = validate_configs(train_doc, model_doc).train
    except (ConfigError, ValueError, TypeError):
        return None
    tokenizer_dir = train.tokenizer_dir or train.initial_checkpoint_dir
    if tokenizer_dir is None:
        return None

    @overload
    def where(path: None) -> None: ...
    @overload
    def where(path: str | Path) -> Path: ...
    def where(path: str | Path | None) -> Path | None:
        return None if path is None else run_dir / Path(str(path))  # an absolute path stays itself

    args = train.data.init_args
    try:
        train_files, val_files = split_files(where(args.train_data_path), where(args.val_data_path))
        ev = train.eval
        if not (bool(ev.interval) or ev.initial_validation or ev.final_validation):
            val_files = []
        n_bytes = sum(os.path.getsize(p) for p in (*train_files, *val_files))
    except (DataError, OSError):
        return None
    return DataNeed(
        tuple(train_files), tuple(val_files), where(tokenizer_dir) or Path("."), n_bytes
    )


def cached_paths(need: DataNeed, cache_dir: Path) -> list[Path] | None:
    """The token cache files of ``need`` when every one exists under ``cache_dir``, else None.
    Hashes the files (``worker.data.files_sha256``: reads every byte once, ~1 GB/s) and the
    tokenizer; imports no torch. Raises DataError for an unreadable file."""
    from worker.data import TextSet, cache_key
    from worker.tokenizer import tokenizer_hash

    tok = tokenizer_hash(need.tokenizer_dir)
    paths = []
    for files in (need.train_files, need.val_files):
        if files:
            paths.append(cache_dir / f"{cache_key(TextSet.of(files).sha256, tok)}.npy")
    return paths if all(p.is_file() for p in paths) else None


# -- the marker and the lock ------------------------------------------------------------------


def read_marker(run_dir: Path) -> dict[str, Any]:
    """``RUN_DIR/prep.json`` as a dict; {} when missing or unreadable."""
    try:
        data = json.loads((run_dir / MARKER_FILE).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def write_marker(run_dir: Path, state: str, **fields: Any) -> None:
    """Write ``RUN_DIR/prep.json`` atomically (temporary file + rename)."""
    run_dir.mkdir(parents=True, exist_ok=True)
    body = {"state": state, "at": _utc().isoformat(), **fields}
    tmp = run_dir / f".{MARKER_FILE}.{os.getpid()}.tmp"
    tmp.write_text(json.dumps(body, indent=1) + "\n", encoding="utf-8")
    os.replace(tmp, run_dir / MARKER_FILE)


def _marker_age_s(marker: dict[str, Any]) -> float | None:
    try:
        at = datetime.fromisoformat(str(marker["at"]))
    except (KeyError, ValueError):
        return None
    return (_utc() - at).total_seconds()


@contextlib.contextmanager
def run_lock(run_dir: Path) -> Iterator[bool]:
    """Hold ``RUN_DIR/prep.lock`` (exclusive ``flock``, not waiting) for the block; yields
    whether this process got it. The kernel releases it when the process dies."""
    run_dir.mkdir(parents=True, exist_ok=True)
    fd = os.open(run_dir / LOCK_FILE, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            yield False
            return
        try:
            yield True
        finally:
            fcntl.flock(fd, fcntl.LOCK_UN)
    finally:
        os.close(fd)


def is_locked(run_dir: Path) -> bool:
    """Whether some process holds ``RUN_DIR/prep.lock`` now (a preparation is under way)."""
    if not (run_dir / LOCK_FILE).exists():
        return False
    with run_lock(run_dir) as got:
        return not got


# -- the training worker's question ------------------------------------------------------------


@dataclass(frozen=True)
class Decision:
    """What a training worker does with a queued run: ``train`` (claim it), ``prepare`` (send
    the preparation and leave the run queued) or ``wait`` (a preparation is under way or on
    its way); ``why`` says so in a log line."""

    action: Literal["train", "prepare", "wait"]
    why: str


def decide(run: Run, settings: Settings, aux_worker_live: Callable[[], bool]) -> Decision:
    """See the module docstring, step 1. ``aux_worker_live`` says whether a live worker
    consumes the aux queue (asked only when a preparation would be sent). Never raises."""
    if settings.engine != "litgpt":
        return Decision("train", f"the {settings.engine} engine tokenizes nothing")
    run_dir = settings.run_dir(run.id)
    need = data_need(dict(run.resolved_train), dict(run.resolved_model), run_dir)
    if need is None:
        return Decision(
            "train", "the data cannot be checked here: the training process reports why"
        )
    if need.n_bytes < settings.prepare_min_bytes:
        return Decision(
            "train",
            f"{need.describe()}: below MOEJOBS_PREPARE_MIN_BYTES "
            f"({settings.prepare_min_bytes:,} bytes), tokenized by the training process",
        )
    marker = read_marker(run_dir)
    state = marker.get("state")
    if state == "done":
        caches = [Path(p) for p in marker.get("caches") or []]
        if caches and all(p.is_file() for p in caches):
            return Decision("train", "data prepared: " + ", ".join(p.name for p in caches))
    try:
        if is_locked(run_dir):
            return Decision("wait", "data preparation under way")
    except OSError as error:  # the run folder cannot be written: the training reports it
        return Decision("train", f"run folder {run_dir}: {error.strerror}")
    if state == "failed":
        return Decision(
            "train",
            f"data preparation failed ({marker.get('message')}): the training process tokenizes",
        )
    age = _marker_age_s(marker)
    if state == "sent" and age is not None and 0 <= age < settings.queued_stale_seconds:
        return Decision("wait", f"data preparation sent {age:.0f} s ago")
    if not aux_worker_live():
        return Decision(
            "train",
            "no live worker consumes the aux queue: the training process "
            "tokenizes (start one with `moejobs worker --role aux`)",
        )
    return Decision("prepare", f"{need.describe()} not tokenized yet")


# -- the aux worker's task ---------------------------------------------------------------------


@dataclass
class PrepOutcome:
    """How :func:`prepare_run` ended: ``state`` ready (the caches exist; the run was sent to
    training), failed_run (the run failed: bad data or a full disk), fallback (the training
    process will tokenize), stopped (cancelled, or the worker stopped), skipped (not queued,
    not found, or prepared elsewhere)."""

    state: str
    message: str = ""


def prepare_run(
    run_id: uuid.UUID,
    *,
    db,
    settings: Settings,
    worker_id: str,
    send_train: Callable[[uuid.UUID], object],
    send_prepare: Callable[[uuid.UUID], object],
    shutdown: Callable[[], bool] = lambda: False,
    env: dict[str, str] | None = None,
) -> PrepOutcome:
    """Prepare run ``run_id``'s data (module docstring, steps 2-3). ``send_train`` /
    ``send_prepare`` send the run's training / preparation message again; ``shutdown`` says
    that this worker is stopping (the preparation is ended and sent again for another worker);
    ``env`` is the preparation process' environment (default: this one's, with
    ``MOEJOBS_TOKEN_CACHE`` from ``settings``). Never raises for a failed preparation."""
    from service import reads
    from service.models import RunStatus

    if settings.engine != "litgpt":
        return PrepOutcome("skipped", f"the {settings.engine} engine tokenizes nothing")
    with db.session() as session:
        try:
            run = reads.get_run(session, run_id)
        except reads.RunNotFound:
            return PrepOutcome("skipped", "not found")
    if run.status != RunStatus.queued:
        return PrepOutcome("skipped", run.status.value)
    run_dir = settings.run_dir(run.id)
    need = data_need(dict(run.resolved_train), dict(run.resolved_model), run_dir)
    if need is None:  # the training process says why
        send_train(run.id)
        return PrepOutcome("fallback", "the data cannot be checked")
    if need.n_bytes < settings.prepare_min_bytes:  # the training process tokenizes it
        return PrepOutcome("skipped", f"{need.describe()}: below MOEJOBS_PREPARE_MIN_BYTES")
    try:
        with run_lock(run_dir) as got:
            if not got:
                return PrepOutcome("skipped", "another worker is preparing it")
            return _prepare_locked(
                run,
                run_dir,
                need,
                db=db,
                settings=settings,
                worker_id=worker_id,
                send_train=send_train,
                send_prepare=send_prepare,
                shutdown=shutdown,
                env=env,
            )
    except OSError as error:  # the run folder or the cache cannot be written: the training
        log.warning("run %s: data preparation failed: %s", run.id, error)  # reports it
        send_train(run.id)
        return PrepOutcome("fallback", str(error))


def _prepare_locked(
    run: Run,
    run_dir: Path,
    need: DataNeed,
    *,
    db,
    settings: Settings,
    worker_id: str,
    send_train: Callable[[uuid.UUID], object],
    send_prepare: Callable[[uuid.UUID], object],
    shutdown: Callable[[], bool],
    env: dict[str, str] | None,
) -> PrepOutcome:
    """:func:`prepare_run` once the run's lock is held."""
    from service import reads, runs
    from service.models import FailureReason, RunStatus

    actor = f"worker:{worker_id}"
    cache_dir = Path(settings.token_cache or "")
    try:
        found = cached_paths(need, cache_dir)
    except DataError as error:  # unreadable file: the training process fails it properly
        write_marker(run_dir, "failed", worker=worker_id, message=str(error))
        send_train(run.id)
        return PrepOutcome("fallback", str(error))
    if found is not None:
        write_marker(run_dir, "done", worker=worker_id, caches=[str(p) for p in found])
        send_train(run.id)
        return PrepOutcome("ready", "already prepared")
    write_marker(run_dir, "running", worker=worker_id)
    _note(
        db,
        run.id,
        f"preparing data on {worker_id}: {need.describe()} (the run stays "
        "queued; progress in the engine events)",
        actor,
    )
    result, stopped = _run_preparation(run, run_dir, settings, db, shutdown, env)
    if stopped:
        write_marker(run_dir, "stopped", worker=worker_id, message=stopped)
        if stopped == "worker stopping":
            send_prepare(run.id)  # another aux worker (or this one, restarted) goes on
        return PrepOutcome("stopped", stopped)
    if result.get("ok"):
        caches = [str(p) for p in result.get("caches") or []]
        write_marker(
            run_dir,
            "done",
            worker=worker_id,
            caches=caches,
            tokens=result.get("tokens"),
            seconds=result.get("seconds"),
        )
        _note(db, run.id, f"data prepared: {result.get('message', '')}", actor)
        send_train(run.id)
        return PrepOutcome("ready", str(result.get("message", "")))
    reason, message = result.get("reason"), str(result.get("message") or "preparation failed")
    if reason in (
        FailureReason.invalid_data.value,
        FailureReason.no_space.value,
        FailureReason.invalid_config.value,
    ):
        write_marker(run_dir, "failed", worker=worker_id, reason=reason, message=message)
        with db.session() as session:
            try:
                runs.transition(
                    session,
                    run.id,
                    RunStatus.failed,
                    f"data preparation: {message}",
                    reason=reason,
                    failure_message=message,
                    actor=actor,
                )
            except reads.RunError as error:  # cancelled meanwhile: nothing to fail
                log.info("run %s: not failed after its preparation (%s)", run.id, error)
        return PrepOutcome("failed_run", message)
    write_marker(run_dir, "failed", worker=worker_id, reason=reason, message=message)
    _note(
        db,
        run.id,
        f"data preparation failed ({message}): the training process will tokenize",
        actor,
    )
    send_train(run.id)
    return PrepOutcome("fallback", message)


def _note(db, run_id: uuid.UUID, message: str, actor: str) -> None:
    from service import runs

    try:
        with db.session() as session:
            runs.add_note(session, run_id, message, actor=actor)
    except Exception as error:  # a history line must never stop the preparation
        log.warning("run %s: note not recorded (%s)", run_id, error)


def preparation_command(train_path: Path, model_path: Path, result_path: Path) -> list[str]:
    """The preparation process' command line (this module as a script)."""
    return [
        sys.executable,
        "-m",
        "worker.prepare",
        "--train-config",
        str(train_path),
        "--model-config",
        str(model_path),
        "--result",
        str(result_path),
    ]


def _run_preparation(
    run: Run,
    run_dir: Path,
    settings: Settings,
    db,
    shutdown: Callable[[], bool],
    env: dict[str, str] | None,
) -> tuple[dict[str, Any], str | None]:
    """Start the preparation process and wait for it; returns (its result, None) or ({}, why it
    was stopped)."""
    from service import reads
    from service.models import RunStatus
    from worker.launch import REPO_ROOT
    from worker.runner import write_configs

    train_path, model_path = write_configs(run, run_dir)
    result_path = run_dir / RESULT_FILE
    result_path.unlink(missing_ok=True)
    if env is None:
        env = dict(os.environ)
    env = {
        **env,
        "MOEJOBS_TOKEN_CACHE": str(settings.token_cache),
        "CUDA_VISIBLE_DEVICES": "",
        "PYTHONUNBUFFERED": "1",
        "PYTHONPATH": os.pathsep.join(p for p in (str(REPO_ROOT), env.get("PYTHONPATH", "")) if p),
    }
    log_path = run_dir / "train.log"
    cmd = preparation_command(train_path, model_path, result_path)
    with open(log_path, "a", encoding="utf-8") as fh:
        fh.write(
            f"[moejobs] {_utc().isoformat(timespec='seconds')} data preparation: {' '.join(cmd)}\n"
        )
    with open(log_path, "ab") as out:
        proc = subprocess.Popen(
            cmd,
            cwd=str(run_dir),
            stdin=subprocess.DEVNULL,
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
            env=env,
        )
    log.info("run %s: data preparation pid %d", run.id, proc.pid)
    stopped: str | None = None
    try:
        while proc.poll() is None:
            time.sleep(POLL_SECONDS)
            if stopped is not None:
                continue
            if shutdown():
                stopped = "worker stopping"
            else:
                try:
                    with db.session() as session:
                        status = reads.get_run(session, run.id, configs=False).status
                except reads.RunNotFound:
                    status = None
                except Exception:  # database away for a moment: keep preparing
                    continue
                if status != RunStatus.queued:
                    stopped = f"the run is {status.value if status else 'deleted'}"
            if stopped is not None:
                log.info("run %s: ending its data preparation: %s", run.id, stopped)
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(proc.pid, signal.SIGTERM)
    except BaseException:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
        raise
    if stopped is not None:
        return {}, stopped
    try:
        result = json.loads(result_path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        result = {
            "ok": False,
            "reason": "crashed",
            "message": f"the preparation process exited {proc.returncode} without a result",
        }
    return result if isinstance(result, dict) else {
        "ok": False,
        "message": "unreadable result",
    }, None


# -- the preparation process -------------------------------------------------------------------


def _stop(signum: int, _frame: object) -> None:
    raise SystemExit(128 + signum)  # unwinds: tokenize_files removes its temporary files


def _write_result(path: Path, body: dict[str, Any]) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(body, indent=1) + "\n", encoding="utf-8")
    os.replace(tmp, path)


def main(argv: list[str] | None = None) -> int:
    """``python -m worker.prepare --train-config T --model-config M --result R``: tokenize the
    run's training (and, when validation is configured, validation) text into the token cache
    (``MOEJOBS_TOKEN_CACHE``) exactly as the training process would, writing ``data_progress``
    events to ``out_dir/events.jsonl`` and progress lines to stderr, then ``R`` (JSON: ``ok``,
    ``caches``, ``tokens``, ``seconds``, ``message``; or ``ok`` false with ``reason`` and
    ``message``). Exit 0 when prepared, 1 otherwise; SIGTERM/SIGINT end it (128 + N) with no
    partial cache left."""
    from worker.launch import die_with_parent

    die_with_parent()
    signal.signal(signal.SIGTERM, _stop)
    signal.signal(signal.SIGINT, _stop)
    parser = argparse.ArgumentParser(
        prog="python -m worker.prepare", description="Tokenize a run's data into the token cache."
    )
    parser.add_argument("--train-config", required=True)
    parser.add_argument("--model-config", required=True)
    parser.add_argument("--result", required=True, help="JSON file to write the outcome to")
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=logging.INFO,
        stream=sys.stderr,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    result_path = Path(args.result)
    started = time.monotonic()
    out_dir: Path = Path(".")
    try:
        from service.config.issues import ConfigError
        from service.config.parse import load_document
        from service.config.validate import validate_configs
        from service.contract import EventKind, append_event

        try:
            validated = validate_configs(
                load_document(args.train_config), load_document(args.model_config)
            )
        except ConfigError as error:
            _write_result(
                result_path,
                {"ok": False, "reason": "invalid_config", "message": " ".join(str(error).split())},
            )
            return 1
        train, model = validated.train, validated.model
        out_dir = Path(train.out_dir)
        plan = validated.plan
        ev = train.eval
        need_val = bool(ev.interval) or ev.initial_validation or ev.final_validation
        tokenizer_dir = train.tokenizer_dir or train.initial_checkpoint_dir
        if tokenizer_dir is None:
            raise DataError(
                "tokenizer_dir: a tokenizer folder is required (train one with "
                "`moejobs tokenizer train`)"
            )

        from worker.data import PrepProgress, prepare_data
        from worker.tokenizer import load_tokenizer

        padded_vocab = model.resolved_padded_vocab_size
        tokenizer = load_tokenizer(Path(tokenizer_dir), padded_vocab)

        def progress(p: PrepProgress) -> None:
            log.info("data: tokenizing: %s", p.describe())
            eta = p.eta_s
            append_event(
                out_dir,
                EventKind.data_progress,
                message=p.describe(),
                tokens=p.tokens,
                bytes_done=p.bytes_done,
                bytes_total=p.bytes_total,
                tokens_per_s=round(p.tokens_per_s, 1),
                eta_s=round(eta, 1) if eta is not None else None,
                done=p.done,
                stage="prepare",
            )

        args_ = train.data.init_args
        data = prepare_data(
            args_.train_data_path,
            args_.val_data_path,
            tokenizer,
            tokenizer_dir,
            padded_vocab,
            plan.seq_len,
            plan.micro_batch_size,
            need_val,
            on_progress=progress,
        )
    except BaseException as exc:  # SystemExit from a signal included: report, then re-raise it
        from worker import errors

        if isinstance(exc, SystemExit):
            raise
        err = errors.classify(exc, out_dir)
        if not isinstance(exc, errors.EngineError):
            import traceback

            traceback.print_exc()
        print(f"error: {err.label}: {err}", file=sys.stderr, flush=True)
        reason = err.reason.value if err.reason is not None else "crashed"
        _write_result(result_path, {"ok": False, "reason": reason, "message": str(err)})
        return 1
    tokens = {"train": len(data.train), "val": len(data.val) if data.val is not None else None}
    seconds = round(time.monotonic() - started, 1)
    caches = [str(data.train.path)] + ([str(data.val.path)] if data.val is not None else [])
    message = (
        f"{tokens['train']:,} training tokens"
        + (f", {tokens['val']:,} validation tokens" if tokens["val"] is not None else "")
        + f" in {seconds:g} s"
    )
    log.info("data prepared: %s (%s)", message, ", ".join(caches))
    _write_result(
        result_path,
        {"ok": True, "caches": caches, "tokens": tokens, "seconds": seconds, "message": message},
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
