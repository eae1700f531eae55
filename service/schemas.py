"""Configuration schemas for moejobs training jobs (pure pydantic v2; never imports torch or litgpt).

Two documents describe a job:

* the **train config** (`TrainConfig`): the keys of ``litgpt pretrain`` (top-level ``out_dir``,
  ``precision``, ``devices``, ..., and the ``train``/``eval``/``log`` groups of LitGPT's ``TrainArgs``,
  ``EvalArgs``, ``LogArgs`` with the defaults of ``litgpt.pretrain.setup()``), plus this project's own
  keys (``train.gradient_checkpointing``, ``train.moe_*_coef``, the ``optimization`` group);
* the **model config** (`ModelConfig`): every field of ``litgpt.Config`` (LitGPT 0.5.13) with its name,
  type and default.

`validate_configs(train_dict, model_dict)` validates both, applies the cross-field rules, and returns a
`Validated` (the two models plus a list of warnings), or raises `ConfigError` listing every problem as an
`Issue(loc, message)`. Locations of train-config issues are paths inside the train document
(``train.micro_batch_size``); locations of model-config issues start with ``model``
(``model.n_head``).

The schemas know nothing about the machine: whether flash kernels, bf16 or N devices exist is a
pre-flight check of the engine.
"""

from __future__ import annotations

import difflib
import math
import types
import typing
import unicodedata
from dataclasses import dataclass, field
from typing import Annotated, Any, Literal, Union

from pydantic import (
    AfterValidator,
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    ValidationError,
    WithJsonSchema,
    ValidationInfo,
    field_validator,
    model_validator,
)

__all__ = [
    "Issue",
    "ConfigError",
    "Validated",
    "TrainConfig",
    "ModelConfig",
    "DataConfig",
    "TextFilesArgs",
    "TrainArgs",
    "EvalArgs",
    "LogArgs",
    "OptimizerConfig",
    "OptimizerArgs",
    "OptimizationConfig",
    "OPTIMIZER_CLASSES",
    "DATA_CLASSES",
    "MODEL_LOC",
    "validate_configs",
    "validate_train_config",
    "validate_model_config",
    "train_config_json_schema",
    "model_config_json_schema",
]

#: First element of the location of every model-config issue.
MODEL_LOC = "model"

#: Accepted ``data.class_path`` values (normalised to the first).
DATA_CLASSES: dict[str, str] = {
    "litgpt.data.TextFiles": "litgpt.data.TextFiles",
    "litgpt.data.text_files.TextFiles": "litgpt.data.TextFiles",
    "TextFiles": "litgpt.data.TextFiles",
}

#: Accepted optimizer names (short and dotted) -> normalised class path. Nothing else is ever imported.
OPTIMIZER_CLASSES: dict[str, str] = {
    "AdamW": "torch.optim.AdamW",
    "Adam": "torch.optim.Adam",
    "SGD": "torch.optim.SGD",
    "torch.optim.AdamW": "torch.optim.AdamW",
    "torch.optim.Adam": "torch.optim.Adam",
    "torch.optim.SGD": "torch.optim.SGD",
}

#: Constructor defaults of the allowed torch optimizers (torch 2.x), and which keywords each accepts.
_OPTIMIZER_DEFAULTS: dict[str, dict[str, Any]] = {
    "torch.optim.AdamW": {
        "lr": 1e-3,
        "weight_decay": 1e-2,
        "betas": (0.9, 0.999),
        "eps": 1e-8,
        "amsgrad": False,
    },
    "torch.optim.Adam": {
        "lr": 1e-3,
        "weight_decay": 0.0,
        "betas": (0.9, 0.999),
        "eps": 1e-8,
        "amsgrad": False,
    },
    "torch.optim.SGD": {
        "lr": 1e-3,
        "weight_decay": 0.0,
        "momentum": 0.0,
        "dampening": 0.0,
        "nesterov": False,
    },
}


# --------------------------------------------------------------------------------------------------
# Issues and errors
# --------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Issue:
    """One validation error or warning.

    ``loc`` is the path of the offending key (``("train", "micro_batch_size")``; model-config paths start
    with ``"model"``); ``message`` is a complete sentence. ``str(issue)`` is ``"train.micro_batch_size: message"``.
    """

    loc: tuple[str | int, ...]
    message: str

    @property
    def path(self) -> str:
        """The location as a dotted path (``train.micro_batch_size``; list indices as ``[0]``)."""
        out = ""
        for part in self.loc:
            if isinstance(part, int):
                out += f"[{part}]"
            else:
                out += ("." if out else "") + str(part)
        return out

    def __str__(self) -> str:
        return f"{self.path}: {self.message}" if self.loc else self.message

    def to_dict(self) -> dict[str, str]:
        """JSON-friendly form: ``{"loc": "train.micro_batch_size", "message": "..."}``."""
        return {"loc": self.path, "message": self.message}


class ConfigError(ValueError):
    """Invalid configuration. ``.errors`` lists every problem found; ``str()`` gives one per line."""

    def __init__(self, errors: list[Issue] | Issue | str):
        if isinstance(errors, str):
            errors = [Issue((), errors)]
        elif isinstance(errors, Issue):
            errors = [errors]
        self.errors: list[Issue] = list(errors)
        super().__init__("\n".join(str(e) for e in self.errors))

    def __str__(self) -> str:
        return "\n".join(str(e) for e in self.errors)


# --------------------------------------------------------------------------------------------------
# Helpers for field types
# --------------------------------------------------------------------------------------------------

_STRICT = ConfigDict(
    extra="forbid", validate_default=True, use_attribute_docstrings=False, allow_inf_nan=False
)

#: Largest integer any config field accepts: int64, what the databases and torch hold.
INT_MAX = 2**63 - 1
#: Largest ``n_layer`` accepted (the estimate walks the layers one by one).
MAX_LAYERS = 1024


#: Longest name (run name, model name, preset, LogArgs texts): the ``runs.name`` column's length.
MAX_NAME_CHARS = 200
#: Longest path a config may give (characters; Linux PATH_MAX less its NUL). Where it points on
#: the server is checked again in bytes (``service.paths.check_path_length``).
MAX_PATH_CHARS = 4095

#: Unicode categories refused in names: control characters (C0, DEL, C1: NUL, newline, escape...),
#: lone surrogates (not encodable: no file system or database stores them) and the line and
#: paragraph separators.
_NAME_REFUSED = frozenset({"Cc", "Cs", "Zl", "Zp"})


def _codepoints(chars: set[str]) -> str:
    return ", ".join(f"U+{ord(c):04X}" for c in sorted(chars)[:5])


def check_name_text(value: str, what: str = "a name") -> str:
    """``value`` when it holds no control character, lone surrogate or line separator
    (:data:`_NAME_REFUSED`); raise ``ValueError`` naming the code points otherwise."""
    bad = {c for c in value if unicodedata.category(c) in _NAME_REFUSED}
    if bad:
        raise ValueError(f"control characters are not allowed in {what} (found {_codepoints(bad)})")
    return value


def check_path_text(value: str) -> str:
    """``value`` when no file system would refuse its characters: no NUL, no lone surrogate;
    raise ``ValueError`` otherwise."""
    bad = {c for c in value if c == "\x00" or unicodedata.category(c) == "Cs"}
    if bad:
        raise ValueError(f"a path cannot contain {_codepoints(bad)} (NUL or a lone surrogate)")
    return value


#: :func:`check_name_text` as a regular expression, for JSON Schema documents (the check itself
#: is the function, whose message names the code points). Lone surrogates are left out: no
#: pattern engine of a JSON Schema tool takes them, and UTF-8 JSON can only carry them escaped.
NAME_TEXT_REGEX = r"^[^\x00-\x1f\x7f-\x9f\u2028\u2029]*$"

#: A name or short free text: at most :data:`MAX_NAME_CHARS` characters, no control characters.
NameText = Annotated[
    str,
    Field(max_length=MAX_NAME_CHARS, json_schema_extra={"pattern": NAME_TEXT_REGEX}),
    AfterValidator(check_name_text),
]
#: A path in a config: at most :data:`MAX_PATH_CHARS` characters, no NUL or lone surrogate.
PathText = Annotated[str, Field(max_length=MAX_PATH_CHARS), AfterValidator(check_path_text)]


def _numeric_without_bool(annotation: Any) -> bool:
    kinds = _unwrap(annotation)
    return bool not in kinds and any(k in (int, float) for k in kinds)


def _numeric_items(annotation: Any) -> bool:
    """Whether ``annotation`` is a list/tuple whose items are numbers that are not bools."""
    items = [
        a
        for k in _unwrap(annotation)
        if typing.get_origin(k) in (list, tuple)
        for a in typing.get_args(k)
        if a is not Ellipsis
    ]
    return bool(items) and all(_numeric_without_bool(a) for a in items)


