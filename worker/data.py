"""Training data: ``*.txt`` folders -> a token cache -> deterministic micro-batches.

Semantics follow LitGPT's ``TextFiles`` (0.5.13) where it matters for the model:

* the ``*.txt`` files at the top level of a folder, sorted by name;
* every file is read as ``tokenize()`` reads it (UTF-8 in text mode, so CRLF becomes LF, then
  ``str.strip()``; a BOM is kept: ``worker.tokenizer.read_text``) and encoded with a BOS token in
  front and no EOS, and the files are concatenated: the same token ids as LitGPT;
* samples are non-overlapping windows of ``max_seq_length + 1`` tokens (input = window[:-1],
  target = window[1:]);
* without ``val_data_path`` the first sorted training file is the validation set (needs >= 2 files).

Where this module deliberately differs from ``TextFiles`` (``litgpt/data/text_files.py``):

* the tokens are cached **outside** the user's folders (``~/.cache/moejobs/tokens``, or the
  ``MOEJOBS_TOKEN_CACHE`` environment variable), under a name derived from the SHA-256 of the file
  names and bytes (:func:`files_sha256`), the tokenizer's hash and the cache format, so a cache is
  never stale and nothing is written into the input folders. The same raw-text hashes are what a
  checkpoint records for the resume checks (``worker.checkpoint``); each file is hashed once per
  start (:func:`source_text`);
* a cache file is written under a temporary name and renamed (``os.replace``), so two runs that
  build the same cache at once both end with the same complete file, and a reader never sees half;
* the sampling order is a pure function of (seed, world size, data position), so a resumed run
  sees exactly the micro-batches it would have seen without the interruption.

The cache is built streaming (:func:`_encode_files`): files are read in pieces, cut into chunks
only where the byte-level BPE pre-tokenizer ends a piece anyway (:func:`safe_split`, so the ids are
those of encoding each file whole), encoded with the ``tokenizers`` batch API on all CPUs and
written to the ``.npy`` as they come; peak memory does not depend on the corpus' size.

``data.init_args.num_workers`` is accepted but no DataLoader worker processes are started: a
micro-batch is a gather of ``micro_batch_size`` rows from a memory-mapped array (microseconds),
while worker processes cost seconds to start, duplicate the parent's memory on fork, and cannot be
started at all inside a daemonic Celery pool process. The engine logs this.
"""

from __future__ import annotations

import codecs
import hashlib
import itertools
import json
import os
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from worker.errors import DataError, no_space_errno
from worker.tokenizer import text_files, tokenizer_hash

if TYPE_CHECKING:  # pragma: no cover
    import litgpt
    import torch

#: bump when the cache file layout or the tokenization rule changes (invalidates old caches).
#: 1: each file's bytes as they are; 2: read as LitGPT's ``tokenize()`` reads them (CRLF -> LF,
#: stripped: ``worker.tokenizer.read_text``). Checkpoints record it (``token_format``): a resume
#: across a change is allowed with a warning (``worker.checkpoint.token_format_change``).
CACHE_FORMAT = 2


def cache_root() -> Path:
    """Folder of the token caches: ``$MOEJOBS_TOKEN_CACHE`` or ``~/.cache/moejobs/tokens``."""
    env = os.environ.get("MOEJOBS_TOKEN_CACHE")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "moejobs" / "tokens"


def split_files(
    train_data_path: str | Path, val_data_path: str | Path | None
) -> tuple[list[Path], list[Path]]:
    """Training and validation files, LitGPT ``TextFiles`` rules.

    Returns:
        ``(train_files, val_files)``; ``val_files`` is empty when there is no validation set
        (no ``val_data_path`` and a single training file).

    Raises:
        DataError: a folder is missing, is a file, or has no ``.txt`` file (message names it).
    """
    train_files = text_files(Path(train_data_path))
    if val_data_path is not None:
        return train_files, text_files(Path(val_data_path))
    if len(train_files) >= 2:
        return train_files[1:], train_files[:1]
    return train_files, []


#: bytes read at a time while hashing a file
_HASH_CHUNK = 1 << 20


