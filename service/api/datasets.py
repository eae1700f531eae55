"""Datasets (folders of UTF-8 ``.txt`` files under DATA_ROOT) and tokenizers trained from them.

Uploads (``POST /datasets/{name}``):

- ``multipart/form-data`` with one or more ``.txt`` files (any field name; a file name may
  contain sub-folders, e.g. ``train/a.txt``), or with a single ``.tar``/``.tar.gz``/``.tgz``;
- or the raw archive as the body (``Content-Type: application/x-tar`` or ``application/gzip``).

Each file is checked while it is written to a staging folder (``DATA_ROOT/.staging-<id>``):
a safe relative name (no absolute path, no ``..``, no control character, each part at most
255 bytes), a regular file (tar links, devices and FIFOs are refused), a ``.txt`` name, valid
UTF-8 without NUL bytes (binary data), not empty; the extracted total is bounded by
``UPLOAD_LIMIT_BYTES`` (a compressed archive cannot expand past it). Any problem is a 422
naming the member, and nothing is left behind. The staging folder is then renamed to
``DATA_ROOT/<name>`` (atomic on one file system); replacing an existing dataset needs
``?overwrite=true`` and is refused while a queued or running run reads it.

The names ``tokenizers`` (the tokenizer folder) and ``sample`` (the smoke test's data, seeded
by the worker) are reserved. Tokenizers: ``POST /tokenizers/{name}`` enqueues
``service.queue.TOKENIZER_TASK`` (202); the worker writes ``DATA_ROOT/tokenizers/<name>``.
"""

from __future__ import annotations

import codecs
import json
import os
import shutil
import tarfile
import tempfile
import uuid
from datetime import UTC, datetime
from pathlib import Path, PurePosixPath
from typing import IO, Annotated

from fastapi import APIRouter, Request, Response, status
from fastapi import Path as PathParam
from sqlmodel import Session
from starlette.concurrency import run_in_threadpool
from starlette.datastructures import UploadFile

from service import reads
from service.api.body import media_type
from service.api.deps import CeleryDep, DatabaseGate, GateDep, SettingsDep
from service.api.errors import ApiError, dependency_unavailable, invalid
from service.api.models import DatasetPublic, TokenizerCreate, TokenizerPublic
from service.api.openapi import errors
from service.config.fields import check_name_text
from service.config.paths import (
    NAME_REGEX,
    PathEscape,
    PathTooLong,
    check_name,
    check_path_length,
    resolve_under,
    safe_relative,
)
from service.queue import TOKENIZER_RECORD, enqueue_tokenizer, tokenizer_marker_paths
from service.settings import Settings

router = APIRouter(tags=["datasets"])

#: Dataset and tokenizer names: exactly what ``service.config.paths.check_name`` accepts.
#: (The pattern is for the document; ``_name`` checks it with a message saying what is valid.)
NameParam = Annotated[
    str, PathParam(min_length=1, max_length=64, json_schema_extra={"pattern": NAME_REGEX})
]

TOKENIZERS_DIR = "tokenizers"
SAMPLE_DIR = "sample"
RESERVED = frozenset({TOKENIZERS_DIR, SAMPLE_DIR})
ARCHIVE_SUFFIXES = (".tar", ".tar.gz", ".tgz")
ARCHIVE_TYPES = (
    "application/x-tar",
    "application/tar",
    "application/gzip",
    "application/x-gzip",
    "application/x-gtar",
    "application/octet-stream",
)
#: Most files a dataset may hold.
MAX_FILES = 100_000
_CHUNK = 1 << 20


class UploadProblem(Exception):
    """A member of an upload is refused: ``member`` (its name) and ``reason``."""

    def __init__(self, member: str, reason: str):
        super().__init__(f"{member}: {reason}")
        self.member, self.reason = member, reason


def _name(name: str, what: str = "dataset name") -> str:
    try:
        return check_name(name, what)
    except ValueError as error:
        raise invalid(["path", "name"], str(error)) from None


