"""Validation rules, warnings, error messages and JSON Schema of the service.config package (fast: no training)."""

from __future__ import annotations

import copy
import json

import pytest

from service.config.issues import ConfigError, Issue
from service.config.merge import deep_merge, resolve
from service.config.model import ModelConfig, model_config_json_schema
from service.config.parse import load_document
from service.config.presets import load_preset
from service.config.train import TrainConfig, train_config_json_schema
from service.config.validate import validate_configs
from tests.support import REPO, configs

CONFIGS = REPO / "configs"

# A small valid pair that produces no warning: 20 optimizer steps of 2 micro-batches (2 x 32 tokens).
BASE_TRAIN: dict = configs.load("valid_train")
BASE_MODEL: dict = configs.load("valid_model")


def validate(train: dict | None = None, model: dict | None = None):
    return validate_configs(
        deep_merge(BASE_TRAIN, train or {}), deep_merge(BASE_MODEL, model or {})
    )


def errors(train: dict | None = None, model: dict | None = None) -> dict[str, str]:
    """Errors of the base configs with overrides, as {dotted path: message}."""
    with pytest.raises(ConfigError) as info:
        validate(train, model)
    return {e.path: e.message for e in info.value.errors}


def warnings(train: dict | None = None, model: dict | None = None) -> dict[str, str]:
    return {w.path: w.message for w in validate(train, model).warnings}


def test_base_configs_are_valid_without_warnings():
    v = validate()
    assert isinstance(v.train, TrainConfig) and isinstance(v.model, ModelConfig)
    assert v.warnings == []


# ---------------------------------------------------------------------------------------------------
# Issue / ConfigError
# ---------------------------------------------------------------------------------------------------


def test_issue_str_and_config_error_lists_one_per_line():
    issue = Issue(("train", "micro_batch_size"), "must be >= 1, got 0")
    assert str(issue) == "train.micro_batch_size: must be >= 1, got 0"
    assert (
        Issue(("model", "sliding_window_indices", 3), "x").path == "model.sliding_window_indices[3]"
    )
    err = ConfigError([issue, Issue(("precision",), "bad")])
    assert str(err) == "train.micro_batch_size: must be >= 1, got 0\nprecision: bad"
    assert issue.to_dict() == {"loc": "train.micro_batch_size", "message": "must be >= 1, got 0"}


def test_errors_of_both_documents_are_reported_together_without_pydantic_noise():
    with pytest.raises(ConfigError) as info:
        validate({"train": {"micro_batch_size": 0}, "precision": "fp8"}, {"n_layer": "many"})
    text = str(info.value)
    assert [e.path for e in info.value.errors] == [
        "precision",
        "train.micro_batch_size",
        "model.n_layer",
    ]
    assert "https://" not in text and "pydantic" not in text and "Input should" not in text
    assert len(text.splitlines()) == 3


def test_issues_name_their_document_so_a_train_key_named_model_is_not_a_model_issue() -> None:
    """The model document's issues say ``document="model"`` with locations inside that
    document; an unknown train key ``model`` is a train issue whose location is ``("model",)``.
    Printed, a model issue still starts with ``model.``."""
    with pytest.raises(ConfigError) as info:
        validate({"model": {"n_layer": 2}}, {"n_layer": "many", "__not_a_mapping": None})
    got = [(e.document, e.loc) for e in info.value.errors]
    assert got == [("train", ("model",)), ("model", ("__not_a_mapping",)), ("model", ("n_layer",))]
    assert [e.path for e in info.value.errors] == [
        "model",
        "model.__not_a_mapping",
        "model.n_layer",
    ]
    with pytest.raises(ConfigError) as info:
        validate_configs(BASE_TRAIN, ["not", "a", "mapping"])  # type: ignore[arg-type]
    (issue,) = info.value.errors
    assert (issue.document, issue.loc, str(issue)) == (
        "model",
        (),
        "model: the model config must be a mapping (key: value), got list",
    )
    assert validate_configs(BASE_TRAIN, BASE_MODEL).plan.optimizer_steps == 20


# ---------------------------------------------------------------------------------------------------
# Unknown keys
# ---------------------------------------------------------------------------------------------------


def test_unknown_key_names_full_path_and_nearest_key():
    e = errors({"train": {"micro_batch_szie": 4}})
    assert e == {"train.micro_batch_szie": "unknown key; did you mean micro_batch_size?"}


def test_unknown_model_key_suggests():
    assert errors(model={"n_embed": 64}) == {"model.n_embed": "unknown key; did you mean n_embd?"}


def test_unknown_nested_optimizer_key():
    e = errors({"optimizer": {"init_args": {"lrr": 0.1}}})
    assert e == {"optimizer.init_args.lrr": "unknown key; did you mean lr?"}


