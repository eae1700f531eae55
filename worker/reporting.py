"""The engine's own account of one process, in the forms ``service.contract`` defines:
``out_dir/events.jsonl`` lines while it runs and ``out_dir/result.json`` when it ends.

Torch-free (``worker.entry`` uses it before torch is imported). Only rank 0 reports: a
:class:`Reporter` built with ``enabled=False`` (other ranks) writes nothing. Writing is best
effort: an event or result that cannot be written (a full disk) is logged once and the run goes
on; the exit code and the ``error: <reason>: ...`` line on stderr still say how it ended.
"""

from __future__ import annotations

import logging
import os
import signal
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from service import contract
from service.contract import EngineResult, EventKind, ExitCode, Outcome
from worker import checkpoint as ckpt
from worker import early, fence
from worker.errors import BEFORE_START, EngineError, Interrupted, interrupted_before_start

log = logging.getLogger("moejobs.train")


def current_attempt() -> int | None:
    """The attempt (fencing token) of this process: the installed fence's, else
    ``MOEJOBS_ATTEMPT``, else None (not started by a worker)."""
    guard = fence.current()
    if guard is not None:
        return guard.attempt
    try:
        return int(os.environ[contract.ENV_ATTEMPT])
    except (KeyError, ValueError):
        return None


def raw_out_dir(train_config: str | Path | None) -> str:
    """``out_dir`` as the raw train config document says, for reporting before (or without) a
    valid config: the document's ``out_dir`` when it is a string; the schema's default
    (``out/pretrain``) when the document is a mapping without one; the working directory
    (``.``) when the file is missing or unreadable or ``out_dir`` is not a string."""
    if not train_config:
        return "."
    try:
        import yaml

        with open(train_config, encoding="utf-8") as fh:
            doc = yaml.safe_load(fh)  # JSON is YAML too
    except Exception:  # noqa: BLE001 - missing, unreadable or not YAML: the config check says so
        return "."
    if not isinstance(doc, dict):
        return "."
    if "out_dir" not in doc:
        from service.config.train import TrainConfig

        return str(TrainConfig.model_fields["out_dir"].default)
    value = doc["out_dir"]
    return value if isinstance(value, str) and value else "."


@dataclass
class Progress:
    """What the run has reached so far (all attempts), kept current by the training loop."""

    steps: int = 0
    tokens: int = 0
    final_loss: float | None = None
    val_loss: float | None = None
    planned_steps: int | None = None
    #: the newest checkpoint this process wrote
    checkpoint: Path | None = None
    #: whether this process' first optimizer step has begun
    training_started: bool = False