def _root(settings: Settings) -> Path:
    assert settings.data_root is not None
    return settings.data_root


def _in_use(session: Session, folder: Path) -> list[str]:
    """Ids of queued/running runs whose resolved input paths lie in ``folder``."""
    prefix = str(folder).rstrip("/") + "/"
    users = []
    for run in reads.active_runs(session):
        t = run.resolved_train or {}
        args = (t.get("data") or {}).get("init_args") or {}
        paths = [
            args.get("train_data_path"),
            args.get("val_data_path"),
            t.get("tokenizer_dir"),
            t.get("initial_checkpoint_dir"),
        ]
        if any(isinstance(p, str) and (p == str(folder) or p.startswith(prefix)) for p in paths):
            users.append(str(run.id))
    return users


# -- writing an upload ----------------------------------------------------------------------------


class _Staging:
    """Files written into a staging folder with every check of the module docstring."""

    def __init__(self, root: Path, byte_limit: int):
        self.root = root
        self.byte_limit = byte_limit
        self.total = 0
        self.names: set[PurePosixPath] = set()

    def _target(self, member: str, *, is_dir: bool = False) -> tuple[PurePosixPath, Path]:
        try:
            check_name_text(member, "a file name")
        except ValueError as error:
            raise UploadProblem(member, str(error)) from None
        try:
            rel = safe_relative(member)
            check_path_length(self.root.joinpath(*rel.parts))
        except PathTooLong as error:
            raise UploadProblem(member, str(error)) from None
        except PathEscape as error:
            raise UploadProblem(member, str(error).split(": ", 1)[-1]) from None
        if not is_dir and rel.suffix.lower() != ".txt":
            raise UploadProblem(member, "only .txt files are accepted")
        if any(part.startswith(".") for part in rel.parts):
            raise UploadProblem(
                member, "hidden files and folders (starting with '.') are not accepted"
            )
        return rel, self.root.joinpath(*rel.parts)

    def add_dir(self, member: str) -> None:
        _rel, path = self._target(member, is_dir=True)
        path.mkdir(parents=True, exist_ok=True)

    def add_file(self, member: str, source: IO[bytes]) -> None:
        rel, path = self._target(member)
        if rel in self.names:
            raise UploadProblem(member, "appears twice in the upload")
        if len(self.names) >= MAX_FILES:
            raise UploadProblem(member, f"more than {MAX_FILES:,} files")
        self.names.add(rel)
        path.parent.mkdir(parents=True, exist_ok=True)
        decoder = codecs.getincrementaldecoder("utf-8")("strict")
        offset, text_seen = 0, False
        with open(path, "xb") as out:
            while True:
                chunk = source.read(_CHUNK)
                if not chunk:
                    break
                try:
                    text = decoder.decode(chunk)
                except UnicodeDecodeError as error:
                    raise UploadProblem(
                        member,
                        f"not valid UTF-8 text (byte {offset + error.start}: {error.reason})",
                    ) from None
                nul = chunk.find(b"\x00")
                if nul >= 0:
                    raise UploadProblem(
                        member, f"not a text file: a NUL byte at byte {offset + nul} (binary data)"
                    )
                offset += len(chunk)
                self.total += len(chunk)
                if self.total > self.byte_limit:
                    raise UploadProblem(
                        member,
                        f"the dataset is larger than the upload limit of "
                        f"{self.byte_limit:,} bytes (MOEJOBS_UPLOAD_LIMIT_BYTES)",
                    )
                # str.strip, as the engine reads it (Unicode whitespace such as U+3000 too)
                text_seen = text_seen or bool(text.strip())
                out.write(chunk)
            try:
                decoder.decode(b"", final=True)
            except UnicodeDecodeError:
                raise UploadProblem(
                    member,
                    f"not valid UTF-8 text (it ends inside a multi-byte "
                    f"character at byte {offset})",
                ) from None
        if not text_seen:
            raise UploadProblem(member, "file is empty (or only whitespace)")

    def add_tar(self, archive_name: str, fileobj: IO[bytes]) -> None:
        try:
            with tarfile.open(fileobj=fileobj, mode="r|*") as tar:
                for member in tar:
                    name = member.name
                    if member.isdir():
                        self.add_dir(name)
                    elif member.isreg():
                        source = tar.extractfile(member)
                        assert source is not None
                        self.add_file(name, source)
                    else:
                        kind = (
                            "a symbolic link"
                            if member.issym()
                            else "a hard link"
                            if member.islnk()
                            else "a device or FIFO"
                            if (member.ischr() or member.isblk() or member.isfifo())
                            else "not a regular file"
                        )
                        raise UploadProblem(
                            name, f"{kind}; only folders and .txt files are accepted"
                        )
        except tarfile.TarError as error:
            raise UploadProblem(archive_name, f"not a readable tar archive ({error})") from None
        except (EOFError, OSError) as error:
            raise UploadProblem(
                archive_name, f"the archive is truncated or corrupt ({error})"
            ) from None

    def finish(self) -> None:
        if not self.names:
            raise UploadProblem("(upload)", "no .txt file in the upload")


