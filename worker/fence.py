"""The engine's side of fencing: it stops itself when its worker goes silent, and it never
renames a checkpoint into a folder that another attempt owns. Torch-free (the stub engine
uses it too); ``worker.entry`` starts it before anything heavy is imported.

The worker's runner gives the training process the read end of a pipe
(``service.contract.ENV_WATCHDOG_FD``) and writes a byte to it every half second for as long
as its lease is safely held (``worker.runner``). A thread here (:class:`Fence`) reads those
bytes. When none came for ``deadline`` seconds (``ENV_TRAINER_DEADLINE``: the worker is
frozen, or it lost the database long enough to stop vouching for its lease), when the pipe
is closed (the worker died), or when ``out_dir/.owner.json`` names another attempt, the
process is *fenced*:

- no checkpoint write may start any more (:meth:`Fence.writing` raises :class:`Fenced`);
- a write already under way may finish within ``write_allowance`` seconds
  (``ENV_CHECKPOINT_WRITE``), but its rename into place is checked again
  (:meth:`Fence.check_commit`) and refused once the allowance is spent or the owner changed;
- then the process exits at once with ``ExitCode.FENCED`` (``os._exit``: no cleanup code of
  the training loop runs, nothing more is written; rank processes die with it through their
  parent-death signal).

Timing invariant (``service.settings``): the lease outlives the trainer, i.e.
``LEASE_SECONDS > TRAINER_DEADLINE_SECONDS + CHECKPOINT_WRITE_SECONDS + HEARTBEAT_SECONDS``,
and the worker stops writing bytes ``TRAINER_DEADLINE + CHECKPOINT_WRITE + HEARTBEAT`` seconds
before its lease would expire. So a trainer whose worker went silent is dead before the
reconciler can hand the run to another attempt: at any moment at most one training process of
a run is alive. The owner-file check is the second line, for when the clocks of two machines
disagree by more than the grace: a rename still races a claim that lands between the check
and the rename (microseconds, not the minutes of the old failure).
"""

from __future__ import annotations

import contextlib
import os
import select
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

from service import contract

#: Deadline used when the runner gives a pipe but no ``ENV_TRAINER_DEADLINE``.
DEFAULT_DEADLINE_S = 30.0
#: Write allowance used when ``ENV_CHECKPOINT_WRITE`` is absent.
DEFAULT_WRITE_ALLOWANCE_S = 45.0
#: How often the owner file is read, seconds.
OWNER_CHECK_S = 1.0


class Fenced(Exception):
    """This process may not write into the run's folder any more (``str()`` says why)."""


def _env_float(name: str, default: float) -> float:
    try:
        value = float(os.environ.get(name, ""))
    except ValueError:
        return default
    return value if value > 0 else default


def _env_int(name: str) -> int | None:
    try:
        return int(os.environ[name])
    except (KeyError, ValueError):
        return None


