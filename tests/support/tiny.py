"""The tiny MoE the engine tests train on a CPU in seconds, its training config document, and
a real-text corpus copied from the Python standard library."""

from __future__ import annotations

import sysconfig
from pathlib import Path
from typing import Any

from tests.support import configs

#: A tiny LitGPT MoE (2 layers, width 64, 4 experts top-2, widths divisible by 8).
TINY_MODEL: dict = configs.load("valid_tiny_model")


def stdlib_text_files(dest: Path, names: list[str]) -> Path:
    """Copy the named top-level standard-library modules (``"os"`` -> ``os.py``) to ``dest/*.txt``."""
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    dest.mkdir(parents=True, exist_ok=True)
    for name in names:
        (dest / f"{name}.txt").write_bytes((stdlib / f"{name}.py").read_bytes())
    return dest


TRAIN_MODULES = [
    "argparse",
    "ast",
    "calendar",
    "csv",
    "dataclasses",
    "difflib",
    "functools",
    "inspect",
    "ipaddress",
    "pathlib",
    "shutil",
    "string",
    "textwrap",
    "typing",
]
VAL_MODULES = ["fractions", "heapq"]


def tiny_train_config(
    out_dir: Path, corpus: Path, tokenizer_dir: Path, **train_overrides: Any
) -> dict[str, Any]:
    """A training config document for the tiny model: 32-token samples, micro-batch 2, global
    batch 4 (2 micro-batches per step), AdamW lr 3e-3, no compile, no validation, no checkpoints
    between steps. ``train_overrides`` are merged into the ``train`` section."""
    doc: dict[str, Any] = {
        "out_dir": str(out_dir),
        "precision": "32-true",
        "tokenizer_dir": str(tokenizer_dir),
        "devices": 1,
        "seed": 1234,
        "resume": "auto",
        "data": {
            "class_path": "litgpt.data.TextFiles",
            "init_args": {
                "train_data_path": str(corpus / "train"),
                "val_data_path": str(corpus / "val"),
                "num_workers": 0,
            },
        },
        "train": {
            "global_batch_size": 4,
            "micro_batch_size": 2,
            "max_seq_length": 32,
            "max_tokens": 4 * 32 * 6,
            "lr_warmup_steps": 2,
            "save_interval": None,
            "log_interval": 1,
            "max_norm": 1.0,
            "min_lr": 3e-4,
        },
        "eval": {"interval": 0, "final_validation": False, "max_iters": 4},
        "optimizer": {
            "class_path": "torch.optim.AdamW",
            "init_args": {"lr": 3e-3, "weight_decay": 0.01},
        },
        "optimization": {"compile": False, "flash_attention": True, "moe_implementation": "loop"},
        "logger_name": "csv",
    }
    doc["train"].update(train_overrides)
    return doc
