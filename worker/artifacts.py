"""What a worker keeps in the object store besides checkpoints (``worker.retention`` uploads
those): the run's files synced while it trains (:class:`FileSync`), and the newest recorded
checkpoint fetched before an attempt whose machine has none (:func:`fetch_checkpoint`), and
another run's checkpoint that ``initial_checkpoint_dir`` names when this machine lacks its folder
(:func:`fetch_initial_checkpoint`).
Nothing here runs without ``settings.artifact_url``.
"""

from __future__ import annotations

import logging
import time
import uuid
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path

from service import artifacts, contract, reads
from service.artifacts import ArtifactStore, StoreError
from service.checks import WEIGHTS_FILE
from service.db import Database

log = logging.getLogger("moejobs.runner")

#: How often the run's files are uploaded while it trains, in seconds (and once at its end).
SYNC_SECONDS = 30.0


def synced_files(out_dir: Path, run_dir: Path) -> list[Path]:
    """The files synced to ``runs/<run id>/files/``: metrics, router telemetry, the engine's
    events and the run's log."""
    return [
        out_dir / contract.METRICS_FILE,
        out_dir / contract.ROUTER_FILE,
        out_dir / contract.EVENTS_FILE,
        run_dir / "train.log",
    ]


class FileSync:
    """Uploads the run's files every ``every`` seconds from a background thread (one upload
    round at a time; a round still running when the next is due is not doubled), and once
    more, waited for, by :meth:`finish`. A failed round is logged; the next one retries."""

    def __init__(
        self,
        store: ArtifactStore,
        run_id: uuid.UUID,
        files: list[Path],
        *,
        every: float | None = None,
    ) -> None:
        self.store, self.run_id, self.files = store, run_id, files
        self.every = every if every is not None else SYNC_SECONDS
        self.next_at = time.monotonic() + self.every
        self.rounds = 0
        self._executor = ThreadPoolExecutor(1, thread_name_prefix=f"sync-{run_id}")
        self._future: Future[None] | None = None

    def key(self, path: Path) -> str:
        return artifacts.run_file_key(self.run_id, path.name)

    def _upload(self) -> None:
        for path in self.files:
            try:
                self.store.put_file(path, self.key(path))
            except FileNotFoundError:
                continue  # not written yet
            except (StoreError, OSError) as error:
                log.warning("run %s: syncing %s failed: %s", self.run_id, path.name, error)
        self.rounds += 1

    def tick(self, now: float | None = None) -> None:
        """Start a round when one is due and none is running (the runner loop calls this)."""
        now = time.monotonic() if now is None else now
        if now < self.next_at or (self._future is not None and not self._future.done()):
            return
        self.next_at = now + self.every
        self._future = self._executor.submit(self._upload)

    def close(self) -> None:
        """Stop without a last round (the attempt lost the run: its files are not ours)."""
        self._executor.shutdown(wait=False, cancel_futures=True)

    def finish(self, timeout: float = 120.0) -> None:
        """The last round (after the round in flight), waited for at most ``timeout`` s."""
        try:
            if self._future is not None:
                self._future.exception(timeout=timeout)
            self._future = self._executor.submit(self._upload)
            self._future.exception(timeout=timeout)
        except TimeoutError:
            log.warning("run %s: the last sync of its files did not end in time", self.run_id)
        self._executor.shutdown(wait=False, cancel_futures=True)


def fetch_checkpoint(
    store: ArtifactStore,
    db: Database,
    run_id: uuid.UUID,
    out_dir: Path,
    has_local: Callable[[Path], bool],
    files: list[Path] | None = None,
) -> str | None:
    """Before an attempt: when ``out_dir`` holds no complete checkpoint (``has_local``) but the
    database records one, download the newest recorded (``final`` last, else the highest
    step) from the store into ``out_dir/<name>``, so the engine's ``resume: auto`` finds it as
    if it had been written here; then each of ``files`` (:func:`synced_files`) that is absent
    here from its synced copy, best effort (the metrics files the engine trims to the resumed
    step, the log the attempts append to). Returns the name fetched, None when nothing was to
    fetch. Raises StoreError (the store failed: the attempt must not start from scratch) and
    SQLAlchemyError."""
    if has_local(out_dir):
        return None
    with db.session() as session:
        recorded = reads.list_checkpoints(session, run_id)
    if not recorded:
        return None
    name = recorded[-1].name
    out_dir.mkdir(parents=True, exist_ok=True)
    started = time.monotonic()
    count = store.get_folder(artifacts.checkpoint_prefix(run_id, name), out_dir / name)
    for path in files or []:
        if path.exists():
            continue
        path.parent.mkdir(parents=True, exist_ok=True)
        try:
            store.get_file(artifacts.run_file_key(run_id, path.name), path)
        except StoreError as error:
            log.info("run %s: no synced %s: %s", run_id, path.name, error)
    log.info(
        "run %s: checkpoint %s fetched from the object store (%d files, %.1f s)",
        run_id,
        name,
        count,
        time.monotonic() - started,
    )
    return name


#: The folder (below the run's own folder) that holds the fetched copy of the checkpoint its
#: ``initial_checkpoint_dir`` names, when this machine lacks the recorded folder.
INITIAL_CHECKPOINT_CACHE = "initial_checkpoint"


def fetch_initial_checkpoint(
    store: ArtifactStore, db: Database, path: str, run_dir: Path
) -> Path | None:
    """Before an attempt: the folder the engine should load ``initial_checkpoint_dir`` (the
    resolved ``path``, a recorded checkpoint of another run, e.g. from ``run:ID/final``) from.
    None when ``path`` holds the weights here (a shared file system: nothing to fetch) or is
    no recorded checkpoint (the engine reports the missing folder as without a store). Else
    ``run_dir/initial_checkpoint``: downloaded from the store once (renamed into place
    complete, so a folder there is a whole copy, reused by the run's later attempts on this
    machine). The other run's folder is never written: its own attempts may run here later.
    Raises StoreError (the store failed or lacks the checkpoint) and SQLAlchemyError."""
    if (Path(path) / WEIGHTS_FILE).is_file():
        return None
    cache = run_dir / INITIAL_CHECKPOINT_CACHE
    if cache.is_dir():
        return cache
    with db.session() as session:
        record = reads.checkpoint_at(session, path)
    if record is None:
        return None
    run_dir.mkdir(parents=True, exist_ok=True)
    started = time.monotonic()
    count = store.get_folder(artifacts.checkpoint_prefix(record.run_id, record.name), cache)
    log.info(
        "initial checkpoint %s (run %s, %s) fetched from the object store into %s "
        "(%d files, %.1f s)",
        path,
        record.run_id,
        record.name,
        cache,
        count,
        time.monotonic() - started,
    )
    return cache
