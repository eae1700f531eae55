"""Training data: ``*.txt`` folders -> a token cache -> deterministic micro-batches.

Semantics follow LitGPT's ``TextFiles`` (0.5.13) where it matters for the model:

* the ``*.txt`` files at the top level of a folder, sorted by name;
* every file is read as ``tokenize()`` reads it (UTF-8 in text mode, so CRLF becomes LF, then
  ``str.strip()``; a BOM is kept: ``worker.tokenizer.read_text``) and encoded with a BOS token in
  front and no EOS, and the files are concatenated: the same token ids as LitGPT;
* samples are non-overlapping windows of ``max_seq_length + 1`` tokens (input = window[:-1],
  target = window[1:]);
* without ``val_data_path`` the first sorted training file is the validation set (needs >= 2 files).

Where this module deliberately differs from ``TextFiles`` (see ../shared/design/litgpt-facts.md):

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

``data.init_args.num_workers`` is accepted but no DataLoader worker processes are started: a
micro-batch is a gather of ``micro_batch_size`` rows from a memory-mapped array (microseconds),
while worker processes cost seconds to start, duplicate the parent's memory on fork, and cannot be
started at all inside a daemonic Celery pool process. The engine logs this.
"""
from __future__ import annotations

import hashlib
import json
import os
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from worker.errors import DataError, no_space_errno
from worker.tokenizer import read_text, text_files, tokenizer_hash

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


def split_files(train_data_path: str | Path, val_data_path: str | Path | None) -> tuple[list[Path], list[Path]]:
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
    return SourceText(train=TextSet.of(train_files), val=TextSet.of(val_files) if val_files else None)


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


def _encode_files(files: Sequence[Path], tokenizer: litgpt.Tokenizer, padded_vocab_size: int) -> np.ndarray:
    parts: list[np.ndarray] = []
    for path in files:
        text = read_text(path)  # DataError naming the file when empty or not UTF-8
        ids = tokenizer.encode(text, bos=True, eos=False).numpy()
        parts.append(ids.astype(np.int64, copy=False))
    tokens = np.concatenate(parts) if parts else np.zeros(0, dtype=np.int64)
    if tokens.size and (tokens.min() < 0 or tokens.max() >= padded_vocab_size):
        raise DataError(
            f"{files[0].parent}: the tokenizer produced id {int(tokens.max())}, not below the model's "
            f"padded_vocab_size {padded_vocab_size}"
        )
    dtype = np.uint16 if padded_vocab_size <= 2**16 else np.uint32
    return tokens.astype(dtype)


def tokenize_files(
    files: Sequence[Path],
    tokenizer: litgpt.Tokenizer,
    tokenizer_dir: str | Path,
    padded_vocab_size: int,
    cache_dir: Path | None = None,
    *,
    text: TextSet | None = None,
    tokenizer_sha256: str | None = None,
) -> TokenSet:
    """Tokenize ``files`` (or reuse the cache) and return the memory-mapped tokens.

    The cache file name is :func:`cache_key`; it is written to a temporary file in the cache
    folder, flushed to disk and renamed, so concurrent builders are safe. Nothing is written
    next to the input files. ``text`` (the :class:`TextSet` of ``files``) and
    ``tokenizer_sha256`` are the hashes when already computed; otherwise they are computed here.

    Raises:
        DataError: a file is empty or not UTF-8, an id is out of range, or the cache folder cannot
            be written (each message names the file or folder).
    """
    files = [Path(f) for f in files]
    folder = files[0].parent if files else Path(".")
    cache_dir = Path(cache_dir) if cache_dir is not None else cache_root()
    data_sha = text.sha256 if text is not None else files_sha256(files)
    tok_sha = tokenizer_sha256 if tokenizer_sha256 is not None else tokenizer_hash(Path(tokenizer_dir))
    key = cache_key(data_sha, tok_sha)
    path = cache_dir / f"{key}.npy"
    if not path.is_file():
        tokens = _encode_files(files, tokenizer, padded_vocab_size)
        try:
            cache_dir.mkdir(parents=True, exist_ok=True)
            fd, tmp_name = tempfile.mkstemp(prefix=f".{key}.", suffix=".tmp", dir=cache_dir)
        except OSError as exc:
            if no_space_errno(exc) is not None:
                raise  # a full filesystem (no block or no inode left): the caller's no_space
            raise DataError(f"token cache folder {cache_dir}: cannot write ({exc.strerror}); set MOEJOBS_TOKEN_CACHE") from None
        try:
            with os.fdopen(fd, "wb") as fh:
                np.save(fh, tokens, allow_pickle=False)
                fh.flush()
                os.fsync(fh.fileno())
            meta = {
                "format": CACHE_FORMAT,
                "tokens": int(tokens.size),
                "dtype": str(tokens.dtype),
                "files": [str(f) for f in files],
            }
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
        arr = np.stack([np.asarray(self.data.tokens[i * w : (i + 1) * w]) for i in rows]).astype(np.int64)
        return torch.from_numpy(arr)


def validation_batches(
    data: TokenSet, seq_len: int, micro_batch_size: int, max_iters: int, world_size: int = 1, rank: int = 0
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
) -> PreparedData:
    """Find, tokenize (cached) and check the data for one run.

    Validation data is tokenized only when ``need_validation`` (some validation is configured),
    but a given ``val_data_path`` must always exist and hold ``.txt`` files. ``source`` (from
    :func:`source_text` of the same paths) and ``tokenizer_sha256`` are reused when given, so a
    start that already hashed them for the resume checks does not hash again.

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
    train = tokenize_files(source.train.files, tokenizer, tokenizer_dir, padded_vocab_size, cache_dir,
                           text=source.train, tokenizer_sha256=tokenizer_sha256)
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
        val = tokenize_files(source.val.files, tokenizer, tokenizer_dir, padded_vocab_size, cache_dir,
                             text=source.val, tokenizer_sha256=tokenizer_sha256)
        where = Path(val_data_path) if val_data_path is not None else source.val.files[0]
        if val.n_windows(seq_len + 1) < micro_batch_size:
            raise DataError(
                f"{where}: validation data has {len(val)} tokens, fewer than one micro-batch of "
                f"micro_batch_size x (max_seq_length + 1) = {micro_batch_size} x {seq_len + 1} = {need} tokens"
            )
    return PreparedData(train=train, val=val, source=source, tokenizer_sha256=tokenizer_sha256)