def test_key_in_wrong_section_points_to_the_right_one():
    e = errors({"max_seq_length": 32})
    assert e == {"max_seq_length": "unknown key here; did you mean train.max_seq_length?"}


def test_model_key_in_train_config_says_where_it_belongs():
    assert errors({"n_layer": 2}) == {"n_layer": "unknown key; n_layer belongs in the model config"}
    assert errors(model={"micro_batch_size": 2}) == {
        "model.micro_batch_size": "unknown key; micro_batch_size belongs in the train config, as train.micro_batch_size"
    }


def test_unknown_key_without_a_close_match_lists_valid_keys():
    e = errors({"eval": {"zzz": 1}})
    assert e["eval.zzz"].startswith(
        "unknown key; valid keys here: interval, max_new_tokens, max_iters"
    )


# ---------------------------------------------------------------------------------------------------
# Field-level errors
# ---------------------------------------------------------------------------------------------------


def test_micro_batch_size_bound():
    assert errors({"train": {"micro_batch_size": 0}}) == {
        "train.micro_batch_size": "must be >= 1, got 0"
    }


def test_type_error_is_readable():
    assert errors({"train": {"micro_batch_size": "four"}}) == {
        "train.micro_batch_size": "expected an integer, got 'four'"
    }


def test_precision_allowlist():
    e = errors({"precision": "bf16"})
    assert e["precision"].startswith(
        "'bf16' is not allowed; choose one of 'bf16-mixed', 'bf16-true', '16-mixed'"
    )


def test_logger_name_only_csv():
    assert errors({"logger_name": "tensorboard"}) == {
        "logger_name": "'tensorboard' is not allowed; choose one of 'csv'"
    }


def test_missing_required_keys():
    train = copy.deepcopy(BASE_TRAIN)
    del train["data"]
    with pytest.raises(ConfigError) as info:
        validate_configs(train, BASE_MODEL)
    assert [str(e) for e in info.value.errors] == ["data: required key is missing"]
    e = errors({"data": {"init_args": {"train_data_path": None}}})
    assert e == {"data.init_args.train_data_path": "expected a string, got None"}


def test_data_class_path_allowlist_never_imports():
    e = errors({"data": {"class_path": "os.system"}})
    assert e == {
        "data.class_path": "'os.system' is not an allowed data module; allowed: litgpt.data.TextFiles (or TextFiles)"
    }
    assert validate().train.data.class_path == "litgpt.data.TextFiles"


def test_optimizer_class_path_allowlist():
    e = errors({"optimizer": {"class_path": "bitsandbytes.optim.AdamW8bit"}})
    assert e == {
        "optimizer.class_path": "'bitsandbytes.optim.AdamW8bit' is not an allowed optimizer; allowed: "
        "torch.optim.AdamW, torch.optim.Adam, torch.optim.SGD (or AdamW, Adam, SGD)"
    }


def test_optimizer_short_form_is_normalised():
    train = deep_merge(BASE_TRAIN, {"train": {"min_lr": 0.0}})
    train["optimizer"] = "Adam"
    v = validate_configs(train, BASE_MODEL)
    assert v.train.optimizer.class_path == "torch.optim.Adam"
    assert v.train.optimizer.torch_kwargs() == {
        "lr": 1e-3,
        "weight_decay": 0.0,
        "betas": (0.9, 0.999),
        "eps": 1e-8,
        "amsgrad": False,
    }
    train["optimizer"] = "RMSprop"
    with pytest.raises(
        ConfigError, match=r"optimizer.class_path: 'RMSprop' is not an allowed optimizer"
    ):
        validate_configs(train, BASE_MODEL)


def test_optimizer_defaults_follow_the_class():
    v = validate()
    assert v.train.optimizer.torch_kwargs() == {
        "lr": 1e-3,
        "weight_decay": 0.01,
        "betas": (0.9, 0.999),
        "eps": 1e-8,
        "amsgrad": False,
    }
    v = validate(
        {"optimizer": {"class_path": "SGD", "init_args": {"momentum": 0.9, "nesterov": True}}}
    )
    assert v.train.optimizer.torch_kwargs() == {
        "lr": 1e-3,
        "weight_decay": 0.0,
        "momentum": 0.9,
        "dampening": 0.0,
        "nesterov": True,
    }


def test_optimizer_argument_of_another_class_is_refused():
    e = errors({"optimizer": {"class_path": "SGD", "init_args": {"betas": [0.9, 0.95]}}})
    assert e == {
        "optimizer.init_args.betas": "not an argument of torch.optim.SGD; SGD accepts: lr, weight_decay, momentum, "
        "dampening, nesterov"
    }


