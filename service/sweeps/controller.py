"""The sweep controller: creates a sweep's trials, stops the ones early stopping prunes and
ends the sweep. Its only state is the database (``sweeps``, ``sweep_trials``, the runs and
their metric points), so any process may run it: the API right after ``POST /sweeps`` and a
cancel, every worker periodically and when a trial's run ended (``worker.sweeper``).

One controller decides for a sweep at a time: :func:`tick` first takes the sweep's lease
(``sweeps.controller_id``/``controller_until``) with a conditional UPDATE that succeeds for one
process only, and gives it back at the end (an abandoned lease expires after
:data:`LEASE_SECONDS`). A tick:

1. submits trials that have a row but no run yet (a grid's points, in number order, or a
   sampled trial whose process died between the row and the run) while fewer than
   ``max_concurrent`` of its runs are queued or running; each through
   ``service.submission.submit_run`` (validation, admission; the trial's idempotency key
   ``sweep:<sweep id>:<number>`` makes a repeated submission return the first run);
2. random and tpe: asks Optuna for new points while slots are free and fewer than
   ``max_runs`` trials were created. The study lives in memory, rebuilt from the tables at
   every tick (finished trials with their metric value); the sampler is seeded with the
   sweep's ``seed`` plus the trial's number, so a random sweep is reproducible (a TPE sweep
   also depends on which trials had finished when a point was asked). TPE starts with
   ``max(2, max_runs // 4)`` random trials. A point that does not validate becomes a
   ``skipped`` trial with its errors and does not count towards ``max_runs``; after
   :data:`SKIP_LIMIT_IN_A_ROW` skipped trials in a row (or ``max(10, 2 * max_runs)`` in all)
   the sweep creates no more and ends ``failed`` when none of its trials succeeded;
3. median early stopping (``early_stopping: {type: median, min_steps}``): Optuna's
   ``MedianPruner`` (``n_warmup_steps = min_steps``, ``n_startup_trials = max(1, max_runs //
   4)`` finished trials) on each running trial's metric per logged step; a pruned trial's run
   gets a cancel request with reason ``pruned`` (it stops at a step boundary, writes a
   checkpoint and ends ``cancelled``);
4. the sweep ends when it will create no more trials and none is queued or running:
   ``finished`` (``end_reason`` says why), ``failed`` or ``cancelled``.

A trial's value is its best logged metric value (min or max by the goal); the sweep's best
trial is the succeeded trial with the best value (the lower number on a tie).
"""

from __future__ import annotations

import logging
import os
import socket
import uuid
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any

import sqlalchemy as sa
from celery import Celery
from sqlmodel import Session, col, select

from service import reads
from service import runs as runs_service
from service.db import read_transaction, write_transaction
from service.models import (
    CancelReason,
    MetricPoint,
    Run,
    RunStatus,
    Sweep,
    SweepStatus,
    SweepTrial,
    aware_now,
)
from service.settings import Settings
from service.submission import InvalidSubmission, send_run, submit_run
from service.sweeps.spec import CheckedSweep, SweepCreate, trial_request

__all__ = [
    "LEASE_SECONDS",
    "SKIP_LIMIT_IN_A_ROW",
    "SweepNotFound",
    "SweepActive",
    "TrialView",
    "SweepView",
    "TickResult",
    "api_holder",
    "create_sweep",
    "tick",
    "tick_running",
    "request_cancel",
    "delete_sweep",
    "view_sweep",
    "list_sweeps",
]

log = logging.getLogger("moejobs.sweeps")

#: Seconds a controller's lease lasts when its process dies in the middle of a tick.
LEASE_SECONDS = 30.0
#: Skipped (invalid) sampled points in a row after which a sweep creates no more trials.
SKIP_LIMIT_IN_A_ROW = 10
ACTIVE = (RunStatus.queued, RunStatus.running)


class SweepNotFound(LookupError):
    def __init__(self, sweep_id: uuid.UUID):
        super().__init__(f"sweep {sweep_id} not found")
        self.sweep_id = sweep_id


class SweepActive(Exception):
    def __init__(self, sweep_id: uuid.UUID, status: SweepStatus):
        super().__init__(
            f"sweep {sweep_id} is {status.value}: cancel it and wait until it has ended"
        )
        self.sweep_id, self.status = sweep_id, status


def api_holder() -> str:
    """The controller id of this API process (``api:<host>:<pid>``)."""
    return f"api:{socket.gethostname()}:{os.getpid()}"


