"""The training plan: how a run is cut into micro-batches and optimizer steps.

:func:`training_plan` is the single source of truth for how many micro-batches and optimizer
steps a run takes; validation computes it once (``service.config.validate.Validated.plan``), the
estimate (``service.estimate``) and the engine's loop use it, so the estimate and the run agree.
Pure Python: no torch, no litgpt.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

from service.config.model import ModelConfig
from service.config.train import TrainConfig

__all__ = ["TrainingPlan", "training_plan", "warmup_steps"]


@dataclass(frozen=True)
class TrainingPlan:
    """How a run is cut into micro-batches and optimizer steps (LitGPT ``pretrain`` semantics).

    Counts marked *per rank* are what one data-parallel process does; every rank does the same.

    Attributes:
        world_size: data-parallel ranks = devices x num_nodes (devices 'auto' counted as 1).
        micro_batch_size: samples per forward/backward on one rank.
        seq_len: tokens per sample = train.max_seq_length, or the model's block_size when unset.
        tokens_per_micro_batch: micro_batch_size x seq_len (one rank).
        micro_batches_total: per rank, max_tokens // world_size // tokens_per_micro_batch (LitGPT's max_iters).
        grad_accum_iters: micro-batches per optimizer step on one rank = global_batch_size // (world_size x micro_batch_size).
        steps_from_tokens: micro_batches_total // grad_accum_iters (whole steps that max_tokens allows).
        optimizer_steps: steps_from_tokens, capped by train.max_steps when set. The run's length and the
            cosine-decay horizon. (max_time may stop a run earlier; it does not change the schedule.)
        micro_batches_trained: per rank, optimizer_steps x grad_accum_iters (the loop runs exactly these).
        dropped_micro_batches: per rank, micro_batches_total - steps_from_tokens x grad_accum_iters: the tail
            that does not fill an optimizer step and is never trained.
        tokens_per_step: tokens per optimizer step, all ranks = grad_accum_iters x tokens_per_micro_batch x world_size.
        tokens_trained: all ranks, optimizer_steps x tokens_per_step.
        warmup_steps: optimizer steps of linear warm-up: train.lr_warmup_steps, or
            ceil(lr_warmup_fraction x optimizer_steps), or 0. May exceed optimizer_steps (validation warns).
    """

    world_size: int
    micro_batch_size: int
    seq_len: int
    tokens_per_micro_batch: int
    micro_batches_total: int
    grad_accum_iters: int
    steps_from_tokens: int
    optimizer_steps: int
    micro_batches_trained: int
    dropped_micro_batches: int
    tokens_per_step: int
    tokens_trained: int
    warmup_steps: int

    def learning_rate(self, step: int, peak_lr: float, min_lr: float) -> float:
        """Learning rate for optimizer step ``step`` (1-based: the first step is 1).

        Linear warm-up then cosine decay to ``min_lr`` over the run's ``optimizer_steps``:

        * ``step <= warmup_steps``: ``peak_lr * step / warmup_steps`` (step 1 is already non-zero; if the
          warm-up is longer than the run the peak is never reached);
        * after: ``min_lr + 0.5 * (1 + cos(pi * r)) * (peak_lr - min_lr)`` with
          ``r = (step - warmup_steps) / (optimizer_steps - warmup_steps)``, so the last step uses ``min_lr``.

        This is LitGPT's ``get_lr`` (pretrain.py) counted in optimizer steps instead of micro-batches.
        Steps beyond ``optimizer_steps`` (resumed runs asking for more) return ``min_lr``.
        """
        if step < 1:
            raise ValueError(f"step is 1-based, got {step}")
        w = self.warmup_steps
        if w > 0 and step <= w:
            return peak_lr * step / w
        total = self.optimizer_steps
        if step >= total:
            return min_lr if total > w else peak_lr
        r = (step - w) / (total - w)
        return min_lr + 0.5 * (1.0 + math.cos(math.pi * r)) * (peak_lr - min_lr)

    def to_dict(self) -> dict:
        return asdict(self)


def warmup_steps(train: TrainConfig, optimizer_steps: int) -> int:
    """Optimizer steps of linear warm-up for a run of ``optimizer_steps`` steps:
    ``train.lr_warmup_steps``, or ``ceil(lr_warmup_fraction x optimizer_steps)``, or 0."""
    t = train.train
    if t.lr_warmup_steps:
        return t.lr_warmup_steps
    if t.lr_warmup_fraction:
        return math.ceil(t.lr_warmup_fraction * optimizer_steps)
    return 0


def training_plan(train: TrainConfig, model: ModelConfig) -> TrainingPlan:
    """Cut a run into micro-batches and optimizer steps exactly as the engine will.

    Args:
        train: validated train config (uses devices, num_nodes, train.{micro_batch_size, global_batch_size,
            max_tokens, max_seq_length, max_steps, lr_warmup_steps, lr_warmup_fraction}).
        model: validated model config (block_size when max_seq_length is unset).

    Returns:
        `TrainingPlan`. For the shipped configs: 156 micro-batches, 32 per step, 4 optimizer steps,
        28 dropped micro-batches, 262,144 tokens trained.

    Never raises for a validated pair; ``optimizer_steps`` is 0 when max_tokens does not cover one step
    (validation reports that as an error).
    """
    t = train.train
    world = train.world_size
    seq_len = t.max_seq_length if t.max_seq_length is not None else model.block_size
    tokens_per_mb = t.micro_batch_size * seq_len
    mb_total = t.max_tokens // world // tokens_per_mb
    accum = max(1, t.global_batch_size // (world * t.micro_batch_size))
    steps_from_tokens = mb_total // accum
    steps = steps_from_tokens if t.max_steps is None else min(steps_from_tokens, t.max_steps)
    warmup = warmup_steps(train, steps)
    tokens_per_step = accum * tokens_per_mb * world
    return TrainingPlan(
        world_size=world,
        micro_batch_size=t.micro_batch_size,
        seq_len=seq_len,
        tokens_per_micro_batch=tokens_per_mb,
        micro_batches_total=mb_total,
        grad_accum_iters=accum,
        steps_from_tokens=steps_from_tokens,
        optimizer_steps=steps,
        micro_batches_trained=steps * accum,
        dropped_micro_batches=mb_total - steps_from_tokens * accum,
        tokens_per_step=tokens_per_step,
        tokens_trained=steps * tokens_per_step,
        warmup_steps=warmup,
    )
