"""A worker process's life outside its tasks: which GPUs it owns, its row in the ``workers``
table (registration, heartbeats, removal at shutdown), the periodic reconciler, and the
sample data the smoke test trains on.

Liveness comes from the ``workers`` table (the embedded broker transport has no Celery remote
control): a worker heartbeats every ``HEARTBEAT_SECONDS`` and counts as live while its last
heartbeat is younger than ``WORKER_STALE_SECONDS``.

Nothing here imports torch: GPUs are found with ``nvidia-smi`` (or, on a ROCm machine, torch in
a short subprocess).
"""

from __future__ import annotations

import json
import logging
import os
import platform
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from sqlalchemy.exc import SQLAlchemyError

from service import runs
from service.db import Database, open_database, schema_is_current
from service.queue import worker_queues
from service.settings import Settings
from worker.runner import WorkerInfo

log = logging.getLogger("moejobs.worker")

#: The smoke test's data under DATA_ROOT: sample/train, sample/val, sample/tokenizer.
SAMPLE_DIR = "sample"
#: Bytes of standard-library text in the sample corpus, and the sample tokenizer's vocabulary.
SAMPLE_BYTES = 300_000
SAMPLE_VOCAB = 4096


# -- GPUs ---------------------------------------------------------------------------------------


def _nvidia_smi_gpus(smi: str) -> list[dict[str, Any]]:
    out = subprocess.run(
        [smi, "--query-gpu=index,uuid,name,memory.total", "--format=csv,noheader,nounits"],
        capture_output=True,
        text=True,
        timeout=30,
    )
    if out.returncode != 0:
        raise RuntimeError(out.stderr.strip() or f"nvidia-smi exited with {out.returncode}")
    gpus = []
    for line in out.stdout.splitlines():
        parts = [p.strip() for p in line.split(",")]
        if len(parts) < 4:
            continue
        index, uuid_, name, mib = parts[0], parts[1], ",".join(parts[2:-1]), parts[-1]
        try:
            memory = int(float(mib) * 2**20)
        except ValueError:
            memory = None
        gpus.append({"index": int(index), "uuid": uuid_, "name": name, "memory_bytes": memory})
    return gpus


_TORCH_PROBE = (
    "import json, torch\n"
    "n = torch.cuda.device_count() if torch.cuda.is_available() else 0\n"
    "print(json.dumps([{'index': i, 'name': torch.cuda.get_device_name(i),"
    " 'memory_bytes': torch.cuda.get_device_properties(i).total_memory} for i in range(n)]))\n"
)


def _torch_gpus() -> list[dict[str, Any]]:
    out = subprocess.run(
        [sys.executable, "-c", _TORCH_PROBE], capture_output=True, text=True, timeout=120
    )
    if out.returncode != 0:
        raise RuntimeError(
            out.stderr.strip().splitlines()[-1] if out.stderr.strip() else f"exit {out.returncode}"
        )
    return json.loads(out.stdout.strip().splitlines()[-1])


def detect_gpus() -> list[dict[str, Any]]:
    """The GPUs this process may use: ``[{"index", "name", "memory_bytes"[, "uuid"]}]``.

    ``nvidia-smi`` when it is installed (physical indices; narrowed to ``CUDA_VISIBLE_DEVICES``
    when that lists indices or UUIDs); else, when a ROCm device node exists, torch in a
    subprocess (this process never initialises a GPU); else none. A failing probe is logged
    and counts as no GPU."""
    try:
        smi = shutil.which("nvidia-smi")
        if smi:
            gpus = _nvidia_smi_gpus(smi)
            visible = os.environ.get("CUDA_VISIBLE_DEVICES")
            if visible is not None:
                wanted = [v.strip() for v in visible.split(",") if v.strip()]
                gpus = [g for g in gpus if str(g["index"]) in wanted or g.get("uuid") in wanted]
            return gpus
        if Path("/dev/kfd").exists():
            return _torch_gpus()
    except (OSError, subprocess.SubprocessError, RuntimeError, ValueError) as error:
        log.warning("GPU detection failed, registering without GPUs: %s", error)
    return []


def owned_gpus(
    settings: Settings, detected: list[dict[str, Any]]
) -> tuple[list[dict[str, Any]], str | None]:
    """The GPUs this worker owns and the ``CUDA_VISIBLE_DEVICES`` value for its training
    processes: all detected ones for ``worker_gpus="all"`` (environment left alone, None), else
    those among them whose index is listed (indices not found are logged and skipped)."""
    if settings.worker_gpus == "all":
        return detected, None
    wanted = list(settings.worker_gpus)
    by_index = {g["index"]: g for g in detected}
    missing = [i for i in wanted if i not in by_index]
    if missing:
        log.warning(
            "MOEJOBS_WORKER_GPUS lists GPU(s) %s that this machine does not show (found %s)",
            missing,
            sorted(by_index),
        )
    owned = [by_index[i] for i in wanted if i in by_index]
    return owned, ",".join(str(g["index"]) for g in owned)


