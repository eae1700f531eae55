"""Exceptions the training engine raises, each with its exit code and failure reason, and the one
function that classifies any other exception (:func:`classify`).

``run_train.py`` and ``python -m worker.entry`` / ``python -m worker.train`` turn these into one
line on stderr (``error: <label>: <message>``), ``out_dir/result.json`` and an exit code, all
from ``service.contract``. Nothing here imports torch.
"""

from __future__ import annotations

import errno
import shutil
from pathlib import Path

from service.contract import ExitCode, FailureReason, Outcome

#: errno values that mean "the filesystem is full" (a quota counts as full for the run).
NO_SPACE_ERRNOS = frozenset({errno.ENOSPC, errno.EDQUOT})


class EngineError(Exception):
    """Base class: training could not run or finish. Exit code 1, reason ``crashed``."""

    exit_code: int = ExitCode.FAILED
    reason: FailureReason | None = FailureReason.crashed
    outcome: Outcome = Outcome.failed

    @property
    def label(self) -> str:
        """The word after ``error:`` on the one-line message (the reason, or ``interrupted``)."""
        return self.reason.value if self.reason is not None else self.outcome.value


class DataError(EngineError):
    """Input text or tokenizer is unusable (missing folder, no .txt files, empty or
    undecodable file, validation data shorter than one micro-batch). The message names the
    file or folder. Exit code 1, failure reason ``invalid_data``."""

    reason = FailureReason.invalid_data


class CheckpointError(DataError):
    """A checkpoint to resume from cannot be loaded (truncated or unreadable file); the message
    names the file. Exit code 1, failure reason ``invalid_data``: the same folder fails the same
    way until the file is removed or another ``resume`` is chosen."""


class PreflightError(EngineError):
    """The validated config asks for something this machine cannot do (flash kernels forced on
    a CPU or with 32-true, bf16 on a GPU without it, more devices than exist). The message
    names the config field. Exit code 2, like any other invalid config."""

    exit_code = ExitCode.INVALID_CONFIG
    reason = FailureReason.invalid_config


class OutOfMemory(EngineError):
    """Host or GPU memory ran out. Exit code 1, failure reason ``out_of_memory``."""

    reason = FailureReason.out_of_memory


class NoSpace(EngineError):
    """A write failed because the filesystem is full (ENOSPC/EDQUOT), e.g. a checkpoint (inside
    ``torch.save``), metrics.csv or the token cache. Exit code 1, failure reason ``no_space``.

    Attributes:
        path: the file or folder being written.
        free_bytes: free bytes on its filesystem when the error was classified (None when
            unknown).
    """

    reason = FailureReason.no_space

    def __init__(self, message: str, path: Path | str | None = None, free_bytes: int | None = None):
        super().__init__(message)
        self.path = Path(path) if path is not None else None
        self.free_bytes = free_bytes


class Interrupted(EngineError):
    """Training stopped on SIGTERM/SIGINT: at an optimizer-step boundary after writing a
    resumable checkpoint (exit code 75, EX_TEMPFAIL: run it again and it resumes), or before
    training started (``before_start``: exit 128 + the signal, nothing trained).

    Attributes:
        signal_name: ``SIGTERM`` or ``SIGINT`` (None when another rank received it).
        checkpoint: the checkpoint written on the way out, if any.
    """

    exit_code: int = ExitCode.INTERRUPTED
    reason = None
    outcome = Outcome.interrupted

    def __init__(
        self,
        message: str,
        *,
        signal_name: str | None = None,
        checkpoint: Path | str | None = None,
        exit_code: int | None = None,
    ):
        super().__init__(message)
        self.signal_name = signal_name
        self.checkpoint = Path(checkpoint) if checkpoint is not None else None
        if exit_code is not None:
            self.exit_code = exit_code


#: The one line printed (and the result message) when a signal stops a run before its first
#: optimizer step.
BEFORE_START = "interrupted before training started"


def interrupted_before_start(signum: int, name: str) -> Interrupted:
    """The :class:`Interrupted` for signal ``signum`` (named ``name``) received before training
    started: exit code 128 + signum (130 SIGINT, 143 SIGTERM)."""
    return Interrupted(BEFORE_START, signal_name=name, exit_code=128 + signum)


def no_space_errno(exc: BaseException) -> OSError | None:
    """The ENOSPC/EDQUOT ``OSError`` that caused ``exc`` (itself, or along its ``__cause__`` /
    ``__context__`` chain), else None. ``torch.save`` into a Python file object raises a
    ``RuntimeError`` ("unexpected pos ...") whose ``__context__`` is the writer's OSError."""
    seen: set[int] = set()
    item: BaseException | None = exc
    while item is not None and id(item) not in seen:
        seen.add(id(item))
        if isinstance(item, OSError) and item.errno in NO_SPACE_ERRNOS:
            return item
        item = item.__cause__ or item.__context__
    return None


def free_bytes(path: Path | str) -> int | None:
    """Free bytes (for unprivileged users) on the filesystem holding ``path`` or, when it does
    not exist (a removed temporary folder), its nearest existing parent; None if unknown."""
    p = Path(path).absolute()
    for candidate in (p, *p.parents):
        try:
            return shutil.disk_usage(candidate).free
        except OSError:
            continue
    return None


def _size(n: int | None) -> str:
    if n is None:
        return "unknown"
    for unit, scale in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if n >= scale:
            return f"{n / scale:.1f} {unit}"
    return f"{n} bytes"


def no_space(path: Path | str, what: str = "", needed_bytes: int | None = None) -> NoSpace:
    """The :class:`NoSpace` for a full filesystem while writing ``path`` (``what`` says which
    output, e.g. "checkpoint"; ``needed_bytes`` how much it was going to write, when known); the
    message names the path and its free space now."""
    free = free_bytes(path)
    head = f"{what} " if what else ""
    need = f", the {what or 'file'} needs about {_size(needed_bytes)}" if needed_bytes else ""
    return NoSpace(
        f"no space left on device writing {head}{path} ({_size(free)} free there{need}); "
        "free some space (or move out_dir / MOEJOBS_TOKEN_CACHE) and run it again",
        path=path,
        free_bytes=free,
    )


def _first_line(exc: BaseException) -> str:
    return (str(exc).strip().splitlines() or [""])[0]


def classify(exc: BaseException, default_path: Path | str) -> EngineError:
    """The :class:`EngineError` for any exception that ended a run: an ``EngineError`` as it
    is; ENOSPC anywhere in its chain -> :class:`NoSpace` naming the failed file (the OSError's
    ``filename``, else ``default_path``); ``MemoryError`` or an "out of memory" message (CUDA's
    ``OutOfMemoryError``) -> :class:`OutOfMemory`; anything else -> ``crashed`` with the type and
    first line of the message."""
    if isinstance(exc, EngineError):
        return exc
    full = no_space_errno(exc)
    if full is not None:
        return no_space(full.filename or default_path)
    text = _first_line(exc)
    if isinstance(exc, MemoryError):
        return OutOfMemory(f"{type(exc).__name__}: {text or 'host memory exhausted'}")
    if "out of memory" in str(exc).lower():
        return OutOfMemory(f"{type(exc).__name__}: {text}")
    return EngineError(f"{type(exc).__name__}: {text}")