def files_sha256(files: Sequence[Path]) -> str:
    """SHA-256 (hex) of the raw text of ``files`` in the given (reading) order.

    For each file: its name, NUL, its size in bytes, NUL, its bytes. The names are included
    because they fix the order of concatenation; the folder is not, so the same text in two
    places hashes the same. Independent of the tokenizer and of :data:`CACHE_FORMAT`. Files are
    read in 1 MiB chunks (memory stays flat for large corpora).

    Raises:
        DataError: a file cannot be read (the message names it).
    """
    return _hash_files(files)[0]


def _hash_files(files: Sequence[Path]) -> tuple[str, int]:
    """(:func:`files_sha256`, total bytes)."""
    digest = hashlib.sha256()
    total = 0
    for path in files:
        path = Path(path)
        try:
            with open(path, "rb") as fh:
                size = os.fstat(fh.fileno()).st_size
                digest.update(path.name.encode() + b"\0" + str(size).encode() + b"\0")
                while chunk := fh.read(_HASH_CHUNK):
                    digest.update(chunk)
        except OSError as exc:
            raise DataError(f"{path}: cannot read ({exc.strerror})") from None
        total += size
    return digest.hexdigest(), total


@dataclass(frozen=True)
class TextSet:
    """One list of text files in reading order and the hash of their raw bytes.

    Attributes:
        files: the ``.txt`` files, in concatenation order.
        sha256: :func:`files_sha256` of ``files``.
        n_bytes: total size of the files in bytes (for messages).
    """

    files: tuple[Path, ...]
    sha256: str
    n_bytes: int

    @classmethod
    def of(cls, files: Sequence[Path]) -> TextSet:
        """Hash ``files`` (reads every byte once). Raises DataError naming an unreadable file."""
        files = tuple(Path(f) for f in files)
        sha, n_bytes = _hash_files(files)
        return cls(files=files, sha256=sha, n_bytes=n_bytes)

    def describe(self) -> str:
        """``"14 files, 1,043,112 bytes, sha256 3f2a9c01e4b7"`` (the hash shortened to 12 hex digits)."""
        return f"{len(self.files)} file{'s' if len(self.files) != 1 else ''}, {self.n_bytes:,} bytes, sha256 {self.sha256[:12]}"


@dataclass(frozen=True)
class SourceText:
    """The raw text of a run, as the engine will read it (LitGPT ``TextFiles`` split).

    Attributes:
        train: the training files.
        val: the validation files, or None when there is no validation set.
    """

    train: TextSet
    val: TextSet | None


def source_text(train_data_path: str | Path, val_data_path: str | Path | None) -> SourceText:
    """Find the run's text files (:func:`split_files`) and hash them (:func:`files_sha256`).

    Raises:
        DataError: a folder is missing or has no ``.txt`` file, or a file cannot be read.
    """
    train_files, val_files = split_files(train_data_path, val_data_path)
    return SourceText(
        train=TextSet.of(train_files), val=TextSet.of(val_files) if val_files else None
    )


def cache_key(data_sha256: str, tokenizer_sha256: str) -> str:
    """Name of a token cache: SHA-256 (hex) of the cache format, the tokenizer's hash
    (``worker.tokenizer.tokenizer_hash``) and the raw text's hash (:func:`files_sha256`)."""
    digest = hashlib.sha256(f"moejobs-tokens-v{CACHE_FORMAT}\0".encode())
    digest.update(tokenizer_sha256.encode() + b"\0" + data_sha256.encode())
    return digest.hexdigest()


@dataclass(frozen=True)
class TokenSet:
    """Token ids of a list of files, concatenated (BOS in front of each file).

    Attributes:
        tokens: 1-D array of ids, ``uint16`` when every id fits, else ``uint32``; memory-mapped.
        path: the cache file (``<cache_root>/<key>.npy``).
        files: the source files, in concatenation order.
        folder: the folder the files came from (for error messages).
    """

    tokens: np.ndarray
    path: Path
    files: tuple[Path, ...]
    folder: Path

    def __len__(self) -> int:
        return int(self.tokens.shape[0])

    def n_windows(self, window: int) -> int:
        """Number of non-overlapping windows of ``window`` tokens (the tail is dropped)."""
        return len(self) // window


def _solid(ch: str) -> bool:
    """A character the byte-level pre-tokenizer's regex never treats as whitespace (``\\s``):
    printable and not a space (format characters such as U+FEFF count as not solid)."""
    return ch.isprintable() and not ch.isspace()


