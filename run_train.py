#!/usr/bin/env python
"""Train a LitGPT MoE model from configs/*.yaml with command-line overrides.

    uv run python run_train.py                    # the shipped MoE-200M defaults
    uv run python run_train.py --smoke-test       # one tiny step, no checkpoint
    uv run python run_train.py --preset cpu-tiny  # a small MoE that trains on a laptop CPU
    uv run python run_train.py --help             # every flag

Thin on purpose: SIGINT/SIGTERM handlers go in before anything heavy is imported, so a Ctrl-C
in the first instant prints ``interrupted before training started`` and exits 130 (143 for
SIGTERM) with nothing trained. See cli/train.py for the exit codes.
"""

import sys

if __name__ == "__main__":
    from worker.early import install_early_handlers

    install_early_handlers()
    from cli.train import main  # after the handlers, on purpose

    sys.exit(main())
