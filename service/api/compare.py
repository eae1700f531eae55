"""Comparing runs: ``GET /compare`` (final and best metrics, the config keys that differ) and
``GET /compare/metrics`` (several runs' metric columns in one request, for overlays).

Both take ``runs=ID,ID,...`` (2 to :data:`MAX_RUNS` distinct run ids, in the order to show;
``runs`` may also be repeated). A malformed or short list is a 422 naming ``query.runs``; an
unknown run a 404 ``run_not_found`` naming it.
"""

from __future__ import annotations

import json
import uuid
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Annotated, Any

from fastapi import APIRouter, Query
from sqlmodel import Session

from service import reads
from service.api.deps import GateDep, SettingsDep
from service.api.errors import invalid
from service.api.models import (
    BestValue,
    ComparedRun,
    Comparison,
    ConfigDifference,
    MetricRow,
    RunSeries,
    SeriesPage,
)
from service.api.openapi import errors
from service.api.series import downsample
from service.models import METRIC_COLUMNS, Run

router = APIRouter(tags=["compare"])

#: Most runs one comparison takes.
MAX_RUNS = 20
#: Keys that differ between any two runs by construction (the service sets them per run).
PER_RUN_KEYS = frozenset({"train_config.out_dir"})
#: Columns ``GET /compare/metrics`` returns when ``columns`` is not given.
DEFAULT_COLUMNS = ("loss", "val_loss", "learning_rate", "tokens_per_sec")

RunsQuery = Annotated[
    list[str],
    Query(
        description=f"Run ids separated by commas (or the parameter repeated): 2 to {MAX_RUNS}.",
        max_length=MAX_RUNS,
    ),
]


def parse_run_ids(values: Sequence[str]) -> list[uuid.UUID]:
    """The distinct run ids of ``values`` (each a comma-separated list), in order. Raises a 422
    at ``query.runs`` for a malformed id or fewer than 2 / more than :data:`MAX_RUNS` runs."""
    ids: dict[uuid.UUID, None] = {}
    for part in (p.strip() for value in values for p in value.split(",")):
        if not part:
            continue
        try:
            ids[uuid.UUID(part)] = None
        except ValueError:
            raise invalid(["query", "runs"], f"{part[:60]!r} is not a run id (a UUID)") from None
    if not 2 <= len(ids) <= MAX_RUNS:
        raise invalid(
            ["query", "runs"],
            f"give 2 to {MAX_RUNS} distinct run ids separated by commas, got {len(ids)}",
        )
    return list(ids)


def flatten(doc: Any, prefix: str = "") -> Iterator[tuple[str, Any]]:
    """``(dotted path, value)`` for every leaf of nested mappings (lists are leaves):
    ``{"optimizer": {"init_args": {"lr": 1e-3}}}`` -> ``("optimizer.init_args.lr", 0.001)``.
    An empty mapping is a leaf (``{}``)."""
    if isinstance(doc, Mapping) and doc:
        for key, value in doc.items():
            yield from flatten(value, f"{prefix}.{key}" if prefix else str(key))
    else:
        yield prefix, doc


def _normal(value: Any) -> Any:
    """``value`` with integral floats as ints (``1.0`` equals ``1``; booleans stay booleans)."""
    if isinstance(value, float) and value.is_integer():
        return int(value)
    if isinstance(value, list):
        return [_normal(v) for v in value]
    if isinstance(value, dict):
        return {k: _normal(v) for k, v in value.items()}
    return value


def _canonical(value: Any) -> str:
    return json.dumps(_normal(value), sort_keys=True, separators=(",", ":"), default=str)


def _inside(value: Any, folder: Path) -> bool:
    return isinstance(value, str) and (value == str(folder) or value.startswith(f"{folder}/"))


