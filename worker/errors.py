"""Exceptions the training engine raises, each mapped to a process exit code.

``run_train.py`` and the ``python -m worker.train`` entry point turn these into one-line
messages and exit codes; nothing here imports torch.
"""
from __future__ import annotations


class EngineError(Exception):
    """Base class: training could not run or finish. Exit code 1."""

    exit_code = 1
    reason = "crashed"


class DataError(EngineError):
    """Input text or tokenizer is unusable (missing folder, no .txt files, empty or
    undecodable file, validation data shorter than one micro-batch). The message names the
    file or folder. Exit code 1, failure reason ``invalid_data``."""

    reason = "invalid_data"


class PreflightError(EngineError):
    """The validated config asks for something this machine cannot do (flash kernels forced on
    a CPU or with 32-true, bf16 on a GPU without it, more devices than exist). The message
    names the config field. Exit code 2, like any other invalid config."""

    exit_code = 2
    reason = "invalid_config"


class Interrupted(EngineError):
    """Training stopped on SIGTERM at a step boundary after writing a resumable checkpoint.
    Exit code 75 (EX_TEMPFAIL: try again later, it resumes)."""

    exit_code = 75
    reason = "interrupted"