# -- creating ---------------------------------------------------------------------------------


def create_sweep(session: Session, checked: CheckedSweep, *, owner: str = "local") -> Sweep:
    """Store a checked sweep (``running``) and, for a grid, all of its trials (rows without
    runs yet: :func:`tick` submits them as slots free up)."""
    sweep = checked.sweep
    with write_transaction(session):
        row = Sweep(
            name=sweep.name,
            owner=owner,
            method=sweep.method,
            metric_name=sweep.metric.name,
            metric_goal=sweep.metric.goal,
            max_runs=len(checked.points) if sweep.method == "grid" else sweep.max_runs,
            max_concurrent=sweep.max_concurrent,
            seed=sweep.seed,
            spec=sweep.model_dump(mode="json", by_alias=True),
            webhooks=[h.model_dump() for h in sweep.webhooks],
        )
        session.add(row)
        session.flush()
        for number, params in enumerate(checked.points):
            session.add(SweepTrial(sweep_id=row.id, number=number, params=params))
        session.flush()
        session.expunge(row)
    return row


# -- reading ----------------------------------------------------------------------------------


@dataclass
class TrialView:
    """One trial as the API shows it: ``status`` is its run's status, ``pending`` (a row
    waiting for a free slot) or ``skipped``."""

    number: int
    params: dict[str, Any]
    state: str
    status: str
    errors: list[Any]
    run_id: uuid.UUID | None
    run_name: str | None
    cancel_reason: str | None
    final_value: float | None
    best_value: float | None
    last_step: int | None
    series: list[tuple[int, float]] = field(default_factory=list, repr=False)


@dataclass
class SweepView:
    sweep: Sweep
    trials: list[TrialView]
    best: TrialView | None

    @property
    def active(self) -> int:
        return sum(t.status in ("queued", "running") for t in self.trials)


def _get_sweep(session: Session, sweep_id: uuid.UUID) -> Sweep:
    row = session.exec(
        select(Sweep).where(col(Sweep.id) == sweep_id).execution_options(populate_existing=True)
    ).first()
    if row is None:
        raise SweepNotFound(sweep_id)
    return row


def _series(
    session: Session, run_ids: Sequence[uuid.UUID], metric: str
) -> dict[uuid.UUID, list[tuple[int, float]]]:
    """``{run id: [(step, value), ...]}`` of ``metric``'s logged values, by step."""
    if not run_ids:
        return {}
    column = getattr(MetricPoint, metric)
    rows = session.execute(
        sa.select(col(MetricPoint.run_id), col(MetricPoint.step), column)
        .where(col(MetricPoint.run_id).in_(list(run_ids)), column.is_not(None))
        .order_by(col(MetricPoint.run_id), col(MetricPoint.step))
    ).all()
    out: dict[uuid.UUID, list[tuple[int, float]]] = {}
    for run_id, step, value in rows:
        out.setdefault(run_id, []).append((int(step), float(value)))
    return out


def _better(goal: str) -> Any:
    return min if goal == "minimize" else max


def _view(session: Session, sweep: Sweep) -> SweepView:
    trials = session.exec(
        select(SweepTrial)
        .where(col(SweepTrial.sweep_id) == sweep.id)
        .order_by(col(SweepTrial.number))
    ).all()
    run_ids = [t.run_id for t in trials if t.run_id is not None]
    runs: dict[uuid.UUID, Any] = {}
    if run_ids:
        for row in session.execute(
            sa.select(col(Run.id), col(Run.name), col(Run.status), col(Run.cancel_reason)).where(
                col(Run.id).in_(run_ids)
            )
        ).all():
            runs[row.id] = row
    series = _series(session, list(runs), sweep.metric_name)
    pick = _better(sweep.metric_goal)
    views = []
    for t in trials:
        run = runs.get(t.run_id) if t.run_id is not None else None
        points = series.get(t.run_id, []) if t.run_id is not None else []
        if t.state == "skipped":
            status = "skipped"
        elif run is None:
            status = "pending" if t.run_id is None else "deleted"
        else:
            status = run.status.value
        views.append(
            TrialView(
                number=t.number,
                params=t.params,
                state=t.state,
                status=status,
                errors=t.errors,
                run_id=t.run_id,
                run_name=run.name if run is not None else None,
                cancel_reason=run.cancel_reason.value
                if run is not None and run.cancel_reason
                else None,
                final_value=points[-1][1] if points else None,
                best_value=pick(v for _, v in points) if points else None,
                last_step=points[-1][0] if points else None,
                series=points,
            )
        )
    done = [v for v in views if v.status == "succeeded" and v.best_value is not None]
    best = None
    if done:
        sign = 1.0 if sweep.metric_goal == "minimize" else -1.0
        best = min(done, key=lambda v: (sign * (v.best_value or 0.0), v.number))
    return SweepView(sweep=sweep, trials=views, best=best)