def _is_ascii_letter(ch: str) -> bool:
    return ("a" <= ch <= "z") or ("A" <= ch <= "Z")


def safe_split(text: str, start: int) -> int:
    """The first position ``p >= start`` where ``text`` may be cut without changing its byte-level
    BPE encoding (``encode(text) == encode(text[:p]) + encode(text[p:])``), or -1 when none.

    The GPT-2 pre-tokenizer regex (``'s|'t|...| ?\\p{L}+| ?\\p{N}+| ?[^\\s\\p{L}\\p{N}]+|\\s+(?!\\S)|\\s+``)
    ends a pre-token at ``p`` and starts the next one there, whatever is around, when:

    * ``text[p-1]`` is a lone ``"\\n"`` between two solid characters (:func:`_solid`): the run of
      whitespace is that one newline, a pre-token of its own in both texts (a longer run would be
      one pre-token at the end of ``text[:p]`` but split before its last character in ``text``);
    * or ``text[p-1]`` is an ASCII letter and ``text[p:p+2]`` is a space and an ASCII letter (the
      word ends at ``p``; the space starts the next word's pre-token).

    The regex has no look-behind, so matching ``text[p:]`` from 0 is matching ``text`` from ``p``.
    """
    n = len(text)
    nl = text.find("\n", max(start - 1, 1))
    sp = text.find(" ", max(start, 1))
    while nl != -1 or sp != -1:
        if nl != -1 and (sp == -1 or nl + 1 <= sp):
            p = nl + 1
            if p < n and _solid(text[p]) and _solid(text[nl - 1]):
                return p
            nl = text.find("\n", p)
        else:
            p = sp
            if p + 1 < n and _is_ascii_letter(text[p - 1]) and _is_ascii_letter(text[p + 1]):
                return p
            sp = text.find(" ", p + 1)
    return -1


#: bytes read from a file at a time
READ_BYTES = 1 << 20
#: characters of text per chunk handed to the tokenizer (each cut at the next safe point after it;
#: the library encodes short texts faster than 64 Ki-character ones)
CHUNK_CHARS = 1 << 12
#: characters of text per ``encode_batch`` call: bounds the memory of one batch's encodings
#: (1 MiB of text is ~0.3M tokens; ``tokenizers`` holds ~150 bytes a token while encoding), with
#: 512 KiB of text per CPU for the library's threads (2 CPUs: 1 MiB; 16 CPUs: 8 MiB)
BATCH_CHARS = max(1 << 20, (1 << 16) * 8 * (os.cpu_count() or 1))
#: seconds between two progress reports (``on_progress``)
PROGRESS_INTERVAL_S = 5.0


@dataclass(frozen=True)
class PrepProgress:
    """How far the tokenization of one file set has come.

    Attributes:
        tokens: token ids written so far.
        bytes_done: bytes of text read so far (of ``bytes_total``).
        bytes_total: size of all the files in bytes.
        elapsed_s: seconds since the tokenization began.
        done: True on the last report (the cache is complete).
    """

    tokens: int
    bytes_done: int
    bytes_total: int
    elapsed_s: float
    done: bool = False

    @property
    def tokens_per_s(self) -> float:
        return self.tokens / self.elapsed_s if self.elapsed_s > 0 else 0.0

    @property
    def eta_s(self) -> float | None:
        """Seconds left, from the bytes read so far (None before any byte is read)."""
        if self.done:
            return 0.0
        if self.bytes_done <= 0 or self.elapsed_s <= 0:
            return None
        return self.elapsed_s * (self.bytes_total - self.bytes_done) / self.bytes_done

    def describe(self) -> str:
        """``"12,345,678 tokens, 40% of 99.0 MB, 1.10M tokens/s, ETA 54 s"``."""
        share = 100.0 * self.bytes_done / self.bytes_total if self.bytes_total else 100.0
        eta = self.eta_s
        return (
            f"{self.tokens:,} tokens, {share:.0f}% of {self.bytes_total / 1e6:.1f} MB, "
            f"{self.tokens_per_s / 1e6:.2f}M tokens/s"
            + (f", ETA {eta:.0f} s" if eta is not None and not self.done else "")
            + (f", done in {self.elapsed_s:.1f} s" if self.done else "")
        )


