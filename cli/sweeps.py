"""``moejobs sweep create FILE``, ``moejobs sweep list``, ``moejobs sweep status ID
[--follow]``, ``moejobs sweep cancel ID``: sweeps on a server, through the typed client
(``cli.http``)."""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from typing import IO

from cli.http import Api, ClientError
from cli.runs import _run_command
from service.api.models import SweepPage, SweepPublic

POLL_SECONDS = 2.0
ENDED = ("finished", "failed", "cancelled")


def _value(value: float | None) -> str:
    return "-" if value is None else f"{value:.4g}"


def print_sweep(sweep: SweepPublic, out: IO[str]) -> None:
    """The sweep's line, its trials table and its best trial."""
    counts = ", ".join(f"{n} {s}" for s, n in sorted(sweep.trial_counts.items()))
    print(
        f"sweep {sweep.id} ({sweep.name}): {sweep.status}; {sweep.method}, "
        f"{sweep.metric.goal} {sweep.metric.name}; trials: {counts or 'none yet'}",
        file=out,
    )
    if sweep.end_reason:
        print(f"  {sweep.end_reason}", file=out)
    paths = list(sweep.spec.get("parameters", {}))
    print(
        f"  {'#':>3}  {'status':<10} {'final':>9} {'best':>9}  run"
        + "".join(f"  {p.rsplit('.', 1)[-1]}" for p in paths),
        file=out,
    )
    for t in sweep.trials:
        status = t.status + (f" ({t.cancel_reason})" if t.cancel_reason == "pruned" else "")
        values = "".join(f"  {t.params.get(p)!r}" for p in paths)
        run = str(t.run_id) if t.run_id else "-"
        print(
            f"  {t.number:>3}  {status:<10} {_value(t.final_value):>9} "
            f"{_value(t.best_value):>9}  {run}{values}",
            file=out,
        )
        if t.status == "skipped" and t.errors:
            print(f"       skipped: {t.errors[0].get('msg', '')}", file=out)
    if sweep.best_trial is not None:
        b = sweep.best_trial
        print(
            f"  best: trial {b.number} ({sweep.metric.name} {_value(b.best_value)}), "
            f"run {b.run_id}",
            file=out,
        )


def create(
    base_url: str | None, path: str, token: str | None = None, *, out: IO[str] | None = None
) -> SweepPublic:
    """Read the sweep document (YAML or JSON) and ``POST /sweeps``. Raises ClientError (exit 2
    for an unreadable document or a refused sweep)."""
    from service.config.issues import ConfigError
    from service.config.parse import load_document

    out = out or sys.stdout
    try:
        doc = load_document(Path(path))
    except ConfigError as error:
        raise ClientError(str(error), exit_code=2) from None
    with Api(base_url, token) as api:
        sweep = api.create_sweep(doc)
    print_sweep(sweep, out)
    return sweep


def status(
    base_url: str | None,
    sweep_id: str,
    follow: bool = False,
    token: str | None = None,
    *,
    poll_seconds: float = POLL_SECONDS,
    out: IO[str] | None = None,
) -> SweepPublic:
    """Print the sweep; with ``follow``, a line per change until it has ended, then the
    table."""
    out = out or sys.stdout
    with Api(base_url, token) as api:
        sweep = api.get_sweep(sweep_id)
        if follow:
            last = ""
            while sweep.status not in ENDED:
                counts = ", ".join(f"{n} {s}" for s, n in sorted(sweep.trial_counts.items()))
                best = sweep.best_trial
                line = f"{sweep.status}: {counts}" + (
                    f"; best so far trial {best.number} ({_value(best.best_value)})" if best else ""
                )
                if line != last:
                    print(line, file=out, flush=True)
                    last = line
                time.sleep(poll_seconds)
                sweep = api.get_sweep(sweep_id)
    print_sweep(sweep, out)
    return sweep


def print_sweeps(page: SweepPage, out: IO[str]) -> None:
    """One line per sweep: id, status, method, metric, trials by status, best value."""
    if not page.items:
        print("no sweeps yet (moejobs sweep create FILE)", file=out)
        return
    print(f"{'ID':<36}  {'STATUS':<9} {'METHOD':<6} {'BEST':>9}  TRIALS  NAME", file=out)
    for s in page.items:
        best = s.best_trial.best_value if s.best_trial is not None else None
        counts = ",".join(f"{n} {st}" for st, n in sorted(s.trial_counts.items())) or "-"
        print(
            f"{s.id!s:<36}  {s.status:<9} {s.method:<6} {_value(best):>9}  {counts}  {s.name}",
            file=out,
        )


def list_sweeps(
    base_url: str | None, token: str | None = None, *, limit: int = 100, out: IO[str] | None = None
) -> SweepPage:
    """``GET /sweeps`` as a table (newest first)."""
    out = out or sys.stdout
    with Api(base_url, token) as api:
        page = api.list_sweeps(limit)
    print_sweeps(page, out)
    return page


def cancel(
    base_url: str | None, sweep_id: str, token: str | None = None, *, out: IO[str] | None = None
) -> SweepPublic:
    out = out or sys.stdout
    with Api(base_url, token) as api:
        sweep = api.cancel_sweep(sweep_id)
    print_sweep(sweep, out)
    return sweep


def cmd_sweep(args: argparse.Namespace) -> int:
    """``moejobs sweep create FILE | list | status ID [--follow] | cancel ID``; ``status --follow``
    exits 0 only when the sweep finished."""
    result: list[SweepPublic] = []
    if args.sweep_command == "create":
        return _run_command(lambda: result.append(create(args.url, args.file, token=args.token)))
    if args.sweep_command == "list":
        return _run_command(lambda: list_sweeps(args.url, args.token, limit=args.limit))
    if args.sweep_command == "cancel":
        return _run_command(lambda: result.append(cancel(args.url, args.sweep_id, args.token)))
    code = _run_command(
        lambda: result.append(status(args.url, args.sweep_id, args.follow, args.token))
    )
    if code == 0 and args.follow and result[0].status != "finished":
        return 1
    return code