class _Section(BaseModel):
    """Base of every config section: unknown keys are errors, floats must be finite
    (``allow_inf_nan=False``: YAML's ``.inf``/``.nan``), integers must fit in int64, and a
    boolean is never a number (``save_interval: true`` is refused, not read as 1). An integral
    float (``1e12``, ``4.0``) is accepted for an integer field as the integer it denotes; a
    fractional one (``2.5``) is refused."""

    model_config = _STRICT

    @field_validator("*", mode="before")
    @classmethod
    def _no_bool_for_numbers(cls, value: Any, info: ValidationInfo) -> Any:
        field_info = cls.model_fields.get(info.field_name or "")
        if field_info is None:
            return value
        annotation = field_info.annotation
        if isinstance(value, bool) and _numeric_without_bool(annotation):
            kind = "an integer" if int in _unwrap(annotation) else "a number"
            raise ValueError(
                f"expected {kind}, got {str(value).lower()} (a boolean is not a number)"
            )
        if (
            isinstance(value, (list, tuple))
            and any(isinstance(v, bool) for v in value)
            and _numeric_items(annotation)
        ):
            raise ValueError(
                f"expected numbers, got {_short(list(value))} (a boolean is not a number)"
            )
        return value

    @field_validator("*", mode="after")
    @classmethod
    def _fits_int64(cls, value: Any) -> Any:
        if (
            isinstance(value, int)
            and not isinstance(value, bool)
            and not -INT_MAX <= value <= INT_MAX
        ):
            raise ValueError(
                f"must be at most {INT_MAX:,} in absolute value (int64), got a number "
                f"with {len(str(abs(value)))} digits"
            )
        return value


def _int_like(value: Any) -> Any:
    """Accept ``3e12``-style strings (PyYAML reads ``3e12`` as a string) for integer fields."""
    if isinstance(value, str):
        s = value.strip().replace("_", "")
        try:
            f = float(s)
        except ValueError:
            return value
        if math.isfinite(f) and f == int(f) and ("e" in s.lower() or "." in s):
            return int(f)
        return value
    if isinstance(value, float) and math.isfinite(value) and value == int(value):
        return int(value)
    return value


IntLike = Annotated[int, BeforeValidator(_int_like)]


def _devices(value: Any) -> Any:
    if value == "auto":
        return "auto"
    if isinstance(value, bool):
        raise ValueError(f"must be a positive integer or 'auto', got {value!r}")
    if isinstance(value, str) and value.strip().isdigit():
        value = int(value.strip())
    if isinstance(value, int):
        if value < 1:
            raise ValueError(f"must be a positive integer (>= 1) or 'auto', got {value}")
        return value
    raise ValueError(f"must be a positive integer or 'auto', got {value!r}")


Devices = Annotated[
    Union[int, Literal["auto"]],
    BeforeValidator(_devices),
    WithJsonSchema({"anyOf": [{"type": "integer", "minimum": 1}, {"const": "auto"}]}),
]


def _resume(value: Any) -> Any:
    if isinstance(value, bool) or value is None:
        return bool(value)
    if isinstance(value, str):
        low = value.strip().lower()
        if low in ("true", "false"):
            return low == "true"
        if low == "auto":
            return "auto"
        if not value.strip():
            raise ValueError(
                "must be true, false, 'auto' or a checkpoint folder path, got an empty string"
            )
        if len(value) > MAX_PATH_CHARS:
            raise ValueError(
                f"a checkpoint folder path has at most {MAX_PATH_CHARS:,} characters, "
                f"got {len(value):,}"
            )
        return check_path_text(value)
    raise ValueError(f"must be true, false, 'auto' or a checkpoint folder path, got {value!r}")


Resume = Annotated[
    Union[bool, str],
    BeforeValidator(_resume),
    WithJsonSchema({"anyOf": [{"type": "boolean"}, {"const": "auto"}, {"type": "string"}]}),
]


#: What ``resume_allow_changes`` can accept on resume (see the field's description).
ResumeChange = Literal["data", "tokenizer", "schedule", "batch", "seq_len"]


def _allow_changes(value: Any) -> Any:
    # `resume_allow_changes: data` or "data,schedule" (a flag's value) read as a list
    if value is None:
        return []
    if isinstance(value, str):
        return [part.strip() for part in value.split(",") if part.strip()]
    return value


ResumeAllowChanges = Annotated[list[ResumeChange], BeforeValidator(_allow_changes)]


def _str_or_int(value: Any) -> Any:
    if isinstance(value, bool) or not isinstance(value, (str, int)):
        raise ValueError(f"must be 'first', 'random' or an integer index, got {value!r}")
    return value


EvaluateExample = Annotated[
    Union[str, int],
    BeforeValidator(_str_or_int),
    WithJsonSchema({"anyOf": [{"type": "string"}, {"type": "integer", "minimum": 0}]}),
]

Precision = Literal["bf16-mixed", "bf16-true", "16-mixed", "16-true", "32-true"]


# --------------------------------------------------------------------------------------------------
# Train config
# --------------------------------------------------------------------------------------------------


class TextFilesArgs(_Section):
    """``init_args`` of ``litgpt.data.TextFiles``."""

    train_data_path: PathText = Field(
        description="Folder with the training .txt files (top level only, LitGPT's TextFiles glob)."
    )
    val_data_path: PathText | None = Field(
        default=None,
        description="Folder with the validation .txt files. Null: LitGPT's TextFiles behaviour, the first "
        "sorted training file is used for validation (needs >= 2 training files).",
    )
    seed: int = Field(
        default=42,
        ge=0,
        le=2**32 - 1,
        description="Seed for shuffling the dataset; 0 to 2**32-1, NumPy's range.",
    )
    num_workers: int = Field(
        default=4, ge=0, description="Number of data-loading worker processes."
    )


class DataConfig(_Section):
    """Data module: only ``litgpt.data.TextFiles`` is accepted (a config never causes an arbitrary import)."""

    class_path: str = Field(
        default="litgpt.data.TextFiles",
        description="Data module class. Allowed: litgpt.data.TextFiles (or its short form TextFiles).",
        json_schema_extra={"enum": sorted(DATA_CLASSES)},
    )
    init_args: TextFilesArgs = Field(description="Arguments of the data module (TextFiles).")

    @field_validator("class_path", mode="before")
    @classmethod
    def _class_path(cls, v: Any) -> str:
        if not isinstance(v, str) or v not in DATA_CLASSES:
            raise ValueError(
                f"{v!r} is not an allowed data module; allowed: litgpt.data.TextFiles (or TextFiles)"
            )
        return DATA_CLASSES[v]


class TrainArgs(_Section):
    """LitGPT's ``TrainArgs`` with the defaults of ``litgpt pretrain``'s ``setup()``, plus this project's keys."""

    save_interval: int | None = Field(
        default=1000,
        ge=1,
        description="Number of optimizer steps between intermediate checkpoints (out_dir/step-XXXXXXXX). "
        "Null: no intermediate checkpoints.",
    )
    log_interval: int = Field(
        default=1, ge=1, description="Number of optimizer steps between metrics rows."
    )
    global_batch_size: int = Field(
        default=512,
        ge=1,
        description="Samples per optimizer step across all data-parallel ranks. Must be divisible by "
        "micro_batch_size x devices x num_nodes (LitGPT would silently floor it).",
    )
    micro_batch_size: int = Field(
        default=4, ge=1, description="Samples per forward/backward pass on each data-parallel rank."
    )
    lr_warmup_steps: int | None = Field(
        default=2000,
        ge=0,
        description="Optimizer steps of linear learning-rate warm-up (step 1 already has a non-zero LR). "
        "Mutually exclusive with lr_warmup_fraction.",
    )
    lr_warmup_fraction: float | None = Field(
        default=None,
        ge=0.0,
        le=1.0,
        description="Warm-up length as a fraction (0..1) of this run's optimizer steps (LitGPT: of one epoch). "
        "Mutually exclusive with lr_warmup_steps; setting it alone drops the default lr_warmup_steps.",
    )
    epochs: int | None = Field(
        default=None,
        ge=1,
        description="Accepted for LitGPT compatibility and ignored: pretraining length is set by max_tokens "
        "(and max_steps / max_time). LitGPT's pretrain refuses it.",
    )
    max_tokens: IntLike = Field(
        default=3_000_000_000_000,
        ge=1,
        description="Total number of training tokens across all ranks; the run takes "
        "(max_tokens // world_size // (micro_batch_size x max_seq_length)) micro-batches per rank, "
        "and only whole optimizer steps of them.",
    )
    max_steps: int | None = Field(
        default=None,
        ge=1,
        description="Upper limit on optimizer steps (also the cosine-decay horizon when it is the binding "
        "limit). LitGPT's pretrain accepts and ignores it; this project honours it.",
    )
    max_time: float | None = Field(
        default=None,
        gt=0,
        description="Stop after this many seconds of training (at a step boundary, with a checkpoint). "
        "The learning-rate schedule is still planned from max_tokens/max_steps.",
    )
    max_seq_length: int | None = Field(
        default=None,
        ge=1,
        description="Tokens per training sample (sequence length). Null: the model's block_size. "
        "Must be <= block_size.",
    )
    tie_embeddings: bool | None = Field(
        default=False,
        description="Share the token-embedding matrix with the LM head (saves padded_vocab_size x n_embd parameters).",
    )
    max_norm: float | None = Field(
        default=1.0, gt=0, description="Gradient-clipping norm (global L2). Null: no clipping."
    )
    min_lr: float = Field(
        default=4e-5,
        ge=0,
        description="Learning rate at the end of the cosine decay. Must be <= optimizer lr.",
    )
    # ---- this project's keys
    gradient_checkpointing: bool = Field(
        default=False,
        description="Activation checkpointing of every transformer block: recompute activations in the "
        "backward pass (about 1/3 more compute, much less activation memory). moejobs key, not LitGPT's.",
    )
    moe_aux_loss_coef: float = Field(
        default=0.0,
        ge=0,
        description="Coefficient of the Switch-Transformer load-balancing loss added to the LM loss "
        "(0 = off; LitGPT's MoE has none). moejobs key.",
    )
    moe_z_loss_coef: float = Field(
        default=0.0,
        ge=0,
        description="Coefficient of the ST-MoE router z-loss (0 = off). moejobs key.",
    )

    @model_validator(mode="before")
    @classmethod
    def _fraction_replaces_default_steps(cls, data: Any) -> Any:
        # LitGPT's TrainArgs errors when both are set; with pretrain's default lr_warmup_steps=2000 that
        # would make lr_warmup_fraction unusable unless the user also writes lr_warmup_steps: null.
        if (
            isinstance(data, dict)
            and data.get("lr_warmup_fraction") is not None
            and "lr_warmup_steps" not in data
        ):
            data = {**data, "lr_warmup_steps": None}
        return data


