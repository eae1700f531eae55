"""Tokenizer folders: train a byte-level BPE, and load/check one for training.

A folder this module writes is what LitGPT's ``litgpt.Tokenizer`` (and so ``litgpt generate``)
loads: ``tokenizer.json`` (Hugging Face ``tokenizers`` format), ``tokenizer_config.json`` with a
``tokenizer_class`` (LitGPT 0.5.13 reads that key with no fallback) and the BOS/EOS tokens, and
``generation_config.json`` with their ids. A tokenizer trained for the service (the worker's
tokenizer task) also holds :data:`RECORD_FILE`, the request it was trained for.

:func:`train_tokenizer` replaces its destination only when that is new, empty or an earlier
tokenizer folder (nothing but the files above), never the current folder or a data folder.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import tempfile
import uuid
from collections.abc import Iterable, Iterator, Mapping
from pathlib import Path
from typing import TYPE_CHECKING

from service import contract
from service.checks import data_folder_problem, tokenizer_folder_problem
from worker.errors import DataError

if TYPE_CHECKING:  # pragma: no cover - typing only
    import litgpt

BOS_TOKEN = "<|bos|>"
EOS_TOKEN = "<|eos|>"

#: Files copied from a tokenizer folder into every checkpoint folder, when present (defined in
#: ``service.contract``: a weights-only download selects them too).
TOKENIZER_FILES: tuple[str, ...] = contract.TOKENIZER_FILES

#: The service's record of a tokenizer trained on request (dataset, requested_at, requested and
#: learned vocabulary sizes, warnings), written into the folder with it; not a tokenizer file,
#: so never copied into checkpoints nor hashed. ``service.queue.TOKENIZER_RECORD`` names it too.
RECORD_FILE = "moejobs_tokenizer.json"

#: What a tokenizer folder may hold: a folder holding nothing else may be replaced.
_TOKENIZER_OUTPUTS = frozenset(TOKENIZER_FILES) | {RECORD_FILE}

log = logging.getLogger("moejobs.tokenizer")


def text_files(folder: Path) -> list[Path]:
    """The ``*.txt`` files at the top level of ``folder``, sorted by name (LitGPT TextFiles rule).

    Raises:
        DataError: the folder does not exist, is not a folder, or holds no ``.txt`` file.
    """
    folder = Path(folder)
    problem = data_folder_problem(folder)  # the message a dry run and the API give
    if problem:
        raise DataError(problem)
    return sorted(p for p in folder.glob("*.txt") if p.is_file())


def read_text(path: Path) -> str:
    """Read one UTF-8 text file as LitGPT's ``tokenize()`` (``litgpt/data/text_files.py``) does:
    text mode, so ``\\r\\n`` and a lone ``\\r`` become ``\\n`` (universal newlines), then
    ``str.strip()`` (leading and trailing whitespace, blank lines included, go). A UTF-8 BOM is
    kept, as there: it decodes to U+FEFF, which is not whitespace. The training data
    (``worker.data``) and tokenizer training (:func:`train_tokenizer`) both read text this way.

    Raises:
        DataError: the file is not valid UTF-8 (the message gives the byte offset), or holds
            nothing but whitespace.
    """
    raw = Path(path).read_bytes()
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise DataError(f"{path}: not valid UTF-8 text (byte {exc.start}: {exc.reason})") from None
    text = text.replace("\r\n", "\n").replace("\r", "\n").strip()
    if not text:
        raise DataError(f"{path}: file is empty (or only whitespace)")
    return text


def _iter_texts(folders: list[Path]) -> Iterator[str]:
    for folder in folders:
        for path in text_files(folder):
            yield read_text(path)


def train_tokenizer(
    text_dirs: list[Path],
    out_dir: Path,
    vocab_size: int = 4096,
    record: Mapping[str, object] | None = None,
) -> Path:
    """Train a byte-level BPE tokenizer on the ``*.txt`` files of ``text_dirs`` into ``out_dir``.

    The vocabulary holds ``vocab_size`` ids in total (256 byte symbols, the merges, and the two
    special tokens ``<|bos|>`` = 0 and ``<|eos|>`` = 1), so every id is ``< vocab_size`` and a model
    with ``padded_vocab_size >= vocab_size`` can use it. A corpus with too little distinct text
    yields fewer ids (see :func:`vocab_warnings`). The folder is written under a temporary name
    next to ``out_dir`` and renamed, so a reader never sees half of it.

    ``out_dir`` is replaced only when it does not exist, is an empty folder or is an earlier
    tokenizer folder (it holds only ``TOKENIZER_FILES`` and :data:`RECORD_FILE`); it is checked
    before training and again just before the rename (:func:`check_out_dir`).

    Args:
        text_dirs: folders whose top-level ``*.txt`` files are the training text.
        out_dir: destination folder (new, empty, or an earlier tokenizer folder, replaced).
        vocab_size: total vocabulary size, at least 512.
        record: when given, written as :data:`RECORD_FILE` into the folder with
            ``requested_vocab_size``, the learned ``vocab_size`` and ``warnings`` added.

    Returns:
        ``out_dir``.

    Raises:
        DataError: a folder is missing or has no ``.txt`` file, or a file is empty or not UTF-8;
            or ``out_dir`` may not be written (see :func:`check_out_dir`) or cannot be created.
        ValueError: ``vocab_size`` < 512.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    if vocab_size < 512:
        raise ValueError(f"vocab_size must be at least 512, got {vocab_size}")
    folders = [Path(d) for d in text_dirs]
    for folder in folders:  # fail on a bad folder before spending time training
        text_files(folder)
    target = check_out_dir(out_dir, folders)

    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=[BOS_TOKEN, EOS_TOKEN],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(_iter_texts(folders), trainer=trainer)
    learned = tokenizer.get_vocab_size(with_added_tokens=True)

    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".tmp-{target.name}-", dir=target.parent))
    except OSError as exc:
        raise DataError(f"{out_dir}: cannot create the tokenizer folder here ({exc})") from None
    try:
        tokenizer.save(str(tmp / "tokenizer.json"))
        bos_id, eos_id = tokenizer.token_to_id(BOS_TOKEN), tokenizer.token_to_id(EOS_TOKEN)
        _write_json(
            tmp / "tokenizer_config.json",
            {
                "tokenizer_class": "PreTrainedTokenizerFast",
                "bos_token": BOS_TOKEN,
                "eos_token": EOS_TOKEN,
                "add_bos_token": True,
                "model_max_length": 1_000_000,
            },
        )
        _write_json(
            tmp / "generation_config.json", {"bos_token_id": bos_id, "eos_token_id": eos_id}
        )
        if record is not None:
            _write_json(
                tmp / RECORD_FILE,
                {
                    **record,
                    "requested_vocab_size": vocab_size,
                    "vocab_size": learned,
                    "warnings": _short_vocab(vocab_size, learned),
                },
            )
        check_out_dir(out_dir, folders)  # again: it may have changed while the tokenizer trained
        _replace_folder(tmp, target)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return Path(out_dir)


