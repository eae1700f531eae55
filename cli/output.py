"""What the client commands print (:mod:`cli.runs`), built from the API's models: pure
functions from answers to lines, no I/O."""

from __future__ import annotations

from collections.abc import Sequence
from datetime import datetime, timedelta
from typing import Any

from service.api.models import CheckpointPublic, IssueOut, MetricRow, RunPublic, SmokeTestPublic
from service.models import TERMINAL_STATUSES

#: How many checkpoint names a "not found" message lists (the newest ones).
LISTED_CHECKPOINTS = 5


def steps_total(run: RunPublic) -> int | None:
    """Optimizer steps the run will take, from its estimate (``estimate.plan.optimizer_steps``,
    ``service.estimate.Estimate.to_dict``), or None when the run has no estimate."""
    plan = (run.estimate or {}).get("plan") or {}
    value = plan.get("optimizer_steps")
    return int(value) if isinstance(value, (int, float)) else None


def is_terminal(run: RunPublic) -> bool:
    """Whether nothing will change about the run any more (``service.models.TERMINAL_STATUSES``)."""
    return run.status in TERMINAL_STATUSES


def reason(run: RunPublic) -> str:
    """``failure_reason: failure_message`` (either part alone when the other is empty)."""
    return ": ".join(str(p) for p in (run.failure_reason, run.failure_message) if p)


def when(value: datetime) -> str:
    """A timestamp as ``2026-05-09 13:39:09 UTC`` (``UTC`` only when it says it is UTC)."""
    utc = value.utcoffset() == timedelta(0)
    return value.strftime("%Y-%m-%d %H:%M:%S") + (" UTC" if utc else "")


def number(value: Any, spec: str = ".4g") -> str:
    return "-" if value is None else format(value, spec)


def postfix(row: MetricRow) -> str:
    """``loss=2.61, val=2.70, tok/s=52,000`` (val and tok/s when the row has them)."""
    parts = [f"loss={number(row.loss)}"]
    if row.val_loss is not None:
        parts.append(f"val={number(row.val_loss)}")
    if row.tokens_per_sec is not None:
        parts.append(f"tok/s={row.tokens_per_sec:,.0f}")
    return ", ".join(parts)


def issue(warning: IssueOut) -> str:
    """A config warning as ``train.max_tokens: message``."""
    loc = ".".join(str(p) for p in warning.loc)
    return f"{loc}: {warning.msg}" if loc else warning.msg


def runs_table(runs: Sequence[RunPublic]) -> list[str]:
    """The table of ``moejobs runs``: a header, then one row per run."""
    if not runs:
        return ["no runs"]
    lines = [f"{'ID':<36}  {'STATUS':<9}  {'CREATED (UTC)':<19}  {'PLANNED':>8}  NAME"]
    for run in runs:
        created = run.created_at.strftime("%Y-%m-%d %H:%M:%S")
        total = steps_total(run)
        lines.append(
            f"{str(run.id):<36}  {run.status:<9}  {created:<19}  "
            f"{'' if total is None else total:>8}  {run.name}"
        )
    return lines


def final_line(run: RunPublic, last_step: int) -> str:
    """``run ID STATUS after N steps: reason``: the last line of ``status --follow``."""
    line = f"run {run.id} {run.status}"
    if last_step >= 0:
        line += f" after {last_step} step{'s' if last_step != 1 else ''}"
    if reason(run):
        line += f": {reason(run)}"
    return line


def missing_checkpoint(what: str, run: RunPublic, checkpoints: Sequence[CheckpointPublic]) -> str:
    """The one line for a checkpoint the run does not have: ``not found: WHAT``, the run's
    status, and the checkpoints it has (the newest :data:`LISTED_CHECKPOINTS`) with the
    ``--step`` that picks one, e.g. ``...; its checkpoints: step-00000036, step-00000039;
    download one with --step N (e.g. --step 39)``."""
    message = f"not found: {what} (the run is {run.status})"
    names = [c.name for c in checkpoints if c.name]
    if not names:
        return message + "; it has no checkpoints" + ("" if is_terminal(run) else " yet")
    shown = names[-LISTED_CHECKPOINTS:]
    listed = ", ".join(shown)
    if len(names) > len(shown):
        listed = f"{len(names) - len(shown)} older, " + listed
    steps = [c.step for c in checkpoints if c.name != "final" and c.step is not None]
    hints = []
    if steps:
        hints.append(
            f"--step {steps[-1]}" if len(steps) == 1 else f"--step N (e.g. --step {steps[-1]})"
        )
    if "final" in names:
        hints.append("without --step for final")
    message += f"; its checkpoints: {listed}"
    return f"{message}; download one with {' or '.join(hints)}" if hints else message


def smoke_state(result: SmokeTestPublic) -> str:
    """``"passed"``, ``"failed"`` or ``"running"`` (pending or running) for a smoke test."""
    return result.status if result.status in ("passed", "failed") else "running"


def smoke_lines(result: SmokeTestPublic | None) -> list[str]:
    """The lines ``smoke-test`` prints: one per stage, then the verdict (``smoke test
    running`` alone before the first answer)."""
    if result is None:
        return ["smoke test running"]
    lines = []
    for stage in result.stages:
        took = f"{stage.seconds:8.1f} s" if stage.seconds is not None else "       - "
        lines.append(f"  {stage.name:<24}{took}  {stage.status}")
    verdict = smoke_state(result)
    line = f"smoke test {verdict}"
    if verdict == "failed" and result.failed_stage:
        line += f" at stage {result.failed_stage}"
    if verdict == "failed" and result.message:
        line += f": {result.message}"
    lines.append(line)
    return lines