class EvalArgs(_Section):
    """LitGPT's ``EvalArgs`` with the defaults of ``litgpt pretrain``'s ``setup()``."""

    interval: int = Field(
        default=1000,
        ge=0,
        description="Optimizer steps between validation runs; 0 = no periodic validation "
        "(stock LitGPT divides by it and crashes).",
    )
    max_new_tokens: int | None = Field(
        default=None,
        ge=1,
        description="LitGPT finetuning key (tokens to generate); accepted and ignored by pretraining.",
    )
    max_iters: int = Field(
        default=100, ge=1, description="Validation micro-batches per validation run."
    )
    initial_validation: bool = Field(
        default=False, description="Validate once before the first step."
    )
    final_validation: bool = Field(default=True, description="Validate once after the last step.")
    evaluate_example: EvaluateExample = Field(
        default="first",
        description="LitGPT finetuning key ('first', 'random' or an index); accepted and ignored by pretraining.",
    )


class LogArgs(_Section):
    """LitGPT's ``LogArgs`` (for WandB / LitLogger). Accepted for compatibility; unused by the csv logger."""

    project: NameText | None = Field(
        default=None, description="WandB project name (unused by csv)."
    )
    run: NameText | None = Field(default=None, description="WandB run name (unused by csv).")
    group: NameText | None = Field(default=None, description="WandB group name (unused by csv).")
    teamspace: NameText | None = Field(
        default=None, description="Lightning teamspace (unused by csv)."
    )
    metadata: dict | None = Field(
        default=None, description="Extra experiment metadata tags (unused by csv)."
    )
    log_model: bool = Field(
        default=False, description="Log checkpoints as artifacts (unused by csv)."
    )
    save_logs: bool = Field(default=True, description="Upload terminal logs (unused by csv).")
    checkpoint_name: NameText | None = Field(
        default=None, description="Base name of logged checkpoints (unused by csv)."
    )


class OptimizerArgs(_Section):
    """Keyword arguments of the optimizer. Unset keys take the chosen torch optimizer's own default;
    keys the chosen optimizer does not accept stay null (and are refused when given)."""

    lr: float | None = Field(
        default=None, gt=0, description="Peak learning rate (after warm-up). Must be > 0."
    )
    weight_decay: float | None = Field(
        default=None,
        ge=0,
        description="Weight decay (decoupled for AdamW). Default: 0.01 for AdamW, 0 otherwise.",
    )
    betas: tuple[float, float] | None = Field(
        default=None,
        description="Adam/AdamW moment coefficients (beta1, beta2), each in [0, 1). Default (0.9, 0.999).",
    )
    eps: float | None = Field(
        default=None, gt=0, description="Adam/AdamW denominator epsilon. Default 1e-8."
    )
    amsgrad: bool | None = Field(
        default=None, description="Adam/AdamW AMSGrad variant. Default false."
    )
    momentum: float | None = Field(default=None, ge=0, description="SGD momentum. Default 0.")
    dampening: float | None = Field(default=None, ge=0, description="SGD dampening. Default 0.")
    nesterov: bool | None = Field(
        default=None,
        description="SGD Nesterov momentum (needs momentum > 0 and dampening 0). Default false.",
    )

    @field_validator("betas")
    @classmethod
    def _betas(cls, v: tuple[float, float] | None) -> tuple[float, float] | None:
        if v is not None:
            for b in v:
                if not 0.0 <= b < 1.0:
                    raise ValueError(f"each beta must be in [0, 1), got {list(v)}")
        return v


class OptimizerConfig(_Section):
    """Optimizer: ``class_path`` from an allowlist (AdamW, Adam, SGD) plus ``init_args``.

    LitGPT's short form ``optimizer: AdamW`` is accepted and normalised to this structure.
    """

    class_path: str = Field(
        default="torch.optim.AdamW",
        description="Optimizer class: torch.optim.AdamW, torch.optim.Adam or torch.optim.SGD (short names "
        "AdamW/Adam/SGD accepted). Optimizer state has the parameters' dtype (fp32 except with *-true precision).",
        json_schema_extra={"enum": sorted(OPTIMIZER_CLASSES)},
    )
    init_args: OptimizerArgs = Field(
        default_factory=OptimizerArgs,
        description="Optimizer keyword arguments (lr, weight_decay, betas, ...).",
    )

    @field_validator("class_path", mode="before")
    @classmethod
    def _class_path(cls, v: Any) -> str:
        if not isinstance(v, str) or v not in OPTIMIZER_CLASSES:
            raise ValueError(
                f"{v!r} is not an allowed optimizer; allowed: torch.optim.AdamW, torch.optim.Adam, "
                "torch.optim.SGD (or AdamW, Adam, SGD)"
            )
        return OPTIMIZER_CLASSES[v]

    @model_validator(mode="after")
    def _fill_defaults(self) -> OptimizerConfig:
        defaults = _OPTIMIZER_DEFAULTS[self.class_path]
        name = self.class_path.rsplit(".", 1)[1]
        errors: list[tuple[tuple[str, ...], str]] = []
        for key in sorted(self.init_args.model_fields_set):
            if key not in defaults and getattr(self.init_args, key) is not None:
                errors.append(
                    (
                        ("init_args", key),
                        f"not an argument of {self.class_path}; {name} accepts: "
                        + ", ".join(defaults),
                    )
                )
        if errors:
            raise _RuleErrors(errors)
        for key, value in defaults.items():
            if getattr(self.init_args, key) is None:
                object.__setattr__(self.init_args, key, value)
        if self.class_path == "torch.optim.SGD" and self.init_args.nesterov:
            if not self.init_args.momentum or self.init_args.dampening:
                raise _RuleErrors(
                    [
                        (
                            ("init_args", "nesterov"),
                            "Nesterov momentum needs momentum > 0 and dampening 0 "
                            f"(got momentum={self.init_args.momentum:g}, dampening={self.init_args.dampening:g})",
                        )
                    ]
                )
        return self

    @property
    def name(self) -> str:
        """Short class name (``AdamW``)."""
        return self.class_path.rsplit(".", 1)[1]

    @property
    def lr(self) -> float:
        """Peak learning rate."""
        assert self.init_args.lr is not None
        return self.init_args.lr

    def torch_kwargs(self) -> dict[str, Any]:
        """Keyword arguments for ``torch.optim.<name>(params, **kwargs)`` (only keys that class accepts)."""
        return {k: getattr(self.init_args, k) for k in _OPTIMIZER_DEFAULTS[self.class_path]}


def _optimizer_short_form(value: Any) -> Any:
    if isinstance(value, str):
        return {"class_path": value}
    return value


OptimizerField = Annotated[
    OptimizerConfig,
    BeforeValidator(_optimizer_short_form),
]


