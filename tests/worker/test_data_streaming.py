"""Streaming token preparation: chunked encoding gives exactly the ids of encoding each file
whole (LitGPT's ``tokenize()``) on real text with CRLF, a BOM, lone CRs, very long lines and
multi-byte characters cut by the reader; the uint16/uint32 choice; progress reports; a tokenizer
that may not be chunked takes the whole-file path with the same ids; and peak memory that does
not grow with the corpus (measured in subprocesses)."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import sysconfig
from pathlib import Path

import litgpt
import numpy as np
import pytest
from litgpt.data.text_files import tokenize as litgpt_tokenize

from tests.support import REPO
from worker import data as data_module
from worker.data import (
    PrepProgress,
    chunking_problem,
    file_chunks,
    iter_text,
    safe_split,
    tokenize_files,
)
from worker.errors import DataError
from worker.tokenizer import load_tokenizer, read_text

STDLIB = Path(sysconfig.get_paths()["stdlib"])


@pytest.fixture(scope="module")
def tok(tokenizer_dir) -> litgpt.Tokenizer:
    return load_tokenizer(tokenizer_dir, 1024)


@pytest.fixture(scope="module")
def texts(tmp_path_factory) -> list[Path]:
    """Real text (standard-library sources) in the shapes that stress the reader and the cutter."""
    folder = tmp_path_factory.mktemp("stream-texts")
    src = (STDLIB / "textwrap.py").read_bytes()
    prose = (STDLIB / "this.py").read_bytes() + (STDLIB / "os.py").read_bytes()[:20_000]
    files = {
        "a-plain.txt": src,
        "b-crlf.txt": src.replace(b"\n", b"\r\n"),
        "c-bom-crlf.txt": b"\xef\xbb\xbf\r\n\r\n" + src.replace(b"\n", b"\r\n") + b"\r\n\r\n  \t",
        "d-lone-cr.txt": src.replace(b"\n", b"\r"),
        "e-one-long-line.txt": prose.replace(b"\n", b" "),  # ~20 kB without a newline
        "f-unicode.txt": (
            "caf\u00e9 na\u00efve \u00fcber \u4e2d\u6587 \u0645\u0631\u062d\u0628\u0627 \U0001f600\n"
            "\u3000indented\u2028next\u0085line\n\n\n\u00e9t\u00e9 d\u00e9j\u00e0\n" * 400
        ).encode(),
        "g-special-tokens.txt": b"<|bos|>starts with bos\nmiddle <|eos|> text\nends with eos <|eos|>",
        "h-whitespace-runs.txt": b"a\n\nb\n \nc  d\t\te\n\n\n  f g\nh\n" * 300,
    }
    for name, raw in files.items():
        (folder / name).write_bytes(raw)
    return sorted(folder.iterdir())


def _whole(tok: litgpt.Tokenizer, path: Path) -> list[int]:
    """The previous preparation: read the file whole, one ``encode`` call."""
    return tok.encode(read_text(path), bos=True, eos=False).tolist()


def _litgpt(tokenizer_dir: Path, path: Path) -> list[int]:
    (ids,) = litgpt_tokenize(str(path), tokenizer=litgpt.Tokenizer(tokenizer_dir))
    return ids.tolist()


@pytest.mark.parametrize("chunk_chars", [1, 13, 4096])
def test_chunks_concatenate_to_the_text_and_encode_to_the_same_ids(
    texts, tok, monkeypatch, chunk_chars
):
    """chunk_chars=1 cuts at every safe point there is; tiny reads cut CRLF pairs and multi-byte
    characters between two reads."""
    assert chunking_problem(tok) is None
    monkeypatch.setattr(data_module, "READ_BYTES", 7)
    for path in texts:
        chunks = list(file_chunks(path, chunk_chars))
        assert "".join(chunks) == read_text(path), path.name
        if chunk_chars == 1 and path.stat().st_size > 5000:
            assert len(chunks) > 100, path.name
        ids = [i for enc in tok.processor.encode_batch(chunks) for i in enc.ids]
        assert ids == tok.processor.encode(read_text(path)).ids, path.name


def test_cutting_anywhere_else_would_change_the_ids(tok):
    """The rule is not vacuous: the cuts it refuses do change the encoding."""
    enc = tok.processor.encode
    for text, bad in [("a\n\nb", 3), ("x\n    return", 2), ("x     y", 3), ("x.\n\n\ny", 3)]:
        assert enc(text).ids != enc(text[:bad]).ids + enc(text[bad:]).ids, text
        assert safe_split(text, 1) == -1, text
    assert safe_split("ab\ncd", 1) == 3 and safe_split("ab cd", 1) == 2
    assert (
        safe_split("ab\n\ncd", 1) == -1
        and safe_split("ab \ncd", 1) == -1
        and safe_split("1 2", 1) == -1
    )


@pytest.mark.parametrize("chunk,batch", [(1, 1), (64, 1000), (None, None)])
def test_cache_ids_equal_the_previous_preparation_and_litgpt(
    texts, tok, tokenizer_dir, tmp_path, monkeypatch, chunk, batch
):
    if chunk is not None:
        monkeypatch.setattr(data_module, "CHUNK_CHARS", chunk)
        monkeypatch.setattr(data_module, "BATCH_CHARS", batch)
    monkeypatch.setattr(data_module, "READ_BYTES", 4096)
    ts = tokenize_files(texts, tok, tokenizer_dir, 1024, cache_dir=tmp_path / "cache")
    expected = [i for p in texts for i in _whole(tok, p)]
    assert ts.tokens.dtype == np.uint16 and ts.tokens.tolist() == expected
    assert expected == [i for p in texts for i in _litgpt(tokenizer_dir, p)]
    # LitGPT's rules at the file edges: no second BOS, a trailing EOS dropped
    special = _whole(tok, next(p for p in texts if p.name == "g-special-tokens.txt"))
    assert special[0] == tok.bos_id and special[1] != tok.bos_id and special[-1] != tok.eos_id
    meta = json.loads(ts.path.with_suffix(".json").read_text())
    assert meta["tokens"] == len(expected) and meta["dtype"] == "uint16" and meta["chunked"] is True
    loaded = np.load(ts.path, mmap_mode="r")
    assert isinstance(loaded, np.memmap) and loaded.shape == (len(expected),)


def test_uint16_up_to_65536_ids_then_uint32(texts, tok, tokenizer_dir, tmp_path):
    expected = [i for p in texts[:2] for i in _whole(tok, p)]
    small = tokenize_files(texts[:2], tok, tokenizer_dir, 65536, cache_dir=tmp_path / "c16")
    large = tokenize_files(texts[:2], tok, tokenizer_dir, 65537, cache_dir=tmp_path / "c32")
    assert (small.tokens.dtype, large.tokens.dtype) == (np.uint16, np.uint32)
    assert small.tokens.tolist() == large.tokens.tolist() == expected
    assert large.path.stat().st_size == small.path.stat().st_size + 2 * len(expected)


def test_reader_errors_are_read_texts(tmp_path, monkeypatch):
    monkeypatch.setattr(data_module, "READ_BYTES", 3)
    bad = tmp_path / "bad.txt"
    bad.write_bytes("ok caf\u00e9 ".encode() * 5 + b"\xff tail")
    cut = tmp_path / "cut.txt"
    cut.write_bytes(b"ends inside a character \xe2\x82")
    empty = tmp_path / "blank.txt"
    empty.write_bytes(b"\r\n \t\r\n")
    for path in (bad, cut, empty):
        with pytest.raises(DataError) as want:
            read_text(path)
        with pytest.raises(DataError) as got:
            list(iter_text(path))
        assert str(got.value) == str(want.value)


def test_progress_reports_tokens_bytes_and_a_final_done(
    texts, tok, tokenizer_dir, tmp_path, monkeypatch
):
    monkeypatch.setattr(data_module, "BATCH_CHARS", 2000)
    seen: list[PrepProgress] = []
    ts = tokenize_files(
        texts,
        tok,
        tokenizer_dir,
        1024,
        cache_dir=tmp_path / "cache",
        on_progress=seen.append,
        progress_interval_s=0.0,
    )
    assert len(seen) > 5 and seen[-1].done and not any(p.done for p in seen[:-1])
    assert [p.tokens for p in seen] == sorted(p.tokens for p in seen) and seen[-1].tokens == len(ts)
    total = sum(p.stat().st_size for p in texts)
    assert seen[-1].bytes_done == seen[-1].bytes_total == total and seen[-1].eta_s == 0.0
    assert all(p.eta_s is not None and p.eta_s >= 0 for p in seen)
    assert f"{len(ts):,} tokens, 100% of" in seen[-1].describe()
    # a cache that exists is not tokenized again: no report
    again: list[PrepProgress] = []
    tokenize_files(
        texts, tok, tokenizer_dir, 1024, cache_dir=tmp_path / "cache", on_progress=again.append
    )
    assert again == []


def test_a_tokenizer_that_may_not_be_chunked_encodes_whole_files(texts, tokenizer_dir, tmp_path):
    """A post-processor that adds BOS itself (as many Hugging Face tokenizers do): whole files, the
    same ids as LitGPT's tokenize()."""
    folder = tmp_path / "tok-template"
    shutil.copytree(tokenizer_dir, folder)
    doc = json.loads((folder / "tokenizer.json").read_text())
    doc["post_processor"] = {
        "type": "TemplateProcessing",
        "single": [
            {"SpecialToken": {"id": "<|bos|>", "type_id": 0}},
            {"Sequence": {"id": "A", "type_id": 0}},
        ],
        "pair": [{"Sequence": {"id": "A", "type_id": 0}}, {"Sequence": {"id": "B", "type_id": 1}}],
        "special_tokens": {"<|bos|>": {"id": "<|bos|>", "ids": [0], "tokens": ["<|bos|>"]}},
    }
    (folder / "tokenizer.json").write_text(json.dumps(doc))
    tok = load_tokenizer(folder, 1024)
    assert chunking_problem(tok) == "its post-processor is TemplateProcessing"
    ts = tokenize_files(texts, tok, folder, 1024, cache_dir=tmp_path / "cache")
    assert ts.tokens.tolist() == [i for p in texts for i in _litgpt(folder, p)]
    assert json.loads(ts.path.with_suffix(".json").read_text())["chunked"] is False


