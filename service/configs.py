"""Loading, merging and resolving config documents (YAML/JSON files, presets, smoke test, overrides).

Precedence (later wins): config files < preset < smoke-test overrides < explicit overrides.
"""

from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Any

import yaml

from service.resources import project_path
from service.schemas import ConfigError, Validated, validate_configs

__all__ = [
    "CONFIGS_DIR",
    "PRESETS_DIR",
    "SMOKE_TEST_OVERRIDES",
    "load_document",
    "deep_merge",
    "load_preset",
    "list_presets",
    "resolve",
    "resolve_documents",
]

#: The shipped configs/ folder (the repository's, or the copy inside an installed wheel).
CONFIGS_DIR = project_path("configs")
#: Named presets: configs/presets/<name>.yaml.
PRESETS_DIR = CONFIGS_DIR / "presets"

#: The specification's smoke-test train overrides (seed-config.md, "Smoke-test configuration").
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


def load_document(path: str | Path) -> dict:
    """Read one config document (YAML, or JSON for ``.json``) into a dict.

    An empty file gives ``{}``. Raises `ConfigError` naming the file for a missing/unreadable file, a
    syntax error (with line and column) or a top level that is not a mapping.
    """
    p = Path(path)
    try:
        text = p.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ConfigError(f"{p}: file not found") from None
    except IsADirectoryError:
        raise ConfigError(f"{p}: is a folder, not a config file") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"{p}: cannot read: {exc}") from None
    if p.suffix.lower() == ".json":
        try:
            data = json.loads(text, object_pairs_hook=unique_json_object) if text.strip() else {}
        except json.JSONDecodeError as exc:
            raise ConfigError(
                f"{p}: invalid JSON at line {exc.lineno}, column {exc.colno}: {exc.msg}"
            ) from None
        except ValueError as exc:  # a duplicate key
            raise ConfigError(f"{p}: invalid JSON: {exc}") from None
    else:
        try:
            data = yaml.load(text, Loader=ConfigLoader)  # noqa: S506 - a SafeLoader subclass
        except yaml.YAMLError as exc:
            mark = getattr(exc, "problem_mark", None)
            where = (
                f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
            )
            problem = getattr(exc, "problem", None) or str(exc)
            raise ConfigError(f"{p}: invalid YAML{where}: {problem}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(
            f"{p}: the top level must be a mapping (key: value), got {type(data).__name__}"
        )
    return data


class ConfigLoader(yaml.SafeLoader):
    """PyYAML's safe loader that refuses a key written twice in one mapping (PyYAML would keep
    the last one silently, so a value the user wrote would be lost without a word). Merge keys
    (``<<: *base``) still override as YAML defines."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict:
        seen: dict[str, int] = {}
        for key_node, _ in node.value:
            if key_node.tag == "tag:yaml.org,2002:merge" or not isinstance(
                key_node, yaml.ScalarNode
            ):
                continue
            key = key_node.value
            if key in seen:
                raise yaml.constructor.ConstructorError(
                    "while constructing a mapping",
                    node.start_mark,
                    f"duplicate key {key!r} (first given on line {seen[key]})",
                    key_node.start_mark,
                )
            seen[key] = key_node.start_mark.line + 1
        return super().construct_mapping(node, deep)


def unique_json_object(pairs: list[tuple[str, Any]]) -> dict:
    """``json.loads`` ``object_pairs_hook`` that refuses a key given twice in one object.
    Raises ValueError naming the key."""
    out: dict = {}
    for key, value in pairs:
        if key in out:
            raise ValueError(f"duplicate key {key!r}")
        out[key] = value
    return out


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