class OptimizationConfig(_Section):
    """moejobs' performance knobs (not LitGPT keys): torch.compile, attention backends, MoE kernel."""

    compile: bool = Field(default=True, description="Wrap the model in torch.compile.")
    compile_mode: Literal[
        "default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs"
    ] = Field(
        default="default",
        description="torch.compile mode. reduce-overhead and max-autotune use CUDA graphs on a GPU.",
    )
    compile_dynamic: bool | None = Field(
        default=None,
        description="torch.compile dynamic: true = shape-generic kernels from the start, false = static "
        "shapes, null = torch's automatic choice (recompile as dynamic after a shape changes).",
    )
    compile_fullgraph: bool = Field(
        default=False,
        description="torch.compile fullgraph: fail on any graph break instead of falling back.",
    )
    flash_attention: bool = Field(
        default=True,
        description="Allow the flash-attention SDPA backend (and flash-attn kernels when importable on a GPU).",
    )
    flash_attention_force: bool = Field(
        default=False,
        description="Use only flash attention (needs a CUDA GPU and bf16/fp16; refused by the engine's "
        "pre-flight otherwise).",
    )
    disable_math_fallback: bool = Field(
        default=False, description="Disallow PyTorch's math (reference) SDPA backend."
    )
    moe_implementation: Literal["grouped", "loop"] = Field(
        default="grouped",
        description="MoE layer kernel: grouped = sort-by-expert + grouped GEMM (worker.moe), loop = LitGPT's "
        "per-expert Python loop. Same weights and state-dict keys.",
    )


def _train_schema_extra(schema: dict) -> None:
    # the optimizer also accepts LitGPT's short form (a class name); pydantic only sees the object form
    prop = schema.get("properties", {}).get("optimizer")
    if prop is not None:
        obj = {k: v for k, v in prop.items() if k not in ("description", "title", "default")}
        prop.clear()
        prop.update(
            {
                "title": "Optimizer",
                "description": TrainConfig.model_fields["optimizer"].description,
                "anyOf": [{"type": "string", "enum": sorted(OPTIMIZER_CLASSES)}, obj],
            }
        )


class TrainConfig(_Section):
    """The train config document: ``litgpt pretrain``'s keys plus moejobs' own."""

    model_config = ConfigDict(**_STRICT, json_schema_extra=_train_schema_extra)

    out_dir: PathText = Field(
        default="out/pretrain",
        description="Folder for metrics.csv and checkpoints (step-XXXXXXXX/, final/).",
    )
    precision: Precision = Field(
        default="bf16-mixed",
        description="Lightning precision: bf16-mixed, bf16-true, 16-mixed, 16-true or 32-true. LitGPT's default "
        "(null) picks bf16-mixed on bf16-capable GPUs. Optimizer state is fp32 in every mode except *-true.",
    )
    tokenizer_dir: PathText | None = Field(
        default=None,
        description="Folder with tokenizer.json (or tokenizer.model) and tokenizer_config.json.",
    )
    devices: Devices = Field(
        default="auto",
        description="Data-parallel devices per node: a positive integer or 'auto' (LitGPT's default: every "
        "visible GPU, or 1 CPU process). Plans assume 1 for 'auto'.",
    )
    num_nodes: int = Field(default=1, ge=1, description="Number of nodes.")
    seed: int = Field(
        default=42,
        ge=0,
        le=2**32 - 1,
        description="Random seed (model init, data order); 0 to 2**32-1, NumPy's range.",
    )
    initial_checkpoint_dir: PathText | None = Field(
        default=None,
        description="Checkpoint folder to initialise the weights from (continued pretraining, fine-tuning). "
        "With resume 'auto' or true the run continues from its own newest checkpoint in out_dir when it has "
        "one and starts from these weights only when it has none; a resume path cannot be combined with it.",
    )
    resume: Resume = Field(
        default=False,
        description="false: start fresh; true: resume from the latest checkpoint in out_dir (error if none); "
        "'auto': resume if one exists; or a path to a checkpoint folder. A resume is refused when the data, "
        "the tokenizer, lr/min_lr/warm-up, global_batch_size or the sequence length differ from the checkpoint "
        "(see resume_allow_changes).",
    )
    resume_allow_changes: ResumeAllowChanges = Field(
        default_factory=list,
        description="Differences from the checkpoint that a resume accepts deliberately (a moejobs key; LitGPT "
        "has none). A resume compares the checkpoint's training_state.json with this run and refuses, naming "
        "each difference, unless it is listed here: 'data' (the bytes of the training or validation .txt "
        "files), 'tokenizer' (the tokenizer files), 'schedule' (optimizer lr, train.min_lr, warm-up), 'batch' "
        "(train.global_batch_size), 'seq_len' (the sequence length). A different train.max_tokens or "
        "train.max_steps is always accepted, with a warning naming the old and new schedule.",
        json_schema_extra={"uniqueItems": True},
    )
    logger_name: Literal["csv"] = Field(
        default="csv",
        description="Metrics logger. Only csv (out_dir/metrics.csv; needs no network).",
    )
    data: DataConfig = Field(description="Data module (litgpt.data.TextFiles).")
    train: TrainArgs = Field(
        default_factory=TrainArgs, description="Training arguments (LitGPT's TrainArgs)."
    )
    eval: EvalArgs = Field(
        default_factory=EvalArgs, description="Validation arguments (LitGPT's EvalArgs)."
    )
    log: LogArgs = Field(default_factory=LogArgs, description="LitGPT's LogArgs (unused by csv).")
    optimizer: OptimizerField = Field(
        default_factory=OptimizerConfig,
        description="Optimizer: LitGPT's short form (e.g. AdamW) or {class_path, init_args}. "
        "Allowed: AdamW, Adam, SGD.",
    )
    optimization: OptimizationConfig = Field(
        default_factory=OptimizationConfig,
        description="moejobs performance settings: compile, attention backends, MoE kernel.",
    )

    @model_validator(mode="before")
    @classmethod
    def _empty_sections(cls, data: Any) -> Any:
        # `eval:` with every line commented out is YAML null: treat an empty section as "all defaults"
        if isinstance(data, dict):
            empty = [
                k
                for k in ("train", "eval", "log", "optimizer", "optimization")
                if k in data and data[k] is None
            ]
            if empty:
                data = {k: v for k, v in data.items() if k not in empty}
        return data

    @property
    def world_size(self) -> int:
        """devices x num_nodes, with devices 'auto' counted as 1."""
        d = 1 if self.devices == "auto" else int(self.devices)
        return d * self.num_nodes


# --------------------------------------------------------------------------------------------------
# Model config
# --------------------------------------------------------------------------------------------------