def test_sgd_nesterov_needs_momentum():
    e = errors({"optimizer": {"class_path": "SGD", "init_args": {"nesterov": True}}})
    assert e == {
        "optimizer.init_args.nesterov": "Nesterov momentum needs momentum > 0 and dampening 0 (got momentum=0, dampening=0)"
    }


def test_betas_range():
    e = errors({"optimizer": {"init_args": {"betas": [0.9, 1.0]}}})
    assert e == {"optimizer.init_args.betas": "each beta must be in [0, 1), got [0.9, 1.0]"}


def test_lr_must_be_positive():
    assert errors({"optimizer": {"init_args": {"lr": 0}}}) == {
        "optimizer.init_args.lr": "must be > 0, got 0"
    }


def test_devices_positive_or_auto():
    assert errors({"devices": 0}) == {
        "devices": "must be a positive integer (>= 1) or 'auto', got 0"
    }
    assert errors({"devices": "all"}) == {
        "devices": "must be a positive integer or 'auto', got 'all'"
    }
    assert (
        validate(
            {"devices": "2", "train": {"global_batch_size": 8, "max_tokens": 5120}}
        ).train.devices
        == 2
    )


def test_resume_forms():
    assert validate({"resume": "auto"}).train.resume == "auto"
    assert validate({"resume": True}).train.resume is True
    assert validate({"resume": "out/test/step-00000005"}).train.resume == "out/test/step-00000005"
    assert errors({"resume": 3}) == {
        "resume": "must be true, false, 'auto' or a checkpoint folder path, got 3"
    }


def test_max_tokens_accepts_scientific_notation_string():
    # PyYAML reads `3e6` (no dot) as a string
    v = validate({"train": {"max_tokens": "3e6"}})
    assert v.train.train.max_tokens == 3_000_000


def test_numbers_must_be_finite_and_fit_int64():
    """YAML's .inf/.nan and integers past int64 (which no database column or tensor holds)
    are errors naming the field, in every section."""
    assert errors({"train": {"max_norm": float("inf")}}) == {
        "train.max_norm": "must be a finite number, got inf"
    }
    assert errors({"optimizer": {"init_args": {"lr": float("nan")}}}) == {
        "optimizer.init_args.lr": "must be a finite number, got nan"
    }
    big = 10**30
    message = "must be at most 9,223,372,036,854,775,807 in absolute value (int64), got a number with 31 digits"
    assert errors({"train": {"max_tokens": big}}, {"vocab_size": big}) == {
        "train.max_tokens": message,
        "model.vocab_size": message,
    }
    # the seed feeds NumPy's generators: 0 to 2**32-1
    assert errors({"seed": 2**32}) == {"seed": f"must be <= {2**32 - 1}, got {2**32}"}
    assert errors({"seed": -1}) == {"seed": "must be >= 0, got -1"}
    assert errors({"train": {"max_tokens": "1e30"}}) == {"train.max_tokens": message}
    assert validate({"train": {"max_tokens": 2**62}}).train.train.max_tokens == 2**62


def test_n_layer_has_an_upper_bound():
    assert errors(model={"n_layer": 1025}) == {"model.n_layer": "must be <= 1024, got 1025"}
    assert validate(model={"n_layer": 1024}).model.n_layer == 1024


def test_warmup_fraction_range():
    assert errors({"train": {"lr_warmup_fraction": 1.5}}) == {
        "train.lr_warmup_fraction": "must be <= 1, got 1.5"
    }


def test_mlp_and_norm_class_allowlists():
    e = errors(model={"mlp_class_name": "SwiGLU"})
    assert e == {
        "model.mlp_class_name": "'SwiGLU' is not allowed; choose one of 'GptNeoxMLP', 'LLaMAMLP', "
        "'GemmaMLP' or 'LLaMAMoE'"
    }
    e = errors(model={"norm_class_name": "BatchNorm"})
    assert e == {
        "model.norm_class_name": "'BatchNorm' is not allowed; choose one of 'LayerNorm' or 'RMSNorm'"
    }


# ---------------------------------------------------------------------------------------------------
# Cross-field rules
# ---------------------------------------------------------------------------------------------------


def test_global_batch_size_divisible_by_micro_batch_times_devices():
    e = errors({"devices": 2, "train": {"global_batch_size": 6}})
    assert e == {
        "train.global_batch_size": "global_batch_size (6) must be divisible by micro_batch_size x devices x num_nodes "
        "= 2 x 2 x 1 = 4 (LitGPT would silently floor it); e.g. use 4 or 8"
    }


def test_global_batch_size_smaller_than_one_micro_batch_per_device():
    e = errors({"num_nodes": 2, "devices": 2, "train": {"global_batch_size": 2}})
    assert e == {
        "train.global_batch_size": "global_batch_size (2) must be divisible by micro_batch_size x devices x "
        "num_nodes = 2 x 2 x 2 = 8 (LitGPT would silently floor it); e.g. use 8"
    }


