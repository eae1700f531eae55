"""File helpers of the API: a checkpoint folder as a streamed tar, the tail of a log.

:func:`tar_stream` writes the ustar/pax format with ``tarfile.TarInfo`` headers and the file
bytes read in chunks, so memory stays at one chunk whatever the size of the weights, and the
exact length is known up front (``Content-Length``: download tools show progress). A plan
may keep only some of the folder's files (``only``) and add files made while streaming
(``extra``: a ``model.safetensors`` converted from ``lit_model.pth``), whose length is known
up front too.
"""

from __future__ import annotations

import json
import os
import tarfile
from collections.abc import Callable, Collection, Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from service import contract
from service.artifacts import ArtifactStore

#: Bytes read from disk per chunk of a streamed archive.
CHUNK = 1 << 20
_BLOCK = tarfile.BLOCKSIZE  # 512
_RECORD = tarfile.RECORDSIZE  # 10240: tar files end on a record boundary


@dataclass(frozen=True)
class Generated:
    """A file of the archive that is not on disk: ``size`` bytes, produced by ``chunks()``."""

    name: str
    size: int
    chunks: Callable[[], Iterable[bytes]]


@dataclass(frozen=True)
class _Entry:
    header: bytes
    path: Path | None  # None for a folder, a generated file or an object
    size: int
    chunks: Callable[[], Iterable[bytes]] | None = None  # a generated file's bytes
    key: str | None = None  # an object of the plan's store


def _header(name: str, *, size: int, mtime: float, is_dir: bool) -> bytes:
    info = tarfile.TarInfo(name + ("/" if is_dir else ""))
    info.type = tarfile.DIRTYPE if is_dir else tarfile.REGTYPE
    info.size = 0 if is_dir else size
    info.mode = 0o755 if is_dir else 0o644
    info.mtime = int(mtime)
    info.uname = info.gname = ""
    return info.tobuf(format=tarfile.PAX_FORMAT, encoding="utf-8", errors="strict")


def _pad(size: int) -> int:
    return (-size) % _BLOCK


class TarPlan:
    """The entries of a folder's archive under the top-level name ``root_name``, with the
    archive's exact length (``length``). Symbolic links are not followed and not archived
    (checkpoint folders hold none). Raises ``FileNotFoundError`` when ``folder`` is missing.

    ``only``: the names of the top-level files to archive (sub-folders and other files are left
    out); None archives everything. ``extra``: generated files added at the top level after
    the folder's own."""

    def __init__(
        self,
        folder: Path,
        root_name: str,
        *,
        only: Collection[str] | None = None,
        extra: Sequence[Generated] = (),
    ):
        if not folder.is_dir():
            raise FileNotFoundError(str(folder))
        entries: list[_Entry] = []
        stat = folder.stat()
        entries.append(
            _Entry(_header(root_name, size=0, mtime=stat.st_mtime, is_dir=True), None, 0)
        )
        for dirpath, dirnames, filenames in os.walk(folder):
            dirnames.sort()
            base = Path(dirpath)
            rel_base = base.relative_to(folder)
            for d in list(dirnames):
                p = base / d
                if p.is_symlink() or only is not None:
                    dirnames.remove(d)
                    continue
                name = f"{root_name}/{(rel_base / d).as_posix()}"
                entries.append(
                    _Entry(_header(name, size=0, mtime=p.stat().st_mtime, is_dir=True), None, 0)
                )
            for f in sorted(filenames):
                p = base / f
                if p.is_symlink() or not p.is_file() or (only is not None and f not in only):
                    continue
                st = p.stat()
                name = f"{root_name}/{(rel_base / f).as_posix()}"
                entries.append(
                    _Entry(
                        _header(name, size=st.st_size, mtime=st.st_mtime, is_dir=False),
                        p,
                        st.st_size,
                    )
                )
        for gen in extra:
            entries.append(
                _Entry(
                    _header(
                        f"{root_name}/{gen.name}", size=gen.size, mtime=stat.st_mtime, is_dir=False
                    ),
                    None,
                    gen.size,
                    gen.chunks,
                )
            )
        self.store: ArtifactStore | None = None
        self._finish(entries)

    @classmethod
    def from_store(
        cls,
        store: ArtifactStore,
        prefix: str,
        root_name: str,
        mtime: float,
        *,
        only: Collection[str] | None = None,
    ) -> TarPlan:
        """The archive of the objects under ``prefix`` of ``store`` (a checkpoint folder kept
        there, ``service.artifacts``), their key below ``prefix`` as path; the file bytes are
        read from the store while the archive streams; every entry has ``mtime`` (the
        checkpoint's record time: the same archive bytes on every download). ``only`` as for
        a folder: the top-level files to archive. Raises ``FileNotFoundError`` when no object
        is there, ``StoreError`` when the store fails."""
        prefix = prefix.rstrip("/") + "/"
        objects = store.list(prefix)
        if not objects:
            raise FileNotFoundError(prefix)
        plan = cls.__new__(cls)
        plan.store = store
        entries = [_Entry(_header(root_name, size=0, mtime=mtime, is_dir=True), None, 0)]
        folders: set[str] = set()
        for key, size in objects:
            rel = key[len(prefix) :]
            parts = rel.split("/")
            if only is not None and (len(parts) > 1 or rel not in only):
                continue
            for depth in range(1, len(parts)):
                folder = "/".join(parts[:depth])
                if folder not in folders:
                    folders.add(folder)
                    header = _header(f"{root_name}/{folder}", size=0, mtime=mtime, is_dir=True)
                    entries.append(_Entry(header, None, 0))
            header = _header(f"{root_name}/{rel}", size=size, mtime=mtime, is_dir=False)
            entries.append(_Entry(header, None, size, key=key))
        plan._finish(entries)
        return plan

    def _finish(self, entries: list[_Entry]) -> None:
        self.entries = entries
        body = sum(len(e.header) + e.size + _pad(e.size) for e in entries) + 2 * _BLOCK
        self.length = body + ((-body) % _RECORD)

    def __iter__(self) -> Iterator[bytes]:
        """The archive's bytes. A file that shrank since planning ends the stream early
        (``OSError``): the client sees a short download instead of a corrupt model."""
        written = 0
        for entry in self.entries:
            yield entry.header
            written += len(entry.header)
            if entry.chunks is not None:
                sent = 0
                for chunk in entry.chunks():
                    sent += len(chunk)
                    yield chunk
                if sent != entry.size:  # the source changed since planning
                    raise OSError(f"a generated file sent {sent} bytes, not {entry.size}")
                written += sent
            elif entry.key is not None and self.store is not None:
                remaining = entry.size
                for chunk in self.store.iter_chunks(entry.key, CHUNK):
                    chunk = chunk[:remaining]
                    remaining -= len(chunk)
                    written += len(chunk)
                    yield chunk
                if remaining > 0:
                    raise OSError(f"object {entry.key} shrank while it was being sent")
            elif entry.path is not None:
                remaining = entry.size
                with open(entry.path, "rb") as handle:
                    while remaining > 0:
                        chunk = handle.read(min(CHUNK, remaining))
                        if not chunk:
                            raise OSError(f"{entry.path} shrank while it was being sent")
                        remaining -= len(chunk)
                        written += len(chunk)
                        yield chunk
            else:
                continue
            pad = _pad(entry.size)
            if pad:
                yield b"\0" * pad
                written += pad
        tail = 2 * _BLOCK
        tail += (-(written + tail)) % _RECORD
        yield b"\0" * tail