class ModelConfig(_Section):
    """Every field of ``litgpt.Config`` (LitGPT 0.5.13) with its name, type and default.

    Derived values (``head_size``, ``padded_vocab_size``, ``n_query_groups``, ``intermediate_size``)
    stay null here when not given, exactly as LitGPT receives them; the ``resolved_*`` properties give
    the values LitGPT computes in ``Config.__post_init__``.
    """

    name: NameText = Field(
        default="",
        description="Model name (free text, at most 200 characters, no "
        "control characters; LitGPT uses it for a few quirks, e.g. 'Gemma' in "
        "the name offsets RMSNorm).",
    )
    hf_config: dict = Field(
        default_factory=dict, description="Hugging Face origin {org, name}; informational."
    )
    block_size: int = Field(
        default=4096, ge=1, description="Maximum context length (RoPE cache size)."
    )
    n_layer: int = Field(
        default=16,
        ge=1,
        le=MAX_LAYERS,
        description=f"Number of transformer blocks (at most {MAX_LAYERS}: the deepest "
        "published LLMs have ~130; the bound keeps validation and estimates cheap).",
    )
    n_embd: int = Field(default=4096, ge=1, description="Hidden size (embedding width).")
    vocab_size: int = Field(
        default=50254, ge=1, description="Number of tokenizer tokens. Must be <= padded_vocab_size."
    )
    padding_multiple: int = Field(
        default=512,
        ge=1,
        description="padded_vocab_size is rounded up to a multiple of this when not set.",
    )
    padded_vocab_size: int | None = Field(
        default=None,
        ge=1,
        description="Rows of the embedding and LM head. Null: vocab_size rounded up to padding_multiple.",
    )
    norm_class_name: Literal["LayerNorm", "RMSNorm"] = Field(
        default="LayerNorm",
        description="Normalisation layer: LayerNorm (weight+bias) or RMSNorm (weight).",
    )
    norm_eps: float = Field(default=1e-5, gt=0, description="Epsilon of the normalisation layers.")
    norm_qk: bool = Field(default=False, description="Normalise queries and keys (QK-norm).")
    norm_qk_type: Literal["default", "olmo2"] = Field(
        default="default",
        description="QK-norm shape: per head (default) or over all heads (olmo2).",
    )
    post_attention_norm: bool = Field(
        default=False, description="Extra norm after attention (Gemma-2 style)."
    )
    post_mlp_norm: bool = Field(
        default=False, description="Extra norm after the MLP (Gemma-2 style)."
    )
    parallel_residual: bool = Field(
        default=True,
        description="GPT-NeoX parallel attention+MLP residual (false: sequential, LLaMA style).",
    )
    shared_attention_norm: bool = Field(
        default=False,
        description="Reuse norm_1's output for the MLP (only with parallel_residual).",
    )
    n_head: int = Field(default=32, ge=1, description="Number of query heads.")
    head_size: int | None = Field(
        default=None,
        ge=1,
        description="Width of one attention head. Null: n_embd // n_head (n_embd must divide).",
    )
    n_query_groups: int | None = Field(
        default=None,
        ge=1,
        description="Key/value heads (GQA): n_head = MHA, 1 = MQA. n_head must be divisible by it. Null: n_head.",
    )
    attn_bias: bool = Field(
        default=False, description="Bias in the qkv projection (also on when bias is true)."
    )
    attention_scores_scalar: int | None = Field(
        default=None,
        ge=1,
        description="Scale attention scores by 1/sqrt(this) instead of 1/sqrt(head_size).",
    )
    sliding_window_size: int | None = Field(
        default=None,
        ge=1,
        description="Sliding-window attention width (null: full causal attention).",
    )
    sliding_window_indices: list[int] | None = Field(
        default=None,
        description="Per layer 0/1: which layers use the sliding window (default all).",
    )
    attention_logit_softcapping: float | None = Field(
        default=None,
        gt=0,
        description="Soft-cap attention logits (disables fused SDPA/flash attention).",
    )
    rope_base: int = Field(default=10000, ge=1, description="RoPE base period (theta).")
    rotary_percentage: float = Field(
        default=0.25,
        ge=0,
        le=1,
        description="Fraction of each head's dimensions that get rotary embeddings. LitGPT's default 0.25 is "
        "GPT-NeoX's; LLaMA/Mixtral use 1.0.",
    )
    rope_condense_ratio: int = Field(
        default=1, ge=1, description="Position interpolation factor for RoPE."
    )
    rope_adjustments: dict | None = Field(
        default=None, description="RoPE scaling (Llama-3.1 / YaRN style) parameters."
    )
    rope_interleave: bool = Field(default=False, description="Interleaved (GPT-J) RoPE layout.")
    intermediate_size: int | None = Field(
        default=None,
        ge=1,
        description="Dense MLP width. Null: 4 x n_embd (not allowed for LLaMAMLP).",
    )
    moe_intermediate_size: int | None = Field(
        default=None, ge=1, description="Width of each expert's MLP (required for LLaMAMoE)."
    )
    bias: bool = Field(default=True, description="Bias in the attention and MLP linear layers.")
    mlp_class_name: Literal["GptNeoxMLP", "LLaMAMLP", "GemmaMLP", "LLaMAMoE"] = Field(
        default="GptNeoxMLP",
        description="MLP block: GptNeoxMLP (GELU), LLaMAMLP (SwiGLU), GemmaMLP (GeGLU) or LLaMAMoE "
        "(mixture of SwiGLU experts).",
    )
    gelu_approximate: Literal["none", "tanh"] = Field(
        default="none", description="GELU approximation."
    )
    n_expert: int = Field(
        default=0, ge=0, description="Number of experts per MoE layer (LLaMAMoE)."
    )
    n_shared_expert: int | None = Field(
        default=None,
        ge=0,
        description="Always-active shared experts (DeepSeek style), width moe_intermediate_size each.",
    )
    n_expert_groups: int | None = Field(
        default=None, ge=1, description="Expert groups for group-limited routing (DeepSeek-V3)."
    )
    n_topk_groups: int | None = Field(
        default=None, ge=1, description="Groups kept per token in group-limited routing."
    )
    n_topk_scores_per_group: int | None = Field(
        default=None,
        ge=1,
        description="Scores per group used to rank groups in group-limited routing.",
    )
    n_expert_per_token: int = Field(
        default=0,
        ge=0,
        description="Experts each token is routed to (top-k); 1 <= k <= n_expert for LLaMAMoE.",
    )
    first_k_dense_replace: int | None = Field(
        default=None, ge=0, description="The first k layers use a dense LLaMAMLP instead of MoE."
    )
    routed_scaling_factor: float = Field(
        default=1.0, gt=0, description="Multiplier on the routing weights."
    )
    norm_topk_prob: bool = Field(
        default=False, description="Renormalise top-k routing probabilities (grouped router)."
    )
    scale_embeddings: bool = Field(
        default=False, description="Multiply embeddings by sqrt(n_embd) (Gemma)."
    )
    lm_head_bias: bool = Field(default=False, description="Bias in the LM head.")
    final_logit_softcapping: float | None = Field(
        default=None, gt=0, description="Soft-cap the output logits."
    )
    norm_1: bool = Field(default=True, description="Norm before attention (false: identity).")
    norm_2: bool = Field(default=True, description="Norm before the MLP (false: identity).")
    latent_attention: dict | None = Field(
        default=None,
        description="Multi-head latent attention (DeepSeek) ranks: q_lora_rank, kv_lora_rank, qk_rope_head_dim, "
        "qk_nope_head_dim, v_head_dim.",
    )
    rope_local_base_freq: float | None = Field(
        default=None, gt=0, description="RoPE base for local-attention layers (Gemma-3)."
    )
    rope_indices: list[int] | None = Field(
        default=None, description="Per layer 0/1: 1 = use rope_local_base_freq."
    )

    # ---- derived values (what litgpt.Config.__post_init__ computes)
    @property
    def resolved_head_size(self) -> int:
        return self.head_size if self.head_size is not None else self.n_embd // self.n_head

    @property
    def resolved_padded_vocab_size(self) -> int:
        if self.padded_vocab_size is not None:
            return self.padded_vocab_size
        n, k = self.vocab_size, self.padding_multiple
        return n if n % k == 0 else n + k - n % k

    @property
    def resolved_n_query_groups(self) -> int:
        return self.n_query_groups if self.n_query_groups is not None else self.n_head

    @property
    def resolved_intermediate_size(self) -> int:
        return self.intermediate_size if self.intermediate_size is not None else 4 * self.n_embd

    @property
    def rope_n_elem(self) -> int:
        if self.latent_attention is not None:
            return int(self.latent_attention["qk_rope_head_dim"])
        return int(self.rotary_percentage * self.resolved_head_size)

    @property
    def is_moe(self) -> bool:
        return self.mlp_class_name == "LLaMAMoE"

    def litgpt_kwargs(self) -> dict[str, Any]:
        """Keyword arguments for ``litgpt.Config(**kwargs)``: every field, as given (LitGPT derives the rest)."""
        return self.model_dump()

    @model_validator(mode="after")
    def _rules(self) -> ModelConfig:
        errors: list[tuple[str, str]] = []
        if self.head_size is None and self.n_embd % self.n_head != 0:
            errors.append(
                (
                    "n_embd",
                    f"n_embd ({self.n_embd}) must be divisible by n_head ({self.n_head}) when head_size is "
                    f"not set (head_size = n_embd / n_head = {self.n_embd / self.n_head:g})",
                )
            )
        if self.n_query_groups is not None:
            if self.n_query_groups > self.n_head or self.n_head % self.n_query_groups != 0:
                errors.append(
                    (
                        "n_query_groups",
                        f"n_head ({self.n_head}) must be divisible by n_query_groups "
                        f"({self.n_query_groups})",
                    )
                )
        if self.padded_vocab_size is not None and self.vocab_size > self.padded_vocab_size:
            errors.append(
                (
                    "vocab_size",
                    f"vocab_size ({self.vocab_size}) must be <= padded_vocab_size "
                    f"({self.padded_vocab_size}); LitGPT would silently cut vocab_size to {self.padded_vocab_size}",
                )
            )
        if self.mlp_class_name == "LLaMAMLP" and self.intermediate_size is None:
            errors.append(
                ("intermediate_size", "mlp_class_name LLaMAMLP requires intermediate_size")
            )
        if self.is_moe:
            if self.n_expert < 1:
                errors.append(
                    (
                        "n_expert",
                        f"mlp_class_name LLaMAMoE requires n_expert >= 1, got {self.n_expert}",
                    )
                )
            elif not 1 <= self.n_expert_per_token <= self.n_expert:
                errors.append(
                    (
                        "n_expert_per_token",
                        f"n_expert_per_token ({self.n_expert_per_token}) must be between 1 and "
                        f"n_expert ({self.n_expert}) for mlp_class_name LLaMAMoE",
                    )
                )
            if self.moe_intermediate_size is None:
                errors.append(
                    (
                        "moe_intermediate_size",
                        "mlp_class_name LLaMAMoE requires moe_intermediate_size "
                        "(the width of each expert)",
                    )
                )
        else:
            if self.first_k_dense_replace is not None:
                errors.append(
                    (
                        "first_k_dense_replace",
                        "first_k_dense_replace needs mlp_class_name LLaMAMoE, got "
                        f"{self.mlp_class_name}",
                    )
                )
        if self.n_expert_groups is not None:
            if self.n_expert_groups < 2 or self.n_expert % self.n_expert_groups != 0:
                errors.append(
                    (
                        "n_expert_groups",
                        f"n_expert_groups ({self.n_expert_groups}) must be > 1 and divide n_expert "
                        f"({self.n_expert})",
                    )
                )
            elif self.n_topk_groups is None:
                errors.append(("n_topk_groups", "n_expert_groups requires n_topk_groups"))
            elif (
                self.n_topk_scores_per_group is None
                or self.n_topk_scores_per_group > self.n_expert // self.n_expert_groups
            ):
                errors.append(
                    (
                        "n_topk_scores_per_group",
                        "n_expert_groups requires n_topk_scores_per_group <= experts per "
                        f"group ({self.n_expert // self.n_expert_groups})",
                    )
                )
        if not self.parallel_residual and self.shared_attention_norm:
            errors.append(
                (
                    "shared_attention_norm",
                    "shared_attention_norm needs parallel_residual true "
                    "(LitGPT has no non-parallel residual with a shared attention norm)",
                )
            )
        for name in ("sliding_window_indices", "rope_indices"):
            values = getattr(self, name)
            if values is not None:
                if len(values) < self.n_layer:
                    errors.append(
                        (
                            name,
                            f"{name} needs one 0/1 entry per layer (n_layer={self.n_layer}), got {len(values)}",
                        )
                    )
                elif not set(values) <= {0, 1}:
                    errors.append((name, f"{name} may only contain 0 and 1, got {values}"))
        if self.latent_attention is not None:
            keys = (
                "q_lora_rank",
                "kv_lora_rank",
                "qk_rope_head_dim",
                "qk_nope_head_dim",
                "v_head_dim",
            )
            missing = [
                k
                for k in keys
                if not isinstance(self.latent_attention.get(k), int) or self.latent_attention[k] < 1
            ]
            unknown = [k for k in self.latent_attention if k not in keys]
            if missing or unknown:
                errors.append(
                    (
                        "latent_attention",
                        "latent_attention needs positive integers "
                        + ", ".join(keys)
                        + (f"; missing/invalid: {', '.join(missing)}" if missing else "")
                        + (f"; unknown: {', '.join(unknown)}" if unknown else ""),
                    )
                )
            elif self.resolved_n_query_groups != self.n_head:
                errors.append(
                    (
                        "n_query_groups",
                        "latent_attention does not support GQA/MQA: n_query_groups must equal n_head",
                    )
                )
        if not errors and self.latent_attention is None:
            hs = self.resolved_head_size
            n_elem = self.rope_n_elem
            if n_elem % 2:
                errors.append(
                    (
                        "rotary_percentage",
                        f"rotary_percentage x head_size = {self.rotary_percentage} x {hs} gives "
                        f"{n_elem} rotary dimensions; RoPE needs an even number",
                    )
                )
        if errors:
            raise _RuleErrors(errors)
        return self