def view_sweep(session: Session, sweep_id: uuid.UUID) -> SweepView:
    """The sweep, its trials and its best trial. Raises :class:`SweepNotFound`."""
    with read_transaction(session):
        sweep = _get_sweep(session, sweep_id)
        view = _view(session, sweep)
        session.expunge(sweep)
        return view


def list_sweeps(session: Session, *, limit: int = 100) -> list[SweepView]:
    """The newest ``limit`` sweeps with their trials."""
    with read_transaction(session):
        rows = session.exec(select(Sweep).order_by(col(Sweep.created_at).desc()).limit(limit)).all()
        views = [_view(session, row) for row in rows]
        for row in rows:
            session.expunge(row)
        return views


# -- the lease --------------------------------------------------------------------------------


def _take_lease(session: Session, sweep_id: uuid.UUID, holder: str, now: datetime) -> bool:
    """Take the sweep's controller lease: one conditional UPDATE, so of two processes asking
    at once exactly one gets it. False when another holds an unexpired lease or the sweep is
    not running."""
    with write_transaction(session):
        result = session.execute(
            sa.update(Sweep)
            .where(
                col(Sweep.id) == sweep_id,
                col(Sweep.status) == SweepStatus.running,
                sa.or_(
                    col(Sweep.controller_until).is_(None),
                    col(Sweep.controller_until) < now,
                    col(Sweep.controller_id) == holder,
                ),
            )
            .values(controller_id=holder, controller_until=now + timedelta(seconds=LEASE_SECONDS))
            .execution_options(synchronize_session=False)
        )
        return bool(result.rowcount == 1)  # type: ignore[attr-defined]  # CursorResult


def _release_lease(session: Session, sweep_id: uuid.UUID, holder: str) -> None:
    with write_transaction(session):
        session.execute(
            sa.update(Sweep)
            .where(col(Sweep.id) == sweep_id, col(Sweep.controller_id) == holder)
            .values(controller_id=None, controller_until=None)
            .execution_options(synchronize_session=False)
        )


# -- one decision -----------------------------------------------------------------------------


@dataclass
class TickResult:
    """What one :func:`tick` did (``decided`` False: another controller held the lease or
    the sweep had ended)."""

    sweep_id: uuid.UUID
    decided: bool = False
    submitted: list[int] = field(default_factory=list)
    skipped: list[int] = field(default_factory=list)
    pruned: list[int] = field(default_factory=list)
    status: str | None = None


def tick(
    session: Session,
    settings: Settings,
    celery: Celery,
    sweep_id: uuid.UUID,
    *,
    holder: str,
    now: datetime | None = None,
) -> TickResult:
    """One decision for sweep ``sweep_id`` under its lease (module docstring). Never raises
    for a trial that cannot be submitted (it is skipped with its errors); database errors
    propagate (the lease expires)."""
    now = aware_now(now)
    result = TickResult(sweep_id=sweep_id)
    if not _take_lease(session, sweep_id, holder, now):
        return result
    result.decided = True
    try:
        _decide(session, settings, celery, sweep_id, result)
    finally:
        _release_lease(session, sweep_id, holder)
    return result


def tick_running(
    session: Session, settings: Settings, celery: Celery, *, holder: str
) -> list[TickResult]:
    """:func:`tick` every running sweep (a worker's periodic pass); a sweep whose tick
    failed is logged and left to the next pass."""
    with read_transaction(session):
        ids = list(
            session.exec(
                select(col(Sweep.id)).where(col(Sweep.status) == SweepStatus.running)
            ).all()
        )
    out = []
    for sweep_id in ids:
        try:
            out.append(tick(session, settings, celery, sweep_id, holder=holder))
        except Exception:
            log.exception("sweep %s: tick failed; the next pass tries again", sweep_id)
    return out


