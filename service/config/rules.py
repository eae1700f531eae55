"""Rules a valid config pair must also keep, and warnings about valid but probably unintended
settings. Both need more than one field: several sections of the train document
(:func:`train_rules`), or both documents and the training plan (:func:`cross_rules`,
:func:`config_warnings`). Each message gives the numbers that show the problem.
"""

from __future__ import annotations

from service.config.issues import Issue
from service.config.model import ModelConfig
from service.config.plan import TrainingPlan, training_plan
from service.config.train import TrainConfig

__all__ = ["FEW_STEPS", "train_rules", "cross_rules", "config_warnings"]


def train_rules(cfg: TrainConfig, raw: dict) -> list[Issue]:
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
    raw_train = raw.get("train")
    if not isinstance(raw_train, dict):
        raw_train = {}
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


def cross_rules(cfg: TrainConfig, model: ModelConfig) -> tuple[list[Issue], TrainingPlan | None]:
    """Rules that need both documents: the errors, and the training plan of the pair (None when
    it cannot be cut into optimizer steps, which one of the errors says)."""
    errors: list[Issue] = []
    t = cfg.train
    if t.max_seq_length is not None and t.max_seq_length > model.block_size:
        errors.append(
            Issue(
                ("train", "max_seq_length"),
                f"max_seq_length ({t.max_seq_length}) must be <= the model's block_size ({model.block_size})",
            )
        )
        return errors, None
    if t.global_batch_size % (t.micro_batch_size * cfg.world_size):
        return (
            errors,
            None,
        )  # already reported; the plan needs a whole number of micro-batches per step
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
    return errors, plan


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


def config_warnings(cfg: TrainConfig, model: ModelConfig, plan: TrainingPlan) -> list[Issue]:
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
                ("rotary_percentage",),
                f"rotary_percentage is not set, so LitGPT's default 0.25 applies: RoPE covers {model.rope_n_elem} of the "
                f"{hs} dimensions of each head (LLaMA and Mixtral configs in LitGPT use 1.0)",
                "model",
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
                ("n_expert",),
                f"n_expert ({model.n_expert}) is ignored: mlp_class_name is {model.mlp_class_name}, not LLaMAMoE",
                "model",
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