# --------------------------------------------------------------------------------------------------
# Error conversion
# --------------------------------------------------------------------------------------------------


class _RuleErrors(ValueError):
    """Raised inside model validators: several (field, message) errors at once."""

    def __init__(self, errors: list[tuple[str | tuple[str, ...], str]]):
        self.errors = [((f,) if isinstance(f, str) else tuple(f), m) for f, m in errors]
        super().__init__("; ".join(m for _, m in errors))


def _unwrap(annotation: Any) -> list[Any]:
    """All concrete classes inside an annotation (Optional / Union / Annotated unwrapped)."""
    origin = typing.get_origin(annotation)
    if origin is Annotated:
        return _unwrap(typing.get_args(annotation)[0])
    if origin in (Union, types.UnionType):
        out = []
        for a in typing.get_args(annotation):
            out.extend(_unwrap(a))
        return out
    return [annotation]


def _sub_model(model: type[BaseModel], key: str) -> type[BaseModel] | None:
    info = model.model_fields.get(key)
    if info is None:
        return None
    for cls in _unwrap(info.annotation):
        if isinstance(cls, type) and issubclass(cls, BaseModel):
            return cls
    return None


def _all_paths(model: type[BaseModel], prefix: tuple[str, ...] = ()) -> list[tuple[str, ...]]:
    out = []
    for name in model.model_fields:
        out.append(prefix + (name,))
        sub = _sub_model(model, name)
        if sub is not None:
            out.extend(_all_paths(sub, prefix + (name,)))
    return out


def _dotted(loc: tuple) -> str:
    return Issue(tuple(loc), "").path


def _unknown_keys(
    data: Any,
    model: type[BaseModel],
    root: type[BaseModel],
    loc_prefix: tuple,
    path: tuple = (),
    other_root: type[BaseModel] | None = None,
    other_name: str = "",
) -> list[Issue]:
    """Issues for keys of ``data`` that ``model`` (at ``path`` inside ``root``) does not define."""
    issues: list[Issue] = []
    if not isinstance(data, dict):
        return issues
    fields = list(model.model_fields)
    for key, value in data.items():
        skey = str(key)
        if skey in model.model_fields:
            sub = _sub_model(model, skey)
            if sub is not None and isinstance(value, dict):
                issues.extend(
                    _unknown_keys(
                        value, sub, root, loc_prefix, path + (skey,), other_root, other_name
                    )
                )
            continue
        issues.append(
            Issue(
                loc_prefix + path + (skey,),
                _suggest(skey, fields, root, path, other_root, other_name),
            )
        )
    return issues


def _suggest(
    key: str, fields: list[str], root: type[BaseModel], path: tuple, other_root, other_name: str
) -> str:
    close = difflib.get_close_matches(key, fields, n=1, cutoff=0.6)
    if close:
        return f"unknown key; did you mean {close[0]}?"
    # the same name elsewhere in this document?
    elsewhere = [p for p in _all_paths(root) if p[-1] == key and p[:-1] != path]
    if elsewhere:
        return f"unknown key here; did you mean {'.'.join(elsewhere[0])}?"
    if other_root is not None:
        there = [p for p in _all_paths(other_root) if p[-1] == key]
        if there:
            where = "" if len(there[0]) == 1 else f", as {'.'.join(there[0])}"
            return f"unknown key; {key} belongs in the {other_name}{where}"
    # a close name anywhere in this document
    names = {p[-1]: p for p in _all_paths(root)}
    close = difflib.get_close_matches(key, list(names), n=1, cutoff=0.75)
    if close:
        return f"unknown key; did you mean {'.'.join(names[close[0]])}?"
    return "unknown key; valid keys here: " + ", ".join(fields)


def _short(value: Any, limit: int = 60) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _num(value: Any) -> str:
    """Numbers as a person writes them (0.001, 1e-08, 0, 1.5); anything else via repr."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return _short(value)
    return f"{value:g}" if isinstance(value, float) else str(value)


def _message(err: dict) -> str:
    """A readable sentence for one pydantic error (no URLs, no 'Input should be')."""
    kind = err.get("type", "")
    ctx = err.get("ctx") or {}
    got = err.get("input")
    if kind == "missing":
        return "required key is missing"
    if kind == "literal_error":
        return f"{_short(got)} is not allowed; choose one of {ctx.get('expected', '')}"
    if kind in ("int_parsing", "int_type", "int_from_float"):
        return f"expected an integer, got {_short(got)}"
    if kind == "finite_number":
        return f"must be a finite number, got {_short(got)}"
    if kind in ("float_parsing", "float_type"):
        return f"expected a number, got {_short(got)}"
    if kind in ("bool_parsing", "bool_type"):
        return f"expected true or false, got {_short(got)}"
    if kind in ("string_type",):
        return f"expected a string, got {_short(got)}"
    if kind in ("dict_type", "model_type", "model_attributes_type"):
        return f"expected a mapping (key: value), got {_short(got)}"
    if kind in ("list_type", "tuple_type"):
        return f"expected a list, got {_short(got)}"
    if kind in ("string_too_long", "string_too_short"):
        size = len(got) if isinstance(got, str) else 0
        if kind == "string_too_long":
            return f"at most {ctx.get('max_length', 0):,} characters, got {size:,}"
        return f"at least {ctx.get('min_length')} characters, got {size}"
    if kind in ("too_short", "too_long"):
        return f"expected {ctx.get('expected', ctx.get('min_length', ''))} items, got {_short(got)}"
    for bound, op in (("ge", ">="), ("gt", ">"), ("le", "<="), ("lt", "<")):
        if bound in ctx and kind in (
            "greater_than_equal",
            "greater_than",
            "less_than_equal",
            "less_than",
        ):
            return f"must be {op} {_num(ctx[bound])}, got {_num(got)}"
    if kind == "extra_forbidden":
        return "unknown key"
    msg = str(err.get("msg", "invalid value"))
    for prefix in ("Value error, ", "Assertion failed, "):
        if msg.startswith(prefix):
            msg = msg[len(prefix) :]
    return msg


def _clean_loc(loc: tuple, model: type[BaseModel]) -> tuple:
    """Drop pydantic's union/validator tags from a location, keeping field names and list indices."""
    out: list[str | int] = []
    current: type[BaseModel] | None = model
    for part in loc:
        if isinstance(part, int):
            out.append(part)
            continue
        if current is not None and part in current.model_fields:
            out.append(part)
            current = _sub_model(current, part)
        elif current is None and not out:
            out.append(part)
        # else: a tag such as 'function-before[...]' or 'int' -> dropped
    return tuple(out)