class _ReadCounter:
    """Bytes read so far from the files of one tokenization (for progress)."""

    def __init__(self) -> None:
        self.bytes = 0


def iter_text(path: Path, counter: _ReadCounter | None = None) -> Iterator[str]:
    """The text of ``path`` as :func:`worker.tokenizer.read_text` gives it (UTF-8, universal
    newlines, stripped, BOM kept), in pieces of at most about :data:`READ_BYTES` characters whose
    concatenation is that text; memory stays flat whatever the file's size.

    Raises:
        DataError: not valid UTF-8 (the byte offset, as ``read_text`` says it) or only whitespace.
    """
    decoder = codecs.getincrementaldecoder("utf-8")("strict")
    fed = 0  # bytes given to the decoder so far
    carry_cr = ""  # a "\r" at the end of a piece: it may be the first half of "\r\n"
    held = ""  # trailing whitespace, emitted only when something solid follows
    started = False  # leading whitespace is dropped until the first non-space character
    try:
        fh = open(path, "rb")
    except OSError as exc:
        raise DataError(f"{path}: cannot read ({exc.strerror})") from None
    with fh:
        while True:
            raw = fh.read(READ_BYTES)
            final = not raw
            pending = len(decoder.getstate()[0])
            try:
                text = decoder.decode(raw, final=final)
            except UnicodeDecodeError as exc:
                offset = fed - pending + exc.start
                raise DataError(
                    f"{path}: not valid UTF-8 text (byte {offset}: {exc.reason})"
                ) from None
            fed += len(raw)
            if counter is not None:
                counter.bytes += len(raw)
            text = carry_cr + text
            carry_cr = ""
            if not final and text.endswith("\r"):
                text, carry_cr = text[:-1], "\r"
            text = text.replace("\r\n", "\n").replace("\r", "\n")
            if not started:
                text = text.lstrip()
                started = bool(text)
            if text:
                body = text.rstrip()
                if body:
                    yield held + body
                    held = text[len(body) :]
                else:
                    held += text
            if final:
                break
    if not started:
        raise DataError(f"{path}: file is empty (or only whitespace)")


def file_chunks(
    path: Path, chunk_chars: int | None = None, counter: _ReadCounter | None = None
) -> Iterator[str]:
    """The text of ``path`` (:func:`iter_text`) cut into chunks of about ``chunk_chars``
    characters or more, each cut at a :func:`safe_split` point, so that encoding the chunks one
    by one gives the ids of encoding the whole text with a byte-level BPE. A stretch with no safe
    point (a very long line without "word word") stays whole: memory grows with that stretch.

    Raises:
        DataError: as :func:`iter_text`.
    """
    chunk_chars = CHUNK_CHARS if chunk_chars is None else chunk_chars
    buf = ""
    scanned = 0  # buf[:scanned] holds no safe point at or after chunk_chars
    for piece in iter_text(path, counter):
        buf += piece
        pos = 0
        while len(buf) - pos >= chunk_chars:
            p = safe_split(buf, max(pos + chunk_chars, scanned))
            if p == -1:
                scanned = max(len(buf) - 2, 0)
                break
            yield buf[pos:p]
            pos = p
        if pos:
            scanned = max(scanned - pos, 0)
            buf = buf[pos:]
    yield buf