def check_out_dir(out_dir: Path, text_dirs: Iterable[Path] = ()) -> Path:
    """Check that :func:`train_tokenizer` may write (and so replace) ``out_dir``.

    Allowed: a path that does not exist, an empty folder, or a folder holding only tokenizer
    files (``TOKENIZER_FILES`` and :data:`RECORD_FILE`). Refused: the current folder or one
    that holds it, a data folder of ``text_dirs`` or one that holds it, a symbolic link, a file
    (or a path below one), and a folder holding anything else.

    Returns:
        ``out_dir`` made absolute (symbolic links in its parents resolved).

    Raises:
        DataError: naming ``out_dir`` and what is in the way.
    """
    given = Path(out_dir)
    choose = "choose an empty or new folder"
    if given.is_symlink():
        raise DataError(f"{given} is a symbolic link, not a tokenizer folder: {choose}")
    target = given.resolve()
    cwd = Path.cwd().resolve()
    if target == cwd:
        raise DataError(f"{given} is the current folder, not a tokenizer folder: {choose}")
    if target in cwd.parents:
        raise DataError(f"{given} holds the current folder {cwd}: {choose}")
    for folder in text_dirs:
        data = Path(folder).resolve()
        if target == data:
            raise DataError(f"{given} is the data folder {folder}: {choose}")
        if target in data.parents:
            raise DataError(f"{given} holds the data folder {folder}: {choose}")
    if not target.exists():
        ancestor = next(p for p in target.parents if p.exists())
        if not ancestor.is_dir():
            raise DataError(f"{given}: {ancestor} is a file, not a folder: {choose}")
        return target
    if not target.is_dir():
        raise DataError(f"{given} is a file, not a folder: {choose}")
    in_the_way = sorted(
        entry.name + ("/" if entry.is_dir() else "")
        for entry in target.iterdir()
        if entry.name not in _TOKENIZER_OUTPUTS or not entry.is_file()
    )
    if in_the_way:
        shown = ", ".join(in_the_way[:5]) + (
            f" and {len(in_the_way) - 5} more" if len(in_the_way) > 5 else ""
        )
        raise DataError(f"{given} is not a tokenizer folder (it holds {shown}): {choose}")
    return target