def _is_archive(filename: str) -> bool:
    return filename.lower().endswith(ARCHIVE_SUFFIXES)


def _publish(staging: Path, target: Path, overwrite: bool) -> None:
    """Move the complete staging folder into place (replacing ``target`` with ``overwrite``)."""
    if target.exists():
        if not overwrite:
            raise ApiError(
                409,
                f"dataset {target.name!r} exists; delete it or pass overwrite=true",
                code="dataset_exists",
            )
        trash = target.parent / f".trash-{uuid.uuid4().hex}"
        os.rename(target, trash)
        os.rename(staging, target)
        shutil.rmtree(trash, ignore_errors=True)
    else:
        os.rename(staging, target)


def _describe(folder: Path) -> DatasetPublic:
    files = size = 0
    folders: set[str] = set()
    for dirpath, dirnames, filenames in os.walk(folder):
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        rel = Path(dirpath).relative_to(folder).as_posix()
        for f in filenames:
            if f.endswith(".txt"):
                files += 1
                size += (Path(dirpath) / f).stat().st_size
                folders.add("" if rel == "." else rel)
    modified = datetime.fromtimestamp(folder.stat().st_mtime, tz=UTC)
    return DatasetPublic(
        name=folder.name, files=files, bytes=size, folders=sorted(folders), modified_at=modified
    )


# -- routes ----------------------------------------------------------------------------------------


_UPLOAD_BODY = {
    "requestBody": {
        "required": True,
        "content": {
            "multipart/form-data": {
                "schema": {
                    "type": "object",
                    "properties": {
                        "files": {"type": "array", "items": {"type": "string", "format": "binary"}}
                    },
                }
            },
            "application/x-tar": {"schema": {"type": "string", "format": "binary"}},
        },
    }
}


