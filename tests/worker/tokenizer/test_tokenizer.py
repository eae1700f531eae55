"""Tokenizer folders: training, the checks made before training, and the demo corpus."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from tests.support import REPO
from worker.corpus import build_corpus, stdlib_sources
from worker.errors import DataError
from worker.tokenizer import TOKENIZER_FILES, load_tokenizer, tokenizer_hash, train_tokenizer


@pytest.fixture(scope="module")
def small_corpus(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("text")
    for src in stdlib_sources()[:12]:
        (folder / f"{src.stem}.txt").write_bytes(src.read_bytes())
    return folder


@pytest.fixture(scope="module")
def tokenizer_dir(small_corpus, tmp_path_factory) -> Path:
    return train_tokenizer(
        [small_corpus], tmp_path_factory.mktemp("tok") / "tokenizer", vocab_size=1024
    )


def test_trained_tokenizer_round_trips_and_has_bos(tokenizer_dir):
    tok = load_tokenizer(tokenizer_dir, padded_vocab_size=1024)
    text = "def f(x):\n    return x + 1\n"
    ids = tok.encode(text)
    assert ids[0].item() == tok.bos_id == 0
    assert tok.decode(ids[1:]) == text
    assert int(ids.max()) < 1024
    config = json.loads((tokenizer_dir / "tokenizer_config.json").read_text())
    assert config["tokenizer_class"] == "PreTrainedTokenizerFast"
    assert {p.name for p in tokenizer_dir.iterdir()} <= set(TOKENIZER_FILES)


def test_tokenizer_too_big_for_model_names_both_sizes(tokenizer_dir):
    with pytest.raises(
        DataError, match=r"has 1024 token ids but the model's padded_vocab_size is 512"
    ):
        load_tokenizer(tokenizer_dir, padded_vocab_size=512)


def test_missing_folder_and_missing_files(tmp_path):
    with pytest.raises(DataError, match=r"tokenizer_dir .*nope: folder does not exist"):
        load_tokenizer(tmp_path / "nope", 1024)
    with pytest.raises(DataError, match="holds neither tokenizer.json nor tokenizer.model"):
        load_tokenizer(tmp_path, 1024)


def test_config_without_tokenizer_class_and_without_bos(tokenizer_dir, tmp_path):
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "tokenizer.json").write_bytes((tokenizer_dir / "tokenizer.json").read_bytes())
    (broken / "tokenizer_config.json").write_text(json.dumps({"bos_token": "<|bos|>"}))
    with pytest.raises(DataError, match="no 'tokenizer_class'"):
        load_tokenizer(broken, 1024)
    (broken / "tokenizer_config.json").write_text(
        json.dumps({"tokenizer_class": "PreTrainedTokenizerFast"})
    )
    with pytest.raises(DataError, match="no BOS token"):
        load_tokenizer(broken, 1024)


def test_training_errors_name_the_file(tmp_path):
    with pytest.raises(DataError, match="no .txt files"):
        train_tokenizer([tmp_path], tmp_path / "tok")
    (tmp_path / "empty.txt").write_text("  \n")
    with pytest.raises(DataError, match=r"empty.txt: file is empty"):
        train_tokenizer([tmp_path], tmp_path / "tok")
    (tmp_path / "empty.txt").write_bytes(b"caf\xe9 latin-1")
    with pytest.raises(DataError, match=r"empty.txt: not valid UTF-8 text \(byte 3"):
        train_tokenizer([tmp_path], tmp_path / "tok")
    assert not (tmp_path / "tok").exists()


def test_hash_changes_with_content(tokenizer_dir, tmp_path):
    copy = tmp_path / "copy"
    copy.mkdir()
    for name in TOKENIZER_FILES:
        if (tokenizer_dir / name).is_file():
            (copy / name).write_bytes((tokenizer_dir / name).read_bytes())
    assert tokenizer_hash(copy) == tokenizer_hash(tokenizer_dir)
    (copy / "generation_config.json").write_text('{"bos_token_id": 0, "eos_token_id": 0}')
    assert tokenizer_hash(copy) != tokenizer_hash(tokenizer_dir)


def test_cli_tokenizer_train(small_corpus, tmp_path):
    out = tmp_path / "cli-tok"
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "cli.main",
            "tokenizer",
            "train",
            "--data",
            str(small_corpus),
            "--out",
            str(out),
            "--vocab-size",
            "600",
        ],
        cwd=REPO,
        capture_output=True,
        text=True,
    )
    assert done.returncode == 0, done.stderr
    assert load_tokenizer(out, 600).processor.get_vocab_size() == 600
    bad = subprocess.run(
        [
            sys.executable,
            "-m",
            "cli.main",
            "tokenizer",
            "train",
            "--data",
            str(tmp_path / "missing"),
            "--out",
            str(out),
        ],
        cwd=REPO,
        capture_output=True,
        text=True,
    )
    assert bad.returncode == 2
    assert "missing: data folder does not exist" in bad.stderr
    assert "Traceback" not in bad.stderr


def test_demo_corpus_is_real_text_split_in_two(tmp_path):
    train, val = build_corpus(tmp_path / "c", max_bytes=400_000, val_every=5)
    train_files, val_files = sorted(train.glob("*.txt")), sorted(val.glob("*.txt"))
    assert train_files and val_files
    assert not {p.name for p in train_files} & {p.name for p in val_files}
    total = sum(p.stat().st_size for p in train_files + val_files)
    assert 400_000 <= total < 400_000 + max(p.stat().st_size for p in stdlib_sources())
    # a second call leaves an existing corpus alone
    before = {p: p.stat().st_mtime_ns for p in train_files}
    build_corpus(tmp_path / "c", max_bytes=10)
    assert {p: p.stat().st_mtime_ns for p in sorted(train.glob("*.txt"))} == before
