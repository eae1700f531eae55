"""Terminal progress for training: a tqdm bar fed by the engine's metrics rows."""

from __future__ import annotations

import os
import sys
from typing import IO, TYPE_CHECKING, Any

if TYPE_CHECKING:
    from tqdm import tqdm

#: Width of a bar when the terminal reports none (zero columns: some containers' and CI's
#: pseudo-terminals) and ``COLUMNS`` does not say either.
FALLBACK_COLUMNS = 100


def width_options(file: IO[str]) -> dict[str, Any]:
    """tqdm's width options for a bar written to ``file``: ``dynamic_ncols`` (follow the
    window) when the terminal reports a width, else a fixed ``ncols`` (``COLUMNS`` or
    :data:`FALLBACK_COLUMNS`). tqdm takes a reported width of 0 as -1 columns and prints
    nothing at all; a file that is no terminal gets the fixed width too."""
    try:
        columns = os.get_terminal_size(file.fileno()).columns
    except (AttributeError, OSError, ValueError):
        columns = 0
    if columns > 1:
        return {"dynamic_ncols": True}
    env = os.environ.get("COLUMNS", "")
    fixed = int(env) if env.isdigit() and int(env) > 1 else FALLBACK_COLUMNS
    return {"dynamic_ncols": False, "ncols": fixed}


class ProgressBar:
    """A progress bar over optimizer steps showing loss, tokens/s and the ETA.

    ``update(row, plan)`` is the engine's ``on_row`` callback: ``row`` is one metrics.csv row
    (a dict with ``step``, ``loss``, ``tokens_per_sec``, ``val_loss`` ...), ``plan`` the
    :class:`service.config.plan.TrainingPlan` (its ``optimizer_steps`` is the bar's total).
    """

    def __init__(self, enabled: bool = True) -> None:
        self.enabled = enabled
        self._bar: tqdm[Any] | None = None

    def update(self, row: dict[str, Any], plan: Any) -> None:
        if not self.enabled:
            return
        from tqdm import tqdm

        if self._bar is None:
            self._bar = tqdm(
                total=plan.optimizer_steps,
                unit="step",
                file=sys.stderr,
                **width_options(sys.stderr),
            )
        step = int(row["step"])
        self._bar.update(max(0, step - self._bar.n))
        postfix = {}
        if row.get("loss") not in (None, ""):
            postfix["loss"] = f"{float(row['loss']):.3f}"
        if row.get("val_loss") not in (None, ""):
            postfix["val"] = f"{float(row['val_loss']):.3f}"
        if row.get("tokens_per_sec") not in (None, ""):
            postfix["tok/s"] = f"{float(row['tokens_per_sec']):,.0f}"
        self._bar.set_postfix(postfix, refresh=True)

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
            self._bar = None