def _replace_folder(new: Path, target: Path) -> None:
    """Rename ``new`` to ``target``; an old ``target`` (checked: tokenizer files only) is first
    renamed aside and then only its tokenizer files are deleted."""
    old = None
    if target.exists():
        old = target.with_name(f".old-{target.name}-{uuid.uuid4().hex[:8]}")
        os.rename(target, old)
    try:
        os.replace(new, target)
    except BaseException:
        if old is not None:
            os.rename(old, target)
        raise
    if old is not None:
        for name in _TOKENIZER_OUTPUTS:
            (old / name).unlink(missing_ok=True)
        try:
            old.rmdir()
        except OSError:  # something appeared in it after the check: keep it, never delete it
            log.warning(
                "kept %s: files appeared in the old tokenizer folder while replacing it", old
            )


def _short_vocab(requested: int, learned: int) -> list[str]:
    if learned < requested:
        return [
            f"the corpus has too little distinct text for {requested} tokens: {learned} learned"
        ]
    return []


def vocab_warnings(tokenizer_dir: Path, vocab_size: int) -> list[str]:
    """Warnings about a tokenizer folder trained for ``vocab_size`` ids: one
    ("the corpus has too little distinct text for 8192 tokens: 294 learned") when its
    ``tokenizer.json`` has fewer ids, else none.

    Raises:
        OSError: ``tokenizer.json`` cannot be read; ``Exception`` from ``tokenizers`` when it
            is not a tokenizer file.
    """
    from tokenizers import Tokenizer

    learned = Tokenizer.from_file(str(Path(tokenizer_dir) / "tokenizer.json")).get_vocab_size(
        with_added_tokens=True
    )
    return _short_vocab(vocab_size, learned)


def _write_json(path: Path, data: dict) -> None:
    path.write_text(json.dumps(data, indent=2) + "\n", encoding="utf-8")


def load_tokenizer(tokenizer_dir: Path, padded_vocab_size: int) -> litgpt.Tokenizer:
    """Load and check a tokenizer folder for training a model of ``padded_vocab_size`` rows.

    Checks, in order: the folder exists; it holds ``tokenizer.json`` or ``tokenizer.model``; a
    ``tokenizer_config.json``, if present, is JSON with a ``tokenizer_class``; the tokenizer has a
    BOS token (LitGPT's TextFiles puts one in front of every document); every id is below
    ``padded_vocab_size``.

    Raises:
        DataError: naming ``tokenizer_dir`` and the failed check.
    """
    import litgpt

    folder = Path(tokenizer_dir)
    where = f"tokenizer_dir {folder}"
    problem = tokenizer_folder_problem(folder)  # the message a dry run and the API give
    if problem:
        raise DataError(f"tokenizer_dir {problem}")
    config_path = folder / "tokenizer_config.json"
    if config_path.is_file():
        try:
            config = json.loads(config_path.read_text(encoding="utf-8"))
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise DataError(f"{where}: tokenizer_config.json is not valid JSON ({exc})") from None
        if not isinstance(config, dict) or "tokenizer_class" not in config:
            raise DataError(
                f"{where}: tokenizer_config.json has no 'tokenizer_class' (LitGPT requires it; "
                'e.g. "PreTrainedTokenizerFast")'
            )
    try:
        tokenizer = litgpt.Tokenizer(folder)
    except Exception as exc:  # a corrupt file: the library's own message, with the folder
        raise DataError(f"{where}: cannot be loaded: {exc}") from None
    if tokenizer.bos_id is None:
        raise DataError(
            f"{where}: no BOS token (set bos_token in tokenizer_config.json or bos_token_id in "
            "generation_config.json); every document starts with one"
        )
    if tokenizer.backend == "huggingface":
        n_ids = tokenizer.processor.get_vocab_size(with_added_tokens=True)
    else:
        n_ids = tokenizer.vocab_size
    if n_ids > padded_vocab_size:
        raise DataError(
            f"{where}: has {n_ids} token ids but the model's padded_vocab_size is "
            f"{padded_vocab_size}; ids must be < padded_vocab_size (raise padded_vocab_size "
            f"and vocab_size to at least {n_ids}, or train a smaller tokenizer)"
        )
    return tokenizer


def tokenizer_hash(tokenizer_dir: Path) -> str:
    """SHA-256 (hex) over the tokenizer folder's files in ``TOKENIZER_FILES`` (names and bytes)."""
    import hashlib

    digest = hashlib.sha256()
    for name in TOKENIZER_FILES:
        path = Path(tokenizer_dir) / name
        if path.is_file():
            digest.update(name.encode() + b"\0" + path.read_bytes() + b"\0")
    return digest.hexdigest()
