"""Loading, merging, presets and precedence (service.config.parse, .presets, .merge)."""

from __future__ import annotations

import pytest
import yaml

from service.config.issues import ConfigError
from service.config.merge import deep_merge, resolve, resolve_documents
from service.config.parse import load_document
from service.config.presets import PRESETS_DIR, SMOKE_TEST_OVERRIDES, list_presets, load_preset
from tests.support import REPO, configs

CONFIGS = REPO / "configs"
TRAIN = CONFIGS / "train_config.yaml"
MODEL = CONFIGS / "model_config.yaml"


def test_load_yaml_and_json(tmp_path):
    y = tmp_path / "a.yaml"
    y.write_text("train:\n  micro_batch_size: 2\n")
    assert load_document(y) == {"train": {"micro_batch_size": 2}}
    j = tmp_path / "a.json"
    j.write_text('{"train": {"micro_batch_size": 3}}')
    assert load_document(j) == {"train": {"micro_batch_size": 3}}
    empty = tmp_path / "empty.yaml"
    empty.write_text("# nothing\n")
    assert load_document(empty) == {}


def test_missing_file_names_the_path(tmp_path):
    missing = tmp_path / "nope.yaml"
    with pytest.raises(ConfigError) as info:
        load_document(missing)
    assert str(info.value) == f"{missing}: file not found"


def test_yaml_syntax_error_names_file_and_line(tmp_path):
    bad = configs.path("invalid_unclosed_bracket")
    with pytest.raises(ConfigError) as info:
        load_document(bad)
    text = str(info.value)
    assert text.startswith(f"{bad}: invalid YAML at line ")
    line = int(text.split("line ")[1].split(",")[0])
    assert line in (3, 4)


def test_json_syntax_error_names_file_and_line(tmp_path):
    bad = tmp_path / "bad.json"
    bad.write_text('{\n  "train": {,}\n}')
    with pytest.raises(ConfigError, match=r"bad\.json: invalid JSON at line 2, column 13"):
        load_document(bad)


def test_a_key_given_twice_is_an_error_not_a_silent_overwrite(tmp_path):
    dup = configs.path("invalid_duplicate_key")
    with pytest.raises(ConfigError) as info:
        load_document(dup)
    assert str(info.value) == (
        f"{dup}: invalid YAML at line 4, column 3: duplicate key "
        f"'micro_batch_size' (first given on line 2)"
    )
    dup_json = tmp_path / "dup.json"
    dup_json.write_text('{"train": {"max_tokens": 1, "max_tokens": 2}}')
    with pytest.raises(ConfigError, match=r"dup\.json: invalid JSON: duplicate key 'max_tokens'"):
        load_document(dup_json)
    # YAML merge keys still override, as YAML defines them (with the mapping written in place:
    # aliases are refused, test below)
    merged = tmp_path / "merge.yaml"
    merged.write_text("opt:\n  <<: {lr: 1}\n  lr: 2\n")
    assert load_document(merged)["opt"] == {"lr": 2}


def test_files_are_read_by_the_api_parser_aliases_and_non_json_values_refused(tmp_path):
    """One parser for files and HTTP bodies (issue 10): a config file is refused where the API
    refuses the same document, naming the file."""
    alias = configs.path("invalid_alias")
    with pytest.raises(ConfigError) as info:
        load_document(alias)
    assert str(info.value) == (
        f"{alias}: invalid YAML at line 3, column 7: YAML aliases (*name) are not accepted "
        "by the API; write the value out"
    )
    dated = configs.path("invalid_date")
    with pytest.raises(ConfigError) as info:
        load_document(dated)
    assert str(info.value) == (
        f"{dated}: log.metadata.day: a date is not a JSON value (YAML reads dates and tagged "
        "values as such: quote it)"
    )
    nan = tmp_path / "nan.json"
    nan.write_text('{"rope_adjustments": {"factor": NaN}}')
    with pytest.raises(ConfigError, match=r"nan\.json: rope_adjustments\.factor: must be a finite"):
        load_document(nan)
    deep = tmp_path / "deep.yaml"
    deep.write_text("a: " + "[" * 5000 + "]" * 5000 + "\n")
    with pytest.raises(ConfigError, match=r"deep\.yaml: "):
        load_document(deep)


def test_top_level_must_be_a_mapping(tmp_path):
    bad = configs.path("invalid_top_level_list")
    with pytest.raises(ConfigError) as info:
        load_document(bad)
    assert str(info.value) == f"{bad}: the top level must be a mapping (key: value), got list"


def test_folder_is_not_a_config(tmp_path):
    with pytest.raises(ConfigError, match="is a folder, not a config file"):
        load_document(tmp_path)


