"""A run's provenance: what produced it (package versions, this code's git commit, the seed,
the hardware) and what it read (hashes of its text files and tokenizer), recorded once per
attempt by the worker (``runs.record_provenance``) from a helper thread, since hashing reads
every input file."""

from __future__ import annotations

import hashlib
import logging
import subprocess
import sys
import threading
import uuid
from collections.abc import Iterable
from importlib import metadata
from pathlib import Path
from typing import Any

from service import runs
from service.db import Database
from worker.launch import REPO_ROOT
from worker.tokenizer import tokenizer_hash

log = logging.getLogger("moejobs.runner")

#: The distributions whose versions are recorded (those installed), besides Python's.
PACKAGES = (
    "moejobs",
    "torch",
    "litgpt",
    "lightning",
    "litdata",
    "tokenizers",
    "numpy",
    "celery",
    "sqlalchemy",
)


def record_later(
    db: Database, run_id: uuid.UUID, train_doc: dict[str, Any], hardware: dict[str, Any]
) -> threading.Thread:
    """Record the provenance of run ``run_id`` (:func:`provenance`) in a daemon thread, started
    before this returns; join it to wait. Never fails the run: an error is logged."""

    def work() -> None:
        try:
            values = provenance(train_doc, hardware)
            with db.session() as session:
                runs.record_provenance(session, run_id, **values)
        except Exception as error:  # provenance is informational; never fail a run for it
            log.warning("run %s: provenance not recorded: %s", run_id, error)

    thread = threading.Thread(target=work, name=f"provenance-{run_id}", daemon=True)
    thread.start()
    return thread


def provenance(train_doc: dict[str, Any], hardware: dict[str, Any]) -> dict[str, Any]:
    """Keyword arguments for ``runs.record_provenance`` from a resolved train config: package
    versions, git commit of this code (None outside a git checkout), seed, ``hardware`` as
    given, sha256 of the training and validation text files and of the tokenizer files
    (``worker.tokenizer.tokenizer_hash``)."""
    args = (train_doc.get("data") or {}).get("init_args") or {}
    tokenizer_dir = train_doc.get("tokenizer_dir") or train_doc.get("initial_checkpoint_dir")
    return {
        "package_versions": _package_versions(),
        "git_commit": _git_commit(),
        "seed": train_doc.get("seed"),
        "hardware": hardware,
        "data_hash": hash_files([args.get("train_data_path"), args.get("val_data_path")]),
        "tokenizer_hash": (
            tokenizer_hash(Path(tokenizer_dir))
            if tokenizer_dir and Path(tokenizer_dir).is_dir()
            else None
        ),
    }


def hash_files(folders: Iterable[Path | str | None], pattern: str = "*.txt") -> str | None:
    """sha256 hex over the files matching ``pattern`` at the top level of each folder (file
    names and bytes, sorted by name); None when no folder exists."""
    digest = hashlib.sha256()
    seen = False
    for folder in folders:
        if not folder or not Path(folder).is_dir():
            continue
        seen = True
        for path in sorted(Path(folder).glob(pattern)):
            if not path.is_file():
                continue
            digest.update(path.name.encode() + b"\0")
            with open(path, "rb") as fh:
                for chunk in iter(lambda: fh.read(1 << 20), b""):
                    digest.update(chunk)
            digest.update(b"\0")
    return digest.hexdigest() if seen else None


def _git_commit() -> str | None:
    if not (REPO_ROOT / ".git").exists():
        return None
    try:
        out = subprocess.run(
            ["git", "-C", str(REPO_ROOT), "rev-parse", "HEAD"],
            capture_output=True,
            text=True,
            timeout=10,
        )
    except (OSError, subprocess.SubprocessError):
        return None
    commit = out.stdout.strip()
    return (
        commit
        if out.returncode == 0 and len(commit) == 40 and set(commit) <= set("0123456789abcdef")
        else None
    )


def _package_versions() -> dict[str, str]:
    versions = {"python": sys.version.split()[0]}
    for name in PACKAGES:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            pass
    return versions