def tail_lines(path: Path, count: int, *, max_bytes: int = 8 << 20, end: int | None = None) -> str:
    """The last ``count`` lines of a text file (read backwards in blocks, at most
    ``max_bytes`` from the end; ``end``: as if the file ended at that byte). '' when the file
    does not exist. Undecodable bytes are replaced."""
    try:
        handle = open(path, "rb")
    except FileNotFoundError:
        return ""
    with handle:
        handle.seek(0, os.SEEK_END)
        end = handle.tell() if end is None else min(end, handle.tell())
        pos, data = end, b""
        while pos > 0 and data.count(b"\n") <= count and end - pos < max_bytes:
            step = min(64 * 1024, pos)
            pos -= step
            handle.seek(pos)
            data = handle.read(step) + data
    lines = data.decode("utf-8", "replace").splitlines()
    if pos > 0 and lines:
        lines = lines[1:]  # the first one may be cut
    selected = lines[-count:] if count > 0 else []
    return "".join(line + "\n" for line in selected)


def read_after(path: Path, offset: int, *, max_bytes: int = 1 << 20) -> tuple[str, int]:
    """The whole lines of a text file after byte ``offset`` (at most ``max_bytes``, whole
    lines only unless one line alone is longer) and the offset after them: what ``logs
    --follow`` polls. A file shorter than ``offset`` (rewritten) is read from its start;
    ('', 0) when it does not exist. Undecodable bytes are replaced."""
    try:
        handle = open(path, "rb")
    except FileNotFoundError:
        return "", 0
    with handle:
        size = handle.seek(0, os.SEEK_END)
        if offset > size:
            offset = 0
        handle.seek(offset)
        data = handle.read(max_bytes)
    cut = data.rfind(b"\n") + 1
    if cut == 0 and len(data) < max_bytes:
        return "", offset  # a line still being written
    data = data[:cut] if cut else data
    return data.decode("utf-8", "replace"), offset + len(data)


def file_size(path: Path) -> int:
    """The size of ``path`` in bytes, 0 when it does not exist."""
    try:
        return path.stat().st_size
    except FileNotFoundError:
        return 0


#: Largest samples file read for the API (a few prompts of a few dozen tokens are ~1 KiB).
SAMPLES_MAX_BYTES = 1 << 20


def read_samples(checkpoint_folder: Path) -> list[dict[str, Any]] | None:
    """The ``samples`` of a checkpoint's samples file (``contract.samples_path``): a list of
    ``{"prompt", "text"}``; None when it does not exist (yet), is too big or unreadable."""
    path = contract.samples_path(checkpoint_folder)
    try:
        if path.stat().st_size > SAMPLES_MAX_BYTES:
            return None
        doc = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    samples = doc.get("samples") if isinstance(doc, dict) else None
    if not isinstance(samples, list):
        return None
    return [
        {"prompt": str(s.get("prompt", "")), "text": str(s.get("text", ""))}
        for s in samples
        if isinstance(s, dict)
    ]