def test_n_embd_divisible_by_n_head():
    assert errors(model={"n_embd": 66}) == {
        "model.n_embd": "n_embd (66) must be divisible by n_head (4) when head_size is not set "
        "(head_size = n_embd / n_head = 16.5)"
    }


def test_explicit_head_size_lifts_the_divisibility_rule():
    v = validate(model={"n_embd": 72, "head_size": 16})
    assert v.model.resolved_head_size == 16


def test_n_head_divisible_by_n_query_groups():
    assert errors(model={"n_query_groups": 3}) == {
        "model.n_query_groups": "n_head (4) must be divisible by n_query_groups (3)"
    }


def test_rope_needs_an_even_number_of_dimensions():
    assert errors(model={"head_size": 15, "n_embd": 64}) == {
        "model.rotary_percentage": "rotary_percentage x head_size = 1.0 x 15 gives 15 rotary dimensions; "
        "RoPE needs an even number"
    }


@pytest.mark.parametrize("k", [0, 5])
def test_n_expert_per_token_between_1_and_n_expert(k):
    assert errors(model={"n_expert_per_token": k}) == {
        "model.n_expert_per_token": f"n_expert_per_token ({k}) must be between 1 and n_expert (4) for "
        "mlp_class_name LLaMAMoE"
    }


def test_moe_requires_experts():
    assert errors(model={"n_expert": 0}) == {
        "model.n_expert": "mlp_class_name LLaMAMoE requires n_expert >= 1, got 0"
    }


def test_moe_requires_moe_intermediate_size():
    model = copy.deepcopy(BASE_MODEL)
    del model["moe_intermediate_size"]
    with pytest.raises(ConfigError) as info:
        validate_configs(BASE_TRAIN, model)
    assert [str(e) for e in info.value.errors] == [
        "model.moe_intermediate_size: mlp_class_name LLaMAMoE requires moe_intermediate_size (the width of each expert)"
    ]


def test_llama_mlp_requires_intermediate_size():
    e = errors(model={"mlp_class_name": "LLaMAMLP", "n_expert": 0})
    assert e == {"model.intermediate_size": "mlp_class_name LLaMAMLP requires intermediate_size"}


def test_first_k_dense_replace_needs_moe():
    e = errors(model={"mlp_class_name": "GptNeoxMLP", "n_expert": 0, "first_k_dense_replace": 1})
    assert e == {
        "model.first_k_dense_replace": "first_k_dense_replace needs mlp_class_name LLaMAMoE, got GptNeoxMLP"
    }


def test_shared_attention_norm_needs_parallel_residual():
    e = errors(model={"shared_attention_norm": True})
    assert e == {
        "model.shared_attention_norm": "shared_attention_norm needs parallel_residual true (LitGPT has no "
        "non-parallel residual with a shared attention norm)"
    }


def test_max_seq_length_within_block_size():
    assert errors({"train": {"max_seq_length": 128}}) == {
        "train.max_seq_length": "max_seq_length (128) must be <= the model's block_size (64)"
    }


def test_vocab_size_within_padded_vocab_size():
    assert errors(model={"vocab_size": 300}) == {
        "model.vocab_size": "vocab_size (300) must be <= padded_vocab_size (256); LitGPT would silently cut "
        "vocab_size to 256"
    }


def test_max_tokens_must_cover_one_optimizer_step():
    assert errors({"train": {"max_tokens": 100}}) == {
        "train.max_tokens": "max_tokens (100) does not cover one optimizer step: it gives 1 micro-batch of 2 x 32 = "
        "64 tokens per device, but one step needs 2 (global_batch_size 4 / micro_batch_size 2 / 1 device); "
        "raise max_tokens to at least 128"
    }


def test_min_lr_not_above_lr():
    assert errors({"train": {"min_lr": 0.01}}) == {
        "train.min_lr": "min_lr (0.01) must be <= the optimizer's lr (0.001): the cosine schedule decays from lr to min_lr"
    }


def test_warmup_steps_and_fraction_not_both():
    assert errors({"train": {"lr_warmup_steps": 2, "lr_warmup_fraction": 0.1}}) == {
        "train.lr_warmup_fraction": "set either lr_warmup_steps (2) or lr_warmup_fraction (0.1), not both"
    }


def test_warmup_fraction_alone_replaces_pretrains_default_steps():
    train = copy.deepcopy(BASE_TRAIN)
    del train["train"]["lr_warmup_steps"]  # pretrain's default is 2000
    assert validate_configs(train, BASE_MODEL).train.train.lr_warmup_steps == 2000
    train["train"]["lr_warmup_fraction"] = 0.1
    v = validate_configs(train, BASE_MODEL)
    assert v.train.train.lr_warmup_steps is None and v.train.train.lr_warmup_fraction == 0.1


