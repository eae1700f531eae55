"""``moejobs tokenizer train`` and ``moejobs seed-data``: data on this machine (torch-free; the
tokenizer comes from the ``tokenizers`` library of the ``train`` extra)."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path


def cmd_tokenizer_train(args: argparse.Namespace) -> int:
    """Train a tokenizer folder; one ``error: ...`` line and exit 2 when the data or ``--out``
    is unusable (``--out`` must be new, empty or an earlier tokenizer folder), ``warning: ...``
    lines when the corpus yields fewer ids than ``--vocab-size``."""
    from worker.errors import DataError
    from worker.tokenizer import train_tokenizer, vocab_warnings

    try:
        out = train_tokenizer(
            [Path(d) for d in args.data], Path(args.out), vocab_size=args.vocab_size
        )
    except (DataError, ValueError, OSError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    for warning in vocab_warnings(out, args.vocab_size):
        print(f"warning: {warning}", file=sys.stderr)
    print(f"tokenizer written to {out}")
    return 0


def seed_demo_data(data_root: Path) -> dict[str, Path]:
    """Put the demo corpus and tokenizer where the shipped train config's relative paths
    resolve under ``data_root`` (``./data/custom_text/{train,val}``, ``./data/tokenizer``), so
    the shipped defaults run as submitted. Existing data is kept."""
    from worker.corpus import build_corpus
    from worker.tokenizer import train_tokenizer

    base = Path(data_root) / "data"
    train_dir, val_dir = build_corpus(base / "custom_text")
    tokenizer = base / "tokenizer"
    if not (tokenizer / "tokenizer.json").is_file():
        train_tokenizer([train_dir], tokenizer, vocab_size=4096)
    return {"train": train_dir, "val": val_dir, "tokenizer": tokenizer}


def cmd_seed_data(args: argparse.Namespace) -> int:
    paths = seed_demo_data(Path(args.root))
    for key, path in paths.items():
        print(f"{key:9s} {path}")
    return 0
