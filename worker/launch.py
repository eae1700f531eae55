"""Start the extra data-parallel ranks of a single-node run (devices > 1).

Lightning Fabric's own launcher re-executes ``sys.argv`` for ranks 1..N-1. That is right for a
script whose command line means "train this" (``python -m worker.train ...``), and wrong for
every other caller of :func:`worker.train.run_training`: under pytest it would start pytest
again, under ``moejobs demo`` the whole demo, and ``run_train.py`` would re-resolve its flags.
So the engine starts the extra ranks itself, always with the same command,

    python -m worker.train --train-config <resolved>.yaml --model-config <resolved>.yaml

and sets the variables of Lightning's documented "processes launched externally" protocol
(``MASTER_ADDR``, ``MASTER_PORT``, ``WORLD_SIZE``, ``NODE_RANK``, ``LOCAL_RANK``; see
``lightning.fabric.plugins.environments.LightningEnvironment``) in every rank, including its own
process, before creating the Fabric; Fabric then sees ``LOCAL_RANK`` and starts nothing.
The rank processes die with their parent (Linux ``PR_SET_PDEATHSIG``), so a ``kill -9`` of rank 0
leaves no orphan blocked in a collective. They do not inherit the worker's heartbeat pipe
(``service.contract.ENV_WATCHDOG_FD`` is removed from their environment): rank 0's fence
watches it, and the same number in a rank process would name some other file.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

import yaml

from service import contract

#: environment variable that marks a rank process started by this module (value: parent pid)
PARENT_ENV = "MOEJOBS_RANK_PARENT"
_DIST_KEYS = ("MASTER_ADDR", "MASTER_PORT", "WORLD_SIZE", "NODE_RANK", "LOCAL_RANK")
REPO_ROOT = Path(__file__).resolve().parents[1]


def externally_launched() -> bool:
    """True when this process is one rank of a group someone else started: the environment has
    ``LOCAL_RANK`` (torchrun, or :class:`RankProcesses`), or it is one task of an ``srun``
    that started several (``SLURM_PROCID`` with ``SLURM_NTASKS`` > 1; every task is a rank and
    Lightning's ``SLURMEnvironment`` reads the ranks from SLURM's variables)."""
    if "LOCAL_RANK" in os.environ:
        return True
    try:
        tasks = int(os.environ.get("SLURM_NTASKS", "1"))
    except ValueError:
        tasks = 1
    return "SLURM_PROCID" in os.environ and tasks > 1


def is_rank_zero_env() -> bool:
    """Whether this process is global rank 0, judged from the environment before Fabric exists
    (``RANK`` of torchrun/SLURM-style launchers, else ``NODE_RANK`` and ``LOCAL_RANK``)."""
    for key in ("RANK", "SLURM_PROCID"):
        if key in os.environ:
            return os.environ[key] == "0"
    return os.environ.get("NODE_RANK", "0") == "0" and os.environ.get("LOCAL_RANK", "0") == "0"


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class RankProcesses:
    """Ranks 1..world_size-1 of a one-node run, started as ``python -m worker.train`` children."""

    def __init__(
        self,
        world_size: int,
        train_doc: dict[str, Any],
        model_doc: dict[str, Any],
        write_checkpoints: bool,
    ):
        self.world_size = world_size
        self.train_doc, self.model_doc = train_doc, model_doc
        self.write_checkpoints = write_checkpoints
        self.procs: list[subprocess.Popen] = []
        self._tmp: tempfile.TemporaryDirectory | None = None

    def start(self) -> None:
        """Write the resolved configs, set the distributed variables in this process (rank 0)
        and start the other ranks. The caller restores ``os.environ`` afterwards."""
        self._tmp = tempfile.TemporaryDirectory(prefix="moejobs-ranks-")
        tdir = Path(self._tmp.name)
        (tdir / "train.yaml").write_text(
            yaml.safe_dump(self.train_doc, sort_keys=False), encoding="utf-8"
        )
        (tdir / "model.yaml").write_text(
            yaml.safe_dump(self.model_doc, sort_keys=False), encoding="utf-8"
        )
        os.environ.update(
            MASTER_ADDR="127.0.0.1",
            MASTER_PORT=str(_free_port()),
            WORLD_SIZE=str(self.world_size),
            NODE_RANK="0",
            LOCAL_RANK="0",
        )
        cmd = [
            sys.executable,
            "-m",
            "worker.train",
            "--train-config",
            str(tdir / "train.yaml"),
            "--model-config",
            str(tdir / "model.yaml"),
        ]
        if not self.write_checkpoints:
            cmd.append("--no-checkpoints")
        for rank in range(1, self.world_size):
            self.procs.append(subprocess.Popen(cmd, env=self.rank_env(rank)))

    @staticmethod
    def rank_env(rank: int) -> dict[str, str]:
        """The environment of rank process ``rank``: this process' (with the distributed
        variables set by :meth:`start`), its own ``LOCAL_RANK``, the parent's pid, the repository
        on ``PYTHONPATH``, and without ``ENV_WATCHDOG_FD`` (the pipe is rank 0's; the
        descriptor is not passed on, so the number would name another file)."""
        env = dict(os.environ, LOCAL_RANK=str(rank), **{PARENT_ENV: str(os.getpid())})
        env.pop(contract.ENV_WATCHDOG_FD, None)
        env["PYTHONPATH"] = os.pathsep.join(
            p for p in (str(REPO_ROOT), env.get("PYTHONPATH", "")) if p
        )
        return env

    def wait(self, timeout: float) -> list[int | None]:
        """Wait up to ``timeout`` seconds in all for the ranks to exit; return their exit codes
        (None for one still running, which is then killed)."""
        import time

        deadline = time.monotonic() + timeout
        codes: list[int | None] = []
        for p in self.procs:
            try:
                codes.append(p.wait(timeout=max(0.1, deadline - time.monotonic())))
            except subprocess.TimeoutExpired:
                codes.append(None)
        self.kill()
        return codes

    def kill(self) -> None:
        """SIGKILL every rank still running (they hold no state worth saving: rank 0 writes the
        checkpoints) and remove the temporary config folder."""
        for p in self.procs:
            if p.poll() is None:
                p.send_signal(signal.SIGKILL)
                p.wait()
        if self._tmp is not None:
            self._tmp.cleanup()
            self._tmp = None


def die_with_parent() -> None:
    """In a rank process started by :class:`RankProcesses`: get SIGKILL when the parent dies."""
    parent = os.environ.get(PARENT_ENV)
    if not parent:
        return
    if sys.platform.startswith("linux"):
        import ctypes

        libc = ctypes.CDLL(None, use_errno=True)
        PR_SET_PDEATHSIG = 1
        libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL)
    if os.getppid() != int(parent):  # the parent died before prctl took effect
        os._exit(1)
