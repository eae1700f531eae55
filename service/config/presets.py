"""Presets: named layers of both documents shipped in ``configs/presets/<name>.yaml`` (or any
file of that shape), and the smoke test's train overrides.

A preset file has the keys ``train_config`` and ``model_config`` (each a mapping, both
optional); ``service.config.merge`` merges it over the submitted documents.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from service.config.issues import ConfigError
from service.config.parse import load_document
from service.resources import project_path

__all__ = [
    "CONFIGS_DIR",
    "PRESETS_DIR",
    "SMOKE_TEST_OVERRIDES",
    "list_presets",
    "load_preset",
]

#: The shipped configs/ folder (the repository's, or the copy inside an installed wheel).
CONFIGS_DIR = project_path("configs")
#: Named presets: configs/presets/<name>.yaml.
PRESETS_DIR = CONFIGS_DIR / "presets"

#: The specification's smoke-test train overrides (the README's ``--smoke-test`` row lists them).
SMOKE_TEST_OVERRIDES: dict[str, Any] = {
    "train": {
        "micro_batch_size": 1,
        "global_batch_size": 1,
        "max_tokens": 64,
        "max_seq_length": 64,
    },
    "precision": "32-true",
    "logger_name": "csv",
}

_PRESET_KEYS = ("train_config", "model_config")


def list_presets() -> list[str]:
    """Names of the presets shipped in configs/presets/."""
    return sorted(p.stem for p in PRESETS_DIR.glob("*.yaml"))


def _preset_path(name_or_path: str | Path) -> Path:
    text = str(name_or_path)
    candidate = Path(text)
    looks_like_path = (
        candidate.suffix.lower() in (".yaml", ".yml", ".json") or "/" in text or "\\" in text
    )
    if looks_like_path:
        return candidate
    named = PRESETS_DIR / f"{text}.yaml"
    if named.is_file():
        return named
    if candidate.is_file():
        return candidate
    available = ", ".join(list_presets()) or "none"
    raise ConfigError(f"unknown preset {text!r}: no file {named} (available presets: {available})")


def load_preset(name_or_path: str | Path) -> dict:
    """Load a preset: a name from configs/presets/ (``cpu-tiny``) or a file path.

    Returns ``{"train_config": {...}, "model_config": {...}}`` (both keys present, possibly empty).
    Raises `ConfigError` for an unknown name, an unreadable file, or a key other than
    ``train_config``/``model_config`` (naming the file and the key).
    """
    path = _preset_path(name_or_path)
    doc = load_document(path)
    out: dict[str, dict] = {}
    for key, value in doc.items():
        if key not in _PRESET_KEYS:
            raise ConfigError(
                f"{path}: unknown preset key {key!r}; a preset may only have train_config and model_config"
            )
        if value is None:
            value = {}
        if not isinstance(value, dict):
            raise ConfigError(
                f"{path}: {key} must be a mapping (key: value), got {type(value).__name__}"
            )
        out[key] = value
    for key in _PRESET_KEYS:
        out.setdefault(key, {})
    return out