class Reporter:
    """Writes one engine process' events and its ``result.json`` (rank 0 only).

    Args:
        out_dir: the run's folder (may not exist yet; it is created on the first write).
        enabled: False on ranks other than 0: nothing is written.
        attempt: the attempt to stamp; default :func:`current_attempt`.
    """

    def __init__(
        self, out_dir: Path | str, *, enabled: bool = True, attempt: int | None = None
    ) -> None:
        self.out_dir = Path(out_dir)
        self.enabled = enabled
        self.attempt = attempt if attempt is not None else current_attempt()
        self.progress = Progress()
        self.result: EngineResult | None = None
        self._started = time.monotonic()
        self._warned = False

    def retarget(self, out_dir: Path | str) -> None:
        """Report into ``out_dir`` from now on (the validated config's, once known)."""
        self.out_dir = Path(out_dir)

    # -- events -------------------------------------------------------------------------------

    def event(
        self,
        kind: EventKind | str,
        *,
        step: int | None = None,
        message: str | None = None,
        **data: Any,
    ) -> None:
        """Append one event (``service.contract.append_event``); never raises."""
        if not self.enabled:
            return
        try:
            contract.append_event(
                self.out_dir, kind, attempt=self.attempt, step=step, message=message, **data
            )
        except (OSError, ValueError, TypeError) as exc:
            self._warn_once(f"cannot write {self.out_dir / contract.EVENTS_FILE}: {exc}")

    def _warn_once(self, text: str) -> None:
        if not self._warned:
            self._warned = True
            log.warning("%s (further reporting errors are not logged)", text)

    # -- the end ------------------------------------------------------------------------------

    def finish(
        self,
        outcome: Outcome,
        exit_code: int,
        *,
        reason=None,
        message: str = "",
        stopped_by: str | None = None,
        checkpoint: Path | str | None = None,
        peak_memory_bytes: int | None = None,
    ) -> EngineResult:
        """Build the :class:`~service.contract.EngineResult` from ``progress`` and the given
        fields, write ``result.json`` and the ``finished`` event (rank 0, once: a later call
        returns the first result). Never raises."""
        if self.result is not None:
            return self.result
        p = self.progress
        if checkpoint is None:
            checkpoint = p.checkpoint
        result = EngineResult(
            outcome=outcome,
            reason=reason,
            message=" ".join(message.split()),
            exit_code=int(exit_code),
            attempt=self.attempt,
            steps=p.steps,
            planned_steps=p.planned_steps,
            tokens=p.tokens,
            final_loss=p.final_loss,
            val_loss=p.val_loss,
            checkpoint=str(checkpoint) if checkpoint is not None else None,
            stopped_by=stopped_by,
            peak_memory_bytes=peak_memory_bytes,
            elapsed_s=round(time.monotonic() - self._started, 3),
        )
        self.result = result
        if self.enabled:
            try:
                result.write(self.out_dir)
            except OSError as exc:
                self._warn_once(f"cannot write {self.out_dir / contract.RESULT_FILE}: {exc}")
            self.event(
                EventKind.finished,
                step=p.steps,
                message=result.message,
                outcome=outcome.value,
                exit_code=int(exit_code),
                reason=reason.value if reason is not None else None,
            )
        return result

    def succeeded(self, training) -> EngineResult:
        """Report a ``worker.train.TrainingResult`` (completed, max_time or nothing_to_do)."""
        p = self.progress
        p.steps, p.tokens = training.steps, training.tokens
        p.final_loss, p.val_loss = training.final_loss, training.val_loss
        if training.stopped_by == "nothing_to_do":
            message = f"nothing to train: final/ is already at step {training.steps}"
        elif training.stopped_by == "max_time":
            message = f"train.max_time reached after optimizer step {training.steps}"
        else:
            message = f"trained {training.steps} optimizer steps ({training.tokens} tokens)"
        return self.finish(
            Outcome.succeeded,
            ExitCode.OK,
            message=message,
            stopped_by=training.stopped_by,
            checkpoint=training.checkpoint_dir,
            peak_memory_bytes=training.peak_memory_bytes,
        )

    def failed(self, error: EngineError) -> EngineResult:
        """Report an :class:`~worker.errors.EngineError` (an interruption included)."""
        if isinstance(error, Interrupted):
            if str(error) == BEFORE_START:
                self._fill_from_checkpoints()
            return self.finish(
                Outcome.interrupted,
                error.exit_code,
                message=str(error),
                stopped_by=error.signal_name,
                checkpoint=error.checkpoint,
            )
        return self.finish(error.outcome, error.exit_code, reason=error.reason, message=str(error))

    def _fill_from_checkpoints(self) -> None:
        """Before training started the loop has not said where the run is: take steps and
        tokens from the newest complete checkpoint (earlier attempts' progress)."""
        p = self.progress
        if p.steps:
            return
        try:
            latest = ckpt.latest_checkpoint(self.out_dir)
        except OSError:
            latest = None
        if latest is not None:
            p.steps = latest.step
            try:
                p.tokens = int(latest.meta.get("tokens", 0))
            except (TypeError, ValueError):
                pass

    def exit_before_start(self, signum: int) -> None:
        """The hook ``worker.early``'s handlers call just before they exit 128 + signum:
        report ``interrupted`` (``interrupted before training started``)."""
        try:
            name = signal.Signals(signum).name
        except ValueError:
            name = f"signal {signum}"
        self.failed(interrupted_before_start(signum, name))

    def install_early_exit(self) -> None:
        """Make this reporter write ``result.json`` when ``worker.early``'s SIGINT/SIGTERM
        handlers end the process (they do only where they are installed)."""
        early.set_early_exit_hook(self.exit_before_start if self.enabled else None)