def chunking_problem(tokenizer: litgpt.Tokenizer) -> str | None:
    """Why ``tokenizer`` may not encode a file in chunks (:func:`file_chunks`), or None when it
    may: a Hugging Face byte-level BPE with no normalizer, the GPT-2 regex pre-tokenizer
    (``ByteLevel``, ``use_regex``, no prefix space), no post-processor adding tokens, no BPE
    dropout, no truncation or padding, and no added token that strips the whitespace around it.
    Any other tokenizer encodes each file whole (same ids, memory grows with the largest file)."""
    if getattr(tokenizer, "backend", None) != "huggingface":
        return f"the {getattr(tokenizer, 'backend', '?')} backend encodes whole files"
    proc = tokenizer.processor
    try:
        pre = (
            json.loads(proc.pre_tokenizer.__getstate__()) if proc.pre_tokenizer is not None else {}
        )
        post = (
            json.loads(proc.post_processor.__getstate__())
            if proc.post_processor is not None
            else None
        )
        added = list(proc.get_added_tokens_decoder().values())
        model, dropout = type(proc.model).__name__, getattr(proc.model, "dropout", None)
    except Exception as exc:  # noqa: BLE001 - a tokenizer that cannot describe itself: whole files
        return f"its configuration cannot be read ({exc})"
    if proc.normalizer is not None:
        return "it has a normalizer"
    if not (
        pre.get("type") == "ByteLevel"
        and pre.get("use_regex", True)
        and not pre.get("add_prefix_space")
    ):
        return "its pre-tokenizer is not ByteLevel(use_regex, no prefix space)"
    if post is not None and post.get("type") != "ByteLevel":
        return f"its post-processor is {post.get('type')}"
    if model != "BPE" or dropout:
        return "its model is not a BPE without dropout"
    if proc.truncation is not None or proc.padding is not None:
        return "it truncates or pads"
    if any(t.lstrip or t.rstrip or t.single_word for t in added):
        return "an added token strips whitespace or matches single words"
    return None


class _NpyWriter:
    """A 1-D ``.npy`` file written piece by piece: the header is written for shape (0,) and
    rewritten for the final length at the end (NumPy pads the header so that any length fits
    in place: ``numpy.lib.format.GROWTH_AXIS_MAX_DIGITS``)."""

    def __init__(self, fh, dtype: np.dtype) -> None:
        self.fh, self.dtype, self.n = fh, np.dtype(dtype), 0
        np.lib.format.write_array_header_1_0(fh, self._header(0))
        self.data_start = fh.tell()

    def _header(self, n: int) -> dict:
        return {
            "descr": np.lib.format.dtype_to_descr(self.dtype),
            "fortran_order": False,
            "shape": (n,),
        }

    def write(self, ids: np.ndarray) -> None:
        self.fh.write(np.ascontiguousarray(ids, dtype=self.dtype).tobytes())
        self.n += int(ids.size)

    def finish(self) -> None:
        self.fh.flush()
        self.fh.seek(0)
        np.lib.format.write_array_header_1_0(self.fh, self._header(self.n))
        if self.fh.tell() != self.data_start:  # pragma: no cover - NumPy's padding guarantees it
            raise RuntimeError("the .npy header grew when rewritten")
        self.fh.seek(0, os.SEEK_END)
        self.fh.flush()


