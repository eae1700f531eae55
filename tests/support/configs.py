"""Config documents kept as files under ``tests/data/configs``: ``valid_*.yaml`` (documents the
service accepts, shared by many tests) and ``invalid_*.yaml`` (whole documents it refuses).

:func:`load` reads with plain ``yaml.safe_load``, not the service's parser (the parser is what
many of the tests check, and this module is imported where the service is not installed)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml

from tests.support import REPO

CONFIGS = REPO / "tests" / "data" / "configs"


def path(name: str) -> Path:
    """The file of the document ``name`` (``"valid_train"`` -> ``.../valid_train.yaml``)."""
    file = CONFIGS / f"{name}.yaml"
    if not file.is_file():
        raise FileNotFoundError(f"no test config {file}")
    return file


def load(name: str) -> dict[str, Any]:
    """The document ``name`` as a new dict (callers may change it)."""
    return yaml.safe_load(path(name).read_text(encoding="utf-8"))