def test_tokenizer_dir_required():
    assert errors({"tokenizer_dir": None}) == {
        "tokenizer_dir": "tokenizer_dir is required: TextFiles tokenizes the text with it (train one with "
        "`moejobs tokenizer train --data DIR --out DIR`)"
    }


def test_initial_checkpoint_dir_with_resume_auto_or_true_but_not_a_path():
    """A fine-tune run re-queued with resume: auto continues its own checkpoint (the engine uses
    the initial weights only while it has none), so auto and true are valid with
    initial_checkpoint_dir; a resume path would replace the initial weights and is refused."""
    for resume in ("auto", True, False):
        v = validate({"initial_checkpoint_dir": "ckpt", "resume": resume})
        assert v.train.resume == resume and v.train.initial_checkpoint_dir == "ckpt"
        assert v.warnings == []
    assert errors({"initial_checkpoint_dir": "ckpt", "resume": "out/test/step-00000005"}) == {
        "initial_checkpoint_dir": "initial_checkpoint_dir and resume: out/test/step-00000005 cannot be combined: "
        "the checkpoint path would replace the initial weights; use resume: auto (continue this run's own newest "
        "checkpoint, start from initial_checkpoint_dir while it has none) or drop one of the two"
    }


def test_resume_allow_changes():
    assert validate().train.resume_allow_changes == []
    assert validate(
        {
            "resume": "auto",
            "resume_allow_changes": ["data", "tokenizer", "schedule", "batch", "seq_len"],
        }
    ).train.resume_allow_changes == ["data", "tokenizer", "schedule", "batch", "seq_len"]
    # one entry or a comma-separated string (a flag's value) reads as a list; null as none
    assert validate(
        {"resume": "auto", "resume_allow_changes": "data"}
    ).train.resume_allow_changes == ["data"]
    assert validate(
        {"resume": "auto", "resume_allow_changes": "data, schedule"}
    ).train.resume_allow_changes == ["data", "schedule"]
    assert (
        validate({"resume": "auto", "resume_allow_changes": None}).train.resume_allow_changes == []
    )
    assert errors({"resume": "auto", "resume_allow_changes": ["data", "lr"]}) == {
        "resume_allow_changes[1]": "'lr' is not allowed; choose one of 'data', 'tokenizer', 'schedule', 'batch' "
        "or 'seq_len'"
    }
    assert errors({"resume_allow_changes": 3}) == {"resume_allow_changes": "expected a list, got 3"}
    # with resume: false it still matters: the service resumes later attempts of a run automatically
    assert warnings({"resume": False, "resume_allow_changes": ["data"]}) == {}
    prop = train_config_json_schema()["properties"]["resume_allow_changes"]
    assert prop["type"] == "array" and prop["uniqueItems"] is True
    assert prop["items"]["enum"] == ["data", "tokenizer", "schedule", "batch", "seq_len"]
    assert "max_tokens" in prop["description"]


def test_model_lists_and_groups():
    assert errors(model={"sliding_window_size": 16, "sliding_window_indices": [1]}) == {
        "model.sliding_window_indices": "sliding_window_indices needs one 0/1 entry per layer (n_layer=2), got 1"
    }
    e = errors(model={"n_expert_groups": 3})
    assert e == {"model.n_expert_groups": "n_expert_groups (3) must be > 1 and divide n_expert (4)"}


def test_not_a_mapping() -> None:
    with pytest.raises(ConfigError) as info:
        validate_configs(["a"], "b")  # type: ignore[arg-type]
    assert [str(e) for e in info.value.errors] == [
        "the train config must be a mapping (key: value), got list",
        "model: the model config must be a mapping (key: value), got str",
    ]


# ---------------------------------------------------------------------------------------------------
# Warnings
# ---------------------------------------------------------------------------------------------------


def test_warning_few_optimizer_steps():
    w = warnings(
        {
            "train": {"max_tokens": 1024, "lr_warmup_steps": 1, "save_interval": 2},
            "eval": {"interval": 2},
        }
    )
    assert w == {
        "train.max_tokens": "only 8 optimizer steps will run: max_tokens 1,024 gives 16 micro-batches of 64 tokens "
        "per device and each step takes 2 micro-batches (global_batch_size 4 / micro_batch_size 2 / 1 device)"
    }


def test_warning_dropped_micro_batches():
    w = warnings({"train": {"max_tokens": 2560 + 64}})
    assert w == {
        "train.max_tokens": "the last micro-batch (64 tokens) does not fill a whole optimizer step of 2 micro-batches, "
        "so it is never trained (LitGPT would compute it and drop its gradients): 2,560 of max_tokens 2,624 tokens "
        "are trained"
    }
    # 2 devices, 3 micro-batches per step: 62 micro-batches per device = 20 steps + 2 left over
    w = warnings({"devices": 2, "train": {"global_batch_size": 12, "max_tokens": 62 * 64 * 2}})
    assert w == {
        "train.max_tokens": "the last 2 micro-batches per device (256 tokens) do not fill a whole optimizer step of 3 "
        "micro-batches, so they are never trained (LitGPT would compute them and drop their gradients): 7,680 of "
        "max_tokens 7,936 tokens are trained"
    }


