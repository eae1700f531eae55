"""Shared fixtures: a real-text corpus from the Python standard library, a tokenizer trained on
it, and tiny MoE model / training config documents that train on a CPU in seconds.

Every test gets its own token cache (``MOEJOBS_TOKEN_CACHE``) so nothing is written under the
user's home folder. The PostgreSQL and Redis servers of the session are chosen on first use by
``test_servers_support`` (throwaway ones are stopped here when the session ends, and the
summary says which were used).
"""

from __future__ import annotations

import copy
import os
import sys
import sysconfig
from pathlib import Path

import pytest
import test_servers_support

# One intra-op thread for torch in the tests and in the processes they start (inherited). On a
# CPU shared with other jobs, torch's default of one OpenMP thread per core stalls at every
# parallel region whenever another process holds a core: measured on the 2-core development
# machine, the 300-step learning test took 357 s with 2 threads and 58 s with 1. CI may override.
os.environ.setdefault("OMP_NUM_THREADS", "1")
if "torch" in sys.modules:  # imported before this file: the variable came too late
    sys.modules["torch"].set_num_threads(int(os.environ["OMP_NUM_THREADS"]))

REPO = Path(__file__).resolve().parents[1]

#: A tiny LitGPT MoE (2 layers, width 64, 4 experts top-2, widths divisible by 8).
TINY_MODEL: dict = {
    "name": "tiny-moe",
    "block_size": 128,
    "vocab_size": 1024,
    "padded_vocab_size": 1024,
    "n_layer": 2,
    "n_embd": 64,
    "n_head": 4,
    "n_query_groups": 2,
    "rotary_percentage": 1.0,
    "bias": False,
    "norm_class_name": "RMSNorm",
    "norm_eps": 1e-5,
    "mlp_class_name": "LLaMAMoE",
    "moe_intermediate_size": 128,
    "n_expert": 4,
    "n_expert_per_token": 2,
    "parallel_residual": False,
}


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


def pytest_configure(config: pytest.Config) -> None:
    test_servers_support.mode()  # a bad MOEJOBS_TEST_SERVERS is a usage error, at once


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    test_servers_support.stop_throwaway_servers()


def pytest_terminal_summary(terminalreporter, exitstatus: int, config: pytest.Config) -> None:
    lines = test_servers_support.summary()
    if lines:
        terminalreporter.section("test servers")
        for line in lines:
            terminalreporter.write_line(line)


@pytest.fixture(autouse=True)
def _token_cache(tmp_path_factory, monkeypatch):
    monkeypatch.setenv("MOEJOBS_TOKEN_CACHE", str(tmp_path_factory.getbasetemp() / "token-cache"))


@pytest.fixture(scope="session")
def corpus(tmp_path_factory) -> Path:
    """``<tmp>/corpus/{train,val}/*.txt`` from standard-library sources (~1 MB of real text)."""
    root = tmp_path_factory.mktemp("corpus")
    stdlib_text_files(root / "train", TRAIN_MODULES)
    stdlib_text_files(root / "val", VAL_MODULES)
    return root


@pytest.fixture(scope="session")
def tokenizer_dir(corpus, tmp_path_factory) -> Path:
    """A 1024-id byte-level BPE trained on the corpus with ``worker.tokenizer.train_tokenizer``."""
    from worker.tokenizer import train_tokenizer

    return train_tokenizer(
        [corpus / "train"], tmp_path_factory.mktemp("tok") / "tokenizer", vocab_size=1024
    )


def tiny_train_config(out_dir: Path, corpus: Path, tokenizer_dir: Path, **train_overrides) -> dict:
    """A training config document for the tiny model: 32-token samples, micro-batch 2, global
    batch 4 (2 micro-batches per step), AdamW lr 3e-3, no compile, no validation, no checkpoints
    between steps. ``train_overrides`` are merged into the ``train`` section."""
    doc = {
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


@pytest.fixture
def tiny_model() -> dict:
    """A fresh copy of :data:`TINY_MODEL`."""
    return copy.deepcopy(TINY_MODEL)


@pytest.fixture
def train_doc(tmp_path, corpus, tokenizer_dir) -> dict:
    """:func:`tiny_train_config` with ``out_dir = tmp_path / "run"``."""
    return tiny_train_config(tmp_path / "run", corpus, tokenizer_dir)
