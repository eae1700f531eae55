"""Checkpoint folders: LitGPT-loadable weights plus the training state, written atomically.

Layout of ``out_dir/step-XXXXXXXX/`` (8-digit optimizer step) and ``out_dir/final/``::

    lit_model.pth          model state dict, LitGPT key names (``litgpt generate <dir>`` loads it)
    model_config.yaml      the ``litgpt.Config`` as YAML (what ``litgpt.utils.save_config`` writes)
    tokenizer.json, tokenizer_config.json, generation_config.json, ...   copied tokenizer files
    training_state.pt      optimizer state, RNG states and the fields of training_state.json
    training_state.json    step, tokens, data position, elapsed time, the resolved train config

A folder is first written as ``out_dir/.tmp-<name>-<pid>/``, every file flushed to disk, and
then renamed to its final name, so a folder named ``step-*`` or ``final`` is always complete.
Replacing an existing folder (``final/`` of a resumed run) renames the old one to
``.old-<name>-<pid>`` first and deletes it after the new one is in place; if the process dies in
between, :func:`clean_stale` puts the old folder back.
"""
from __future__ import annotations

import json
import os
import re
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from service import contract

from worker.tokenizer import TOKENIZER_FILES

FINAL = contract.FINAL
STATE_PT = "training_state.pt"
STATE_JSON = "training_state.json"
WEIGHTS = "lit_model.pth"
MODEL_CONFIG = "model_config.yaml"
REQUIRED = (WEIGHTS, MODEL_CONFIG, STATE_PT, STATE_JSON)
_TEMP_RE = re.compile(r"^\.(tmp|old)-(.+)-(\d+)$")


step_dir_name = contract.step_dir_name


@dataclass(frozen=True)
class CheckpointInfo:
    """A complete checkpoint folder and the contents of its ``training_state.json``."""

    path: Path
    step: int
    meta: dict[str, Any]

    @property
    def is_final(self) -> bool:
        return self.path.name == FINAL


def _fsync_file(path: Path) -> None:
    with open(path, "rb") as fh:
        os.fsync(fh.fileno())


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _pid_alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def clean_stale(out_dir: Path) -> list[str]:
    """Remove leftovers of writers that died: ``.tmp-*`` folders, and ``.old-*`` folders whose
    replacement is in place. An ``.old-<name>-<pid>`` whose ``<name>`` folder is missing is
    renamed back (the process died between the two renames). Folders of live processes are kept.

    Returns:
        what was done, one line per folder (for the log).
    """
    done: list[str] = []
    if not out_dir.is_dir():
        return done
    for entry in sorted(out_dir.iterdir()):
        m = _TEMP_RE.match(entry.name)
        if not m or not entry.is_dir() or _pid_alive(int(m.group(3))):
            continue
        kind, name = m.group(1), m.group(2)
        if kind == "old" and not (out_dir / name).exists():
            os.replace(entry, out_dir / name)
            done.append(f"restored {name} from {entry.name}")
        else:
            shutil.rmtree(entry, ignore_errors=True)
            done.append(f"removed stale {entry.name}")
    return done


def save_checkpoint(
    out_dir: Path,
    name: str,
    *,
    model_state: dict[str, torch.Tensor],
    model_config: Any,
    tokenizer_dir: Path | None,
    state: dict[str, Any],
    meta: dict[str, Any],
) -> Path:
    """Write checkpoint folder ``out_dir/name`` atomically and return its path.

    Args:
        model_state: the model's state dict with LitGPT key names (no wrapper prefixes).
        model_config: a ``litgpt.Config``; written with ``litgpt.utils.save_config``.
        tokenizer_dir: folder whose ``TOKENIZER_FILES`` are copied (skipped when None).
        state: training state for ``training_state.pt`` (optimizer state dict, RNG states, ...).
        meta: JSON-serialisable summary (must contain ``step``); stored in both state files.

    Raises:
        OSError: the folder cannot be written (disk full, permissions).
    """
    from litgpt.utils import save_config

    out_dir.mkdir(parents=True, exist_ok=True)
    pid = os.getpid()
    tmp = out_dir / f".tmp-{name}-{pid}"
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir()
    try:
        torch.save(model_state, tmp / WEIGHTS)
        save_config(model_config, tmp)
        if tokenizer_dir is not None:
            for fname in TOKENIZER_FILES:
                src = Path(tokenizer_dir) / fname
                if src.is_file():
                    shutil.copyfile(src, tmp / fname)
        torch.save({**state, "meta": meta}, tmp / STATE_PT)
        (tmp / STATE_JSON).write_text(json.dumps(meta, indent=2, default=str) + "\n", encoding="utf-8")
        for f in tmp.iterdir():
            _fsync_file(f)
        _fsync_dir(tmp)
        target = out_dir / name
        old = out_dir / f".old-{name}-{pid}"
        if target.exists():
            os.replace(target, old)
        os.replace(tmp, target)
        _fsync_dir(out_dir)
        if old.exists():
            shutil.rmtree(old, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return target


def read_checkpoint(path: Path) -> CheckpointInfo | None:
    """The :class:`CheckpointInfo` of ``path``, or None when it is not a complete checkpoint."""
    path = Path(path)
    if not path.is_dir() or not all((path / f).is_file() for f in REQUIRED):
        return None
    try:
        meta = json.loads((path / STATE_JSON).read_text(encoding="utf-8"))
        return CheckpointInfo(path=path, step=int(meta["step"]), meta=meta)
    except (OSError, ValueError, KeyError, TypeError):
        return None


def list_checkpoints(out_dir: Path) -> list[CheckpointInfo]:
    """Complete ``step-*`` and ``final`` checkpoints in ``out_dir``, oldest step first
    (at equal steps ``final`` sorts last)."""
    out_dir = Path(out_dir)
    found: list[CheckpointInfo] = []
    if not out_dir.is_dir():
        return found
    for entry in out_dir.iterdir():
        if contract.is_checkpoint_name(entry.name):
            info = read_checkpoint(entry)
            if info is not None:
                found.append(info)
    return sorted(found, key=lambda c: (c.step, c.is_final))


def latest_checkpoint(out_dir: Path) -> CheckpointInfo | None:
    """The complete checkpoint with the highest step (``final`` wins a tie), or None."""
    found = list_checkpoints(out_dir)
    return found[-1] if found else None


def load_weights(path: Path) -> dict[str, torch.Tensor]:
    """The model state dict of checkpoint folder ``path`` (accepts ``{"model": sd}`` too)."""
    sd = torch.load(Path(path) / WEIGHTS, map_location="cpu", weights_only=True, mmap=True)
    return sd.get("model", sd) if isinstance(sd, dict) and "model" in sd else sd


def load_state(path: Path) -> dict[str, Any]:
    """The contents of ``training_state.pt`` of checkpoint folder ``path``."""
    return torch.load(Path(path) / STATE_PT, map_location="cpu", weights_only=False)
