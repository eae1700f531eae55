"""The engine's CSV files in the database while the training runs: ``out_dir/metrics.csv`` into
metric rows, ``out_dir/router.csv`` (when the engine writes one) into router rows.

One :class:`CsvIngest` per file (:func:`metrics_ingest`, :func:`router_ingest`): it tails the
file (:class:`CsvTail`, complete lines only), keeps the rows not stored yet, and stores them
through the caller's tolerant writer (``worker.runner``), which retries them on the next poll
after a database hiccup. When the engine rewrote the file (a resumed attempt keeps the rows up
to its checkpoint and re-trains the rest), rows still pending from the old file are dropped and
the database's rows past the new file's last step are deleted with the next write, so the
database always mirrors the file (last write of a step wins).
"""

from __future__ import annotations

import csv
import io
import logging
import os
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

from service import contract, runs
from service.models import METRIC_COLUMNS

log = logging.getLogger("moejobs.runner")

Row = dict[str, str]

#: ``write(what, fn)``: run ``fn(session)`` in a transaction and return its result, or None when
#: it could not be written (retry later) or the lease is lost; ``what`` names it in the log.
Writer = Callable[[str, Callable[[Any], Any]], Any]

#: ``store(session, rows, keep_through)``: insert ``rows`` idempotently; with ``keep_through``,
#: first delete the stored rows past that step. Returns the number of rows written.
Store = Callable[[Any, list[Row], int | None], int]


class CsvTail:
    """Reads the rows appended to a CSV file since the last call, complete lines only.

    The first line is the header. A file that was replaced (other inode, e.g. the engine
    rewrote metrics.csv when resuming) or truncated is read again from the start; callers'
    inserts are idempotent, so rows read twice do no harm. After a :meth:`read` that began a
    file (it read the header), :attr:`rewound` is True: the rows returned are then the whole
    file so far, and a caller can drop what it stored past them."""

    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        self.rewound = False
        self._inode: int | None
        self._offset: int
        self._header: list[str] | None
        self._partial: bytes
        self._reset(None)

    def _reset(self, inode: int | None) -> None:
        self._inode, self._offset, self._header, self._partial = inode, 0, None, b""

    def read(self) -> list[Row]:
        """New complete rows as dicts keyed by the header (empty list when none or no file)."""
        try:
            fh = open(self.path, "rb")
        except FileNotFoundError:
            return []
        with fh:
            stat = os.fstat(fh.fileno())
            if stat.st_ino != self._inode or stat.st_size < self._offset:
                self._reset(stat.st_ino)
            fh.seek(self._offset)
            data = fh.read()
        self._offset += len(data)
        lines = (self._partial + data).split(b"\n")
        self._partial = lines.pop()  # b"" after a final newline, else an unfinished line
        rows: list[Row] = []
        self.rewound = False
        for record in csv.reader(io.StringIO(b"\n".join(lines).decode("utf-8", "replace"))):
            if not record:
                continue
            if self._header is None:
                self._header = [name.strip() for name in record]
                self.rewound = True
                continue
            if len(record) == len(self._header):
                rows.append(dict(zip(self._header, record, strict=True)))
        return rows


class CsvIngest:
    """Stores the rows appended to one engine CSV file (module docstring).

    Args:
        path: the CSV file (it may not exist yet).
        what: names the write in the log (``"metrics"``, ``"router stats"``).
        select: the rows of a read to store (may drop rows or columns).
        store: writes rows (:data:`Store`).
        skip_errors: exceptions of ``store`` that mean a malformed batch: it is logged and
            dropped, and the training goes on.
        skipped: names dropped rows in that log line (``"metric rows"``).
        run_id: names the run in the log.
    """

    def __init__(
        self,
        path: Path,
        *,
        what: str,
        select: Callable[[list[Row]], list[Row]],
        store: Store,
        skip_errors: tuple[type[Exception], ...],
        skipped: str,
        run_id: uuid.UUID,
    ) -> None:
        self.tail = CsvTail(path)
        self.what, self.skipped, self.run_id = what, skipped, run_id
        self._select, self._store, self._skip_errors = select, store, skip_errors
        #: rows read but not stored yet (the database did not answer)
        self.pending: list[Row] = []
        #: the last step of a rewritten file, until the stored rows past it are deleted
        self.keep_through: int | None = None

    def ingest(self, write: Writer) -> None:
        """Read the rows appended since the last call and store them with the pending ones."""
        rows = self.tail.read()
        if self.tail.rewound:
            self.pending = []
            self.keep_through = _last_step(rows)
        self.pending.extend(self._select(rows))
        if not self.pending and self.keep_through is None:
            return
        rows, keep = self.pending, self.keep_through
        try:
            done = write(self.what, lambda session: self._store(session, rows, keep))
        except self._skip_errors as error:  # a malformed row: skip the batch, keep training
            log.warning("run %s: %s skipped: %s", self.run_id, self.skipped, error)
            done = 0
        if done is not None:
            self.pending, self.keep_through = [], None


def metrics_ingest(out_dir: Path, run_id: uuid.UUID, attempt: int) -> CsvIngest:
    """``out_dir/metrics.csv`` into ``runs.record_metrics``: rows with a step; columns other
    than ``step`` and ``service.models.METRIC_COLUMNS`` are dropped with a warning (once per
    column)."""
    return CsvIngest(
        out_dir / contract.METRICS_FILE,
        what="metrics",
        select=_MetricColumns(),
        store=lambda session, rows, keep: runs.record_metrics(
            session, run_id, rows, attempt=attempt, keep_through=keep
        ),
        skip_errors=(ValueError,),
        skipped="metric rows",
        run_id=run_id,
    )


def router_ingest(out_dir: Path, run_id: uuid.UUID, attempt: int) -> CsvIngest:
    """``out_dir/router.csv`` into ``runs.record_router_stats``: rows with the columns
    ``step``, ``layer``, ``expert`` and ``fraction``."""
    return CsvIngest(
        out_dir / contract.ROUTER_FILE,
        what="router stats",
        select=_router_rows,
        store=lambda session, rows, keep: runs.record_router_stats(
            session, run_id, rows, attempt=attempt, keep_through=keep
        ),
        skip_errors=(ValueError, KeyError),
        skipped="router rows",
        run_id=run_id,
    )


class _MetricColumns:
    """Selects metrics.csv rows that have a step, without the columns the database does not
    know; warns once per unknown column."""

    def __init__(self) -> None:
        self._warned: set[str] = set()

    def __call__(self, rows: list[Row]) -> list[Row]:
        selected = []
        for row in rows:
            unknown = set(row) - {"step", *METRIC_COLUMNS}
            if unknown - self._warned:
                log.warning("metrics.csv columns ignored: %s", sorted(unknown))
                self._warned |= unknown
            if row.get("step", "").strip():
                selected.append({k: v for k, v in row.items() if k not in unknown})
        return selected


def _router_rows(rows: list[Row]) -> list[Row]:
    return [r for r in rows if {"step", "layer", "expert", "fraction"} <= set(r)]


def _last_step(rows: list[Row]) -> int:
    """The largest integer ``step`` among CSV rows (0 when there is none)."""
    steps = [int(r["step"]) for r in rows if (r.get("step") or "").strip().isdigit()]
    return max(steps, default=0)