def test_warning_warmup_longer_than_run():
    w = warnings({"train": {"lr_warmup_steps": 25}})
    assert w == {
        "train.lr_warmup_steps": "the warm-up of 25 optimizer steps (50 micro-batches) is longer than the run "
        "(20 steps, 40 micro-batches): the learning rate never reaches its peak 0.001; it reaches at most 80% of it "
        "(0.0008) at step 20"
    }


def test_warning_save_interval_larger_than_run():
    w = warnings({"train": {"save_interval": 20}})
    assert w == {
        "train.save_interval": "save_interval (20) is not smaller than the run's 20 optimizer steps: no intermediate "
        "checkpoint is written, so a run that crashes or is killed (kill -9, a lost machine) starts over; "
        "a stop by SIGTERM or Ctrl-C still checkpoints and resumes"
    }


def test_warning_rotary_percentage_default():
    model = copy.deepcopy(BASE_MODEL)
    del model["rotary_percentage"]
    w = {x.path: x.message for x in validate_configs(BASE_TRAIN, model).warnings}
    assert w == {
        "model.rotary_percentage": "rotary_percentage is not set, so LitGPT's default 0.25 applies: RoPE covers 4 of "
        "the 16 dimensions of each head (LLaMA and Mixtral configs in LitGPT use 1.0)"
    }
    # explicitly set to 0.25: intended, no warning
    assert warnings(model={"rotary_percentage": 0.25}) == {}


def test_warning_16_mixed():
    assert warnings({"precision": "16-mixed"}) == {
        "precision": "16-mixed: where no CUDA GPU is present, Lightning runs 16-mixed as bf16 (bf16 autocast), not "
        "fp16; on a GPU it is fp16 autocast with a gradient scaler"
    }


def test_warning_no_validation_at_all():
    assert warnings({"eval": {"interval": 0, "final_validation": False}}) == {
        "eval.interval": "eval.interval is 0 (off) and eval.final_validation is false: the run computes no "
        "validation loss at all (val_loss and val_ppl stay empty in metrics.csv)"
    }
    assert warnings({"eval": {"interval": 50, "final_validation": False}}) == {
        "eval.interval": "eval.interval is 50, more than the run's 20 steps and eval.final_validation is false: the "
        "run computes no validation loss at all (val_loss and val_ppl stay empty in metrics.csv)"
    }
    assert warnings({"eval": {"interval": 0}}) == {}  # final validation still runs


def test_warning_max_steps_stops_early():
    assert warnings({"train": {"max_steps": 10}}) == {
        "train.max_steps": "max_steps (10) stops the run before max_tokens is used up (20 steps): 1,280 of 2,560 "
        "tokens are trained and the cosine schedule decays over 10 steps (LitGPT's pretrain would ignore max_steps)"
    }


def test_warning_max_steps_without_effect():
    assert warnings({"train": {"max_steps": 100}}) == {
        "train.max_steps": "max_steps (100) has no effect: max_tokens 2,560 allows only 20 optimizer steps"
    }


def test_warning_epochs_ignored():
    assert warnings({"train": {"epochs": 3}}) == {
        "train.epochs": "epochs (3) is ignored: pretraining length is set by max_tokens (and max_steps/max_time); "
        "LitGPT's pretrain refuses epochs"
    }


def test_warning_devices_auto():
    assert warnings({"devices": "auto"}) == {
        "devices": "devices is 'auto' (LitGPT's default): Lightning would use every visible GPU (1 process on a CPU); "
        "the step and token numbers here assume 1 device (20 steps); set devices explicitly"
    }


def test_warning_reduce_overhead_with_dynamic_shapes():
    w = warnings(
        {
            "optimization": {
                "compile": True,
                "compile_mode": "reduce-overhead",
                "compile_dynamic": True,
            }
        }
    )
    assert w == {
        "optimization.compile_dynamic": "compile_dynamic true compiles shape-generic kernels although every training "
        "micro-batch has the same shape (2 x 32); with compile_mode reduce-overhead, CUDA graphs are recorded per "
        "concrete shape anyway, so dynamic shapes add compile work and can slow kernels (null lets torch decide)"
    }
    assert (
        warnings(
            {
                "optimization": {
                    "compile": False,
                    "compile_mode": "reduce-overhead",
                    "compile_dynamic": True,
                }
            }
        )
        == {}
    )


