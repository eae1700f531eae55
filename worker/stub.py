"""The stub engine: a torch-free stand-in for ``worker.train`` that follows the engine contract
(``service.contract``) exactly, so the scheduling and fault tests of the service run in seconds.

Started like the real engine, ``python -m worker.entry --train-config T --model-config M
[--no-checkpoints]`` with ``MOEJOBS_ENGINE=stub`` (``worker.entry`` installs the early signal
handlers and the fence, then calls :func:`main`). It never imports torch.

What it does, in the real engine's order and with its files:

1. reads and validates the two configs (``service.config.validate.validate_configs``; invalid: one line
   ``error: invalid config`` and one line per problem on stderr, ``result.json`` with
   ``invalid_config``, exit 2); takes the plan (``Validated.plan``, ``service.config.plan``);
2. checks that ``data.init_args.train_data_path`` is a folder with ``*.txt`` files (else
   ``invalid_data``, exit 1); nothing is tokenized;
3. resumes like the real engine: ``resume: auto`` continues from the complete checkpoint with
   the highest step (``final/`` included; a ``final/`` that reached the planned steps means
   nothing to do, exit 0), ``true`` requires one, a path names one, ``false`` refuses an
   ``out_dir`` that holds checkpoints (exit 2). ``metrics.csv`` and ``router.csv`` keep their
   rows up to the resumed step (``worker.metrics.MetricsWriter``). Left-over ``.tmp-*``
   folders of dead writers are removed first;
4. "trains": each optimizer step sleeps :data:`ENV_STEP_SECONDS` and writes a row of
   deterministic fake values to ``metrics.csv`` (every ``log_interval`` steps and the last;
   the loss is higher for a learning rate below 1e-3: :meth:`_Engine.fake_loss`;
   ``val_loss`` on ``eval.interval`` steps) and the router fractions of every MoE layer to
   ``router.csv``; a checkpoint ``step-XXXXXXXX`` every ``save_interval`` steps and ``final/``
   at the end (unless ``--no-checkpoints``). A checkpoint folder holds ``lit_model.pth`` and
   ``training_state.pt`` (placeholder bytes, not loadable by torch), ``model_config.yaml`` and
   ``training_state.json`` (step, tokens, samples, ... like ``worker.checkpoint``, so
   ``worker.checkpoint.read_checkpoint`` accepts it); it is written as ``.tmp-<name>-<pid>``
   inside the fence's ``writing()`` and renamed after ``check_commit()``;
5. SIGTERM/SIGINT: stop at the next step boundary, write ``step-XXXXXXXX`` and exit 75. Before
   the first step of this process: one line ``interrupted before training started`` and exit
   130 (SIGINT) / 143 (SIGTERM), nothing written but ``result.json`` and the events. A second
   signal while stopping is ignored;
6. fenced (``worker.fence``: its worker went silent, or another attempt owns the folder): no
   more writes at all (not even ``result.json``, which belongs to the folder's owner now), exit
   76;
7. ``result.json`` (``service.contract.EngineResult``) on every end it can report, and the
   events ``configured``, ``data_ready``, ``model_built``, ``first_step``,
   ``checkpoint_written``, ``stop_requested`` and ``finished`` in ``events.jsonl``
   (``started`` and ``fenced`` come from ``worker.entry`` and ``worker.fence``).

Environment (all optional):

``MOEJOBS_STUB_STEP_SECONDS``
    seconds one optimizer step takes (float >= 0, default 0.05).
``MOEJOBS_STUB_START_SECONDS``
    seconds of "model building" between the ``data_ready`` and ``model_built`` events (float
    >= 0, default 0): a window in which a signal lands before training started.
``MOEJOBS_STUB_FAIL``
    injected faults, ``KIND@STEP`` or ``KIND@STEP:ATTEMPT`` separated by ``|`` or ``,``
    (e.g. ``crash@5|oom@3``). A fault fires while step STEP is trained (its row is not
    written), only in a process that trains that step, and with ``:ATTEMPT`` only when
    ``MOEJOBS_ATTEMPT`` equals ATTEMPT. Kinds: ``crash`` (a RuntimeError: ``crashed``, exit 1),
    ``oom`` (a MemoryError: ``out_of_memory``, exit 1), ``nospace`` (ENOSPC writing
    ``metrics.csv``: ``no_space`` naming the path and its free space, exit 1), ``kill``
    (SIGKILL to itself: no ``result.json``), ``hang`` (stops making progress and ignores
    SIGTERM/SIGINT until killed). A malformed value is an ``invalid_config`` error (exit 2)
    naming the variable.
``MOEJOBS_STUB_CHECKPOINT_BYTES``
    size of each placeholder ``lit_model.pth`` (default 4096), to fill a disk for real.

Every ENOSPC (a checkpoint, the CSV files) ends as ``no_space``.
"""

