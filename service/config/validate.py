"""Validating a job's two documents: :func:`validate_configs` checks the train and model
documents, the rules across them (``service.config.rules``), computes the training plan once and
gathers the warnings; it returns a :class:`Validated` or raises ``ConfigError`` listing every
problem as an ``Issue`` that names its document. The schemas know nothing about the machine:
whether flash kernels, bf16 or N devices exist is a pre-flight check of the engine.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from pydantic import ValidationError

from service.config.issues import ConfigError, Document, Issue, convert, unknown_keys
from service.config.model import ModelConfig
from service.config.plan import TrainingPlan
from service.config.rules import config_warnings, cross_rules, train_rules
from service.config.train import TrainConfig

__all__ = ["Validated", "validate_configs", "validate_train_config", "validate_model_config"]


@dataclass
class Validated:
    """Result of `validate_configs`: the validated models, their training plan (computed once;
    take it from here) and the warnings (valid but probably unintended)."""

    train: TrainConfig
    model: ModelConfig
    plan: TrainingPlan
    warnings: list[Issue] = field(default_factory=list)


def _check_mapping(data: Any, what: str, document: Document) -> list[Issue]:
    if not isinstance(data, dict):
        return [
            Issue(
                (),
                f"the {what} must be a mapping (key: value), got {type(data).__name__}",
                document,
            )
        ]
    return []


def validate_train_config(train: dict) -> TrainConfig:
    """Validate the train document alone (no cross-document rules). Raises `ConfigError`."""
    errors = _check_mapping(train, "train config", "train")
    if errors:
        raise ConfigError(errors)
    errors = unknown_keys(
        train, TrainConfig, TrainConfig, "train", other_root=ModelConfig, other_name="model config"
    )
    try:
        result = TrainConfig.model_validate(train)
    except ValidationError as exc:
        errors.extend(convert(exc, TrainConfig, "train"))
        raise ConfigError(errors) from None
    if errors:
        raise ConfigError(errors)
    return result


def validate_model_config(model: dict) -> ModelConfig:
    """Validate the model document alone. Its issues say ``document="model"``. Raises
    `ConfigError`."""
    errors = _check_mapping(model, "model config", "model")
    if errors:
        raise ConfigError(errors)
    errors = unknown_keys(
        model,
        ModelConfig,
        ModelConfig,
        "model",
        other_root=TrainConfig,
        other_name="train config",
    )
    try:
        result = ModelConfig.model_validate(model)
    except ValidationError as exc:
        errors.extend(convert(exc, ModelConfig, "model"))
        raise ConfigError(errors) from None
    if errors:
        raise ConfigError(errors)
    return result


def validate_configs(train: dict, model: dict) -> Validated:
    """Validate a train document and a model document together.

    Returns `Validated` (``.train``, ``.model``, ``.plan``, ``.warnings``). Raises `ConfigError`
    with every error of both documents plus the cross-field rules (batch divisibility,
    max_seq_length <= block_size, max_tokens covering one optimizer step, lr > 0, min_lr <= lr,
    ...). Pure Python: no torch import.
    """
    errors: list[Issue] = []
    train_cfg = model_cfg = plan = None
    try:
        train_cfg = validate_train_config(train)
    except ConfigError as exc:
        errors.extend(exc.errors)
    try:
        model_cfg = validate_model_config(model)
    except ConfigError as exc:
        errors.extend(exc.errors)
    if train_cfg is not None:
        errors.extend(train_rules(train_cfg, train))
    if train_cfg is not None and model_cfg is not None:
        cross, plan = cross_rules(train_cfg, model_cfg)
        errors.extend(cross)
    if errors:
        raise ConfigError(errors)
    assert train_cfg is not None and model_cfg is not None and plan is not None
    warnings = config_warnings(train_cfg, model_cfg, plan)
    return Validated(train=train_cfg, model=model_cfg, plan=plan, warnings=warnings)