def _cgroup_memory_limit() -> int | None:
    """This process's cgroup memory limit in bytes (v2 ``memory.max``, v1
    ``memory.limit_in_bytes``), None when unlimited or unreadable."""
    try:
        lines = Path("/proc/self/cgroup").read_text().splitlines()
    except OSError:
        return None
    candidates: list[Path] = []
    for line in lines:
        parts = line.split(":", 2)
        if len(parts) != 3:
            continue
        rel = parts[2].lstrip("/")
        if parts[0] == "0" and parts[1] == "":
            candidates += [
                Path("/sys/fs/cgroup") / rel / "memory.max",
                Path("/sys/fs/cgroup/memory.max"),
            ]
        elif "memory" in parts[1].split(","):
            candidates += [
                Path("/sys/fs/cgroup/memory") / rel / "memory.limit_in_bytes",
                Path("/sys/fs/cgroup/memory/memory.limit_in_bytes"),
            ]
    for path in candidates:
        try:
            text = path.read_text().strip()
        except OSError:
            continue
        if text.isdigit() and int(text) < 2**60:  # v1 writes a huge number for "no limit"
            return int(text)
        if text:
            return None  # "max": no limit
    return None


def host_memory_bytes() -> int | None:
    """The memory this process can use: the machine's physical memory, or its cgroup's limit
    when lower (a container). None when it cannot be read."""
    try:
        physical = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        physical = None
    limit = _cgroup_memory_limit()
    known = [v for v in (physical, limit) if v and v > 0]
    return min(known) if known else None


def cpu_model() -> str:
    """The CPU's model name (``/proc/cpuinfo``; ``platform.processor()`` elsewhere), or the
    machine architecture."""
    try:
        for line in Path("/proc/cpuinfo").read_text(errors="replace").splitlines():
            key, _, value = line.partition(":")
            if key.strip() in ("model name", "Model", "cpu model") and value.strip():
                return value.strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "unknown"


def worker_kind(gpus: list[dict[str, Any]]) -> str:
    """What a run's speed on this worker depends on: the first owned GPU's name (e.g.
    "NVIDIA H200"), or ``"cpu: <model name>"`` for a CPU worker. At most 200 characters."""
    if gpus and gpus[0].get("name"):
        return str(gpus[0]["name"])[:200]
    return f"cpu: {cpu_model()}"[:200]


def free_bytes(path: Path | None) -> int | None:
    """Free space under ``path`` (RUNS_DIR) in bytes; None when it cannot be read."""
    if path is None:
        return None
    try:
        return shutil.disk_usage(path).free
    except OSError:
        return None


def default_worker_id() -> str:
    """``<host>-<pid>``: unique among live workers (one process per GPU slot)."""
    return f"{socket.gethostname()}-{os.getpid()}"[:200]


def hardware_description(gpus: list[dict[str, Any]]) -> dict[str, Any]:
    """What the run's provenance says about the machine: host, platform, CPUs, owned GPUs."""
    return {
        "host": socket.gethostname(),
        "platform": platform.platform(),
        "machine": platform.machine(),
        "cpu_count": os.cpu_count(),
        "gpus": [{k: g.get(k) for k in ("index", "name", "memory_bytes")} for g in gpus],
    }


# -- sample data --------------------------------------------------------------------------------


def sample_paths(settings: Settings) -> dict[str, Path]:
    """``{"train", "val", "tokenizer"}`` folders of the smoke test's data under DATA_ROOT."""
    assert settings.data_root is not None
    root = settings.data_root / SAMPLE_DIR
    return {"train": root / "train", "val": root / "val", "tokenizer": root / "tokenizer"}


def _sample_complete(paths: dict[str, Path]) -> bool:
    return (
        any(paths["train"].glob("*.txt"))
        and any(paths["val"].glob("*.txt"))
        and (paths["tokenizer"] / "tokenizer.json").is_file()
    )


