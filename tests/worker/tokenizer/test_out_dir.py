"""Where `moejobs tokenizer train` / ``train_tokenizer`` may write: never over the current
folder, a data folder or a folder of other files (it once wiped `--out .`), and the warning when
the corpus is too small for the requested vocabulary."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.support import REPO
from worker.errors import DataError
from worker.tokenizer import (
    RECORD_FILE,
    TOKENIZER_FILES,
    load_tokenizer,
    train_tokenizer,
    vocab_warnings,
)

#: A few KB of real text: enough for a 512-id vocabulary, far too little for 8192.
SMALL_TEXT = Path(json.__file__).read_text(encoding="utf-8")


def _snapshot(folder: Path) -> dict[str, bytes]:
    return {
        str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()
    }


@pytest.fixture
def workdir(tmp_path: Path) -> Path:
    """A user's folder: two unrelated files, a folder of documents, and a data folder."""
    work = tmp_path / "work"
    (work / "text").mkdir(parents=True)
    (work / "text" / "corpus.txt").write_text(SMALL_TEXT, encoding="utf-8")
    (work / "a.txt").write_text("my notes\n")
    (work / "b.txt").write_text("more notes\n")
    (work / "mydocs").mkdir()
    (work / "mydocs" / "a.txt").write_text("letter\n")
    (work / "mydocs" / "b.txt").write_text("report\n")
    return work


def _cli(cwd: Path, *args: str) -> subprocess.CompletedProcess:
    """`moejobs tokenizer train ARGS` of this checkout, run in ``cwd``."""
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    return subprocess.run(
        [sys.executable, "-m", "cli.main", "tokenizer", "train", *args],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )


@pytest.mark.parametrize(
    "out, message",
    [
        (".", ". is the current folder, not a tokenizer folder: choose an empty or new folder"),
        (
            "mydocs",
            "mydocs is not a tokenizer folder (it holds a.txt, b.txt): choose an empty or new folder",
        ),
        ("a.txt", "a.txt is a file, not a folder: choose an empty or new folder"),
        ("text", "text is the data folder text: choose an empty or new folder"),
        ("..", ".. holds the current folder"),
    ],
)
def test_cli_refuses_folders_that_are_not_tokenizer_folders(workdir, out, message):
    before = _snapshot(workdir.parent)
    done = _cli(workdir, "--data", "text", "--out", out, "--vocab-size", "512")
    assert done.returncode == 2, done.stderr
    lines = done.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), done.stderr
    assert message in lines[0]
    assert _snapshot(workdir.parent) == before  # nothing deleted, nothing left behind
    assert sorted(p.name for p in workdir.iterdir()) == ["a.txt", "b.txt", "mydocs", "text"]


def test_cli_warns_when_the_corpus_is_too_small(workdir):
    done = _cli(workdir, "--data", "text", "--out", "tok", "--vocab-size", "8192")
    assert done.returncode == 0, done.stderr
    learned = load_tokenizer(workdir / "tok", 8192).processor.get_vocab_size()
    assert learned < 8192
    assert done.stderr.splitlines() == [
        f"warning: the corpus has too little distinct text for 8192 tokens: {learned} learned"
    ]
    assert "tokenizer written to tok" in done.stdout


def test_refusals_in_process(workdir, monkeypatch):
    monkeypatch.chdir(workdir)
    text = [workdir / "text"]
    with pytest.raises(DataError, match=r"is the current folder"):
        train_tokenizer(text, Path("."), vocab_size=512)
    with pytest.raises(DataError, match=r"is the current folder"):
        train_tokenizer(text, workdir / "mydocs" / "..", vocab_size=512)
    monkeypatch.chdir(workdir.parent)
    with pytest.raises(DataError, match=r"work holds the data folder"):  # a parent of a data folder
        train_tokenizer(text, Path("work"), vocab_size=512)
    with pytest.raises(
        DataError, match=r"a.txt is a file, not a folder"
    ):  # checked before training
        train_tokenizer(text, workdir / "a.txt" / "tok", vocab_size=512)
    (workdir / "link").symlink_to(workdir / "mydocs")
    with pytest.raises(DataError, match=r"link is a symbolic link"):
        train_tokenizer(text, workdir / "link", vocab_size=512)
    many = workdir / "many"
    many.mkdir()
    for i in range(7):
        (many / f"f{i}.txt").write_text("x")
    (many / "tokenizer.json").write_text(
        "{}"
    )  # a tokenizer file does not make the rest replaceable
    (many / "sub").mkdir()
    with pytest.raises(
        DataError,
        match=r"many is not a tokenizer folder \(it holds f0.txt, f1.txt, "
        r"f2.txt, f3.txt, f4.txt and 3 more\): choose an empty or new folder",
    ):
        train_tokenizer(text, many, vocab_size=512)
    assert len(list(many.iterdir())) == 9


def test_new_empty_and_earlier_tokenizer_folders_are_written(workdir):
    text = [workdir / "text"]
    out = workdir / "tok"
    assert train_tokenizer(text, out, vocab_size=512) == out  # new
    first = _snapshot(out)
    assert set(first) <= set(TOKENIZER_FILES)
    (out / RECORD_FILE).write_text("{}")  # what the service adds: still a tokenizer folder
    train_tokenizer(text, out, vocab_size=600, record={"dataset": "d"})  # earlier output: replaced
    assert load_tokenizer(out, 600).processor.get_vocab_size() == 600
    record = json.loads((out / RECORD_FILE).read_text())
    assert record == {
        "dataset": "d",
        "requested_vocab_size": 600,
        "vocab_size": 600,
        "warnings": [],
    }
    empty = workdir / "empty"
    empty.mkdir()
    train_tokenizer(text, empty, vocab_size=512)  # empty
    assert (empty / "tokenizer.json").is_file()
    # no temporary or old folders left next to them
    assert sorted(p.name for p in workdir.iterdir()) == [
        "a.txt",
        "b.txt",
        "empty",
        "mydocs",
        "text",
        "tok",
    ]


def test_vocabulary_smaller_than_requested_is_reported(workdir):
    out = train_tokenizer([workdir / "text"], workdir / "tok", vocab_size=8192, record={})
    record = json.loads((out / RECORD_FILE).read_text())
    learned = record["vocab_size"]
    assert 258 < learned < 8192 and record["requested_vocab_size"] == 8192
    expected = [f"the corpus has too little distinct text for 8192 tokens: {learned} learned"]
    assert record["warnings"] == expected
    assert vocab_warnings(out, 8192) == expected
    assert vocab_warnings(out, learned) == []


def test_record_file_name_is_the_one_the_api_reads():
    from service.queue import TOKENIZER_RECORD

    assert RECORD_FILE == TOKENIZER_RECORD