def _convert(exc: ValidationError, model: type[BaseModel], loc_prefix: tuple) -> list[Issue]:
    issues: list[Issue] = []
    seen: set[tuple] = set()
    for err in exc.errors(include_url=False):
        if err.get("type") == "extra_forbidden":
            continue  # reported with a suggestion by _unknown_keys
        loc = _clean_loc(tuple(err.get("loc", ())), model)
        original = err.get("ctx", {}).get("error") if err.get("ctx") else None
        if isinstance(original, _RuleErrors):
            for fld, msg in original.errors:
                issues.append(Issue(loc_prefix + loc + fld, msg))
            continue
        msg = _message(err)
        key = (loc, msg)
        if key in seen:
            continue
        seen.add(key)
        issues.append(Issue(loc_prefix + loc, msg))
    return issues


# --------------------------------------------------------------------------------------------------
# Validation entry points
# --------------------------------------------------------------------------------------------------


@dataclass
class Validated:
    """Result of `validate_configs`: the validated models and the warnings (valid but probably unintended)."""

    train: TrainConfig
    model: ModelConfig
    warnings: list[Issue] = field(default_factory=list)


def _check_mapping(data: Any, what: str, loc: tuple) -> list[Issue]:
    if not isinstance(data, dict):
        return [Issue(loc, f"the {what} must be a mapping (key: value), got {type(data).__name__}")]
    return []


def validate_train_config(train: dict) -> TrainConfig:
    """Validate the train document alone (no cross-document rules). Raises `ConfigError`."""
    errors = _check_mapping(train, "train config", ())
    if errors:
        raise ConfigError(errors)
    errors = _unknown_keys(
        train, TrainConfig, TrainConfig, (), other_root=ModelConfig, other_name="model config"
    )
    try:
        result = TrainConfig.model_validate(train)
    except ValidationError as exc:
        errors.extend(_convert(exc, TrainConfig, ()))
        raise ConfigError(errors) from None
    if errors:
        raise ConfigError(errors)
    return result


def validate_model_config(model: dict) -> ModelConfig:
    """Validate the model document alone. Issue locations start with ``model``. Raises `ConfigError`."""
    errors = _check_mapping(model, "model config", (MODEL_LOC,))
    if errors:
        raise ConfigError(errors)
    errors = _unknown_keys(
        model,
        ModelConfig,
        ModelConfig,
        (MODEL_LOC,),
        other_root=TrainConfig,
        other_name="train config",
    )
    try:
        result = ModelConfig.model_validate(model)
    except ValidationError as exc:
        errors.extend(_convert(exc, ModelConfig, (MODEL_LOC,)))
        raise ConfigError(errors) from None
    if errors:
        raise ConfigError(errors)
    return result


def validate_configs(train: dict, model: dict) -> Validated:
    """Validate a train document and a model document together.

    Returns `Validated` (``.train``, ``.model``, ``.warnings``). Raises `ConfigError` with every error of
    both documents plus the cross-field rules (batch divisibility, max_seq_length <= block_size, max_tokens
    covering one optimizer step, lr > 0, min_lr <= lr, ...). Pure Python: no torch import.
    """
    from service.estimate import training_plan  # local: estimate imports this module

    errors: list[Issue] = []
    train_cfg = model_cfg = None
    try:
        train_cfg = validate_train_config(train)
    except ConfigError as exc:
        errors.extend(exc.errors)
    try:
        model_cfg = validate_model_config(model)
    except ConfigError as exc:
        errors.extend(exc.errors)
    if train_cfg is not None:
        errors.extend(_train_rules(train_cfg, train))
    if train_cfg is not None and model_cfg is not None:
        errors.extend(_cross_rules(train_cfg, model_cfg))
    if errors:
        raise ConfigError(errors)
    assert train_cfg is not None and model_cfg is not None
    plan = training_plan(train_cfg, model_cfg)
    warnings = _warnings(train_cfg, model_cfg, plan)
    return Validated(train=train_cfg, model=model_cfg, warnings=warnings)


def _train_rules(cfg: TrainConfig, raw: dict) -> list[Issue]:
    """Rules inside the train document that need several sections."""
    errors: list[Issue] = []
    t = cfg.train
    lr = cfg.optimizer.lr
    world = cfg.world_size
    per_step = t.micro_batch_size * world
    if t.global_batch_size % per_step != 0:
        lo = t.global_batch_size // per_step * per_step
        hi = lo + per_step
        options = f"{lo} or {hi}" if lo else f"{hi}"
        errors.append(
            Issue(
                ("train", "global_batch_size"),
                f"global_batch_size ({t.global_batch_size}) must be divisible by micro_batch_size x devices x num_nodes "
                f"= {t.micro_batch_size} x {cfg.devices if cfg.devices != 'auto' else 1} x {cfg.num_nodes} = {per_step} "
                f"(LitGPT would silently floor it); e.g. use {options}",
            )
        )
    if t.min_lr > lr:
        errors.append(
            Issue(
                ("train", "min_lr"),
                f"min_lr ({t.min_lr:g}) must be <= the optimizer's lr ({lr:g}): the cosine schedule decays from lr to min_lr",
            )
        )
    raw_train = raw.get("train") if isinstance(raw.get("train"), dict) else {}
    if t.lr_warmup_steps and t.lr_warmup_fraction and "lr_warmup_steps" in raw_train:
        errors.append(
            Issue(
                ("train", "lr_warmup_fraction"),
                f"set either lr_warmup_steps ({t.lr_warmup_steps}) or lr_warmup_fraction ({t.lr_warmup_fraction:g}), not both",
            )
        )
    if cfg.tokenizer_dir is None and cfg.initial_checkpoint_dir is None:
        errors.append(
            Issue(
                ("tokenizer_dir",),
                "tokenizer_dir is required: TextFiles tokenizes the text with it (train one with "
                "`moejobs tokenizer train --data DIR --out DIR`)",
            )
        )
    if cfg.initial_checkpoint_dir and not (isinstance(cfg.resume, bool) or cfg.resume == "auto"):
        errors.append(
            Issue(
                ("initial_checkpoint_dir",),
                f"initial_checkpoint_dir and resume: {cfg.resume} cannot be combined: the checkpoint path would "
                "replace the initial weights; use resume: auto (continue this run's own newest checkpoint, start "
                "from initial_checkpoint_dir while it has none) or drop one of the two",
            )
        )
    return errors


def _cross_rules(cfg: TrainConfig, model: ModelConfig) -> list[Issue]:
    """Rules that need both documents."""
    from service.estimate import training_plan

    errors: list[Issue] = []
    t = cfg.train
    if t.max_seq_length is not None and t.max_seq_length > model.block_size:
        errors.append(
            Issue(
                ("train", "max_seq_length"),
                f"max_seq_length ({t.max_seq_length}) must be <= the model's block_size ({model.block_size})",
            )
        )
        return errors
    if t.global_batch_size % (t.micro_batch_size * cfg.world_size):
        return errors  # already reported; the plan below needs a whole number of micro-batches per step
    plan = training_plan(cfg, model)
    if plan.steps_from_tokens < 1:
        need = plan.grad_accum_iters * plan.tokens_per_micro_batch * plan.world_size
        errors.append(
            Issue(
                ("train", "max_tokens"),
                f"max_tokens ({t.max_tokens:,}) does not cover one optimizer step: it gives "
                f"{_n(plan.micro_batches_total, 'micro-batch')} of {t.micro_batch_size} x {plan.seq_len} = "
                f"{plan.tokens_per_micro_batch:,} tokens per device, but one step needs {plan.grad_accum_iters} "
                f"({_batch_split(cfg)}); raise max_tokens to at least {need:,}",
            )
        )
    return errors


#: Below this many optimizer steps a run gets the "only N optimizer steps" warning.
FEW_STEPS = 10


def _batch_split(cfg: TrainConfig) -> str:
    t = cfg.train
    return (
        f"global_batch_size {t.global_batch_size} / micro_batch_size {t.micro_batch_size} / "
        f"{_n(cfg.world_size, 'device')}"
    )


def _n(count: int, word: str) -> str:
    """``1 step``, ``2 steps``, ``1 micro-batch``, ``3 micro-batches`` (thousands separated)."""
    if count == 1:
        return f"1 {word}"
    plural = word + ("es" if word.endswith(("ch", "sh", "s", "x")) else "s")
    return f"{count:,} {plural}"