def ensure_sample_data(settings: Settings) -> dict[str, Path]:
    """Make sure ``DATA_ROOT/sample/{train,val,tokenizer}`` exist (a small standard-library
    corpus, ``worker.corpus.build_corpus``, and a byte-level BPE trained on it,
    ``worker.tokenizer.train_tokenizer``). Missing parts are built in a temporary folder in
    DATA_ROOT and renamed into place, so a reader never sees half a folder and two workers
    starting at once do not clash (the second rename fails and its copy is dropped).
    Returns :func:`sample_paths`."""
    paths = sample_paths(settings)
    if _sample_complete(paths):
        return paths
    from worker.corpus import build_corpus
    from worker.tokenizer import train_tokenizer

    root = paths["train"].parent
    root.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".tmp-{SAMPLE_DIR}-", dir=root.parent))
    try:
        if not (any(paths["train"].glob("*.txt")) and any(paths["val"].glob("*.txt"))):
            build_corpus(tmp, max_bytes=SAMPLE_BYTES)
            for part in ("train", "val"):
                _rename_if_absent(tmp / part, paths[part])
        if not (paths["tokenizer"] / "tokenizer.json").is_file():
            train_tokenizer([paths["train"]], tmp / "tokenizer", vocab_size=SAMPLE_VOCAB)
            _rename_if_absent(tmp / "tokenizer", paths["tokenizer"])
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    log.info("sample data ready in %s", root)
    return paths


def _rename_if_absent(src: Path, dest: Path) -> None:
    if dest.exists() and any(dest.iterdir()):
        return  # someone else's complete copy is in place
    try:
        if dest.exists():
            dest.rmdir()  # an empty leftover folder
        os.rename(src, dest)
    except OSError:  # another worker renamed its copy in first
        if not dest.exists():
            raise


# -- the worker's runtime -----------------------------------------------------------------------


@dataclass
class _Loop:
    name: str
    thread: threading.Thread


