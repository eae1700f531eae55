"""Metric series for the API: server-side downsampling and CSV rendering."""

from __future__ import annotations

import csv
import io
from collections.abc import Sequence
from typing import Any

from service.models import METRIC_COLUMNS

#: CSV header of ``GET /runs/{id}/metrics`` with ``Accept: text/csv`` (metrics.csv's own).
CSV_COLUMNS: tuple[str, ...] = ("step", *METRIC_COLUMNS)


def downsample(points: Sequence[Any], max_points: int) -> list[Any]:
    """At most about ``max_points`` of ``points`` (``MetricPoint`` objects or rows with the same
    attributes, ordered by step), keeping the first and the
    last row and every validation row (``val_loss`` set), and filling the rest of the budget
    with rows evenly spaced by index. Rows are returned unchanged (no averaging), in step
    order. When validation rows alone exceed the budget they are all kept (the result is then
    validation rows + first + last).
    """
    n = len(points)
    if max_points <= 0 or n <= max_points:
        return list(points)
    keep = {0, n - 1}
    keep.update(i for i, p in enumerate(points) if p.val_loss is not None)
    budget = max_points - len(keep)
    if budget > 0:
        # evenly spaced indices strictly between the first and the last
        for k in range(1, budget + 1):
            keep.add(round(k * (n - 1) / (budget + 1)))
    return [points[i] for i in sorted(keep)]


def _cell(value: Any) -> str:
    if value is None:
        return ""
    if isinstance(value, float):
        return repr(value)
    return str(value)


def to_csv(points: Sequence[Any]) -> str:
    """Rows (``MetricPoint`` objects or rows with the same attributes) as CSV with the
    metrics.csv header; empty cells for missing values."""
    out = io.StringIO()
    writer = csv.writer(out, lineterminator="\n")
    writer.writerow(CSV_COLUMNS)
    for p in points:
        writer.writerow([_cell(getattr(p, c)) for c in CSV_COLUMNS])
    return out.getvalue()
