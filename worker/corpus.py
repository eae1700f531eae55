"""The demo corpus: real text that is on every machine that runs Python.

The project commits no third-party corpus. The Python standard library's own source files are
real, varied, public text present wherever the project runs, so the demo and the tests build
their training and validation folders from them.
"""

from __future__ import annotations

import sysconfig
from pathlib import Path


def stdlib_sources() -> list[Path]:
    """Top-level ``*.py`` files of this interpreter's standard library, sorted by name."""
    root = Path(sysconfig.get_paths()["stdlib"])
    return sorted(p for p in root.glob("*.py") if p.is_file())


def build_corpus(dest: Path, max_bytes: int = 3_000_000, val_every: int = 10) -> tuple[Path, Path]:
    """Write ``dest/train/*.txt`` and ``dest/val/*.txt`` from standard-library sources.

    Every ``val_every``-th file (in name order) goes to validation, the rest to training, until
    ``max_bytes`` of text are written in all. Files that are not UTF-8 are skipped. Existing
    folders are left as they are (the corpus is only built when absent).

    Args:
        dest: parent folder of ``train/`` and ``val/``.
        max_bytes: stop after about this many bytes in total (UTF-8).
        val_every: one file in this many goes to ``val/``.

    Returns:
        ``(train_dir, val_dir)``.
    """
    train_dir, val_dir = Path(dest) / "train", Path(dest) / "val"
    if any(train_dir.glob("*.txt")) and any(val_dir.glob("*.txt")):
        return train_dir, val_dir
    train_dir.mkdir(parents=True, exist_ok=True)
    val_dir.mkdir(parents=True, exist_ok=True)
    written = 0
    for i, src in enumerate(stdlib_sources()):
        if written >= max_bytes:
            break
        raw = src.read_bytes()
        try:
            raw.decode("utf-8")
        except UnicodeDecodeError:
            continue
        if not raw.strip():
            continue
        folder = val_dir if i % val_every == val_every - 1 else train_dir
        (folder / f"{src.stem}.txt").write_bytes(raw)
        written += len(raw)
    return train_dir, val_dir
