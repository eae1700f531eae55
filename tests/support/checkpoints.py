"""Real checkpoint folders of the tiny MoE for the download tests: trained once in-process, then
copied into a run's folder and recorded as a worker would."""

from __future__ import annotations

import copy
import shutil
import uuid
from pathlib import Path

from service import runs
from service.db import Database
from service.settings import Settings
from tests.support.tiny import TINY_MODEL, tiny_train_config


def train_tiny(out: Path, corpus: Path, tokenizer_dir: Path) -> Path:
    """Train the tiny MoE for 6 optimizer steps with a checkpoint every 3 (``step-00000003``,
    ``step-00000006``, ``final``) into ``out``; returns ``out``."""
    from service.config.validate import validate_configs
    from worker.train import run_training

    doc = tiny_train_config(out, corpus, tokenizer_dir, save_interval=3)
    v = validate_configs(doc, copy.deepcopy(TINY_MODEL))
    run_training(v.train, v.model)
    return out


def install(settings: Settings, db: Database, run_id: uuid.UUID, source: Path) -> dict[str, Path]:
    """Copy the checkpoint folders of ``source`` into the run's ``out/`` and record them;
    returns ``{name: folder}``."""
    out = settings.run_dir(run_id) / "out"
    folders: dict[str, Path] = {}
    for name in ("step-00000003", "final"):
        folder = out / name
        shutil.copytree(source / name, folder)
        size = sum(p.stat().st_size for p in folder.iterdir())
        with db.session() as s:
            runs.record_checkpoint(
                s, run_id, name, str(folder), step=6 if name == "final" else None, size_bytes=size
            )
        folders[name] = folder
    return folders
