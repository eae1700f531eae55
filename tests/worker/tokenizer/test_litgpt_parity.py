"""Token ids identical to LitGPT's own ``litgpt.data.text_files.tokenize`` (0.5.13: text mode,
``strip()``, BOS and no EOS) on files with CRLF line ends, a BOM, trailing newlines and blank
lines; tokenizer training reads text the same way; a changed token format never reuses a cache."""

from __future__ import annotations

import json
from pathlib import Path

import litgpt
import pytest
from litgpt.data.text_files import tokenize as litgpt_tokenize

from worker import data as data_module
from worker.data import CACHE_FORMAT, cache_key, tokenize_files
from worker.tokenizer import load_tokenizer, read_text, train_tokenizer

#: name -> bytes; each stresses one thing LitGPT's reading does (or does not) change.
FILES = {
    "a-crlf.txt": b"def f(x):\r\n    return x + 1\r\n\r\nprint(f(2))\r\n",
    "b-bom.txt": b"\xef\xbb\xbfimport os\nprint(os.sep)\n",
    "c-bom-crlf-blank.txt": b"\xef\xbb\xbf\r\n\r\n  indented after a BOM\r\n\r\n",
    "d-trailing-newlines.txt": b"x = 1\ny = 2\n\n\n\n",
    "e-blank-lines-around.txt": b"\n\n\t\n# a comment\n\n\n\nz = 3   \n \n",
    "f-lone-cr.txt": b"old mac\rline ends\r",
    "g-unicode-space.txt": "\u3000caf\u00e9 \u00e0 la ligne\u2028\x85\n".encode(),
    "h-no-newline.txt": b"pass",
}


@pytest.fixture(scope="module")
def files(tmp_path_factory) -> list[Path]:
    folder = tmp_path_factory.mktemp("texts")
    for name, raw in FILES.items():
        (folder / name).write_bytes(raw)
    return sorted(folder.iterdir())


@pytest.fixture(scope="module")
def tok(tokenizer_dir) -> litgpt.Tokenizer:
    return load_tokenizer(tokenizer_dir, 1024)


def _litgpt_ids(path: Path, tokenizer_dir: Path) -> list[int]:
    (ids,) = litgpt_tokenize(str(path), tokenizer=litgpt.Tokenizer(tokenizer_dir))
    return ids.tolist()


def test_each_file_has_litgpts_token_ids(files, tok, tokenizer_dir, tmp_path):
    for path in files:
        ours = tokenize_files([path], tok, tokenizer_dir, 1024, cache_dir=tmp_path / "cache")
        assert ours.tokens.tolist() == _litgpt_ids(path, tokenizer_dir), path.name
    # what LitGPT's data module concatenates, file after file, BOS in front of each
    together = tokenize_files(files, tok, tokenizer_dir, 1024, cache_dir=tmp_path / "cache")
    assert together.tokens.tolist() == [i for p in files for i in _litgpt_ids(p, tokenizer_dir)]


def test_reading_normalizes_line_ends_strips_and_keeps_the_bom(files):
    texts = {p.name: read_text(p) for p in files}
    assert texts["a-crlf.txt"] == "def f(x):\n    return x + 1\n\nprint(f(2))"
    assert texts["b-bom.txt"] == "\ufeffimport os\nprint(os.sep)"
    assert (
        texts["c-bom-crlf-blank.txt"] == "\ufeff\n\n  indented after a BOM"
    )  # whitespace after a BOM stays
    assert texts["d-trailing-newlines.txt"] == "x = 1\ny = 2"
    assert texts["e-blank-lines-around.txt"] == "# a comment\n\n\n\nz = 3"
    assert texts["f-lone-cr.txt"] == "old mac\nline ends"
    assert texts["g-unicode-space.txt"] == "caf\u00e9 \u00e0 la ligne"
    assert texts["h-no-newline.txt"] == "pass"


def test_crlf_and_trailing_whitespace_no_longer_make_extra_tokens(
    files, tok, tokenizer_dir, tmp_path
):
    """What the issue measured (a CRLF file: 115 tokens vs LitGPT's 98): the raw bytes gave more."""
    crlf = next(p for p in files if p.name == "a-crlf.txt")
    raw_ids = tok.encode(crlf.read_bytes().decode(), bos=True).tolist()
    ours = tokenize_files(
        [crlf], tok, tokenizer_dir, 1024, cache_dir=tmp_path / "cache"
    ).tokens.tolist()
    assert len(ours) < len(raw_ids) and ours == _litgpt_ids(crlf, tokenizer_dir)


def test_tokenizer_training_reads_text_like_litgpt(files, tmp_path):
    """The same texts as LitGPT reads them, written plainly (LF, stripped, BOM kept), train the
    same tokenizer as the original files."""
    plain = tmp_path / "plain"
    plain.mkdir()
    for path in files:
        with open(path, encoding="utf-8") as fh:  # LitGPT's own reading
            (plain / path.name).write_text(fh.read().strip(), encoding="utf-8", newline="")
    a = train_tokenizer([files[0].parent], tmp_path / "tok-a", vocab_size=512)
    b = train_tokenizer([plain], tmp_path / "tok-b", vocab_size=512)
    assert (a / "tokenizer.json").read_bytes() == (b / "tokenizer.json").read_bytes()
    vocab = json.loads((a / "tokenizer.json").read_text())["model"]["vocab"]
    assert not any(
        "č" in token for token in vocab if len(token) > 1
    )  # 'č' is byte 0x0D (\r) in byte-level BPE


def test_a_new_token_format_never_reuses_an_old_cache(
    files, tok, tokenizer_dir, tmp_path, monkeypatch
):
    assert CACHE_FORMAT == 2
    old_key = None
    with monkeypatch.context() as m:
        m.setattr(data_module, "CACHE_FORMAT", 1)
        old = tokenize_files(files[:1], tok, tokenizer_dir, 1024, cache_dir=tmp_path / "cache")
        old_key = old.path.stem
    new = tokenize_files(files[:1], tok, tokenizer_dir, 1024, cache_dir=tmp_path / "cache")
    assert new.path.stem != old_key and new.path.stem == cache_key(
        data_module.files_sha256(files[:1]), data_module.tokenizer_hash(tokenizer_dir)
    )
    assert json.loads(new.path.with_suffix(".json").read_text())["format"] == 2
