"""The train config document (:class:`TrainConfig`): the keys of ``litgpt pretrain`` (top-level
``out_dir``, ``precision``, ``devices``, ..., and the ``train``/``eval``/``log`` groups of LitGPT's
``TrainArgs``, ``EvalArgs``, ``LogArgs`` with the defaults of ``litgpt.pretrain.setup()``), plus
this project's own keys (``train.gradient_checkpointing``, ``train.moe_*_coef``, the
``optimization`` group). Rules that need several sections or the model document are in
``service.config.rules``; validation entry points in ``service.config.validate``.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BeforeValidator, ConfigDict, Field, field_validator, model_validator

from service.config.fields import (
    STRICT,
    Devices,
    EvaluateExample,
    IntLike,
    NameText,
    PathText,
    Precision,
    Resume,
    ResumeAllowChanges,
    Section,
)
from service.config.issues import RuleErrors

__all__ = [
    "DATA_CLASSES",
    "OPTIMIZER_CLASSES",
    "TextFilesArgs",
    "DataConfig",
    "TrainArgs",
    "EvalArgs",
    "LogArgs",
    "OptimizerArgs",
    "OptimizerConfig",
    "OptimizationConfig",
    "TrainConfig",
    "train_config_json_schema",
]


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


class TextFilesArgs(Section):
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


class DataConfig(Section):
    """Data module: only ``litgpt.data.TextFiles`` is accepted (a config never causes an arbitrary import)."""

    class_path: str = Field(
        default="litgpt.data.TextFiles",
        description="Data module class. Allowed: litgpt.data.TextFiles (or its short form TextFiles).",
        json_schema_extra={"enum": [*sorted(DATA_CLASSES)]},
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


class TrainArgs(Section):
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


class EvalArgs(Section):
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


class LogArgs(Section):
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


class OptimizerArgs(Section):
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


class OptimizerConfig(Section):
    """Optimizer: ``class_path`` from an allowlist (AdamW, Adam, SGD) plus ``init_args``.

    LitGPT's short form ``optimizer: AdamW`` is accepted and normalised to this structure.
    """

    class_path: str = Field(
        default="torch.optim.AdamW",
        description="Optimizer class: torch.optim.AdamW, torch.optim.Adam or torch.optim.SGD (short names "
        "AdamW/Adam/SGD accepted). Optimizer state has the parameters' dtype (fp32 except with *-true precision).",
        json_schema_extra={"enum": [*sorted(OPTIMIZER_CLASSES)]},
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
            raise RuleErrors(errors)
        for key, value in defaults.items():
            if getattr(self.init_args, key) is None:
                object.__setattr__(self.init_args, key, value)
        if self.class_path == "torch.optim.SGD" and self.init_args.nesterov:
            if not self.init_args.momentum or self.init_args.dampening:
                raise RuleErrors(
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


class OptimizationConfig(Section):
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


class TrainConfig(Section):
    """The train config document: ``litgpt pretrain``'s keys plus moejobs' own."""

    model_config = ConfigDict(**STRICT, json_schema_extra=_train_schema_extra)

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


def train_config_json_schema() -> dict:
    """JSON Schema (draft 2020-12) of the train config document, with a description on every field."""
    schema = TrainConfig.model_json_schema()
    schema.setdefault("title", "moejobs train config")
    return schema
