"""``out_dir/metrics.csv`` (one row per logged optimizer step) and model FLOPs utilisation.

Columns (fixed, documented in the README)::

    step            optimizer step (0 = the initial validation, before any update)
    tokens          tokens trained so far, all ranks together
    loss            mean training loss over the step's micro-batches (and ranks)
    learning_rate   learning rate used by this step's update
    grad_norm       total L2 norm of the gradients before clipping
    tokens_per_sec  training throughput since the previous row (all ranks; validation excluded)
    mfu             model FLOPs utilisation on CUDA (empty on CPU or an unknown GPU)
    elapsed_s       seconds of training so far, summed over resumed sessions
    val_loss        validation loss (only on validation steps)
    val_ppl         exp(val_loss)
"""

from __future__ import annotations

import csv
import math
import os
from pathlib import Path
from typing import Any

from service import contract

HEADER = contract.METRICS_HEADER

#: Columns of ``out_dir/router.csv`` (``service.contract.ROUTER_HEADER`` describes them).
ROUTER_HEADER = contract.ROUTER_HEADER


def _fmt(value: Any) -> str:
    if value is None:
        return ""
    if isinstance(value, float):
        if math.isnan(value) or math.isinf(value):
            return str(value)
        return f"{value:.6g}"
    return str(value)


class MetricsWriter:
    """Appends rows to ``metrics.csv`` and flushes each one.

    ``resume_step`` decides what happens to an existing file: ``None`` starts it afresh (header
    only); an integer keeps the rows with ``step <= resume_step`` and drops later ones (they were
    written after the checkpoint being resumed from), so a step never appears twice.
    """

    def __init__(
        self, path: Path, resume_step: int | None, header: tuple[str, ...] = HEADER
    ) -> None:
        self.path = Path(path)
        self.header = tuple(header)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        kept: list[list[str]] = []
        if resume_step is not None and self.path.is_file():
            with open(self.path, newline="", encoding="utf-8") as fh:
                reader = csv.reader(fh)
                found = next(reader, None)
                if found is not None and tuple(found) == self.header:
                    for row in reader:
                        try:
                            if row and int(row[0]) <= resume_step:
                                kept.append(row)
                        except ValueError:
                            continue
        tmp = self.path.with_name(f".{self.path.name}.{os.getpid()}.tmp")
        with open(tmp, "w", newline="", encoding="utf-8") as fh:
            writer = csv.writer(fh)
            writer.writerow(self.header)
            writer.writerows(kept)
        os.replace(tmp, self.path)
        self._fh = open(self.path, "a", newline="", encoding="utf-8")
        self._writer = csv.writer(self._fh)

    def write(self, row: dict[str, Any]) -> None:
        """Append one row (missing columns are empty) and flush it to the OS."""
        self._writer.writerow([_fmt(row.get(k)) for k in self.header])
        self._fh.flush()

    def write_many(self, rows: list[dict[str, Any]]) -> None:
        """Append several rows, then flush once."""
        self._writer.writerows([[_fmt(row.get(k)) for k in self.header] for row in rows])
        self._fh.flush()

    def close(self) -> None:
        self._fh.close()


def read_metrics(path: Path) -> list[dict[str, str]]:
    """Rows of a metrics.csv as dicts of strings (tests and tools)."""
    with open(path, newline="", encoding="utf-8") as fh:
        return list(csv.DictReader(fh))


#: Peak FLOP/s table and lookup: one copy, in ``service.contract``.
PEAK_FLOPS = contract.PEAK_FLOPS
peak_flops_per_device = contract.peak_flops_per_device


def model_flops_utilization(
    tokens_per_sec: float, flops_per_token: float, peak_flops: float | None, world_size: int
) -> float | None:
    """MFU = achieved model FLOP/s / peak FLOP/s of all devices (Chowdhery et al. 2022, PaLM, app. B).

    Args:
        tokens_per_sec: training tokens per second, all ranks together.
        flops_per_token: training FLOPs per token (forward + backward, ``service.estimate``).
        peak_flops: peak FLOP/s of one device (:func:`peak_flops_per_device`), None if unknown.
        world_size: number of devices.
    """
    if not peak_flops or tokens_per_sec <= 0:
        return None
    return tokens_per_sec * flops_per_token / (peak_flops * world_size)