from __future__ import annotations

import argparse
import errno
import json
import math
import os
import shutil
import signal
import sys
import time
import traceback
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from service import contract
from service.contract import EngineResult, EventKind, ExitCode, FailureReason, Outcome

ENV_STEP_SECONDS = "MOEJOBS_STUB_STEP_SECONDS"
ENV_FAIL = "MOEJOBS_STUB_FAIL"
ENV_CHECKPOINT_BYTES = "MOEJOBS_STUB_CHECKPOINT_BYTES"
ENV_START_SECONDS = "MOEJOBS_STUB_START_SECONDS"
DEFAULT_STEP_SECONDS = 0.05
DEFAULT_CHECKPOINT_BYTES = 4096
FAULT_KINDS = ("crash", "oom", "nospace", "kill", "hang")

#: Files of a complete checkpoint folder (``worker.checkpoint.REQUIRED``, without its torch import).
WEIGHTS, MODEL_CONFIG, STATE_PT, STATE_JSON = (
    "lit_model.pth",
    "model_config.yaml",
    "training_state.pt",
    "training_state.json",
)
REQUIRED = (WEIGHTS, MODEL_CONFIG, STATE_PT, STATE_JSON)


class StubError(Exception):
    """A failure the stub reports in ``result.json``: ``reason`` and the exit code."""

    def __init__(
        self, reason: FailureReason, message: str, exit_code: ExitCode = ExitCode.FAILED
    ) -> None:
        super().__init__(message)
        self.reason, self.exit_code = reason, exit_code


@dataclass(frozen=True)
class Fault:
    """One injected fault: ``kind`` while step ``step`` trains (only in ``attempt`` if set)."""

    kind: str
    step: int
    attempt: int | None = None


def parse_faults(text: str) -> list[Fault]:
    """The faults of a :data:`ENV_FAIL` value (module docstring). Raises ValueError naming the
    bad item."""
    faults = []
    for item in text.replace(",", "|").split("|"):
        item = item.strip()
        if not item:
            continue
        kind, at, where = item.partition("@")
        step_text, _, attempt_text = where.partition(":")
        try:
            if kind not in FAULT_KINDS or not at:
                raise ValueError
            step = int(step_text)
            attempt = int(attempt_text) if attempt_text else None
            if step < 1:
                raise ValueError
        except ValueError:
            raise ValueError(
                f"{ENV_FAIL}: {item!r} is not KIND@STEP[:ATTEMPT] with KIND one of "
                f"{', '.join(FAULT_KINDS)} and STEP >= 1"
            ) from None
        faults.append(Fault(kind, step, attempt))
    return faults


def _env_float(name: str, default: float) -> float:
    text = os.environ.get(name, "").strip()
    if not text:
        return default
    try:
        value = float(text)
    except ValueError:
        raise StubError(
            FailureReason.invalid_config,
            f"{name}: expected a number, got {text!r}",
            ExitCode.INVALID_CONFIG,
        ) from None
    if not math.isfinite(value) or value < 0:
        raise StubError(
            FailureReason.invalid_config,
            f"{name}: expected a number >= 0, got {text!r}",
            ExitCode.INVALID_CONFIG,
        )
    return value


def _free_space(path: Path) -> str:
    """``"12.3 MiB free"`` on the file system of ``path`` (its nearest existing folder)."""
    while not path.exists() and path.parent != path:
        path = path.parent
    try:
        free = shutil.disk_usage(path).free
    except OSError:
        return "free space unknown"
    return f"{free / 2**20:.1f} MiB free"