class Fence:
    """The watchdog and the write checks of one training process.

    Args:
        out_dir: the run's output folder (holds ``.owner.json``).
        attempt: this process' attempt; None disables the owner check.
        fd: read end of the worker's heartbeat pipe; None means no watchdog (``run_train.py``).
        deadline: seconds without a byte before the process is fenced.
        write_allowance: seconds a checkpoint write under way may still take after that.
        exit: what ends the process (``os._exit``; tests pass their own).
    """

    def __init__(
        self,
        out_dir: Path | str,
        *,
        attempt: int | None = None,
        fd: int | None = None,
        deadline: float = DEFAULT_DEADLINE_S,
        write_allowance: float = DEFAULT_WRITE_ALLOWANCE_S,
        exit: Callable[[int], object] = os._exit,
    ) -> None:
        self.out_dir = Path(out_dir)
        self.attempt = attempt
        self.fd = fd
        self.deadline = deadline
        self.write_allowance = write_allowance
        self._exit = exit
        self._lock = threading.Lock()
        self._writes = 0
        self._last_beat = time.monotonic()
        self._fenced_at: float | None = None
        self.reason: str | None = None
        self._thread: threading.Thread | None = None
        self._stop = threading.Event()

    @classmethod
    def from_env(cls, out_dir: Path | str) -> Fence:
        """The fence the runner asked for through the environment (``service.contract``); an
        inactive one (no watchdog, no owner check) when the process was not started by a
        worker or the descriptor is not open in this process (a rank process)."""
        fd = _env_int(contract.ENV_WATCHDOG_FD)
        if fd is not None:
            try:
                os.fstat(fd)
            except OSError:
                fd = None
        return cls(
            out_dir,
            attempt=_env_int(contract.ENV_ATTEMPT),
            fd=fd,
            deadline=_env_float(contract.ENV_TRAINER_DEADLINE, DEFAULT_DEADLINE_S),
            write_allowance=_env_float(contract.ENV_CHECKPOINT_WRITE, DEFAULT_WRITE_ALLOWANCE_S),
        )

    @property
    def active(self) -> bool:
        """True when a watchdog thread watches a worker's pipe."""
        return self.fd is not None

    @property
    def fenced(self) -> bool:
        return self.reason is not None

    def start(self) -> Fence:
        """Start the watchdog thread (a daemon) when there is a pipe; returns self."""
        if self.fd is not None and self._thread is None:
            self._last_beat = time.monotonic()
            self._thread = threading.Thread(target=self._watch, name="moejobs-fence", daemon=True)
            self._thread.start()
        return self

    def stop(self) -> None:
        """Stop watching (tests; a process that ends normally just exits)."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)
            self._thread = None

    # -- checkpoint writes ---------------------------------------------------------------------

    @contextlib.contextmanager
    def writing(self) -> Iterator[None]:
        """Mark a checkpoint write under way. Raises :class:`Fenced` at entry when the process
        is fenced already; while the block runs, the watchdog waits up to ``write_allowance``
        before ending the process."""
        with self._lock:
            if self.reason is not None:
                raise Fenced(self.reason)
            self._writes += 1
        try:
            yield
        finally:
            with self._lock:
                self._writes -= 1

    def check_commit(self) -> None:
        """Call right before renaming a finished checkpoint folder into place. Raises
        :class:`Fenced` when the write allowance after fencing is spent or when the owner
        file names another attempt (the rename must not happen)."""
        with self._lock:
            if (
                self._fenced_at is not None
                and time.monotonic() - self._fenced_at >= self.write_allowance
            ):
                raise Fenced(
                    f"{self.reason}; the checkpoint write outlasted {self.write_allowance:g} s"
                )
        owner = self._other_owner()
        if owner is not None:
            raise Fenced(owner)

    def _other_owner(self) -> str | None:
        if self.attempt is None:
            return None
        owner = contract.read_owner(self.out_dir)
        if owner is not None and owner.attempt != self.attempt:
            return (
                f"attempt {owner.attempt} on worker {owner.worker_id} owns {self.out_dir} "
                f"(this is attempt {self.attempt})"
            )
        return None

    def fence_now(self, why: str) -> None:
        """Fence the process from the training thread (a refused :meth:`check_commit`): the
        same end as the watchdog's (event, one line, exit ``FENCED``); returns only when the
        ``exit`` callback does (tests)."""
        self._fence(why)

    # -- the watchdog --------------------------------------------------------------------------

    def _watch(self) -> None:
        assert self.fd is not None
        poll = max(0.05, min(0.5, self.deadline / 4))
        next_owner_check = time.monotonic() + OWNER_CHECK_S
        while not self._stop.is_set():
            try:
                ready, _, _ = select.select([self.fd], [], [], poll)
            except (OSError, ValueError):
                ready = []
            now = time.monotonic()
            if ready:
                try:
                    data = os.read(self.fd, 4096)
                except OSError:
                    data = b""
                if not data:
                    self._fence("the worker's heartbeat pipe closed (worker gone)")
                    return
                self._last_beat = now
            silent = now - self._last_beat
            if silent > self.deadline:
                self._fence(
                    f"no heartbeat from the worker for {silent:.1f} s "
                    f"(trainer deadline {self.deadline:g} s)"
                )
                return
            if now >= next_owner_check:
                next_owner_check = now + OWNER_CHECK_S
                other = self._other_owner()
                if other is not None:
                    self._fence(other)
                    return

    def _fence(self, why: str) -> None:
        """Forbid new writes, let one under way finish within the allowance, then exit."""
        with self._lock:
            self.reason = why
            self._fenced_at = time.monotonic()
        until = self._fenced_at + self.write_allowance
        while time.monotonic() < until:
            with self._lock:
                if self._writes == 0:
                    break
            time.sleep(0.05)
        try:  # waited_s: how long the write under way still ran (the fencing began that long ago)
            contract.append_event(
                self.out_dir,
                contract.EventKind.fenced,
                attempt=self.attempt,
                message=why,
                waited_s=round(time.monotonic() - self._fenced_at, 3),
            )
        except OSError:
            pass
        try:
            sys.stderr.write(f"error: fenced: {why}: training stopped without writing more\n")
            sys.stderr.flush()
        except (OSError, ValueError):
            pass
        self._exit(int(contract.ExitCode.FENCED))


_current: Fence | None = None


def install(out_dir: Path | str) -> Fence:
    """Build this process' fence from the environment (:meth:`Fence.from_env`) and start it;
    later calls return the same one."""
    global _current
    if _current is None:
        _current = Fence.from_env(out_dir).start()
    return _current


def current() -> Fence | None:
    """This process' fence, or None when :func:`install` was not called."""
    return _current
