#!/usr/bin/env python
"""Train a LitGPT MoE model from configs/*.yaml with command-line overrides.

    uv run python run_train.py                    # the shipped MoE-200M defaults
    uv run python run_train.py --smoke-test       # one tiny step, no checkpoint
    uv run python run_train.py --preset cpu-tiny  # a small MoE that trains on a laptop CPU
    uv run python run_train.py --help             # every flag

See worker/cli.py for the exit codes.
"""
import sys

from worker.cli import main

if __name__ == "__main__":
    sys.exit(main())