def test_warning_flash_forced_with_32_true():
    assert warnings({"optimization": {"flash_attention_force": True}}) == {
        "optimization.flash_attention_force": "flash_attention_force with precision 32-true cannot run: "
        "flash-attention kernels need bf16/fp16 on a CUDA GPU, so the engine's pre-flight check will refuse this run"
    }


def test_warning_experts_without_moe():
    w = warnings(model={"mlp_class_name": "GptNeoxMLP"})
    assert w == {
        "model.n_expert": "n_expert (4) is ignored: mlp_class_name is GptNeoxMLP, not LLaMAMoE"
    }


def test_warning_max_new_tokens_ignored():
    assert warnings({"eval": {"max_new_tokens": 50}}) == {
        "eval.max_new_tokens": "max_new_tokens (50) is ignored by pretraining (LitGPT's pretrain refuses it)"
    }


# ---------------------------------------------------------------------------------------------------
# Shipped configs
# ---------------------------------------------------------------------------------------------------

SHIPPED_WARNINGS = [
    # litgpt-facts.md, "What the shipped defaults really do"
    ("train.max_tokens", "only 4 optimizer steps will run"),
    (
        "train.max_tokens",
        "the last 28 micro-batches (57,344 tokens) do not fill a whole optimizer step of 32 "
        "micro-batches",
    ),
    ("train.lr_warmup_steps", "the learning rate never reaches its peak"),
    ("train.save_interval", "no intermediate checkpoint is written"),
    (
        "model.rotary_percentage",
        "LitGPT's default 0.25 applies: RoPE covers 16 of the 64 dimensions",
    ),
    # and the other consequences of the spec's values
    ("eval.interval", "no validation loss at all"),
    ("devices", "devices is 'auto'"),
    ("optimization.compile_dynamic", "compile_dynamic true"),
]


def test_shipped_configs_validate_with_the_documented_warnings():
    v = resolve(CONFIGS / "train_config.yaml", CONFIGS / "model_config.yaml")
    got = [(w.path, w.message) for w in v.warnings]
    assert len(got) == len(SHIPPED_WARNINGS)
    for (path, fragment), (gpath, gmsg) in zip(SHIPPED_WARNINGS, got, strict=True):
        assert gpath == path and fragment in gmsg, (gpath, gmsg)
    assert v.model.name == "MoE-200M"
    assert v.train.optimizer.lr == 0.0003 and v.train.optimizer.init_args.weight_decay == 0.01


def test_smoke_test_validates_and_warns_about_the_single_step():
    v = resolve(CONFIGS / "train_config.yaml", CONFIGS / "model_config.yaml", smoke_test=True)
    w = {x.path: x.message for x in v.warnings}
    assert w["train.max_tokens"].startswith("only 1 optimizer step will run")
    assert w["train.lr_warmup_steps"].endswith("it reaches at most 20% of it (6e-05) at step 1")
    assert v.train.precision == "32-true"


@pytest.mark.parametrize("preset", sorted(p.stem for p in (CONFIGS / "presets").glob("*.yaml")))
def test_every_preset_validates_merged_over_the_shipped_configs(preset):
    v = resolve(CONFIGS / "train_config.yaml", CONFIGS / "model_config.yaml", preset=preset)
    assert v.train and v.model


def test_cpu_tiny_has_no_warnings():
    v = resolve(CONFIGS / "train_config.yaml", CONFIGS / "model_config.yaml", preset="cpu-tiny")
    assert v.warnings == []


def test_every_shipped_yaml_parses_into_its_schema():
    for path in sorted(CONFIGS.rglob("*.yaml")):
        doc = load_document(path)
        if path.parent.name == "presets":
            assert set(load_preset(path)) == {"train_config", "model_config"}
        else:
            assert doc


# ---------------------------------------------------------------------------------------------------
# Schema coverage and JSON Schema
# ---------------------------------------------------------------------------------------------------


def _walk_properties(schema: dict):
    yield from schema.get("properties", {}).items()
    for sub in schema.get("$defs", {}).values():
        yield from _walk_properties(sub)


@pytest.mark.parametrize("make", [train_config_json_schema, model_config_json_schema])
def test_json_schema_has_a_description_on_every_field(make):
    schema = make()
    json.dumps(schema)  # serialisable
    props = list(_walk_properties(schema))
    assert len(props) > 20
    missing = [name for name, prop in props if not prop.get("description")]
    assert missing == []


def test_json_schema_documents_allowlists_and_short_form():
    schema = train_config_json_schema()
    opt = schema["properties"]["optimizer"]
    assert {
        "type": "string",
        "enum": [
            "Adam",
            "AdamW",
            "SGD",
            "torch.optim.Adam",
            "torch.optim.AdamW",
            "torch.optim.SGD",
        ],
    } in opt["anyOf"]
    assert schema["additionalProperties"] is False


