"""A run's checkpoint folders as the worker sees them while the training runs: which are
complete (:func:`checkpoint_folders`), recording each in the database, and pruning the step
folders to ``settings.keep_checkpoints`` (:class:`Checkpoints`).

The engine writes a checkpoint under a temporary name and renames it into place
(``step-XXXXXXXX`` or ``final``) when it is complete, so those names only ever denote
complete folders.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import sys
import uuid
from functools import partial
from pathlib import Path

from sqlalchemy.exc import SQLAlchemyError

from service import contract, runs
from service.db import Database
from worker.ingest import Writer

log = logging.getLogger("moejobs.runner")


def checkpoint_folders(out_dir: Path) -> list[tuple[str, Path]]:
    """Complete checkpoint folders in ``out_dir`` as ``(name, path)``: ``step-XXXXXXXX`` by
    step, then ``final``; empty when ``out_dir`` does not exist."""
    found: list[tuple[int, str, Path]] = []
    try:
        entries = list(os.scandir(out_dir))
    except (FileNotFoundError, NotADirectoryError):
        return []
    for entry in entries:
        if not entry.is_dir(follow_symlinks=False):
            continue
        step = contract.checkpoint_step(entry.name)
        if step is not None:
            found.append((step, entry.name, Path(entry.path)))
        elif entry.name == "final":
            found.append((sys.maxsize, entry.name, Path(entry.path)))
    return [(name, path) for _, name, path in sorted(found)]


def folder_size(path: Path) -> int:
    """Total size in bytes of the regular files under ``path``."""
    total = 0
    for root, _dirs, files in os.walk(path):
        for name in files:
            try:
                total += os.lstat(os.path.join(root, name)).st_size
            except OSError:
                pass
    return total


class Checkpoints:
    """The checkpoint folders of one attempt's ``out_dir``: records each new complete folder
    (``runs.record_checkpoint``) and removes the oldest step folders past ``keep`` (on disk
    and in the database; ``final`` always stays; ``keep <= 0`` keeps all)."""

    def __init__(
        self, db: Database, out_dir: Path, run_id: uuid.UUID, attempt: int, keep: int
    ) -> None:
        self.db, self.out_dir, self.keep = db, out_dir, keep
        self.run_id, self.attempt = run_id, attempt
        self.recorded: dict[str, int] = {}  # checkpoint name -> folder mtime (ns) recorded

    def record(self, write: Writer) -> list[tuple[str, Path]]:
        """Record the complete folders not recorded yet (a replaced ``final`` is a new folder)
        through the caller's tolerant writer; returns the folders found
        (:func:`checkpoint_folders`), for :meth:`prune`."""
        folders = checkpoint_folders(self.out_dir)
        for name, path in folders:
            try:
                mtime = path.stat().st_mtime_ns
            except OSError:
                continue  # renamed away meanwhile (final/ being replaced)
            if self.recorded.get(name) == mtime:
                continue  # recorded already (a replaced final/ is a new folder: new mtime)
            size = folder_size(path)
            step = runs.checkpoint_step(name)
            if step is None:
                step = _final_step(path)
            result = write(
                f"checkpoint {name}",
                partial(
                    runs.record_checkpoint,
                    run_id=self.run_id,
                    name=name,
                    path=str(path),
                    step=step,
                    size_bytes=size,
                    attempt=self.attempt,
                ),
            )
            if result is not None:
                self.recorded[name] = mtime
                log.info("run %s: checkpoint %s recorded (%d bytes)", self.run_id, name, size)
        return folders

    def prune(self, folders: list[tuple[str, Path]]) -> None:
        """Remove the step folders of ``folders`` past the newest ``keep``: the folder, then its
        database row. A database error is logged (the folder is gone; its row stays)."""
        keep = self.keep
        steps = [(name, path) for name, path in folders if name != "final"]
        if keep <= 0 or len(steps) <= keep:
            return
        for name, path in steps[:-keep]:
            shutil.rmtree(path, ignore_errors=True)
            if path.exists():
                continue
            contract.samples_path(path).unlink(missing_ok=True)
            self.recorded.pop(name, None)
            try:
                with self.db.session() as session:
                    runs.remove_checkpoint(session, self.run_id, name)
                log.info(
                    "run %s: checkpoint %s removed (keep_checkpoints=%d)", self.run_id, name, keep
                )
            except SQLAlchemyError as error:
                log.warning("run %s: forgetting checkpoint %s failed: %s", self.run_id, name, error)


def _final_step(path: Path) -> int | None:
    """The step recorded in a ``final`` folder's ``training_state.json``, None when unreadable."""
    try:
        return int(json.loads((path / "training_state.json").read_text(encoding="utf-8"))["step"])
    except (OSError, ValueError, KeyError, TypeError):
        return None
