"""Runs from runs: ``initial_checkpoint_dir: run:<run id>/<checkpoint>`` resolved through the
database to the recorded checkpoint's path, at submission (``service.submission``).

``<checkpoint>`` is ``final``, a step folder (``step-00000100``) or its step number (``100``),
or ``latest`` (the run's newest recorded checkpoint: ``final`` when it has one, else the step
folder with the highest step). Only checkpoints recorded in the ``checkpoints`` table count:
a folder is recorded after it was renamed into place, so a reference never names a partial
one. The submitted config keeps the reference; the resolved config (what the worker reads)
holds the path.

:func:`resolve_checkpoint_reference` is the one place that turns a reference into what the
worker opens: where checkpoints live elsewhere than on a shared file system (an object store),
this is the function to extend.
"""

from __future__ import annotations

from collections.abc import Callable

from sqlmodel import Session

from service import reads
from service.config.paths import LATEST, parse_run_reference
from service.models import Checkpoint

__all__ = ["checkpoint_resolver", "resolve_checkpoint_reference"]

#: At most this many checkpoint names are listed in a refusal (the newest ones).
_LISTED = 20


def _listed(checkpoints: list[Checkpoint]) -> str:
    names = [c.name for c in checkpoints]
    if not names:
        return "none recorded yet"
    shown = names[-_LISTED:]
    more = f" (and {len(names) - len(shown)} older)" if len(names) > len(shown) else ""
    return ", ".join(shown) + more


def resolve_checkpoint_reference(session: Session, value: str) -> str:
    """The recorded path of the checkpoint that ``value`` (``run:<run id>/<checkpoint>``)
    names.

    Raises:
        ValueError: naming what is wrong, for the field's 422: a malformed reference (the
            expected form), an unknown run, or a checkpoint the run has not recorded (the
            checkpoints it has, and ``latest`` for a run with none yet, its status).
    """
    ref = parse_run_reference(value)
    try:
        run = reads.get_run(session, ref.run_id)
    except reads.RunNotFound:
        raise ValueError(f"{value}: there is no run {ref.run_id}") from None
    checkpoints = reads.list_checkpoints(session, ref.run_id)
    found: Checkpoint | None
    if ref.checkpoint == LATEST:
        found = checkpoints[-1] if checkpoints else None  # step order, final last
    else:
        found = reads.get_checkpoint(session, ref.run_id, ref.checkpoint)
    if found is None:
        raise ValueError(
            f"{value}: run {ref.run_id} ({run.status.value}) has no recorded checkpoint "
            f"{ref.checkpoint!r}; its checkpoints: {_listed(checkpoints)}"
        )
    return found.path


def checkpoint_resolver(session: Session) -> Callable[[str], str]:
    """:func:`resolve_checkpoint_reference` bound to ``session`` (what
    ``service.checks.ServerPaths.references`` takes)."""
    return lambda value: resolve_checkpoint_reference(session, value)