class _Stop:
    """SIGTERM/SIGINT set a flag the loop checks at each step boundary (first signal wins)."""

    def __init__(self) -> None:
        self.signal: int | None = None
        self.ignore = False

    def handler(self, signum: int, _frame: object) -> None:
        if self.signal is None and not self.ignore:
            self.signal = signum

    def install(self) -> None:
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, self.handler)

    @property
    def name(self) -> str:
        return signal.Signals(self.signal).name if self.signal else ""


@dataclass(frozen=True)
class _Checkpoint:
    path: Path
    step: int
    meta: dict[str, Any]


def read_checkpoint(path: Path) -> _Checkpoint | None:
    """A complete checkpoint folder (the four files and a ``training_state.json`` with a step),
    or None. The same test as ``worker.checkpoint.read_checkpoint``, without torch."""
    if not path.is_dir() or not all((path / f).is_file() for f in REQUIRED):
        return None
    try:
        meta = json.loads((path / STATE_JSON).read_text(encoding="utf-8"))
        return _Checkpoint(path, int(meta["step"]), meta)
    except (OSError, ValueError, KeyError, TypeError):
        return None


def latest_checkpoint(out_dir: Path) -> _Checkpoint | None:
    """The complete checkpoint with the highest step in ``out_dir`` (``final`` wins a tie)."""
    found = []
    try:
        entries = list(out_dir.iterdir())
    except OSError:
        return None
    for entry in entries:
        if contract.is_checkpoint_name(entry.name):
            info = read_checkpoint(entry)
            if info is not None:
                found.append(info)
    found.sort(key=lambda c: (c.step, c.path.name == contract.FINAL))
    return found[-1] if found else None


def _clean_stale(out_dir: Path) -> None:
    """Remove ``.tmp-<name>-<pid>`` folders whose writer is dead."""
    try:
        entries = list(out_dir.iterdir())
    except OSError:
        return
    for entry in entries:
        if not entry.name.startswith(".tmp-") or not entry.is_dir():
            continue
        pid_text = entry.name.rsplit("-", 1)[-1]
        if pid_text.isdigit() and int(pid_text) != os.getpid():
            try:
                os.kill(int(pid_text), 0)
                continue  # alive
            except ProcessLookupError:
                pass
            except PermissionError:
                continue
        shutil.rmtree(entry, ignore_errors=True)