def _encode_files(
    files: Sequence[Path],
    tokenizer: litgpt.Tokenizer,
    padded_vocab_size: int,
    fh,
    *,
    on_progress: Callable[[PrepProgress], None] | None = None,
    progress_interval_s: float = PROGRESS_INTERVAL_S,
    n_bytes: int | None = None,
    chunk_chars: int | None = None,
    batch_chars: int | None = None,
) -> dict:
    """Encode ``files`` as LitGPT's ``tokenize()`` does (BOS in front of each file, no EOS) and
    write the ids into ``fh`` as a 1-D ``.npy`` (uint16 when ``padded_vocab_size <= 2**16``,
    else uint32), batch after batch: memory is bounded by ``batch_chars`` (and, where a file
    cannot be cut, by its size), not by the corpus. ``chunk_chars`` and ``batch_chars`` default
    to :data:`CHUNK_CHARS` and :data:`BATCH_CHARS`. Returns the cache's metadata fields."""
    chunk_chars = CHUNK_CHARS if chunk_chars is None else chunk_chars
    batch_chars = BATCH_CHARS if batch_chars is None else batch_chars
    dtype = np.dtype(np.uint16 if padded_vocab_size <= 2**16 else np.uint32)
    writer = _NpyWriter(fh, dtype)
    bos, eos = tokenizer.bos_id, tokenizer.eos_id
    problem = chunking_problem(tokenizer)
    processor = tokenizer.processor
    if tokenizer.backend == "huggingface":
        batch_encode = getattr(processor, "encode_batch_fast", processor.encode_batch)

        def encode(texts: list[str]) -> list[list[int]]:
            return [e.ids for e in batch_encode(texts)]
    else:  # sentencepiece: what litgpt's Tokenizer.encode calls, one text at a time

        def encode(texts: list[str]) -> list[list[int]]:
            return [list(processor.encode(t)) for t in texts]

    counter = _ReadCounter()
    total = n_bytes if n_bytes is not None else sum(os.path.getsize(p) for p in files)
    started = time.monotonic()
    last_report = started

    def pieces() -> Iterator[tuple[str, bool, bool]]:
        for path in files:
            if problem is None:
                it = file_chunks(path, chunk_chars, counter)
            else:
                it = iter([_whole_text(path, counter)])
            first, prev = True, next(it)
            for nxt in it:
                yield prev, first, False
                first, prev = False, nxt
            yield prev, first, True

    def flush(batch: list[tuple[str, bool, bool]]) -> None:
        nonlocal last_report
        outs = []
        for (_, first, last), ids in zip(batch, encode([t for t, _, _ in batch]), strict=True):
            # litgpt.Tokenizer.encode(bos=True, eos=False) on the whole file
            if first and (not ids or ids[0] != bos):
                ids = [bos, *ids]
            if last and ids and ids[-1] == eos:
                ids = ids[:-1]
            outs.append(ids)
        arr = np.fromiter(
            itertools.chain.from_iterable(outs), dtype=np.uint32, count=sum(len(o) for o in outs)
        )
        if arr.size and int(arr.max()) >= padded_vocab_size:
            raise DataError(
                f"{files[0].parent}: the tokenizer produced id {int(arr.max())}, not below the model's "
                f"padded_vocab_size {padded_vocab_size}"
            )
        writer.write(arr)
        now = time.monotonic()
        if on_progress is not None and now - last_report >= progress_interval_s:
            last_report = now
            on_progress(PrepProgress(writer.n, counter.bytes, total, now - started))

    batch: list[tuple[str, bool, bool]] = []
    size = 0
    for item in pieces():
        batch.append(item)
        size += len(item[0])
        if size >= batch_chars:
            flush(batch)
            batch, size = [], 0
    if batch:
        flush(batch)
    writer.finish()
    elapsed = time.monotonic() - started
    if on_progress is not None:
        on_progress(PrepProgress(writer.n, counter.bytes, total, elapsed, done=True))
    return {
        "tokens": writer.n,
        "dtype": str(dtype),
        "chunked": problem is None,
        "seconds": round(elapsed, 3),
    }


def _whole_text(path: Path, counter: _ReadCounter) -> str:
    return "".join(iter_text(path, counter))


def tokenize_files(
    files: Sequence[Path],
    tokenizer: litgpt.Tokenizer,
    tokenizer_dir: str | Path,
    padded_vocab_size: int,
    cache_dir: Path | None = None,
    *,
    text: TextSet | None = None,
    tokenizer_sha256: str | None = None,
    on_progress: Callable[[PrepProgress], None] | None = None,
    progress_interval_s: float = PROGRESS_INTERVAL_S,
) -> TokenSet:
    """Tokenize ``files`` (or reuse the cache) and return the memory-mapped tokens.

    The cache file name is :func:`cache_key`; it is written to a temporary file in the cache
    folder, flushed to disk and renamed, so concurrent builders are safe. Nothing is written
    next to the input files. ``text`` (the :class:`TextSet` of ``files``) and
    ``tokenizer_sha256`` are the hashes when already computed; otherwise they are computed here.

    The files are read and encoded in bounded chunks and written as they are encoded
    (:func:`_encode_files`): peak memory does not grow with the corpus. ``on_progress`` is called
    with a :class:`PrepProgress` at most every ``progress_interval_s`` seconds while encoding and
    once at the end (``done``); not called when the cache already exists.

    Raises:
        DataError: a file is empty or not UTF-8, an id is out of range, or the cache folder cannot
            be written (each message names the file or folder).
    """
    files = [Path(f) for f in files]
    folder = files[0].parent if files else Path(".")
    cache_dir = Path(cache_dir) if cache_dir is not None else cache_root()
    data_sha = text.sha256 if text is not None else files_sha256(files)
    tok_sha = (
        tokenizer_sha256 if tokenizer_sha256 is not None else tokenizer_hash(Path(tokenizer_dir))
    )
    key = cache_key(data_sha, tok_sha)
    path = cache_dir / f"{key}.npy"
    if not path.is_file():
        try:
            cache_dir.mkdir(parents=True, exist_ok=True)
            fd, tmp_name = tempfile.mkstemp(prefix=f".{key}.", suffix=".tmp", dir=cache_dir)
        except OSError as exc:
            if no_space_errno(exc) is not None:
                raise  # a full filesystem (no block or no inode left): the caller's no_space
            raise DataError(
                f"token cache folder {cache_dir}: cannot write ({exc.strerror}); set MOEJOBS_TOKEN_CACHE"
            ) from None
        try:
            with os.fdopen(fd, "wb") as fh:
                fields = _encode_files(
                    files,
                    tokenizer,
                    padded_vocab_size,
                    fh,
                    on_progress=on_progress,
                    progress_interval_s=progress_interval_s,
                    n_bytes=text.n_bytes if text is not None else None,
                )
                os.fsync(fh.fileno())
            meta = {"format": CACHE_FORMAT, **fields, "files": [str(f) for f in files]}
            meta_tmp = Path(tmp_name + ".json")
            meta_tmp.write_text(json.dumps(meta, indent=1) + "\n", encoding="utf-8")
            os.replace(meta_tmp, cache_dir / f"{key}.json")
            os.replace(tmp_name, path)  # the .npy appears last: its presence means complete
        except BaseException:
            for leftover in (Path(tmp_name), Path(tmp_name + ".json")):
                leftover.unlink(missing_ok=True)
            raise
    tokens = np.load(path, mmap_mode="r", allow_pickle=False)
    return TokenSet(tokens=tokens, path=path, files=tuple(files), folder=folder)