def test_deep_merge_merges_mappings_and_replaces_the_rest_without_mutating():
    base = {"a": {"b": 1, "c": [1, 2]}, "optimizer": {"class_path": "AdamW"}, "x": 1}
    over = {"a": {"c": [3], "d": 4}, "optimizer": "SGD"}
    merged = deep_merge(base, over)
    assert merged == {"a": {"b": 1, "c": [3], "d": 4}, "optimizer": "SGD", "x": 1}
    assert base == {"a": {"b": 1, "c": [1, 2]}, "optimizer": {"class_path": "AdamW"}, "x": 1}
    merged["a"]["c"].append(9)
    assert over["a"]["c"] == [3]


def test_presets_by_name_and_by_path():
    assert {"cpu-tiny", "production"} <= set(list_presets())
    by_name = load_preset("cpu-tiny")
    by_path = load_preset(PRESETS_DIR / "cpu-tiny.yaml")
    assert by_name == by_path
    assert by_name["model_config"]["n_expert"] == 4
    assert load_preset("production")["model_config"] == {}


def test_unknown_preset_lists_the_available_ones():
    with pytest.raises(ConfigError) as info:
        load_preset("gpu-huge")
    text = str(info.value)
    assert text.startswith("unknown preset 'gpu-huge': no file ")
    assert "cpu-tiny" in text and "production" in text


def test_preset_with_another_key_is_refused(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("train_config: {}\ntrain:\n  micro_batch_size: 1\n")
    with pytest.raises(ConfigError) as info:
        load_preset(bad)
    assert str(info.value) == (
        f"{bad}: unknown preset key 'train'; a preset may only have train_config and model_config"
    )


def test_preset_section_must_be_a_mapping(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("model_config: 3\n")
    with pytest.raises(ConfigError, match="model_config must be a mapping"):
        load_preset(bad)


def test_smoke_test_overrides_are_the_specs():
    assert SMOKE_TEST_OVERRIDES == {
        "train": {
            "micro_batch_size": 1,
            "global_batch_size": 1,
            "max_tokens": 64,
            "max_seq_length": 64,
        },
        "precision": "32-true",
        "logger_name": "csv",
    }


def test_shipped_files_are_the_specs_values():
    train = load_document(TRAIN)
    assert train["train"] == {
        "global_batch_size": 128,
        "log_interval": 1,
        "max_tokens": 320000,
        "lr_warmup_steps": 5,
        "micro_batch_size": 4,
        "save_interval": 500,
        "gradient_checkpointing": False,
        "max_norm": 1.0,
        "max_seq_length": 512,
    }
    assert load_document(MODEL)["n_expert"] == 8


def test_precedence_files_preset_smoke_overrides(tmp_path):
    preset = tmp_path / "p.yaml"
    preset.write_text(
        yaml.safe_dump(
            {
                "train_config": {
                    "out_dir": "from-preset",
                    "precision": "bf16-true",
                    "train": {"micro_batch_size": 2},
                },
                "model_config": {"n_layer": 3},
            }
        )
    )
    # the preset beats the files
    train, model = resolve_documents(TRAIN, MODEL, preset=preset)
    assert (train["out_dir"], train["precision"], train["train"]["micro_batch_size"]) == (
        "from-preset",
        "bf16-true",
        2,
    )
    assert (
        train["train"]["global_batch_size"] == 128
        and model["n_layer"] == 3
        and model["n_embd"] == 768
    )
    # the smoke test beats the preset
    train, _ = resolve_documents(TRAIN, MODEL, preset=preset, smoke_test=True)
    assert (train["precision"], train["train"]["micro_batch_size"], train["out_dir"]) == (
        "32-true",
        1,
        "from-preset",
    )
    # explicit overrides beat everything
    train, model = resolve_documents(
        TRAIN,
        MODEL,
        preset=preset,
        smoke_test=True,
        train_overrides={"train": {"micro_batch_size": 1, "global_batch_size": 2}},
        model_overrides={"n_layer": 1},
    )
    assert train["train"]["global_batch_size"] == 2 and model["n_layer"] == 1
    assert train["train"]["max_tokens"] == 64


def test_resolve_validates_and_reports_the_dotted_key():
    v = resolve(TRAIN, MODEL, preset="cpu-tiny", train_overrides={"train": {"micro_batch_size": 4}})
    assert v.train.train.micro_batch_size == 4 and v.model.n_layer == 4
    with pytest.raises(ConfigError) as info:
        resolve(TRAIN, MODEL, train_overrides={"train": {"micro_batch_size": 3}})
    assert [e.path for e in info.value.errors] == ["train.global_batch_size"]


def test_resolve_with_documents_instead_of_files():
    train, model = resolve_documents(
        None,
        None,
        train_doc=load_document(TRAIN),
        model_doc=load_document(MODEL),
        preset="cpu-tiny",
    )
    assert model["n_embd"] == 128 and train["out_dir"] == "./out/cpu-tiny"