def test_warning_unaligned_widths_for_the_grouped_moe_kernel():
    w = warnings(model={"moe_intermediate_size": 100}, train={"precision": "bf16-mixed"})
    assert w == {
        "optimization.moe_implementation": "the grouped MoE kernel needs 16-byte rows (bf16-mixed: widths divisible "
        "by 8) but moe_intermediate_size (100) is not: every expert then runs on every token (4 instead of 2 experts "
        "per token, 2x the expert FLOPs)"
    }
    assert warnings(model={"moe_intermediate_size": 100}) == {}  # 32-true: 400-byte rows are fine
    assert (
        warnings(
            model={"moe_intermediate_size": 100},
            train={"optimization": {"moe_implementation": "loop"}, "precision": "bf16-mixed"},
        )
        == {}
    )


def test_warning_router_losses_without_moe():
    w = warnings(
        {"train": {"moe_aux_loss_coef": 0.01}},
        {"mlp_class_name": "LLaMAMLP", "intermediate_size": 128, "n_expert": 0},
    )
    assert w == {
        "train.moe_aux_loss_coef": "router losses are ignored: the model has no MoE layers "
        "(mlp_class_name LLaMAMLP)"
    }


def test_empty_sections_mean_defaults():
    v = validate({"eval": None, "log": None})
    assert v.train.eval.interval == 1000 and v.train.eval.final_validation is True


def test_validated_configs_survive_a_json_round_trip():
    v = validate({"optimizer": "SGD", "train": {"min_lr": 0}})
    again = validate_configs(v.train.model_dump(mode="json"), v.model.model_dump(mode="json"))
    assert again.train == v.train and again.model == v.model


# ---------------------------------------------------------------------------------------------------
# Same names, types and defaults as LitGPT
# ---------------------------------------------------------------------------------------------------


def test_model_config_has_every_litgpt_config_field_with_its_default():
    litgpt = pytest.importorskip("litgpt")
    import dataclasses

    ours = ModelConfig.model_fields
    for f in dataclasses.fields(litgpt.Config):
        assert f.name in ours, f.name
        default = f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default
        assert ours[f.name].get_default(call_default_factory=True) == default, f.name
    assert set(ours) == {f.name for f in dataclasses.fields(litgpt.Config)}


def test_model_kwargs_build_the_same_litgpt_config():
    litgpt = pytest.importorskip("litgpt")
    m = validate().model
    cfg = litgpt.Config(**m.litgpt_kwargs())
    assert (
        cfg.head_size,
        cfg.padded_vocab_size,
        cfg.n_query_groups,
        cfg.intermediate_size,
        cfg.rope_n_elem,
    ) == (
        m.resolved_head_size,
        m.resolved_padded_vocab_size,
        m.resolved_n_query_groups,
        m.resolved_intermediate_size,
        m.rope_n_elem,
    )


def test_train_config_has_pretrains_keys_and_defaults():
    pretrain = pytest.importorskip("litgpt.pretrain")
    import dataclasses
    import inspect

    from litgpt.args import EvalArgs, LogArgs, TrainArgs

    from service.config.train import EvalArgs as OurEval
    from service.config.train import LogArgs as OurLog
    from service.config.train import TrainArgs as OurTrain

    params = inspect.signature(pretrain.setup).parameters
    # top-level keys of `litgpt pretrain` (model_name/model_config live in the model document)
    for name in params:
        if name not in ("model_name", "model_config"):
            assert name in TrainConfig.model_fields, name
    # deliberate differences: precision None (auto) -> bf16-mixed, tensorboard -> csv, data TinyLlama -> required
    same = ["initial_checkpoint_dir", "resume", "devices", "num_nodes", "tokenizer_dir", "seed"]
    for name in same:
        assert TrainConfig.model_fields[name].get_default() == params[name].default, name
    assert TrainConfig.model_fields["out_dir"].get_default() == str(params["out_dir"].default)
    for ours, theirs, setup_default in (
        (OurTrain, TrainArgs, params["train"].default),
        (OurEval, EvalArgs, params["eval"].default),
        (OurLog, LogArgs, params["log"].default),
    ):
        for f in dataclasses.fields(theirs):
            assert f.name in ours.model_fields, f.name
            assert ours.model_fields[f.name].get_default(call_default_factory=True) == getattr(
                setup_default, f.name
            ), (theirs.__name__, f.name)


def test_config_modules_never_import_torch_or_litgpt():
    import subprocess
    import sys

    code = (
        "import sys, service.config.merge, service.config.paths, service.estimate; "
        "print(sorted(m for m in ('torch', 'litgpt', 'lightning') if m in sys.modules))"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, check=True
    )
    assert out.stdout.strip() == "[]"