class WorkerRuntime:
    """Everything a worker process holds while it serves runs: settings, the database, its
    identity and GPUs (:attr:`info`, handed to ``worker.runner``), the heartbeat thread and
    the reconciler thread.

    ``start()`` checks that the database is migrated (``RuntimeError`` otherwise), seeds the
    sample data (``seed_sample``), detects GPUs, registers the worker and starts the threads;
    ``stop()`` stops them and removes the worker's row.
    """

    def __init__(
        self,
        settings: Settings,
        *,
        celery_app: Any = None,
        worker_id: str | None = None,
        reconcile: bool = True,
    ) -> None:
        self.settings = settings
        self.celery_app = celery_app
        self.worker_id = worker_id or default_worker_id()
        self.reconcile_enabled = reconcile
        self.db: Database | None = None
        self.gpus: list[dict[str, Any]] = []
        self.info = WorkerInfo(worker_id=self.worker_id)
        self._stop = threading.Event()
        self._loops: list[_Loop] = []
        self._resend: list[uuid.UUID] = []
        self.started = False

    @property
    def shutdown(self) -> threading.Event:
        """Set when the worker is shutting down (the runner then stops its training)."""
        return self.info.shutdown

    def database(self) -> Database:
        if self.db is None:
            self.db = open_database(self.settings)
        return self.db

    def start(self, *, seed_sample: bool = True) -> None:
        if self.started:
            return
        self.settings.ensure_dirs()
        db = self.database()
        if not schema_is_current(db.engine):
            raise RuntimeError(
                f"the database {db.engine.url.render_as_string(hide_password=True)} is not "
                "migrated to the current schema: run `moejobs migrate` first"
            )
        if seed_sample:
            try:
                ensure_sample_data(self.settings)
            except Exception as error:  # the smoke test will name the missing data
                log.error("could not seed the sample data: %s", error)
        # an aux worker trains nothing: it owns no GPU (a training worker beside it may)
        detected = detect_gpus() if self.settings.worker_role != "aux" else []
        self.gpus, visible = owned_gpus(self.settings, detected)
        self.info.cuda_visible_devices = visible
        self.info.hardware = hardware_description(self.gpus)
        self.register()
        self._loops.append(
            self._spawn("heartbeat", self.settings.heartbeat_seconds, self.heartbeat)
        )
        if self.reconcile_enabled:
            from worker.reconciler import interval_seconds

            self._loops.append(
                self._spawn("reconciler", interval_seconds(self.settings), self.reconcile_once)
            )
            if self.settings.worker_role != "aux":  # sweeps: issue 11 (worker.sweeper)
                self._loops.append(
                    self._spawn("sweeps", self.settings.sweep_tick_seconds, self.tick_sweeps)
                )
            # webhooks: issue 11 (worker.webhooks); every role sends, leases keep it once
            self._loops.append(
                self._spawn("webhooks", self.settings.webhook_tick_seconds, self.send_webhooks)
            )
        self.started = True
        log.info(
            "worker %s registered (role %s, queues %s): %d GPU(s)%s",
            self.worker_id,
            self.settings.worker_role,
            ", ".join(worker_queues(self.settings)),
            len(self.gpus),
            "".join(f", {g['index']}: {g['name']}" for g in self.gpus),
        )

    def _spawn(self, name: str, every: float, fn) -> _Loop:
        def loop() -> None:
            while not self._stop.wait(every):
                try:
                    fn()
                except Exception:  # keep the loop alive: the next tick retries
                    log.exception("%s failed", name)

        thread = threading.Thread(target=loop, name=f"moejobs-{name}", daemon=True)
        thread.start()
        return _Loop(name, thread)

    def register(self) -> None:
        """Write this worker's row: its GPUs, kind (:func:`worker_kind`), host memory and the
        free space under RUNS_DIR (what admission compares runs with)."""
        with self.database().session() as session:
            runs.register_worker(
                session,
                self.worker_id,
                socket.gethostname(),
                pid=os.getpid(),
                gpus=self.gpus,
                kind=worker_kind(self.gpus),
                host_memory_bytes=host_memory_bytes(),
                free_bytes=free_bytes(self.settings.runs_dir),
                role=self.settings.worker_role,
            )

    def heartbeat(self) -> None:
        """Renew this worker's heartbeat and its free space under RUNS_DIR; register again if
        its row was removed."""
        with self.database().session() as session:
            if (
                runs.heartbeat_worker(
                    session, self.worker_id, free_bytes=free_bytes(self.settings.runs_dir)
                )
                is None
            ):
                log.warning("worker row %s was gone: registering again", self.worker_id)
                self.register()

    def app(self) -> Any:
        """The Celery app used to (re-)enqueue runs (``service.queue.make_celery`` of the
        settings unless one was given)."""
        if self.celery_app is None:
            from service.queue import make_celery

            self.celery_app = make_celery(self.settings)
        return self.celery_app

    def reconcile_once(self):
        """One :func:`worker.reconciler.reconcile` pass with this worker's database and app."""
        from worker.reconciler import reconcile

        summary = reconcile(self.settings, db=self.database(), celery_app=self.app())
        if summary:
            log.info("reconciler: %s", summary)
        return summary

    def tick_sweeps(self):
        """One sweep controller pass (``worker.sweeper.tick_all``) as this worker."""
        from worker.sweeper import tick_all

        return tick_all(self.settings, self.database(), self.app(), self.worker_id)

    def send_webhooks(self):
        """One webhook pass (``worker.webhooks.send_due``) as this worker."""
        from worker.webhooks import send_due

        return send_due(self.settings, self.database(), self.worker_id)

    def resend_at_exit(self, run_id: uuid.UUID) -> None:
        """Send run ``run_id``'s message again when this worker stops (:meth:`stop`, after its
        consumer stopped): a run given back or left queued by a stopping worker goes to
        another worker at once, not after ``QUEUED_STALE_SECONDS``."""
        if run_id not in self._resend:
            self._resend.append(run_id)

    def _send_given_back(self) -> None:
        from service.queue import enqueue_run

        for run_id in self._resend:
            result = enqueue_run(self.app(), str(run_id))
            if result.ok:
                log.info("run %s sent again for another worker", run_id)
            else:  # the reconciler of another worker sends it later
                log.warning("run %s could not be sent again: %s", run_id, result.error)
        self._resend.clear()

    def stop(self) -> None:
        """Send the runs this worker gave back (:meth:`resend_at_exit`), stop the threads and
        remove this worker's row (a clean shutdown)."""
        self.shutdown.set()
        try:
            self._send_given_back()
        except Exception:  # never block the shutdown; the reconciler covers a lost message
            log.exception("sending given-back runs failed")
        self._stop.set()
        for loop in self._loops:
            loop.thread.join(timeout=30)
        self._loops.clear()
        if self.db is not None and self.started:
            try:
                with self.db.session() as session:
                    runs.deregister_worker(session, self.worker_id)
            except SQLAlchemyError as error:
                log.warning("could not remove worker row %s: %s", self.worker_id, error)
        self.started = False
        if self.db is not None:
            self.db.dispose()
            self.db = None


_runtime: WorkerRuntime | None = None
_runtime_lock = threading.Lock()


def current_runtime(settings: Settings | None = None, celery_app: Any = None) -> WorkerRuntime:
    """This process's :class:`WorkerRuntime`, created and started on first use (normally at
    worker start-up by ``worker.celery_app``) from ``settings`` (default
    ``service.settings.get_settings()``)."""
    global _runtime
    with _runtime_lock:
        if _runtime is None:
            if settings is None:
                from service.settings import get_settings

                settings = get_settings()
            _runtime = WorkerRuntime(settings, celery_app=celery_app)
        if not _runtime.started:
            _runtime.start()
        return _runtime


def stop_runtime() -> None:
    """Stop and forget this process's runtime (worker shutdown)."""
    global _runtime
    with _runtime_lock:
        if _runtime is not None:
            _runtime.stop()
            _runtime = None