def _decide(
    session: Session, settings: Settings, celery: Celery, sweep_id: uuid.UUID, result: TickResult
) -> None:
    with read_transaction(session):
        sweep = _get_sweep(session, sweep_id)
        session.expunge(sweep)
    spec = SweepCreate.model_validate(sweep.spec)
    view = view_sweep(session, sweep_id)
    if sweep.cancel_requested:
        _cancel_active(session, view, CancelReason.sweep_cancelled, "its sweep was cancelled")
    elif spec.early_stopping is not None:
        result.pruned = _prune(session, sweep, spec, view)
    if not sweep.cancel_requested:
        _create(session, settings, celery, sweep, spec, view_sweep(session, sweep_id), result)
    result.status = _maybe_finish(session, sweep, view_sweep(session, sweep_id))


def _submit(
    session: Session,
    settings: Settings,
    celery: Celery,
    sweep: Sweep,
    spec: SweepCreate,
    number: int,
    params: dict[str, Any],
) -> list[dict[str, Any]] | None:
    """Submit trial ``number``'s run and link it to its row; its errors when it is invalid
    (the row is then ``skipped``)."""
    try:
        submitted = submit_run(
            session,
            settings,
            celery,
            trial_request(spec, number),
            idempotency_key=f"sweep:{sweep.id}:{number}",
            owner=sweep.owner,
            send=False,
            sweep_id=sweep.id,
            sweep_params=params,
        )
    except InvalidSubmission as error:
        with write_transaction(session):
            session.execute(
                sa.update(SweepTrial)
                .where(col(SweepTrial.sweep_id) == sweep.id, col(SweepTrial.number) == number)
                .values(state="skipped", errors=error.errors)
                .execution_options(synchronize_session=False)
            )
        log.info("sweep %s trial %d skipped: %s", sweep.id, number, error.message)
        return error.errors
    with write_transaction(session):
        session.execute(
            sa.update(SweepTrial)
            .where(col(SweepTrial.sweep_id) == sweep.id, col(SweepTrial.number) == number)
            .values(run_id=submitted.run.id)
            .execution_options(synchronize_session=False)
        )
    send_run(celery, submitted, prepare=settings.engine == "litgpt")
    log.info("sweep %s trial %d: run %s", sweep.id, number, submitted.run.id)
    return None


def _skip_limit(sweep: Sweep) -> int:
    return max(10, 2 * (sweep.max_runs or 0))


def _skipped_in_a_row(trials: Sequence[TrialView]) -> int:
    count = 0
    for t in reversed(trials):
        if t.status != "skipped":
            break
        count += 1
    return count


def _exhausted(sweep: Sweep, trials: Sequence[TrialView]) -> str | None:
    """Why a random/tpe sweep creates no more trials, or None."""
    created = sum(t.state == "created" for t in trials)
    skipped = sum(t.state == "skipped" for t in trials)
    if created >= (sweep.max_runs or 0):
        return f"all {created} trials created (max_runs)"
    if _skipped_in_a_row(trials) >= SKIP_LIMIT_IN_A_ROW or skipped >= _skip_limit(sweep):
        last = next((t for t in reversed(trials) if t.status == "skipped"), None)
        why = last.errors[0]["msg"] if last is not None and last.errors else "invalid"
        return (
            f"{skipped} sampled points were invalid ({_skipped_in_a_row(trials)} in a row; "
            f"the last: {why}): the search space holds too few valid points"
        )
    return None


def _create(
    session: Session,
    settings: Settings,
    celery: Celery,
    sweep: Sweep,
    spec: SweepCreate,
    view: SweepView,
    result: TickResult,
) -> None:
    active = view.active
    for trial in view.trials:  # rows without a run: a grid's points, an interrupted tick
        if active >= sweep.max_concurrent:
            return
        if trial.status == "pending":
            if _submit(session, settings, celery, sweep, spec, trial.number, trial.params):
                result.skipped.append(trial.number)
            else:
                result.submitted.append(trial.number)
                active += 1
    if sweep.method == "grid":
        return
    trials = list(view.trials)
    while active < sweep.max_concurrent and _exhausted(sweep, trials) is None:
        number = len(trials)
        params = _ask(sweep, spec, trials, number)
        with write_transaction(session):
            session.add(SweepTrial(sweep_id=sweep.id, number=number, params=params))
        errors = _submit(session, settings, celery, sweep, spec, number, params)
        status = "skipped" if errors else "queued"
        if errors:
            result.skipped.append(number)
        else:
            result.submitted.append(number)
            active += 1
        trials.append(
            TrialView(
                number=number,
                params=params,
                state="skipped" if errors else "created",
                status=status,
                errors=errors or [],
                run_id=None,
                run_name=None,
                cancel_reason=None,
                final_value=None,
                best_value=None,
                last_step=None,
            )
        )