def _write(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path``; an OSError without a file name gets ``path`` (ENOSPC from
    ``write()`` names no file)."""
    try:
        path.write_bytes(data)
    except OSError as error:
        if error.filename is None:
            raise OSError(error.errno, error.strerror, str(path)) from error
        raise


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


class _Engine:
    """One stub training process (see the module docstring)."""

    def __init__(
        self, train_doc: dict, model_doc: dict, validated: Any, *, write_checkpoints: bool
    ) -> None:
        from worker import fence

        self.train_doc, self.model_doc = train_doc, model_doc
        self.train, self.model = validated.train, validated.model
        self.plan = validated.plan
        self.out_dir = Path(self.train.out_dir)
        self.write_checkpoints = write_checkpoints
        self.guard = fence.install(self.out_dir)
        self.attempt = self.guard.attempt
        self.step_seconds = _env_float(ENV_STEP_SECONDS, DEFAULT_STEP_SECONDS)
        self.start_seconds = _env_float(ENV_START_SECONDS, 0.0)
        self.ckpt_bytes = int(_env_float(ENV_CHECKPOINT_BYTES, DEFAULT_CHECKPOINT_BYTES))
        try:
            self.faults = parse_faults(os.environ.get(ENV_FAIL, ""))
        except ValueError as error:
            raise StubError(
                FailureReason.invalid_config, str(error), ExitCode.INVALID_CONFIG
            ) from None
        self.stop = _Stop()
        self.step = self.samples = self.tokens = 0
        self.loss: float | None = None
        self.val_loss: float | None = None
        self.checkpoint: Path | None = None
        self.started = time.monotonic()

    # -- events and results ---------------------------------------------------------------------

    def event(self, kind: EventKind, **data: Any) -> None:
        self.check_fenced()
        contract.append_event(self.out_dir, kind, attempt=self.attempt, **data)

    def result(
        self,
        outcome: Outcome,
        exit_code: int,
        *,
        reason: FailureReason | None = None,
        message: str = "",
        stopped_by: str | None = None,
    ) -> int:
        """Write ``result.json`` and the ``finished`` event; returns ``exit_code``."""
        EngineResult(
            outcome=outcome,
            reason=reason,
            message=message,
            exit_code=exit_code,
            attempt=self.attempt,
            steps=self.step,
            planned_steps=self.plan.optimizer_steps,
            tokens=self.tokens,
            final_loss=self.loss,
            val_loss=self.val_loss,
            checkpoint=str(self.checkpoint) if self.checkpoint else None,
            stopped_by=stopped_by,
            elapsed_s=round(time.monotonic() - self.started, 3),
        ).write(self.out_dir)
        contract.append_event(
            self.out_dir,
            EventKind.finished,
            attempt=self.attempt,
            step=self.step,
            message=message or outcome.value,
            outcome=outcome.value,
        )
        return exit_code

    def check_fenced(self) -> None:
        from worker.fence import Fenced

        if self.guard.fenced:
            raise Fenced(self.guard.reason or "fenced")

    # -- fake training values -------------------------------------------------------------------

    def fake_loss(self, step: int) -> float:
        """``2 + 5 exp(-step / 25)``, plus ``log10(1e-3 / lr)`` for a learning rate below 1e-3
        (lr 1e-5 adds 2.0): a learning rate far too small trains clearly worse, which the
        sweep tests' early stopping and best trial rely on (lr >= 1e-3: unchanged)."""
        penalty = max(0.0, math.log10(1e-3 / self.train.optimizer.lr))
        return round(2.0 + 5.0 * math.exp(-step / 25.0) + penalty, 6)

    def metrics_row(self, step: int, val: float | None) -> dict[str, Any]:
        lr = self.plan.learning_rate(step, self.train.optimizer.lr, self.train.train.min_lr)
        tps = self.plan.tokens_per_step / self.step_seconds if self.step_seconds > 0 else None
        return {
            "step": step,
            "tokens": self.tokens,
            "loss": self.loss,
            "learning_rate": lr,
            "grad_norm": round(0.5 + 2.0 / math.sqrt(step), 6),
            "tokens_per_sec": tps,
            "mfu": None,
            "elapsed_s": round(step * self.step_seconds, 6),
            "val_loss": val,
            "val_ppl": math.exp(val) if val is not None else None,
        }

    def router_rows(self, step: int) -> list[dict[str, Any]]:
        n_expert = self.model.n_expert
        layers = self.model.n_layer - (self.model.first_k_dense_replace or 0)
        rows: list[dict[str, Any]] = []
        for layer in range(layers):
            weights = [1 + (step + layer + e) % n_expert for e in range(n_expert)]
            total = sum(weights)
            rows.extend(
                {"step": step, "layer": layer, "expert": e, "fraction": w / total}
                for e, w in enumerate(weights)
            )
        return rows

    # -- checkpoints ------------------------------------------------------------------------------

    def save(self, name: str) -> Path | None:
        """Write checkpoint folder ``name`` atomically through the fence; None without
        checkpoints. Raises Fenced, OSError."""
        if not self.write_checkpoints:
            return None
        pid = os.getpid()
        tmp = self.out_dir / f".tmp-{name}-{pid}"
        target = self.out_dir / name
        meta = {
            "step": self.step,
            "tokens": self.tokens,
            "samples": self.samples,
            "loss": self.loss,
            "val_loss": self.val_loss,
            "elapsed_s": round(self.step * self.step_seconds, 6),
            "planned_steps": self.plan.optimizer_steps,
            "world_size": self.plan.world_size,
            "seq_len": self.plan.seq_len,
            "micro_batch_size": self.plan.micro_batch_size,
            "grad_accum_iters": self.plan.grad_accum_iters,
            "train_config": self.train.model_dump(mode="json"),
            "model_name": self.model.name,
            "engine": "stub",
            "attempt": self.attempt,
            "saved_at": contract.utc_now().isoformat(),
        }
        with self.guard.writing():
            if tmp.exists():
                shutil.rmtree(tmp)
            tmp.mkdir(parents=True)
            try:
                head = f"moejobs stub weights, step {self.step}\n".encode()
                _write(tmp / WEIGHTS, head + b"\0" * max(0, self.ckpt_bytes - len(head)))
                _write(
                    tmp / MODEL_CONFIG,
                    yaml.safe_dump(self.model_doc, sort_keys=False).encode("utf-8"),
                )
                _write(tmp / STATE_PT, f"moejobs stub state, step {self.step}\n".encode())
                _write(tmp / STATE_JSON, (json.dumps(meta, indent=2) + "\n").encode("utf-8"))
                for f in REQUIRED:
                    _fsync(tmp / f)
                _fsync(tmp)
                self.guard.check_commit()
                old = self.out_dir / f".old-{name}-{pid}"
                if target.exists():
                    os.replace(target, old)
                os.replace(tmp, target)
                _fsync(self.out_dir)
                shutil.rmtree(old, ignore_errors=True)
            except BaseException:
                shutil.rmtree(tmp, ignore_errors=True)
                raise
        self.checkpoint = target
        self.event(EventKind.checkpoint_written, step=self.step, path=str(target), name=name)
        print(f"stub: checkpoint {target} written (step {self.step})", file=sys.stderr, flush=True)
        return target

    # -- the run ---------------------------------------------------------------------------------

    def resume_from(self) -> _Checkpoint | None:
        resume = self.train.resume
        if resume is False:
            existing = latest_checkpoint(self.out_dir)
            if existing is not None:
                raise StubError(
                    FailureReason.invalid_config,
                    f"resume: false but out_dir {self.out_dir} already holds "
                    f"checkpoints ({existing.path.name}); set resume: auto to "
                    "continue that run",
                    ExitCode.INVALID_CONFIG,
                )
            return None
        if resume is True or resume == "auto":
            latest = latest_checkpoint(self.out_dir)
            if latest is None and resume is True:
                raise StubError(
                    FailureReason.invalid_config,
                    f"resume: true but out_dir {self.out_dir} holds no complete checkpoint",
                    ExitCode.INVALID_CONFIG,
                )
            return latest
        info = read_checkpoint(Path(str(resume)))
        if info is None:
            raise StubError(
                FailureReason.invalid_config,
                f"resume: {resume} is not a complete "
                f"checkpoint folder (needs {', '.join(REQUIRED)})",
                ExitCode.INVALID_CONFIG,
            )
        return info

    def fault(self, step: int) -> None:
        for fault in self.faults:
            if fault.step != step or (fault.attempt is not None and fault.attempt != self.attempt):
                continue
            print(f"stub: injected fault {fault.kind} at step {step}", file=sys.stderr, flush=True)
            if fault.kind == "crash":
                raise RuntimeError(f"injected crash at step {step}")
            if fault.kind == "oom":
                raise MemoryError(f"injected out of memory at step {step}")
            if fault.kind == "nospace":
                raise OSError(
                    errno.ENOSPC,
                    os.strerror(errno.ENOSPC),
                    str(self.out_dir / contract.METRICS_FILE),
                )
            if fault.kind == "kill":
                os.kill(os.getpid(), signal.SIGKILL)
            if fault.kind == "hang":
                self.stop.ignore = True
                while True:
                    time.sleep(3600)

    def run(self) -> int:
        from worker.metrics import MetricsWriter

        self.stop.install()
        self.event(EventKind.configured, planned_steps=self.plan.optimizer_steps, engine="stub")
        data_args = self.train.data.init_args
        train_path = Path(str(data_args.train_data_path))
        if not train_path.is_dir() or not any(train_path.glob("*.txt")):
            raise StubError(
                FailureReason.invalid_data,
                f"data.init_args.train_data_path: {train_path} is not a folder with .txt files",
            )
        self.event(EventKind.data_ready)
        self.out_dir.mkdir(parents=True, exist_ok=True)
        _clean_stale(self.out_dir)
        start = self.resume_from()
        if start is not None:
            self.step = start.step
            self.samples = int(start.meta.get("samples", 0))
            self.tokens = int(start.meta.get("tokens", 0))
            self.loss, self.val_loss = start.meta.get("loss"), start.meta.get("val_loss")
            print(
                f"stub: resuming from {start.path} (step {start.step})", file=sys.stderr, flush=True
            )
        until = time.monotonic() + self.start_seconds
        while self.stop.signal is None and time.monotonic() < until:
            time.sleep(min(0.02, max(0.0, until - time.monotonic())))
        if self.stop.signal is not None:
            return self.before_start()
        self.event(EventKind.model_built, step=self.step, planned_steps=self.plan.optimizer_steps)
        if (
            start is not None
            and start.path.name == contract.FINAL
            and start.step >= self.plan.optimizer_steps
        ):
            self.checkpoint = start.path
            return self.result(
                Outcome.succeeded,
                ExitCode.OK,
                stopped_by="nothing_to_do",
                message=f"nothing to do: {start.path} reached step {start.step}",
            )
        if self.stop.signal is not None:
            return self.before_start()
        keep = self.step if start is not None else None
        metrics = MetricsWriter(self.out_dir / contract.METRICS_FILE, resume_step=keep)
        router = (
            MetricsWriter(
                self.out_dir / contract.ROUTER_FILE, resume_step=keep, header=contract.ROUTER_HEADER
            )
            if self.model.is_moe
            else None
        )
        t = self.train.train
        interval = self.train.eval.interval
        samples_per_step = (
            self.plan.grad_accum_iters * self.plan.world_size * self.plan.micro_batch_size
        )
        first = True
        try:
            while self.step < self.plan.optimizer_steps:
                if first and self.stop.signal is not None:
                    return self.before_start()
                step = self.step + 1
                self.fault(step)
                if self.step_seconds:
                    time.sleep(self.step_seconds)
                self.check_fenced()
                self.step = step
                self.samples += samples_per_step
                self.tokens += samples_per_step * self.plan.seq_len
                self.loss = self.fake_loss(step)
                interrupted = self.stop.signal is not None
                last = step >= self.plan.optimizer_steps or interrupted
                val = None
                if (interval and step % interval == 0) or (
                    last and not interrupted and self.train.eval.final_validation
                ):
                    val = self.val_loss = round(self.loss + 0.1, 6)
                if step % t.log_interval == 0 or val is not None or last:
                    metrics.write(self.metrics_row(step, val))
                    if router is not None:
                        router.write_many(self.router_rows(step))
                if first:
                    first = False
                    self.event(EventKind.first_step, step=step)
                if interrupted:
                    self.event(EventKind.stop_requested, step=step, signal=self.stop.name)
                    path = self.save(contract.step_dir_name(step))
                    message = f"stopped by {self.stop.name} after optimizer step {step}; " + (
                        f"checkpoint {path}; run again with resume: auto to continue"
                        if path
                        else "checkpoints are off, nothing to resume from"
                    )
                    print(f"error: interrupted: {message}", file=sys.stderr, flush=True)
                    return self.result(
                        Outcome.interrupted,
                        ExitCode.INTERRUPTED,
                        message=message,
                        stopped_by=self.stop.name,
                    )
                if t.save_interval and step % t.save_interval == 0:
                    self.save(contract.step_dir_name(step))
            self.save(contract.FINAL)
        finally:
            metrics.close()
            if router is not None:
                router.close()
        print(
            json.dumps(
                {
                    "steps": self.step,
                    "tokens": self.tokens,
                    "final_loss": self.loss,
                    "val_loss": self.val_loss,
                    "engine": "stub",
                    "checkpoint_dir": str(self.checkpoint) if self.checkpoint else None,
                    "stopped_by": "completed",
                }
            ),
            flush=True,
        )
        return self.result(
            Outcome.succeeded,
            ExitCode.OK,
            stopped_by="completed",
            message=f"trained {self.step} steps",
        )

    def before_start(self) -> int:
        """A signal before the first step: one line, exit 128 + N, nothing trained."""
        signum = self.stop.signal or signal.SIGTERM
        self.event(EventKind.stop_requested, step=self.step, signal=self.stop.name)
        print("interrupted before training started", file=sys.stderr, flush=True)
        code = (
            ExitCode.SIGINT_BEFORE_START
            if signum == signal.SIGINT
            else ExitCode.SIGTERM_BEFORE_START
        )
        return self.result(
            Outcome.interrupted,
            code,
            stopped_by=self.stop.name,
            message="interrupted before training started",
        )


def _out_dir_of(doc: Any) -> Path:
    if isinstance(doc, dict) and isinstance(doc.get("out_dir"), str):
        return Path(doc["out_dir"])
    return Path("out/pretrain")


def _report_early(out_dir: Path, error: StubError) -> int:
    """``result.json`` and ``finished`` for a failure before the engine exists."""
    from worker import fence

    guard = fence.current()
    attempt = guard.attempt if guard is not None else None
    try:
        EngineResult(
            outcome=Outcome.failed,
            reason=error.reason,
            message=str(error),
            exit_code=int(error.exit_code),
            attempt=attempt,
        ).write(out_dir)
        contract.append_event(
            out_dir,
            EventKind.finished,
            attempt=attempt,
            message=str(error),
            outcome=Outcome.failed.value,
        )
    except OSError:
        pass
    return int(error.exit_code)


def main(argv: list[str] | None = None) -> int:
    """Run the stub engine (module docstring); returns the exit code (``ExitCode``)."""
    parser = argparse.ArgumentParser(
        prog="python -m worker.entry (MOEJOBS_ENGINE=stub)",
        description="The torch-free stub engine.",
    )
    parser.add_argument("--train-config", required=True)
    parser.add_argument("--model-config", required=True)
    parser.add_argument("--no-checkpoints", action="store_true")
    args = parser.parse_args(argv)

    from service.config.issues import ConfigError
    from service.config.parse import load_document
    from service.config.validate import validate_configs
    from worker.fence import Fenced

    train_doc: Any = None
    try:
        train_doc = load_document(args.train_config)
        model_doc = load_document(args.model_config)
        validated = validate_configs(train_doc, model_doc)
    except ConfigError as exc:
        print("error: invalid config\n" + str(exc), file=sys.stderr, flush=True)
        return _report_early(
            _out_dir_of(train_doc),
            StubError(
                FailureReason.invalid_config,
                "; ".join(str(e) for e in exc.errors),
                ExitCode.INVALID_CONFIG,
            ),
        )
    out_dir = Path(validated.train.out_dir)
    try:
        engine = _Engine(train_doc, model_doc, validated, write_checkpoints=not args.no_checkpoints)
    except StubError as exc:
        print(f"error: {exc.reason.value}: {exc}", file=sys.stderr, flush=True)
        return _report_early(out_dir, exc)
    try:
        return engine.run()
    except Fenced as exc:
        # another attempt owns the folder (or will): nothing more is written into it
        try:
            contract.append_event(
                out_dir, EventKind.fenced, attempt=engine.attempt, message=str(exc)
            )
        except OSError:
            pass
        print(
            f"error: fenced: {exc}: training stopped without writing more",
            file=sys.stderr,
            flush=True,
        )
        return int(ExitCode.FENCED)
    except StubError as exc:
        print(f"error: {exc.reason.value}: {exc}", file=sys.stderr, flush=True)
        return engine.result(
            Outcome.failed, int(exc.exit_code), reason=exc.reason, message=str(exc)
        )
    except Exception as exc:  # a crash: the traceback for the log, then one line
        traceback.print_exc()
        if isinstance(exc, OSError) and exc.errno == errno.ENOSPC:
            where = Path(exc.filename) if exc.filename else out_dir
            reason = FailureReason.no_space
            message = f"no space left on device writing {where} ({_free_space(where)})"
        elif isinstance(exc, MemoryError):
            reason, message = FailureReason.out_of_memory, f"MemoryError: {exc}"
        else:
            first = (str(exc).strip().splitlines() or [""])[0]
            reason, message = FailureReason.crashed, f"{type(exc).__name__}: {first}"
        print(f"error: {reason.value}: {message}", file=sys.stderr, flush=True)
        try:
            return engine.result(
                Outcome.failed, int(ExitCode.FAILED), reason=reason, message=message
            )
        except OSError:
            return int(ExitCode.FAILED)


if __name__ == "__main__":
    sys.exit(main())
