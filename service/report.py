"""Plain-text rendering of validation results and estimates for the command line."""
from __future__ import annotations

from typing import Any

from service.schemas import Issue


def format_issues(issues: list[Issue]) -> list[str]:
    """One indented line per error or warning: ``  - train.micro_batch_size: message``."""
    return [f"  - {issue}" for issue in issues]


def _fmt(value: Any) -> str:
    if isinstance(value, bool) or value is None:
        return str(value)
    if isinstance(value, int):
        return f"{value:,}"
    if isinstance(value, float):
        if value == 0:
            return "0"
        if abs(value) >= 1000:
            return f"{value:,.0f}"
        return f"{value:.4g}"
    return str(value)


def _flatten(data: dict[str, Any], prefix: str = "") -> list[tuple[str, Any]]:
    rows: list[tuple[str, Any]] = []
    for key, value in data.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            rows += _flatten(value, name + ".")
        else:
            rows.append((name, value))
    return rows


def format_estimate(est: Any) -> list[str]:
    """The estimate as aligned ``name  value`` lines (every field of ``est.to_dict()``)."""
    rows = _flatten(est.to_dict())
    width = max((len(name) for name, _ in rows), default=0)
    return ["estimate:"] + [f"  {name.ljust(width)}  {_fmt(value)}" for name, value in rows]