# -- Optuna -----------------------------------------------------------------------------------


def _distributions(spec: SweepCreate) -> dict[str, Any]:
    from optuna.distributions import (
        CategoricalDistribution,
        FloatDistribution,
        IntDistribution,
    )

    out: dict[str, Any] = {}
    for path, p in spec.parameters.items():
        if p.values is not None:
            out[path] = CategoricalDistribution(p.values)
        elif p.distribution == "int_uniform":
            assert isinstance(p.min, int) and isinstance(p.max, int)
            out[path] = IntDistribution(p.min, p.max)
        else:
            assert p.min is not None and p.max is not None
            out[path] = FloatDistribution(
                float(p.min), float(p.max), log=p.distribution == "log_uniform"
            )
    return out


def _study(sweep: Sweep, spec: SweepCreate, trials: Sequence[TrialView], seed: int) -> Any:
    """An in-memory Optuna study rebuilt from ``trials``: ended ones with their value (a
    pruned or failed one without), running ones with their metric per step so far."""
    import optuna
    from optuna.trial import TrialState, create_trial

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    n = sweep.max_runs or len(trials) or 1
    sampler: Any
    if sweep.method == "tpe":
        sampler = optuna.samplers.TPESampler(seed=seed, n_startup_trials=max(2, n // 4))
    else:
        sampler = optuna.samplers.RandomSampler(seed=seed)
    pruner = optuna.pruners.MedianPruner(
        n_startup_trials=max(1, n // 4),
        n_warmup_steps=spec.early_stopping.min_steps if spec.early_stopping else 0,
    )
    study = optuna.create_study(
        direction="maximize" if sweep.metric_goal == "maximize" else "minimize",
        sampler=sampler,
        pruner=pruner,
        study_name=str(sweep.id),
    )
    dists = _distributions(spec)
    for t in trials:
        if t.status == "skipped" or t.status == "pending":
            continue
        params = {k: v for k, v in t.params.items() if k in dists}
        inter = {step: value for step, value in t.series}
        if t.status == "succeeded" and t.best_value is not None:
            state, value = TrialState.COMPLETE, t.best_value
        elif t.status == "cancelled" and t.cancel_reason == CancelReason.pruned.value:
            state, value = TrialState.PRUNED, None
        elif t.status in ("queued", "running"):
            state, value = TrialState.RUNNING, None
        else:
            state, value = TrialState.FAIL, None
        study.add_trial(
            create_trial(
                state=state,
                value=value,
                params=params,
                distributions={k: dists[k] for k in params},
                intermediate_values=inter,
                user_attrs={"number": t.number},
            )
        )
    return study


def _ask(
    sweep: Sweep, spec: SweepCreate, trials: Sequence[TrialView], number: int
) -> dict[str, Any]:
    """The point of trial ``number`` (seeded with the sweep's seed and the number)."""
    seed = ((sweep.seed or 0) * 1_000_003 + number) % (2**32)
    study = _study(sweep, spec, trials, seed)
    trial = study.ask(_distributions(spec))
    return {path: trial.params[path] for path in spec.parameters}


def _prune(session: Session, sweep: Sweep, spec: SweepCreate, view: SweepView) -> list[int]:
    """Cancel (reason ``pruned``) each running trial Optuna's MedianPruner stops."""
    running = [t for t in view.trials if t.status == "running" and t.series]
    if not running:
        return []
    study = _study(sweep, spec, view.trials, sweep.seed or 0)
    frozen = {ft.user_attrs.get("number"): ft for ft in study.get_trials(deepcopy=False)}
    pruned = []
    for t in running:
        ft = frozen.get(t.number)
        if ft is None or not study.pruner.prune(study, ft):
            continue
        assert t.run_id is not None
        message = (
            f"pruned by its sweep's median early stopping at step {t.last_step}: "
            f"{sweep.metric_name} {t.final_value:g} is worse than the median of the "
            f"finished trials"
        )
        try:
            runs_service.request_cancel(
                session, t.run_id, message, actor="sweep", reason=CancelReason.pruned
            )
        except reads.RunError as error:  # it ended meanwhile
            log.info("sweep %s trial %d: not pruned (%s)", sweep.id, t.number, error)
            continue
        log.info("sweep %s trial %d: %s", sweep.id, t.number, message)
        pruned.append(t.number)
    return pruned


# -- ending -----------------------------------------------------------------------------------


def _cancel_active(session: Session, view: SweepView, reason: CancelReason, message: str) -> None:
    for t in view.trials:
        if t.status in ("queued", "running") and t.run_id is not None:
            try:
                runs_service.request_cancel(
                    session, t.run_id, message, actor="sweep", reason=reason
                )
            except reads.RunError:  # ended meanwhile
                pass


def _maybe_finish(session: Session, sweep: Sweep, view: SweepView) -> str:
    if view.active:
        return SweepStatus.running.value
    pending = any(t.status == "pending" for t in view.trials)
    if sweep.cancel_requested:
        status, reason = SweepStatus.cancelled, "cancelled on request"
    elif sweep.method == "grid":
        if pending:
            return SweepStatus.running.value
        status, reason = (
            SweepStatus.finished,
            f"every one of the {len(view.trials)} grid points ran",
        )
    else:
        why = _exhausted(sweep, view.trials)
        if why is None:
            return SweepStatus.running.value
        status, reason = SweepStatus.finished, why
    if status == SweepStatus.finished and view.best is None:
        status = SweepStatus.failed
        skipped = sum(t.status == "skipped" for t in view.trials)
        reason = f"{reason}; no trial succeeded with a value of {sweep.metric_name}" + (
            f" ({skipped} skipped as invalid)" if skipped else ""
        )
    elif status == SweepStatus.finished and view.best is not None:
        reason = (
            f"{reason}; best: trial {view.best.number} ({sweep.metric_name} "
            f"{view.best.best_value:g})"
        )
    now = aware_now(None)
    with write_transaction(session):
        ended = session.execute(
            sa.update(Sweep)
            .where(col(Sweep.id) == sweep.id, col(Sweep.status) == SweepStatus.running)
            .values(status=status, end_reason=reason, finished_at=now, updated_at=now)
            .returning(col(Sweep.webhooks))
            .execution_options(synchronize_session=False)
        ).first()
        if ended is not None and ended[0]:  # webhooks: recorded with the move (issue 11)
            best = view.best
            runs_service.add_deliveries(
                session,
                ended[0],
                status.value,
                event=f"sweep.{status.value}",
                dedupe_key=f"sweep:{sweep.id}:end",
                data={
                    "sweep": {
                        "id": str(sweep.id),
                        "name": sweep.name,
                        "status": status.value,
                        "end_reason": reason,
                        "metric": sweep.metric_name,
                        "best_run_id": str(best.run_id) if best and best.run_id else None,
                        "best_value": best.best_value if best else None,
                        "finished_at": now.isoformat(),
                    }
                },
                sweep_id=sweep.id,
                now=now,
            )
    log.info("sweep %s %s: %s", sweep.id, status.value, reason)
    return status.value


def request_cancel(session: Session, sweep_id: uuid.UUID) -> None:
    """Flag the sweep cancelled and cancel its queued and running runs (reason
    ``sweep_cancelled``); the next :func:`tick` ends it once they have ended. Cancelling an
    ended sweep changes nothing. Raises :class:`SweepNotFound`."""
    now = aware_now(None)
    with write_transaction(session):
        sweep = _get_sweep(session, sweep_id)
        if sweep.status != SweepStatus.running:
            return
        session.execute(
            sa.update(Sweep)
            .where(col(Sweep.id) == sweep_id)
            .values(cancel_requested=True, updated_at=now)
            .execution_options(synchronize_session=False)
        )
    _cancel_active(
        session, view_sweep(session, sweep_id), CancelReason.sweep_cancelled, "sweep cancelled"
    )


def delete_sweep(session: Session, sweep_id: uuid.UUID) -> None:
    """Delete an ended sweep and its trial rows. Its runs stay, as ordinary runs: their
    ``sweep_id`` becomes NULL, ``sweep_params`` stays (delete them with ``DELETE /runs/{id}``).
    Raises :class:`SweepNotFound`, :class:`SweepActive` (running)."""
    with write_transaction(session):
        sweep = _get_sweep(session, sweep_id)
        if sweep.status == SweepStatus.running:
            raise SweepActive(sweep_id, sweep.status)
        session.execute(
            sa.update(Run)
            .where(col(Run.sweep_id) == sweep_id)
            .values(sweep_id=None)
            .execution_options(synchronize_session=False)
        )
        session.execute(
            sa.delete(SweepTrial)
            .where(col(SweepTrial.sweep_id) == sweep_id)
            .execution_options(synchronize_session=False)
        )
        session.execute(
            sa.delete(Sweep)
            .where(col(Sweep.id) == sweep_id)
            .execution_options(synchronize_session=False)
        )
