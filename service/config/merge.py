"""Merging the layers of a job's documents and validating the result.

Precedence (later wins): config files < preset < smoke-test overrides < explicit overrides.
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

from service.config.parse import load_document
from service.config.presets import SMOKE_TEST_OVERRIDES, load_preset
from service.config.validate import Validated, validate_configs

__all__ = ["deep_merge", "replaced_values", "resolve_documents", "resolve"]


def deep_merge(base: dict, over: dict) -> dict:
    """Return a new dict: ``over`` merged into ``base`` recursively (mappings merge, anything else replaces).

    Neither input is modified. A mapping in ``over`` replacing a non-mapping (or the reverse) replaces it
    whole; e.g. ``optimizer: AdamW`` over ``optimizer: {class_path: ...}`` gives ``optimizer: AdamW``.
    """
    out = copy.deepcopy(base)
    for key, value in over.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = deep_merge(out[key], value)
        else:
            out[key] = copy.deepcopy(value)
    return out


def replaced_values(base: dict, over: dict, prefix: str = "") -> list[tuple[str, Any, Any]]:
    """The values of ``base`` that :func:`deep_merge` (``base``, ``over``) would replace with a
    different value, as ``(dotted path, old, new)`` in document order. Used to tell an API user
    which of the submitted values a preset overrides."""
    out: list[tuple[str, Any, Any]] = []
    for key, new in over.items():
        if key not in base:
            continue
        path, old = f"{prefix}{key}", base[key]
        if isinstance(new, dict) and isinstance(old, dict):
            out += replaced_values(old, new, path + ".")
        elif old != new:
            out.append((path, old, new))
    return out


def resolve_documents(
    train_path: str | Path | None,
    model_path: str | Path | None,
    preset: str | Path | None = None,
    smoke_test: bool = False,
    train_overrides: dict | None = None,
    model_overrides: dict | None = None,
    *,
    train_doc: dict | None = None,
    model_doc: dict | None = None,
) -> tuple[dict, dict]:
    """Merge the layers into the final (train, model) dicts, without validating.

    ``train_doc``/``model_doc`` may be given instead of paths (the API receives documents). Layers:
    file (or doc) < preset < `SMOKE_TEST_OVERRIDES` (when ``smoke_test``) < ``*_overrides``.
    """
    train = (
        dict(train_doc)
        if train_doc is not None
        else (load_document(train_path) if train_path else {})
    )
    model = (
        dict(model_doc)
        if model_doc is not None
        else (load_document(model_path) if model_path else {})
    )
    if preset:
        p = load_preset(preset)
        train = deep_merge(train, p["train_config"])
        model = deep_merge(model, p["model_config"])
    if smoke_test:
        train = deep_merge(train, SMOKE_TEST_OVERRIDES)
    if train_overrides:
        train = deep_merge(train, train_overrides)
    if model_overrides:
        model = deep_merge(model, model_overrides)
    return train, model


def dotted_overrides(params: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
    """``{"train_config.optimizer.init_args.lr": 1e-3, "model_config.n_expert": 8}`` as the
    (train, model) override layers :func:`resolve_documents` merges last. Raises ValueError for
    a path that starts with neither document."""
    docs: dict[str, dict[str, Any]] = {"train_config": {}, "model_config": {}}
    for path, value in params.items():
        head, *keys = path.split(".")
        if head not in docs or not keys:
            raise ValueError(f"{path}: a path must start with train_config. or model_config.")
        node = docs[head]
        for key in keys[:-1]:
            node = node.setdefault(key, {})
        node[keys[-1]] = value
    return docs["train_config"], docs["model_config"]


def resolve(
    train_path: str | Path | None,
    model_path: str | Path | None,
    preset: str | Path | None = None,
    smoke_test: bool = False,
    train_overrides: dict | None = None,
    model_overrides: dict | None = None,
) -> Validated:
    """Load, merge (files < preset < smoke test < overrides) and validate.

    Returns `Validated` (``.train``, ``.model``, ``.warnings``). Raises `ConfigError` for unreadable files,
    a bad preset, or an invalid result (each issue names the dotted key).
    """
    train, model = resolve_documents(
        train_path, model_path, preset, smoke_test, train_overrides, model_overrides
    )
    return validate_configs(train, model)