class WindowSampler:
    """Deterministic micro-batches of windows from a :class:`TokenSet`.

    The training stream is an endless sequence of sample indices ``s = 0, 1, 2, ...``; sample ``s``
    is window ``perm_e[s % n]`` with ``e = s // n`` (epoch) and ``perm_e`` a permutation of the
    ``n`` windows drawn from ``numpy.random.default_rng([seed, e])``. Micro-batch ``k`` (counted
    from ``start_sample``) of rank ``r`` of ``world_size`` holds samples
    ``start_sample + (k * world_size + r) * micro_batch_size + b`` for ``b < micro_batch_size``,
    so the ranks of one global micro-batch read disjoint, consecutive slices of the stream and the
    position to resume from is the single number ``samples consumed`` (all ranks together).
    """

    def __init__(
        self,
        data: TokenSet,
        seq_len: int,
        micro_batch_size: int,
        seed: int,
        world_size: int = 1,
        rank: int = 0,
        start_sample: int = 0,
    ) -> None:
        self.data, self.window = data, seq_len + 1
        self.micro_batch_size, self.seed = micro_batch_size, seed
        self.world_size, self.rank, self.start_sample = world_size, rank, start_sample
        self.n = data.n_windows(self.window)
        if self.n < 1:
            raise ValueError("no complete window")
        self._perm_epoch = -1
        self._perm: np.ndarray | None = None

    def _window_of(self, sample: int) -> int:
        epoch, pos = divmod(sample, self.n)
        if epoch != self._perm_epoch:
            self._perm = np.random.default_rng([self.seed, epoch]).permutation(self.n)
            self._perm_epoch = epoch
        assert self._perm is not None  # set above for every epoch >= 0
        return int(self._perm[pos])

    def samples(self, k: int) -> list[int]:
        """Global sample indices of this rank's micro-batch ``k``."""
        first = self.start_sample + (k * self.world_size + self.rank) * self.micro_batch_size
        return list(range(first, first + self.micro_batch_size))

    def batch(self, k: int) -> torch.Tensor:
        """This rank's micro-batch ``k``: int64 tensor of shape ``(micro_batch_size, seq_len + 1)``."""
        import torch

        rows = [self._window_of(s) for s in self.samples(k)]
        w = self.window
        arr = np.stack([np.asarray(self.data.tokens[i * w : (i + 1) * w]) for i in rows]).astype(
            np.int64
        )
        return torch.from_numpy(arr)


