"""A run's checkpoint folders as the worker sees them while the training runs: which are
complete (:func:`checkpoint_folders`), recording each in the database, and pruning the step
folders to ``settings.keep_checkpoints`` (:class:`Checkpoints`).

The engine writes a checkpoint under a temporary name and renames it into place
(``step-XXXXXXXX`` or ``final``) when it is complete, so those names only ever denote
complete folders.

With an object store (``settings.artifact_url``, ``service.artifacts``) a folder is uploaded to
``runs/<run id>/<name>/`` first, in a background thread so the runner loop keeps renewing the
lease, and recorded only once every file is in the store: a recorded checkpoint is always in the
store. The upload starts only while the attempt still holds the run (the caller's ``fenced_out``
reads it from the database); a failed upload is logged and retried on a later poll, and leaves
nothing recorded. Pruning removes the store copy after the database row.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import sys
import uuid
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from functools import partial
from pathlib import Path

from sqlalchemy.exc import SQLAlchemyError

from service import artifacts, contract, runs
from service.artifacts import ArtifactStore, StoreError
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
        self,
        db: Database,
        out_dir: Path,
        run_id: uuid.UUID,
        attempt: int,
        keep: int,
        *,
        store: ArtifactStore | None = None,
        fenced_out: Callable[[], bool] = lambda: False,
    ) -> None:
        self.db, self.out_dir, self.keep = db, out_dir, keep
        self.run_id, self.attempt = run_id, attempt
        self.recorded: dict[str, int] = {}  # checkpoint name -> folder mtime (ns) recorded
        self.store, self.fenced_out = store, fenced_out
        self.uploaded: dict[str, int] = {}  # name -> mtime of a folder in the store, unrecorded
        self.upload_failures = 0
        self._upload: tuple[str, int, Future[int]] | None = None
        self._executor: ThreadPoolExecutor | None = None

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
            if self.store is not None and not self._in_store(name, path, mtime):
                break  # recorded in order: the next ones wait for this upload
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
                self.uploaded.pop(name, None)
                log.info("run %s: checkpoint %s recorded (%d bytes)", self.run_id, name, size)
        return folders

    def _in_store(self, name: str, path: Path, mtime: int) -> bool:
        """Whether folder ``name`` (as of ``mtime``) is completely in the store; when not, polls
        the upload in flight or starts this folder's (one at a time, only while
        ``fenced_out()`` is false)."""
        if self.uploaded.get(name) == mtime:
            return True
        if self._upload is not None:
            up_name, up_mtime, future = self._upload
            if not future.done():
                return False
            self._upload = None
            try:
                count = future.result()
                current = (self.out_dir / up_name).stat().st_mtime_ns
            except (StoreError, OSError) as error:
                self.upload_failures += 1
                log.warning(
                    "run %s: upload of checkpoint %s failed: %s", self.run_id, up_name, error
                )
            else:
                if current == up_mtime:  # not replaced while it was read
                    self.uploaded[up_name] = up_mtime
                    log.info(
                        "run %s: checkpoint %s uploaded (%d files)", self.run_id, up_name, count
                    )
            if self.uploaded.get(name) == mtime:
                return True
        assert self.store is not None
        if self.fenced_out():
            return False  # another attempt owns the run (or it cannot be read): no upload
        if self._executor is None:
            self._executor = ThreadPoolExecutor(1, thread_name_prefix=f"upload-{self.run_id}")
        prefix = artifacts.checkpoint_prefix(self.run_id, name)
        self._upload = (name, mtime, self._executor.submit(self.store.put_folder, path, prefix))
        return False

    def uploading(self) -> bool:
        """Whether an upload is in flight."""
        return self._upload is not None

    def wait_upload(self, timeout: float) -> None:
        """Wait at most ``timeout`` seconds for the upload in flight to end."""
        if self._upload is not None:
            try:
                self._upload[2].exception(timeout=timeout)
            except TimeoutError:
                pass

    def drain(self, write: Writer, renew: Callable[[], None], poll: float = 1.0) -> None:
        """At the attempt's end: record until every complete folder is uploaded and recorded,
        calling ``renew`` (the lease) between waits; stops at the first failed upload (that
        folder stays local and unrecorded) or when ``fenced_out()``."""
        failures = self.upload_failures
        self.record(write)
        while self.store is not None and self.uploading():
            self.wait_upload(poll)
            renew()
            self.record(write)
            if self.upload_failures > failures or self.fenced_out():
                break

    def close(self) -> None:
        """Stop the upload thread; an upload in flight ends in the background, unrecorded."""
        if self._executor is not None:
            self._executor.shutdown(wait=False, cancel_futures=True)

    def prune(self, folders: list[tuple[str, Path]]) -> None:
        """Remove the step folders of ``folders`` past the newest ``keep``: the folder, then its
        database row, then its store copy. A database error is logged (the folder is gone; its
        row stays), as is a store error (objects are left over, never a row without them)."""
        keep = self.keep
        steps = [(name, path) for name, path in folders if name != "final"]
        if keep <= 0 or len(steps) <= keep:
            return
        for name, path in steps[:-keep]:
            if self._upload is not None and self._upload[0] == name:
                continue  # pruned after its upload ends
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
                continue
            self.uploaded.pop(name, None)
            if self.store is not None:
                try:
                    self.store.delete_prefix(artifacts.checkpoint_prefix(self.run_id, name))
                except StoreError as error:
                    log.warning("run %s: deleting stored %s failed: %s", self.run_id, name, error)


def _final_step(path: Path) -> int | None:
    """The step recorded in a ``final`` folder's ``training_state.json``, None when unreadable."""
    try:
        return int(json.loads((path / "training_state.json").read_text(encoding="utf-8"))["step"])
    except (OSError, ValueError, KeyError, TypeError):
        return None
