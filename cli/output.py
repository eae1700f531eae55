"""What the client commands print (:mod:`cli.runs`), built from the API's models: pure
functions from answers to lines, no I/O."""

from __future__ import annotations

from collections.abc import Sequence
from datetime import datetime, timedelta
from typing import Any

from service.api.models import (
    CheckpointPublic,
    Comparison,
    IssueOut,
    MetricRow,
    RunPublic,
    SmokeTestPublic,
)
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


def progress(run: RunPublic) -> str:
    """``STEP/TOTAL`` of the run's newest metric row (``-/200`` before the first, ``120`` when
    no total is planned, ``-`` when neither is known)."""
    step = None if run.latest_metrics is None else run.latest_metrics.step
    total = steps_total(run)
    if total is None:
        return "-" if step is None else str(step)
    return f"{'-' if step is None else step}/{total}"


def runs_table(runs: Sequence[RunPublic]) -> list[str]:
    """The table of ``moejobs runs``: a header, then one row per run with its step / total,
    latest loss and tokens/s (its newest metric row) and its name and tags."""
    if not runs:
        return ["no runs"]
    lines = [
        f"{'ID':<36}  {'STATUS':<9}  {'CREATED (UTC)':<19}  {'STEP':>11}  {'LOSS':>7}  "
        f"{'TOK/S':>9}  NAME"
    ]
    for run in runs:
        created = run.created_at.strftime("%Y-%m-%d %H:%M:%S")
        latest = run.latest_metrics
        loss = number(None if latest is None else latest.loss, ".4f")
        speed = number(None if latest is None else latest.tokens_per_sec, ",.0f")
        tags = f"  [{', '.join(run.tags)}]" if run.tags else ""
        lines.append(
            f"{str(run.id):<36}  {run.status:<9}  {created:<19}  {progress(run):>11}  "
            f"{loss:>7}  {speed:>9}  {run.name}{tags}"
        )
    return lines


def cell(value: Any) -> str:
    """A config value in a table cell: numbers as given (``0.003``, ``8``), strings bare,
    null as ``-``, anything else as compact JSON."""
    if value is None:
        return "-"
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, (int, float, str)):
        return str(value)
    import json

    return json.dumps(value, separators=(",", ":"), sort_keys=True)


def _table(rows: Sequence[Sequence[str]]) -> list[str]:
    """Rows of cells as left-aligned columns two spaces apart (no trailing spaces)."""
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    return [
        "  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)).rstrip() for row in rows
    ]


#: The metric rows of ``moejobs compare``: (label, what, column).
COMPARE_METRICS = (
    ("final loss", "final", "loss"),
    ("best loss", "best", "loss"),
    ("final val_loss", "final", "val_loss"),
    ("best val_loss", "best", "val_loss"),
    ("final tok/s", "final", "tokens_per_sec"),
)


def compare_table(comparison: Comparison) -> list[str]:
    """What ``moejobs compare`` prints: one column per run (its name, id, status, steps), a row
    per metric (final and best, ``3.012 @120`` with the step of the best), then one row per
    config key that differs; the keys left out by construction in a last line."""
    runs = comparison.runs
    rows: list[list[str]] = [
        ["", *(r.name for r in runs)],
        ["run", *(str(r.id)[:8] for r in runs)],
        ["status", *(r.status for r in runs)],
        [
            "steps",
            *(
                f"{'-' if r.final is None else r.final.step}/{'-' if r.steps_total is None else r.steps_total}"
                for r in runs
            ),
        ],
    ]
    for label, what, column in COMPARE_METRICS:
        cells = []
        for r in runs:
            if what == "final":
                value = None if r.final is None else getattr(r.final, column)
                cells.append(number(value, ",.0f" if column == "tokens_per_sec" else ".4g"))
            else:
                best = r.best.get(column)
                cells.append("-" if best is None else f"{best.value:.4g} @{best.step}")
        rows.append([label, *cells])
    if any(r.tags for r in runs):
        rows.append(["tags", *(",".join(r.tags) or "-" for r in runs)])
    lines = _table(rows)
    if comparison.differences:
        lines.append("")
        lines += _table(
            [["config", *("" for _ in runs)]]
            + [[d.key, *(cell(v) for v in d.values)] for d in comparison.differences]
        )
    else:
        lines.append("")
        lines.append("the resolved configs are the same")
    if comparison.left_out:
        lines.append(f"(differ by construction, not shown: {', '.join(comparison.left_out)})")
    return lines


def bar_label(run: RunPublic, state: str | None = None) -> str:
    """The label of ``status --follow``'s bar: the run's name (30 characters at most) and,
    in brackets, ``state`` when given (e.g. the tokenization) or the run's status when it
    is not running (queued, or the final status once it ended)."""
    name = (run.name or str(run.id))[:30]
    shown = state or (None if run.status == "running" else run.status)
    return f"{name} [{shown}]" if shown else name


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