_PEAK = """
import re, resource, sys
from pathlib import Path
from worker import data
from worker.tokenizer import load_tokenizer
data.BATCH_CHARS = 1 << 19
tok_dir, corpus, cache = map(Path, sys.argv[1:4])
tok = load_tokenizer(tok_dir, 1024)
files = sorted(corpus.glob("*.txt"))
with open("/proc/self/clear_refs", "w") as fh:  # reset the peak (ru_maxrss) to the current RSS
    fh.write("5")
base = int(re.search(r"VmRSS:\\s+(\\d+)", Path("/proc/self/status").read_text()).group(1))
ts = data.tokenize_files(files, tok, tok_dir, 1024, cache_dir=cache)
print(base, resource.getrusage(resource.RUSAGE_SELF).ru_maxrss, len(ts))
"""


def _corpus(dest: Path, n_files: int) -> Path:
    """``n_files`` files of ~1 MB of standard-library source each."""
    dest.mkdir(parents=True)
    sources = sorted(p for p in STDLIB.glob("*.py") if p.stat().st_size > 20_000)
    blob = b""
    for src in sources:
        raw = src.read_bytes()
        try:
            raw.decode("utf-8")
        except UnicodeDecodeError:
            continue
        blob += raw
        if len(blob) > 1_000_000:
            break
    for i in range(n_files):
        (dest / f"{i:03d}.txt").write_bytes(
            blob[i * 997 :] + blob[: i * 997]
        )  # not byte-identical files
    return dest