@router.post(
    "/datasets/{name}",
    status_code=status.HTTP_201_CREATED,
    response_model=DatasetPublic,
    responses=errors(409, 415, 422, 503),
    openapi_extra=_UPLOAD_BODY,
    summary="Upload a dataset (.txt files or a .tar of them)",
)
async def upload_dataset(
    name: NameParam,
    request: Request,
    settings: SettingsDep,
    gate: GateDep,
    overwrite: bool = False,
) -> DatasetPublic:
    """Store the upload in ``DATA_ROOT/<name>/`` (module docstring). 201 with the dataset; 409
    when it exists (without ``overwrite``) or a live run reads it; 422 naming a refused file."""
    _name(name)
    if name in RESERVED:
        raise invalid(
            ["path", "name"],
            f"{name!r} is reserved (tokenizers / the smoke test's "
            f"sample data); choose another name",
        )
    root = _root(settings)
    target = root / name
    if target.exists() and not overwrite:
        raise ApiError(
            409, f"dataset {name!r} exists; delete it or pass overwrite=true", code="dataset_exists"
        )
    root.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=".staging-", dir=root))
    try:
        writer = _Staging(staging, settings.upload_limit_bytes)
        kind = media_type(request)
        if kind == "multipart/form-data":
            form = await request.form(max_files=MAX_FILES, max_fields=100)
            uploads = [(k, v) for k, v in form.multi_items() if isinstance(v, UploadFile)]
            if not uploads:
                raise invalid(
                    ["body"],
                    "no file in the upload: send .txt files or one .tar as multipart file parts",
                )
            if len(uploads) == 1 and _is_archive(uploads[0][1].filename or ""):
                upload = uploads[0][1]
                await run_in_threadpool(writer.add_tar, upload.filename or "archive", upload.file)
            else:
                for _key, upload in uploads:
                    filename = upload.filename or ""
                    if _is_archive(filename):
                        raise invalid(
                            ["body", filename], "send one archive alone, not mixed with other files"
                        )
                    await run_in_threadpool(writer.add_file, filename, upload.file)
        elif kind in ARCHIVE_TYPES:
            spool = tempfile.TemporaryFile(dir=root)
            with spool:
                async for chunk in request.stream():
                    spool.write(chunk)
                spool.seek(0)
                await run_in_threadpool(writer.add_tar, "body", spool)
        else:
            raise ApiError(
                415,
                f"unsupported Content-Type {kind!r}: send multipart/form-data "
                f"(.txt files or one .tar) or application/x-tar",
            )
        writer.finish()
        await _check_not_in_use(gate, target, "replace")
        _publish(staging, target, overwrite)
    except UploadProblem as problem:
        raise ApiError(
            422,
            f"{problem.member}: {problem.reason}",
            code="invalid_upload",
            errors=[
                {"loc": ["body", problem.member], "msg": problem.reason, "type": "invalid_upload"}
            ],
        ) from None
    finally:
        if staging.exists():
            shutil.rmtree(staging, ignore_errors=True)
    return _describe(target)


async def _check_not_in_use(gate: DatabaseGate, folder: Path, verb: str) -> None:
    """409 ``in_use`` when a queued or running run reads ``folder`` (through the database
    gate)."""
    if not folder.exists():
        return
    users = await gate.run(_in_use, folder)
    if users:
        raise ApiError(
            409,
            f"cannot {verb} {folder.name!r}: used by queued/running run(s) {', '.join(users)}",
            code="in_use",
            run_ids=users,
        )


@router.get("/datasets", response_model=list[DatasetPublic], summary="List datasets")
def list_datasets(settings: SettingsDep) -> list[DatasetPublic]:
    """Every folder under DATA_ROOT except tokenizers and hidden ones, by name."""
    root = _root(settings)
    if not root.is_dir():
        return []
    return [
        _describe(p)
        for p in sorted(root.iterdir())
        if p.is_dir() and p.name != TOKENIZERS_DIR and not p.name.startswith(".")
    ]


@router.delete(
    "/datasets/{name}",
    status_code=status.HTTP_204_NO_CONTENT,
    responses=errors(404, 409, 422, 503),
    summary="Delete a dataset",
)
async def delete_dataset(name: NameParam, settings: SettingsDep, gate: GateDep) -> Response:
    """404 when missing, 409 while a queued or running run reads it."""
    _name(name)
    if name in RESERVED:
        raise invalid(["path", "name"], f"{name!r} is reserved and cannot be deleted here")
    target = _root(settings) / name
    if not target.is_dir():
        raise ApiError(404, f"no dataset {name!r}", code="dataset_not_found")
    await _check_not_in_use(gate, target, "delete")
    await run_in_threadpool(_trash, target)
    return Response(status_code=status.HTTP_204_NO_CONTENT)


def _trash(folder: Path) -> None:
    """Rename ``folder`` away (readers see it gone at once), then delete it."""
    trash = folder.parent / f".trash-{uuid.uuid4().hex}"
    os.rename(folder, trash)
    shutil.rmtree(trash, ignore_errors=True)