def config_differences(
    configs: Sequence[Mapping[str, Any]], run_folders: Sequence[Path]
) -> tuple[list[ConfigDifference], list[str]]:
    """The keys whose values differ between ``configs`` (one ``{"train_config": ...,
    "model_config": ...}`` per run, flattened by :func:`flatten`; a key one run lacks counts
    as null there), sorted, and the differing keys left out: :data:`PER_RUN_KEYS` and keys
    whose value in every run names a path inside that run's own folder (``run_folders``)."""
    flat = [dict(flatten(c)) for c in configs]
    keys = sorted(set().union(*flat))
    differences, left_out = [], []
    for key in keys:
        values = [f.get(key) for f in flat]
        if len({_canonical(v) for v in values}) == 1:
            continue
        if key in PER_RUN_KEYS or all(
            _inside(v, d) for v, d in zip(values, run_folders, strict=True)
        ):
            left_out.append(key)
        else:
            differences.append(ConfigDifference(key=key, values=values))
    return differences, left_out


def _steps_total(run: Run) -> int | None:
    value = ((run.estimate or {}).get("plan") or {}).get("optimizer_steps")
    return int(value) if isinstance(value, (int, float)) else None


@router.get(
    "/compare",
    response_model=Comparison,
    summary="Compare runs: final and best metrics, differing config keys",
    responses=errors(404, 422, 503),
)
async def compare(runs: RunsQuery, gate: GateDep, settings: SettingsDep) -> Comparison:
    """For each run (in the order given) its final metric row and best values, and the keys of
    the resolved configs (dotted: ``train_config.optimizer.init_args.lr``,
    ``model_config.n_expert``) whose values differ between the runs. Keys that differ by
    construction (``train_config.out_dir``, paths inside each run's own folder) are listed in
    ``left_out`` instead."""
    run_ids = parse_run_ids(runs)

    def work(session: Session) -> tuple[list[Run], dict[uuid.UUID, Any], dict[uuid.UUID, Any]]:
        found = reads.get_runs(session, run_ids)
        return found, reads.latest_metrics(session, run_ids), reads.best_metrics(session, run_ids)

    found, latest, best = await gate.run(work)
    differences, left_out = config_differences(
        [{"train_config": r.resolved_train, "model_config": r.resolved_model} for r in found],
        [settings.run_dir(r.id) for r in found],
    )
    return Comparison(
        runs=[
            ComparedRun(
                id=r.id,
                name=r.name,
                status=r.status.value,
                tags=r.tags or [],
                note=r.note,
                steps_total=_steps_total(r),
                final=MetricRow.of(latest[r.id]) if r.id in latest else None,
                best={k: BestValue(value=v, step=s) for k, (v, s) in best[r.id].items()},
            )
            for r in found
        ],
        differences=differences,
        left_out=left_out,
    )


@router.get(
    "/compare/metrics",
    response_model=SeriesPage,
    summary="Metric columns of several runs (for overlays)",
    responses=errors(404, 422, 503),
)
async def compare_metrics(
    runs: RunsQuery,
    gate: GateDep,
    columns: Annotated[
        str | None,
        Query(
            max_length=500,
            description=f"metric columns separated by commas (default {','.join(DEFAULT_COLUMNS)})",
        ),
    ] = None,
    points: Annotated[
        int, Query(ge=2, le=10_000, description="at most about this many rows per run")
    ] = 500,
) -> SeriesPage:
    """Per run, its metric rows downsampled to about ``points`` (first, last and validation
    rows kept: ``service.api.series.downsample``), column-wise."""
    run_ids = parse_run_ids(runs)
    wanted = [c.strip() for c in (columns or ",".join(DEFAULT_COLUMNS)).split(",") if c.strip()]
    unknown = [c for c in wanted if c not in METRIC_COLUMNS]
    if unknown or not wanted:
        raise invalid(
            ["query", "columns"],
            f"unknown column(s) {', '.join(map(repr, unknown))}; use {', '.join(METRIC_COLUMNS)}"
            if unknown
            else "give at least one column",
        )
    wanted = list(dict.fromkeys(wanted))

    def work(session: Session) -> list[tuple[Run, list[Any]]]:
        found = reads.get_runs(session, run_ids)
        return [(r, reads.metric_rows(session, r.id)) for r in found]

    series = []
    for run, rows in await gate.run(work):
        shown = downsample(rows, points)
        series.append(
            RunSeries(
                run_id=run.id,
                name=run.name,
                total=len(rows),
                downsampled=len(shown) < len(rows),
                step=[r.step for r in shown],
                values={c: [getattr(r, c) for r in shown] for c in wanted},
            )
        )
    return SeriesPage(columns=wanted, series=series)
