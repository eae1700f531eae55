"""Helpers the tests share (no tests here), one module per concern: ``servers`` (where the
session's PostgreSQL and Redis come from), ``db``, ``api``, ``client``, ``worker``, ``faults``,
``tiny`` (the tiny MoE and its training data) and ``configs`` (config documents kept as files
under ``tests/data/configs``). Fixtures live in the ``conftest.py`` files beside the tests."""

from __future__ import annotations

from pathlib import Path

#: The repository root.
REPO = Path(__file__).resolve().parents[2]