# -- tokenizers --------------------------------------------------------------------------------------


def _tokenizer_root(settings: Settings) -> Path:
    return _root(settings) / TOKENIZERS_DIR


def _text_folder(folder: Path) -> Path | None:
    """The folder to train a tokenizer on: ``folder`` when it holds .txt files at its top
    level, else its ``train`` sub-folder when that does, else ``folder`` when any .txt file
    lies below it (the task reads every folder below the one it gets); None without any."""

    def has_txt(p: Path) -> bool:
        return p.is_dir() and any(f.is_file() for f in p.glob("*.txt"))

    if has_txt(folder):
        return folder
    if has_txt(folder / "train"):
        return folder / "train"
    if folder.is_dir() and any(f.is_file() for f in folder.rglob("*.txt")):
        return folder
    return None


def _read_marker(path: Path) -> dict:
    """A JSON object file (request marker or tokenizer record); {} when missing or not one."""
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def _tokenizer_status(settings: Settings, name: str) -> TokenizerPublic | None:
    """Tokenizer ``name`` as the API shows it: ready (its folder holds tokenizer.json; dataset,
    requested_at and warnings from the folder's record, else from a request marker still
    there), failed (an error file), pending (a request marker), or None."""
    folder = _tokenizer_root(settings) / name
    marker, error_file = tokenizer_marker_paths(settings, name)
    info = _read_marker(marker) if marker.exists() else {}
    if (folder / "tokenizer.json").is_file():
        record = _read_marker(folder / TOKENIZER_RECORD)  # written by the worker's task
        warnings = record.get("warnings")
        return TokenizerPublic(
            status="ready",
            vocab_size=_vocab_size(folder) or _int(record.get("vocab_size")),
            requested_vocab_size=_int(record.get("requested_vocab_size") or info.get("vocab_size")),
            warnings=[str(w) for w in warnings] if isinstance(warnings, list) else [],
            **_request_fields(name, folder, {**info, **{k: v for k, v in record.items() if v}}),
        )
    common = _request_fields(name, folder, info)
    requested_size = _int(info.get("vocab_size"))
    if error_file.exists():
        text = error_file.read_text(encoding="utf-8", errors="replace").strip()
        return TokenizerPublic(
            status="failed",
            error=text or "failed",
            vocab_size=requested_size,
            requested_vocab_size=requested_size,
            **common,
        )
    if marker.exists():
        return TokenizerPublic(
            status="pending",
            vocab_size=requested_size,
            requested_vocab_size=requested_size,
            **common,
        )
    return None


def _int(value: object) -> int | None:
    return value if isinstance(value, int) and not isinstance(value, bool) else None


def _request_fields(name: str, folder: Path, info: dict) -> dict:
    """name, path, dataset and requested_at of a tokenizer from its marker or record."""
    requested = info.get("requested_at")
    try:
        requested_at = datetime.fromisoformat(requested) if isinstance(requested, str) else None
    except ValueError:
        requested_at = None
    dataset = info.get("dataset")
    return dict(
        name=name,
        path=str(folder),
        dataset=dataset if isinstance(dataset, str) else None,
        requested_at=requested_at,
    )


def _vocab_size(folder: Path) -> int | None:
    try:
        data = json.loads((folder / "tokenizer.json").read_text(encoding="utf-8"))
        vocab = (data.get("model") or {}).get("vocab") or {}
        added = {t.get("id") for t in data.get("added_tokens") or []}
        return len(set(vocab.values()) | added) or None
    except (OSError, ValueError, AttributeError):
        return None