def _warnings(cfg: TrainConfig, model: ModelConfig, plan) -> list[Issue]:
    """Valid but probably unintended settings, each with the numbers that show it."""
    w: list[Issue] = []
    t = cfg.train
    steps = plan.optimizer_steps
    lr = cfg.optimizer.lr
    if steps < FEW_STEPS:
        w.append(
            Issue(
                ("train", "max_tokens"),
                f"only {_n(steps, 'optimizer step')} will run: max_tokens {t.max_tokens:,} gives "
                f"{_n(plan.micro_batches_total, 'micro-batch')} of {plan.tokens_per_micro_batch:,} tokens per device "
                f"and each step takes {_n(plan.grad_accum_iters, 'micro-batch')} ({_batch_split(cfg)})",
            )
        )
    if plan.dropped_micro_batches:
        dropped_tokens = plan.dropped_micro_batches * plan.tokens_per_micro_batch * plan.world_size
        d = plan.dropped_micro_batches
        per_device = " per device" if plan.world_size > 1 else ""
        what = (
            (
                f"the last micro-batch{per_device} ({dropped_tokens:,} tokens) does not fill a whole optimizer step "
                f"of {plan.grad_accum_iters} micro-batches, so it is never trained (LitGPT would compute it and drop "
                "its gradients)"
            )
            if d == 1
            else (
                f"the last {d:,} micro-batches{per_device} ({dropped_tokens:,} tokens) do not fill a whole optimizer "
                f"step of {plan.grad_accum_iters} micro-batches, so they are never trained (LitGPT would compute them "
                "and drop their gradients)"
            )
        )
        w.append(
            Issue(
                ("train", "max_tokens"),
                f"{what}: {plan.tokens_trained:,} of max_tokens {t.max_tokens:,} tokens are trained",
            )
        )
    if plan.warmup_steps > steps:
        reached = steps / plan.warmup_steps
        key = "lr_warmup_steps" if t.lr_warmup_steps else "lr_warmup_fraction"
        w.append(
            Issue(
                ("train", key),
                f"the warm-up of {_n(plan.warmup_steps, 'optimizer step')} "
                f"({_n(plan.warmup_steps * plan.grad_accum_iters, 'micro-batch')}) is longer than the run "
                f"({_n(steps, 'step')}, {_n(plan.micro_batches_total, 'micro-batch')}): the learning rate never "
                f"reaches its peak {lr:g}; it reaches at most {reached:.0%} of it ({lr * reached:.3g}) at step {steps}",
            )
        )
    if t.save_interval is not None and t.save_interval >= steps:
        w.append(
            Issue(
                ("train", "save_interval"),
                f"save_interval ({t.save_interval}) is not smaller than the run's {_n(steps, 'optimizer step')}: no "
                "intermediate checkpoint is written, so a run that crashes or is killed (kill -9, a lost "
                "machine) starts over; a stop by SIGTERM or Ctrl-C still checkpoints and resumes",
            )
        )
    if t.max_steps is not None:
        if t.max_steps < plan.steps_from_tokens:
            w.append(
                Issue(
                    ("train", "max_steps"),
                    f"max_steps ({t.max_steps}) stops the run before max_tokens is used up "
                    f"({_n(plan.steps_from_tokens, 'step')}): {plan.tokens_trained:,} of {t.max_tokens:,} tokens are "
                    f"trained and the cosine schedule decays over {_n(t.max_steps, 'step')} "
                    "(LitGPT's pretrain would ignore max_steps)",
                )
            )
        elif t.max_steps > plan.steps_from_tokens:
            w.append(
                Issue(
                    ("train", "max_steps"),
                    f"max_steps ({t.max_steps}) has no effect: max_tokens {t.max_tokens:,} allows only "
                    f"{_n(plan.steps_from_tokens, 'optimizer step')}",
                )
            )
    if t.epochs is not None:
        w.append(
            Issue(
                ("train", "epochs"),
                f"epochs ({t.epochs}) is ignored: pretraining length is set by max_tokens (and max_steps/max_time); "
                "LitGPT's pretrain refuses epochs",
            )
        )
    if "rotary_percentage" not in model.model_fields_set and model.latent_attention is None:
        hs = model.resolved_head_size
        w.append(
            Issue(
                (MODEL_LOC, "rotary_percentage"),
                f"rotary_percentage is not set, so LitGPT's default 0.25 applies: RoPE covers {model.rope_n_elem} of the "
                f"{hs} dimensions of each head (LLaMA and Mixtral configs in LitGPT use 1.0)",
            )
        )
    if cfg.precision == "16-mixed":
        w.append(
            Issue(
                ("precision",),
                "16-mixed: where no CUDA GPU is present, Lightning runs 16-mixed as bf16 (bf16 autocast), not fp16; "
                "on a GPU it is fp16 autocast with a gradient scaler",
            )
        )
    no_periodic = cfg.eval.interval == 0 or cfg.eval.interval > steps
    if no_periodic and not cfg.eval.final_validation and not cfg.eval.initial_validation:
        why = (
            "0 (off)"
            if cfg.eval.interval == 0
            else f"{cfg.eval.interval}, more than the run's {_n(steps, 'step')}"
        )
        w.append(
            Issue(
                ("eval", "interval"),
                f"eval.interval is {why} and eval.final_validation is false: the run computes no validation loss at "
                "all (val_loss and val_ppl stay empty in metrics.csv)",
            )
        )
    if cfg.devices == "auto":
        w.append(
            Issue(
                ("devices",),
                "devices is 'auto' (LitGPT's default): Lightning would use every visible GPU (1 process on a CPU); "
                f"the step and token numbers here assume 1 device ({_n(steps, 'step')}); set devices explicitly",
            )
        )
    o = cfg.optimization
    if o.compile and o.compile_mode == "reduce-overhead" and o.compile_dynamic:
        w.append(
            Issue(
                ("optimization", "compile_dynamic"),
                "compile_dynamic true compiles shape-generic kernels although every training micro-batch has the same "
                f"shape ({t.micro_batch_size} x {plan.seq_len}); with compile_mode reduce-overhead, CUDA graphs are "
                "recorded per concrete shape anyway, so dynamic shapes add compile work and can slow kernels "
                "(null lets torch decide)",
            )
        )
    if o.flash_attention_force and cfg.precision == "32-true":
        w.append(
            Issue(
                ("optimization", "flash_attention_force"),
                "flash_attention_force with precision 32-true cannot run: flash-attention kernels need bf16/fp16 on a "
                "CUDA GPU, so the engine's pre-flight check will refuse this run",
            )
        )
    if model.is_moe and o.moe_implementation == "grouped":
        align = 4 if cfg.precision == "32-true" else 8
        unaligned = [
            f"{name} ({getattr(model, name)})"
            for name in ("n_embd", "moe_intermediate_size")
            if getattr(model, name) % align
        ]
        if unaligned:
            w.append(
                Issue(
                    ("optimization", "moe_implementation"),
                    f"the grouped MoE kernel needs 16-byte rows ({cfg.precision}: widths divisible by {align}) but "
                    f"{' and '.join(unaligned)} {'is' if len(unaligned) == 1 else 'are'} not: every expert then runs on "
                    f"every token ({model.n_expert} instead of {model.n_expert_per_token} experts per token, "
                    f"{model.n_expert / model.n_expert_per_token:g}x the expert FLOPs)",
                )
            )
    if not model.is_moe and (t.moe_aux_loss_coef or t.moe_z_loss_coef):
        w.append(
            Issue(
                ("train", "moe_aux_loss_coef" if t.moe_aux_loss_coef else "moe_z_loss_coef"),
                f"router losses are ignored: the model has no MoE layers (mlp_class_name {model.mlp_class_name})",
            )
        )
    if model.n_expert > 0 and not model.is_moe:
        w.append(
            Issue(
                (MODEL_LOC, "n_expert"),
                f"n_expert ({model.n_expert}) is ignored: mlp_class_name is {model.mlp_class_name}, not LLaMAMoE",
            )
        )
    if cfg.eval.max_new_tokens is not None:
        w.append(
            Issue(
                ("eval", "max_new_tokens"),
                f"max_new_tokens ({cfg.eval.max_new_tokens}) is ignored by pretraining (LitGPT's pretrain refuses it)",
            )
        )
    return w


# --------------------------------------------------------------------------------------------------
# JSON Schema
# --------------------------------------------------------------------------------------------------


def train_config_json_schema() -> dict:
    """JSON Schema (draft 2020-12) of the train config document, with a description on every field."""
    schema = TrainConfig.model_json_schema()
    schema.setdefault("title", "moejobs train config")
    return schema


def model_config_json_schema() -> dict:
    """JSON Schema (draft 2020-12) of the model config document, with a description on every field."""
    schema = ModelConfig.model_json_schema()
    schema.setdefault("title", "moejobs model config")
    return schema
