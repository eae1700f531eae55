"""Plain-text rendering of validation results and estimates for the command line."""

from __future__ import annotations

from typing import Any

from service.config.issues import Issue


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


def _with_unit(name: str, value: Any) -> str:
    """Bytes in GiB, FLOP counts in GFLOP/TFLOP(/s), seconds in h:mm:ss; everything else as is."""
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        if name.startswith(("memory.", "storage")) or name.endswith("_bytes"):
            return f"{value / 2**30:,.2f} GiB"
        if name.startswith("peak_flops."):
            return f"{value / 1e12:,.0f} TFLOP/s"
        if name.endswith("flops_per_token"):
            return f"{value / 1e9:,.3f} GFLOP"
        if "flops" in name:
            return f"{value / 1e12:,.1f} TFLOP"
        if name.startswith("time_s."):
            seconds = int(round(value))
            return f"{seconds // 3600}:{seconds // 60 % 60:02d}:{seconds % 60:02d} ({value:,.1f} s)"
    return _fmt(value)


def format_estimate(est: Any) -> list[str]:
    """The estimate as aligned ``name  value`` lines (every field of ``est.to_dict()``, with units)."""
    rows = _flatten(est.to_dict())
    width = max((len(name) for name, _ in rows), default=0)
    return ["estimate:"] + [
        f"  {name.ljust(width)}  {_with_unit(name, value)}" for name, value in rows
    ]