@router.post(
    "/tokenizers/{name}",
    status_code=status.HTTP_202_ACCEPTED,
    responses=errors(409, 422, 503),
    response_model=TokenizerPublic,
    summary="Train a tokenizer from a dataset",
)
def create_tokenizer(
    name: NameParam, body: TokenizerCreate, settings: SettingsDep, celery: CeleryDep
) -> TokenizerPublic:
    """Enqueue tokenizer training on the dataset's .txt files (its top level, else its
    ``train/`` folder) into ``DATA_ROOT/tokenizers/<name>``; poll ``GET /tokenizers``. 409 when
    that tokenizer exists or is pending; 503 when the broker is unreachable."""
    _name(name, "tokenizer name")
    root = _root(settings)
    try:
        dataset_dir = resolve_under(body.dataset, root)
    except PathEscape as error:
        raise invalid(["body", "dataset"], str(error)) from None
    if dataset_dir == root or dataset_dir.is_relative_to(_tokenizer_root(settings)):
        raise invalid(["body", "dataset"], "name a dataset folder under the data root")
    text_dir = _text_folder(dataset_dir)
    if text_dir is None:
        raise invalid(
            ["body", "dataset"],
            f"{body.dataset!r}: no .txt files in {dataset_dir} "
            f"(upload a dataset with POST /datasets/{{name}})",
        )
    current = _tokenizer_status(settings, name)
    if current is not None and current.status != "failed":
        raise ApiError(
            409, f"tokenizer {name!r} is {current.status}; delete it first", code="tokenizer_exists"
        )
    marker, error_file = tokenizer_marker_paths(settings, name)
    marker.parent.mkdir(parents=True, exist_ok=True)
    error_file.unlink(missing_ok=True)
    requested_at = datetime.now(UTC)
    out_dir = _tokenizer_root(settings) / name
    marker.write_text(
        json.dumps(
            {
                "dataset": body.dataset,
                "dataset_dir": str(text_dir),
                "vocab_size": body.vocab_size,
                "requested_at": requested_at.isoformat(),
            }
        ),
        encoding="utf-8",
    )
    result = enqueue_tokenizer(
        celery, name=name, dataset_dir=text_dir, out_dir=out_dir, vocab_size=body.vocab_size
    )
    if not result.ok:
        marker.unlink(missing_ok=True)
        raise dependency_unavailable("broker", f"{result.error}; nothing was queued")
    return TokenizerPublic(
        name=name,
        status="pending",
        path=str(out_dir),
        dataset=body.dataset,
        vocab_size=body.vocab_size,
        requested_vocab_size=body.vocab_size,
        requested_at=requested_at,
    )


@router.get("/tokenizers", response_model=list[TokenizerPublic], summary="List tokenizers")
def list_tokenizers(settings: SettingsDep) -> list[TokenizerPublic]:
    """Ready tokenizers (folders with tokenizer.json), pending and failed requests, by name."""
    root = _tokenizer_root(settings)
    names: set[str] = set()
    if root.is_dir():
        names.update(p.name for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
        pending = root / ".pending"
        if pending.is_dir():
            names.update(p.stem for p in pending.iterdir() if p.suffix in (".json", ".error"))
    out = [_tokenizer_status(settings, n) for n in sorted(names)]
    return [t for t in out if t is not None]


@router.delete(
    "/tokenizers/{name}",
    status_code=status.HTTP_204_NO_CONTENT,
    responses=errors(404, 409, 422, 503),
    summary="Delete a tokenizer",
)
async def delete_tokenizer(name: NameParam, settings: SettingsDep, gate: GateDep) -> Response:
    """Removes the folder and any request marker; 404 when neither exists, 409 while a queued
    or running run uses it."""
    _name(name, "tokenizer name")
    folder = _tokenizer_root(settings) / name
    marker, error_file = tokenizer_marker_paths(settings, name)
    if not (folder.exists() or marker.exists() or error_file.exists()):
        raise ApiError(404, f"no tokenizer {name!r}", code="tokenizer_not_found")
    await _check_not_in_use(gate, folder, "delete")
    if folder.exists():
        await run_in_threadpool(_trash, folder)
    marker.unlink(missing_ok=True)
    error_file.unlink(missing_ok=True)
    return Response(status_code=status.HTTP_204_NO_CONTENT)