def validation_batches(
    data: TokenSet,
    seq_len: int,
    micro_batch_size: int,
    max_iters: int,
    world_size: int = 1,
    rank: int = 0,
) -> list[torch.Tensor]:
    """The fixed validation micro-batches of this rank.

    Micro-batch ``j`` is windows ``j*mbs .. (j+1)*mbs - 1`` in file order, for
    ``j < min(max_iters, n_windows // mbs)``; rank ``r`` takes ``j = r, r + world_size, ...``
    (a rank may get none when there are fewer micro-batches than ranks).
    """
    import torch

    w = seq_len + 1
    n_batches = min(max_iters, data.n_windows(w) // micro_batch_size)
    out = []
    for j in range(rank, n_batches, world_size):
        start = j * micro_batch_size * w
        arr = np.asarray(data.tokens[start : start + micro_batch_size * w]).astype(np.int64)
        out.append(torch.from_numpy(arr.reshape(micro_batch_size, w)))
    return out


@dataclass(frozen=True)
class PreparedData:
    """Tokenized training and (optional) validation data, checked against the batch shape.

    Attributes:
        train, val: the token sets (``val`` None when no validation is configured).
        source: the raw text's files and hashes (validation files hashed even when unused).
        tokenizer_sha256: ``worker.tokenizer.tokenizer_hash`` of the tokenizer folder.
    """

    train: TokenSet
    val: TokenSet | None
    source: SourceText | None = None
    tokenizer_sha256: str | None = None


def prepare_data(
    train_data_path: str | Path,
    val_data_path: str | Path | None,
    tokenizer: litgpt.Tokenizer,
    tokenizer_dir: str | Path,
    padded_vocab_size: int,
    seq_len: int,
    micro_batch_size: int,
    need_validation: bool,
    cache_dir: Path | None = None,
    *,
    source: SourceText | None = None,
    tokenizer_sha256: str | None = None,
    on_progress: Callable[[PrepProgress], None] | None = None,
) -> PreparedData:
    """Find, tokenize (cached) and check the data for one run.

    Validation data is tokenized only when ``need_validation`` (some validation is configured),
    but a given ``val_data_path`` must always exist and hold ``.txt`` files. ``source`` (from
    :func:`source_text` of the same paths) and ``tokenizer_sha256`` are reused when given, so a
    start that already hashed them for the resume checks does not hash again. ``on_progress``
    receives the tokenization's progress (:func:`tokenize_files`; training set, then validation).

    Raises:
        DataError: naming the folder or file: missing folder, no ``.txt`` files, empty or non-UTF-8
            file, training or validation data shorter than one micro-batch of
            ``micro_batch_size x (seq_len + 1)`` tokens, validation needed but no validation set.
    """
    if source is None:
        source = source_text(train_data_path, val_data_path)
    if tokenizer_sha256 is None:
        tokenizer_sha256 = tokenizer_hash(Path(tokenizer_dir))
    need = micro_batch_size * (seq_len + 1)
    train = tokenize_files(
        source.train.files,
        tokenizer,
        tokenizer_dir,
        padded_vocab_size,
        cache_dir,
        text=source.train,
        tokenizer_sha256=tokenizer_sha256,
        on_progress=on_progress,
    )
    if train.n_windows(seq_len + 1) < micro_batch_size:
        raise DataError(
            f"{Path(train_data_path)}: training data has {len(train)} tokens, fewer than one micro-batch "
            f"of micro_batch_size x (max_seq_length + 1) = {micro_batch_size} x {seq_len + 1} = {need} tokens"
        )
    val = None
    if need_validation:
        if source.val is None:
            raise DataError(
                f"{Path(train_data_path)}: validation is configured but there is no validation set "
                "(give data.init_args.val_data_path, or put at least 2 .txt files in train_data_path: "
                "the first sorted file becomes validation)"
            )
        val = tokenize_files(
            source.val.files,
            tokenizer,
            tokenizer_dir,
            padded_vocab_size,
            cache_dir,
            text=source.val,
            tokenizer_sha256=tokenizer_sha256,
            on_progress=on_progress,
        )
        where = Path(val_data_path) if val_data_path is not None else source.val.files[0]
        if val.n_windows(seq_len + 1) < micro_batch_size:
            raise DataError(
                f"{where}: validation data has {len(val)} tokens, fewer than one micro-batch of "
                f"micro_batch_size x (max_seq_length + 1) = {micro_batch_size} x {seq_len + 1} = {need} tokens"
            )
    return PreparedData(train=train, val=val, source=source, tokenizer_sha256=tokenizer_sha256)
