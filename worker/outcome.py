"""How a training attempt ended: its classification and the write that records it.

:func:`classify_exit` turns the training process's exit (its return code, the engine's
``result.json`` and what the worker did or saw meanwhile) into an :class:`Outcome`, from the
contract (``service.contract``), never from log text. :func:`finish_attempt` is the only place
that maps an outcome to ``service.runs``' status functions (``transition`` / ``retry_or_fail``).
:func:`cgroup_oom_kills` reads the kernel's OOM-kill count that tells an OOM kill from another
SIGKILL.
"""

from __future__ import annotations

import enum
import logging
import signal
import uuid
from dataclasses import dataclass
from pathlib import Path

from service import contract, runs
from service.contract import EngineResult, ExitCode, FailureReason
from service.db import Database
from service.models import Run, RunStatus
from service.settings import Settings

log = logging.getLogger("moejobs.runner")

#: Exit codes that mean "stopped on a signal": the engine's own (a checkpoint at a step
#: boundary, or before training started) and the shell's 128 + N.
_STOPPED = frozenset(
    {ExitCode.INTERRUPTED, ExitCode.SIGINT_BEFORE_START, ExitCode.SIGTERM_BEFORE_START}
)


class OutcomeKind(enum.StrEnum):
    """What an attempt's end asks for (see :class:`Outcome`)."""

    #: The run succeeded.
    succeeded = "succeeded"
    #: The run was cancelled on request.
    cancelled = "cancelled"
    #: The run failed with a reason (``killed`` and ``lost_worker`` are retried while attempts
    #: remain).
    failed = "failed"
    #: The worker is shutting down: the run goes back to queued and resumes from its latest
    #: checkpoint on the next claim.
    requeue = "requeue"
    #: Another attempt owns the run: nothing may be written.
    lease_lost = "lease_lost"


#: The status each kind asks for (a ``killed`` failure may still end in queued: see
#: :func:`finish_attempt`); lease_lost asks for none.
_STATUS = {
    OutcomeKind.succeeded: RunStatus.succeeded,
    OutcomeKind.cancelled: RunStatus.cancelled,
    OutcomeKind.failed: RunStatus.failed,
    OutcomeKind.requeue: RunStatus.queued,
}


@dataclass(frozen=True)
class Outcome:
    """How an attempt ended, before it is written.

    ``kind`` is an :class:`OutcomeKind`; ``reason`` is set for ``failed`` (``killed`` goes
    through ``retry_or_fail``: it is re-queued while attempts remain). ``message`` is a
    one-line human reason; ``exit_code`` the child's return code (negative: killed by that
    signal), None when it never started.
    """

    kind: OutcomeKind
    message: str
    reason: FailureReason | None = None
    exit_code: int | None = None

    @property
    def status(self) -> RunStatus | None:
        """The status this outcome asks for (queued for a requeue; None when lease lost).
        ``killed`` may still end in queued: see :func:`finish_attempt`."""
        return _STATUS.get(self.kind)


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
        return Outcome(OutcomeKind.lease_lost, "another attempt owns the run", exit_code=returncode)
    if returncode == ExitCode.OK:
        text = result.message if result is not None and result.message else "training finished"
        return Outcome(OutcomeKind.succeeded, text, exit_code=returncode)
    sig = _signal_of(returncode)
    if cancel_requested:
        how = f" ({_signal_name(sig)})" if sig and returncode not in _STOPPED else ""
        return Outcome(
            OutcomeKind.cancelled, f"training stopped on request{how}", exit_code=returncode
        )
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
        return Outcome(OutcomeKind.requeue, text, exit_code=returncode)
    if returncode == ExitCode.FENCED:
        return Outcome(
            OutcomeKind.failed,
            "the training stopped itself: " + (last or "its worker went silent"),
            FailureReason.lost_worker,
            returncode,
        )
    if result is not None and result.outcome == contract.Outcome.failed and result.reason:
        return Outcome(
            OutcomeKind.failed,
            result.message or last or result.reason.value,
            result.reason,
            returncode,
        )
    if returncode == ExitCode.INVALID_CONFIG:
        return Outcome(
            OutcomeKind.failed,
            (result.message if result else "") or last or "invalid config",
            FailureReason.invalid_config,
            returncode,
        )
    if returncode == ExitCode.FAILED:
        return Outcome(
            OutcomeKind.failed,
            last or "training exited with code 1",
            FailureReason.crashed,
            returncode,
        )
    if sig is not None and returncode not in _STOPPED:
        if oom_killed:
            return Outcome(
                OutcomeKind.failed,
                f"killed by {_signal_name(sig)}: out of memory (OOM killer)",
                FailureReason.out_of_memory,
                returncode,
            )
        return Outcome(
            OutcomeKind.failed,
            f"training process killed by {_signal_name(sig)}",
            FailureReason.killed,
            returncode,
        )
    if returncode in _STOPPED:
        return Outcome(
            OutcomeKind.failed,
            f"training stopped by {_signal_name(sig or signal.SIGTERM)} from outside the worker",
            FailureReason.killed,
            returncode,
        )
    return Outcome(
        OutcomeKind.failed,
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
    if outcome.kind == OutcomeKind.lease_lost:
        return None
    actor = f"worker:{worker_id}"
    with db.session() as session:
        try:
            if outcome.kind == OutcomeKind.failed and outcome.reason in runs.RETRYABLE_REASONS:
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
            if outcome.kind == OutcomeKind.requeue:
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


def cgroup_oom_kills() -> int | None:
    """The kernel's OOM-kill count for this process's cgroup (v2 ``memory.events``, v1
    ``memory.oom_control``), None when unreadable. A count that grew while the training ran
    makes :func:`classify_exit` read a SIGKILL as ``out_of_memory``."""
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