def _peak_kib(tokenizer_dir: Path, corpus: Path, cache: Path) -> tuple[int, int, int]:
    done = subprocess.run(
        [sys.executable, "-c", _PEAK, str(tokenizer_dir), str(corpus), str(cache)],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    base, peak, tokens = map(int, done.stdout.split())
    return base, peak, tokens


@pytest.mark.slow
def test_peak_memory_does_not_grow_with_the_corpus(tokenizer_dir, tmp_path):
    """Peak RSS of the preparation alone (the high-water mark reset after the imports) for 2 MB
    and for 20 MB of text (~0.74M and ~7.4M tokens): the larger corpus adds less memory than its
    extra tokens take as uint16 in the cache file, so nothing holds the corpus' ids. (Measured
    2026-12-03: +7 MB here; the previous preparation, int64 parts concatenated: +59 MB.)"""
    if not Path("/proc/self/clear_refs").exists():
        pytest.skip("needs Linux /proc/self/clear_refs to reset the peak RSS")
    base_s, peak_s, tokens_s = _peak_kib(
        tokenizer_dir, _corpus(tmp_path / "small", 2), tmp_path / "cache-s"
    )
    base_l, peak_l, tokens_l = _peak_kib(
        tokenizer_dir, _corpus(tmp_path / "large", 20), tmp_path / "cache-l"
    )
    assert tokens_l > 9 * tokens_s
    grown_bytes = ((peak_l - base_l) - (peak_s - base_s)) * 1024
    assert grown_bytes < 2 * (tokens_l - tokens_s), (
        base_s,
        peak_s,
        base_l,
        peak_l,
        tokens_s,
        tokens_l,
    )
