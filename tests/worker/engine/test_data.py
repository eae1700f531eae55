"""Training data: TextFiles semantics, the content-keyed token cache, data errors naming the
file or folder, and the deterministic sampler."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from tests.support import REPO
from tests.support.tiny import stdlib_text_files
from worker.data import (
    WindowSampler,
    cache_key,
    files_sha256,
    prepare_data,
    source_text,
    split_files,
    tokenize_files,
    validation_batches,
)
from worker.errors import DataError
from worker.tokenizer import load_tokenizer, tokenizer_hash


@pytest.fixture(scope="module")
def tok(tokenizer_dir):
    return load_tokenizer(tokenizer_dir, 1024)


def _snapshot(folder: Path) -> dict[str, tuple[int, int]]:
    return {p.name: (p.stat().st_size, p.stat().st_mtime_ns) for p in sorted(folder.iterdir())}


def _prepare(train, val, tok, tokenizer_dir, seq=32, mbs=2, need_val=True, cache=None):
    return prepare_data(train, val, tok, tokenizer_dir, 1024, seq, mbs, need_val, cache_dir=cache)


def test_textfiles_semantics_bos_per_file_and_first_file_as_validation(
    tmp_path, tok, tokenizer_dir
):
    folder = stdlib_text_files(tmp_path / "t", ["abc", "bisect", "colorsys"])
    train, val = split_files(folder, None)
    assert [p.name for p in val] == ["abc.txt"] and [p.name for p in train] == [
        "bisect.txt",
        "colorsys.txt",
    ]
    ts = tokenize_files(train, tok, tokenizer_dir, 1024, cache_dir=tmp_path / "cache")
    first = tok.encode((folder / "bisect.txt").read_text().strip(), bos=True).tolist()
    second = tok.encode((folder / "colorsys.txt").read_text().strip(), bos=True).tolist()
    assert ts.tokens.tolist() == first + second  # BOS in front of each (stripped) file, no EOS
    assert ts.tokens.dtype == np.uint16 and first[0] == tok.bos_id
    # one file and no val_data_path: no validation set (an error only when validation is used)
    single = stdlib_text_files(tmp_path / "single", ["bisect"])
    assert split_files(single, None)[1] == []
    with pytest.raises(
        DataError, match=rf"{single}: validation is configured but there is no validation set"
    ):
        _prepare(single, None, tok, tokenizer_dir, cache=tmp_path / "cache")
    assert (
        _prepare(single, None, tok, tokenizer_dir, need_val=False, cache=tmp_path / "cache").val
        is None
    )


def test_cache_is_keyed_by_content_and_never_touches_the_inputs(tmp_path, tok, tokenizer_dir):
    folder = stdlib_text_files(tmp_path / "data", ["bisect", "colorsys"])
    before = _snapshot(folder)
    cache = tmp_path / "cache"
    files = sorted(folder.glob("*.txt"))
    a = tokenize_files(files, tok, tokenizer_dir, 1024, cache_dir=cache)
    assert a.path.parent == cache and _snapshot(folder) == before
    # the same text elsewhere shares the cache; nothing is re-tokenized
    copy = tmp_path / "copy"
    shutil.copytree(folder, copy)
    mtime = a.path.stat().st_mtime_ns
    b = tokenize_files(sorted(copy.glob("*.txt")), tok, tokenizer_dir, 1024, cache_dir=cache)
    assert b.path == a.path and a.path.stat().st_mtime_ns == mtime
    # changing one byte of one file gives a new cache with the new tokens
    text = (copy / "bisect.txt").read_text()
    (copy / "bisect.txt").write_text(text.replace("bisect", "bysect", 1))
    c = tokenize_files(sorted(copy.glob("*.txt")), tok, tokenizer_dir, 1024, cache_dir=cache)
    assert c.path != a.path and c.tokens.tolist() != a.tokens.tolist()
    # so does another tokenizer
    other_tok = tmp_path / "tok2"
    shutil.copytree(tokenizer_dir, other_tok)
    (other_tok / "generation_config.json").write_text(
        '{"bos_token_id": 0, "eos_token_id": 1, "x": 1}'
    )
    data_sha = files_sha256(files)
    assert cache_key(data_sha, tokenizer_hash(other_tok)) != cache_key(
        data_sha, tokenizer_hash(tokenizer_dir)
    )
    assert a.path.name == f"{cache_key(data_sha, tokenizer_hash(tokenizer_dir))}.npy"
    assert _snapshot(folder) == before
    assert not [p for p in cache.iterdir() if ".tmp" in p.name]


def test_raw_text_hash_is_names_and_bytes_in_reading_order(
    tmp_path, tok, tokenizer_dir, monkeypatch
):
    """The hash the resume checks record: file names and bytes in order, nothing else (not the
    folder, the tokenizer or the cache format); prepare_data reuses a given SourceText."""
    folder = stdlib_text_files(tmp_path / "data", ["abc", "bisect", "colorsys"])
    files = sorted(folder.glob("*.txt"))
    base = files_sha256(files)
    assert len(base) == 64 and files_sha256(files) == base
    copy = tmp_path / "elsewhere"
    shutil.copytree(folder, copy)
    assert files_sha256(sorted(copy.glob("*.txt"))) == base  # the folder is not part of it
    assert files_sha256(list(reversed(files))) != base  # the order is
    (copy / "abc.txt").rename(copy / "abd.txt")
    assert files_sha256(sorted(copy.glob("*.txt"))) != base  # so are the names
    (copy / "abd.txt").rename(copy / "abc.txt")
    with open(copy / "colorsys.txt", "ab") as fh:
        fh.write(b" ")
    assert files_sha256(sorted(copy.glob("*.txt"))) != base  # and one more byte
    # the TextFiles split: the first file is validation when no val_data_path is given
    src = source_text(folder, None)
    assert [p.name for p in src.val.files] == ["abc.txt"] and src.val.sha256 == files_sha256(
        files[:1]
    )
    assert src.train.sha256 == files_sha256(files[1:])
    assert src.train.n_bytes == sum(f.stat().st_size for f in files[1:])
    assert source_text(folder, folder).val.sha256 == base
    assert source_text(stdlib_text_files(tmp_path / "one", ["abc"]), None).val is None
    # one hash per file set per start: prepare_data given the SourceText reads no file for hashing
    import worker.data as data_mod

    calls = []
    real = data_mod._hash_files
    monkeypatch.setattr(data_mod, "_hash_files", lambda fs: calls.append(len(fs)) or real(fs))
    prepared = _prepare(folder, None, tok, tokenizer_dir, need_val=True, cache=tmp_path / "cache")
    assert calls == [2, 1]  # train, val: once each
    calls.clear()
    again = prepare_data(
        folder,
        None,
        tok,
        tokenizer_dir,
        1024,
        32,
        2,
        True,
        cache_dir=tmp_path / "cache",
        source=prepared.source,
        tokenizer_sha256=prepared.tokenizer_sha256,
    )
    assert calls == [] and again.train.path == prepared.train.path
    assert prepared.tokenizer_sha256 == tokenizer_hash(tokenizer_dir)


def test_two_processes_building_the_same_cache_at_once(tmp_path, corpus, tokenizer_dir):
    cache = tmp_path / "cache"
    code = (
        "import sys; from pathlib import Path;"
        "from worker.tokenizer import load_tokenizer; from worker.data import tokenize_files;"
        f"tok = load_tokenizer(Path({str(tokenizer_dir)!r}), 1024);"
        f"files = sorted(Path({str(corpus / 'train')!r}).glob('*.txt'));"
        f"ts = tokenize_files(files, tok, Path({str(tokenizer_dir)!r}), 1024, cache_dir=Path({str(cache)!r}));"
        "print(ts.path, len(ts))"
    )
    procs = [
        subprocess.Popen([sys.executable, "-c", code], cwd=REPO, stdout=subprocess.PIPE, text=True)
        for _ in range(2)
    ]
    outs = [p.communicate(timeout=300)[0].strip() for p in procs]
    assert all(p.returncode == 0 for p in procs)
    assert outs[0] == outs[1]
    assert len(list(cache.glob("*.npy"))) == 1 and not [
        p for p in cache.iterdir() if ".tmp" in p.name
    ]


def test_data_errors_name_the_file_or_folder(tmp_path, tok, tokenizer_dir):
    cache = tmp_path / "cache"
    good = stdlib_text_files(tmp_path / "good", ["bisect", "colorsys"])
    missing = tmp_path / "nope"
    with pytest.raises(DataError, match=rf"^{missing}: data folder does not exist"):
        _prepare(missing, good, tok, tokenizer_dir, cache=cache)
    with pytest.raises(DataError, match=rf"^{missing}: data folder does not exist"):
        _prepare(good, missing, tok, tokenizer_dir, cache=cache)
    empty_dir = tmp_path / "no-txt"
    empty_dir.mkdir()
    (empty_dir / "notes.md").write_text("# not a .txt file\n")
    with pytest.raises(DataError, match=rf"^{empty_dir}: no .txt files"):
        _prepare(empty_dir, good, tok, tokenizer_dir, cache=cache)
    bad = tmp_path / "bad"
    shutil.copytree(good, bad)
    (bad / "zz-empty.txt").write_text("\n\n")
    with pytest.raises(DataError, match=rf"^{bad / 'zz-empty.txt'}: file is empty"):
        _prepare(bad, good, tok, tokenizer_dir, cache=cache)
    (bad / "zz-empty.txt").write_bytes("déjà vu".encode("latin-1"))
    with pytest.raises(DataError, match=rf"^{bad / 'zz-empty.txt'}: not valid UTF-8"):
        _prepare(bad, good, tok, tokenizer_dir, cache=cache)
    # validation (and training) data shorter than one micro-batch of micro_batch_size x (seq+1) tokens
    tiny = tmp_path / "tiny"
    tiny.mkdir()
    (tiny / "a.txt").write_text("x = 1\n")
    with pytest.raises(
        DataError,
        match=rf"^{tiny}: validation data has \d+ tokens, fewer than one micro-batch "
        r"of micro_batch_size x \(max_seq_length \+ 1\) = 2 x 33 = 66 tokens",
    ):
        _prepare(good, tiny, tok, tokenizer_dir, cache=cache)
    with pytest.raises(
        DataError, match=rf"^{tiny}: training data has \d+ tokens, fewer than one micro-batch"
    ):
        _prepare(tiny, good, tok, tokenizer_dir, cache=cache)
    # validation that is not used is not tokenized, but a given folder must still exist
    assert _prepare(good, tiny, tok, tokenizer_dir, need_val=False, cache=cache).val is None


def test_engine_reports_data_errors_before_training(train_doc, tiny_model, tmp_path):
    from service.config.validate import validate_configs
    from worker.train import run_training

    train_doc["data"]["init_args"]["train_data_path"] = str(tmp_path / "missing")
    v = validate_configs(train_doc, tiny_model)
    with pytest.raises(DataError, match="missing: data folder does not exist"):
        run_training(v.train, v.model)
    assert not (Path(train_doc["out_dir"]) / "metrics.csv").exists()


def test_sampler_is_deterministic_and_resumes_at_its_position(tmp_path, tok, tokenizer_dir, corpus):
    data = _prepare(
        corpus / "train", corpus / "val", tok, tokenizer_dir, seq=16, mbs=3, cache=tmp_path / "c"
    )
    s = WindowSampler(data.train, 16, 3, seed=7)
    first = [s.batch(k) for k in range(10)]
    assert all(b.shape == (3, 17) for b in first)
    again = WindowSampler(data.train, 16, 3, seed=7)
    assert all((again.batch(k) == first[k]).all() for k in range(10))
    assert not (WindowSampler(data.train, 16, 3, seed=8).batch(0) == first[0]).all()
    # resuming after 4 micro-batches (12 samples) continues with the 5th
    resumed = WindowSampler(data.train, 16, 3, seed=7, start_sample=12)
    assert all((resumed.batch(k) == first[4 + k]).all() for k in range(6))
    # two ranks split each global micro-batch: together they read what one rank with a
    # double-size stream would, and never the same window in one epoch
    r0 = WindowSampler(data.train, 16, 3, seed=7, world_size=2, rank=0)
    r1 = WindowSampler(data.train, 16, 3, seed=7, world_size=2, rank=1)
    assert (r0.batch(0) == first[0]).all() and (r1.batch(0) == first[1]).all()
    n = s.n
    windows = [s._window_of(i) for i in range(n)]
    assert sorted(windows) == list(range(n))  # an epoch is a permutation of all windows
    # windows are non-overlapping slices of seq+1 tokens
    w = windows[0]
    assert first[0][0].tolist() == np.asarray(data.train.tokens[w * 17 : (w + 1) * 17]).tolist()
    # validation batches: fixed, in order, split across ranks
    vb = validation_batches(data.val, 16, 3, max_iters=5)
    assert len(vb) == 5 and vb[0][0].tolist() == np.asarray(data.val.tokens[:17]).tolist()
    assert len(validation_batches(data.val, 16, 3, 5, world_size=2, rank=1)) == 2
    assert os.environ["MOEJOBS_TOKEN_CACHE"]  # the fixture kept the home cache untouched
