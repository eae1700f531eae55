"""Where the paths of a submitted config may point, and what they resolve to.

A config sent to the API names folders on the *server*; the user must not be able to read or
write anything else. Rules (applied by :func:`resolve_run_paths` after schema validation):

- Inputs (``data.init_args.train_data_path``, ``data.init_args.val_data_path``,
  ``tokenizer_dir``, ``initial_checkpoint_dir``, and ``resume`` when it is a path) resolve
  under ``DATA_ROOT``: a relative path (``mydata/train``, ``./mydata/train``) is joined to it;
  an absolute path must already lie inside it. The checkpoint fields
  (``initial_checkpoint_dir``, ``resume``) may also name an absolute folder inside
  ``RUNS_DIR`` (continue from an earlier run's checkpoint).
- ``initial_checkpoint_dir`` may instead name another run's recorded checkpoint:
  ``run:<run id>/final``, ``run:<run id>/step-00000100`` (or the step number) or
  ``run:<run id>/latest`` (:func:`parse_run_reference`). Only the service resolves such a
  reference, through its database (``service.references``), before these rules apply; the
  command line refuses it (:data:`RUN_REFERENCE_CLI_MESSAGE`).
- Outputs: ``out_dir`` is always ``RUNS_DIR/<run id>/out``. A submitted ``out_dir`` is ignored
  unless it would escape the run's folder (absolute, or ``..`` climbing out), which is refused
  like any escaping input.
- Escaping is decided on the normalised text of the path (``..`` and ``.`` removed), not by
  following symbolic links: links the operator put inside DATA_ROOT (e.g. to a big disk) are
  trusted, and uploads through the API cannot create links (``service.api.datasets`` refuses
  them). A NUL byte, ``~`` expansion, empty paths and paths longer than the kernel takes
  (:data:`PATH_MAX_BYTES`, :data:`NAME_MAX_BYTES` per part) are refused.

Errors are ``service.config.issues.ConfigError`` whose issues name the field with the same
locations as schema errors (``("data", "init_args", "train_data_path")``), so the API reports
them as 422s with the full path. Whether the inputs exist is checked afterwards by
``service.checks`` (the same check as on the command line; in the API a missing folder is a
warning: data may be uploaded after the run is submitted but before it starts).
"""

from __future__ import annotations

import copy
import os
import posixpath
import re
import uuid
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Any

from service.config.issues import ConfigError, Issue

#: Input fields: location in the train config -> may also point into RUNS_DIR.
INPUT_FIELDS: dict[tuple[str, ...], bool] = {
    ("data", "init_args", "train_data_path"): False,
    ("data", "init_args", "val_data_path"): False,
    ("tokenizer_dir",): False,
    ("initial_checkpoint_dir",): True,
    ("resume",): True,
}

#: Prefix of a reference to another run's checkpoint in ``initial_checkpoint_dir``.
RUN_REFERENCE_PREFIX = "run:"
#: The field that may hold such a reference.
RUN_REFERENCE_FIELD: tuple[str, ...] = ("initial_checkpoint_dir",)
#: The checkpoint name that means "the run's newest recorded checkpoint".
LATEST = "latest"
#: Why the command line (no database) refuses a reference.
RUN_REFERENCE_CLI_MESSAGE = (
    "only the service resolves run:ID references (submit the run with `moejobs submit` or "
    "POST /runs); here give the checkpoint folder's path (GET /runs/ID/checkpoints lists "
    "a run's checkpoints and their paths)"
)

#: Name of the engine's output folder inside the run's folder.
RUN_OUT_DIR = "out"

#: Dataset and tokenizer names: lower-case letters, digits, ".", "_", "-"; starting with a
#: letter or digit; at most 64 characters.
NAME_PATTERN = re.compile(r"^[a-z0-9][a-z0-9._-]{0,63}$")
#: The names :func:`check_name` accepts as one regular expression without look-arounds (for
#: the OpenAPI document: JSON Schema ``pattern`` with ``maxLength`` 64): no ``..`` anywhere.
NAME_REGEX = r"^[a-z0-9](?:\.?[a-z0-9_-])*\.?$"

#: Longest path the kernel opens, in bytes without the final NUL (Linux PATH_MAX - 1), and
#: longest single file or folder name (NAME_MAX). A longer path is refused, not tried: the
#: system call would fail with "File name too long".
PATH_MAX_BYTES = 4095
NAME_MAX_BYTES = 255


class PathEscape(ValueError):
    """A path leaves the folder it must stay in (message says which and why)."""


class PathTooLong(PathEscape):
    """A path longer than the file system takes (:data:`PATH_MAX_BYTES` in all or
    :data:`NAME_MAX_BYTES` for one part); the message gives the length and the limit."""


def check_path_length(path: str | os.PathLike[str]) -> None:
    """Raise :class:`PathTooLong` when ``path`` (as the server would open it) is longer than
    :data:`PATH_MAX_BYTES` UTF-8 bytes or one of its parts longer than :data:`NAME_MAX_BYTES`."""
    text = os.fspath(path)
    size = len(text.encode("utf-8", "surrogatepass"))
    if size > PATH_MAX_BYTES:
        raise PathTooLong(
            f"the path is {size:,} bytes long on the server; the limit is "
            f"{PATH_MAX_BYTES:,} bytes (PATH_MAX)"
        )
    for part in text.split("/"):
        part_size = len(part.encode("utf-8", "surrogatepass"))
        if part_size > NAME_MAX_BYTES:
            raise PathTooLong(
                f"the name {part[:40]!r}... is {part_size:,} bytes long; a file or "
                f"folder name may have at most {NAME_MAX_BYTES} bytes (NAME_MAX)"
            )


@dataclass(frozen=True)
class RunReference:
    """``run:<run_id>/<checkpoint>``: ``checkpoint`` is ``final``, ``latest``, a step folder
    name (``step-00000100``) or a step number (``100``)."""

    run_id: uuid.UUID
    checkpoint: str


def is_run_reference(value: object) -> bool:
    """Whether ``value`` is meant as a run reference (a string starting ``run:``)."""
    return isinstance(value, str) and value.startswith(RUN_REFERENCE_PREFIX)


def parse_run_reference(value: str) -> RunReference:
    """The reference ``value`` (``run:<run id>/<checkpoint>``). Raises ``ValueError`` with a
    message giving the expected form when it is malformed (no ``/``, not a UUID, an empty or
    nested checkpoint name)."""
    form = "expected run:<run id>/final, run:<run id>/step-00000100 or run:<run id>/latest"
    body = value[len(RUN_REFERENCE_PREFIX) :]
    run_text, sep, checkpoint = body.partition("/")
    if not sep or not checkpoint or "/" in checkpoint or not checkpoint.isprintable():
        raise ValueError(f"{value[:200]!r}: {form}")
    try:
        run_id = uuid.UUID(run_text)
    except ValueError:
        raise ValueError(f"{value[:200]!r}: {run_text[:80]!r} is not a run id; {form}") from None
    return RunReference(run_id=run_id, checkpoint=checkpoint)


def run_reference_elsewhere(loc: tuple[str, ...]) -> str:
    """The message for a ``run:`` reference left where no database resolved it: in another
    field than ``initial_checkpoint_dir``, or (a caller's bug) unresolved."""
    if loc != RUN_REFERENCE_FIELD:
        return (
            "run:ID references are accepted only in initial_checkpoint_dir; give a path here "
            "(GET /runs/ID/checkpoints lists a run's checkpoints and their paths)"
        )
    return "a run:ID reference must be resolved through the service's database first"


def check_name(name: str, what: str = "name") -> str:
    """Return ``name`` when it is a valid dataset/tokenizer name (:data:`NAME_PATTERN`, and not
    ``.``-only); raise ``ValueError`` with a readable message otherwise."""
    if not NAME_PATTERN.match(name) or set(name) == {"."} or ".." in name:
        raise ValueError(
            f"invalid {what} {name!r}: use 1-64 characters a-z, 0-9, '.', '_', '-', starting "
            f"with a letter or digit (no '..')"
        )
    return name


def _is_within(path: str, root: str) -> bool:
    return path == root or path.startswith(root.rstrip("/") + "/")


def resolve_under(value: str, root: Path, *, also: tuple[Path, ...] = ()) -> Path:
    """``value`` resolved under ``root``: a relative path is joined to it, an absolute one must
    lie inside ``root`` (or one of ``also``). The result is normalised and absolute.

    Raises :class:`PathEscape` when the normalised path leaves ``root``/``also``, or when
    ``value`` is empty, has a NUL byte or starts with ``~``; :class:`PathTooLong` when the
    result is longer than the file system takes (:func:`check_path_length`).
    """
    if not isinstance(value, str) or not value.strip():
        raise PathEscape("an empty path")
    if "\x00" in value:
        raise PathEscape("a NUL byte is not allowed in a path")
    if value.startswith("~"):
        raise PathEscape(
            f"{value!r}: '~' is not expanded on the server; use a path relative to the data root"
        )
    root_text = posixpath.normpath(os.fspath(root))
    allowed = [root_text, *(posixpath.normpath(os.fspath(a)) for a in also)]
    if posixpath.isabs(value):
        candidate = posixpath.normpath(value)
    else:
        candidate = posixpath.normpath(posixpath.join(root_text, value))
    if not any(_is_within(candidate, a) for a in allowed):
        where = " or ".join(allowed)
        if posixpath.isabs(value):
            raise PathEscape(
                f"{value!r} is outside the folders a config may use ({where}); "
                f"give a path relative to the data root"
            )
        raise PathEscape(f"{value!r} climbs out of the data root {root_text}")
    check_path_length(candidate)
    return Path(candidate)


def doc_value(doc: dict, loc: tuple[str, ...]) -> Any:
    """The value at ``loc`` (keys) in nested dicts, or None when a key is missing."""
    node: Any = doc
    for key in loc:
        if not isinstance(node, dict) or key not in node:
            return None
        node = node[key]
    return node


def _set(doc: dict, loc: tuple[str, ...], value: Any) -> None:
    node = doc
    for key in loc[:-1]:
        node = node[key]
    node[loc[-1]] = value


def output_dir(run_dir: Path) -> Path:
    """The engine's ``out_dir`` of a run: ``<run folder>/out``."""
    return run_dir / RUN_OUT_DIR


def resolve_run_paths(train: dict, *, data_root: Path, runs_dir: Path, run_dir: Path) -> dict:
    """A copy of the validated train document (``TrainConfig.model_dump(mode="json")``) with
    every input path made absolute under ``data_root`` and ``out_dir`` set to
    ``run_dir/out``. Existence is not checked here (``service.checks.input_problems``).

    A ``run:`` reference must have been replaced by its path before (``service.references``);
    one left in any input field is an issue (:func:`run_reference_elsewhere`).

    Raises ``ConfigError`` listing every escaping path with its field location.
    """
    out = copy.deepcopy(train)
    errors: list[Issue] = []
    for loc, may_use_runs in INPUT_FIELDS.items():
        value = doc_value(out, loc)
        if value is None or isinstance(value, bool) or value == "auto":
            continue  # unset, resume true/false/'auto'
        if is_run_reference(value):
            errors.append(Issue(loc, run_reference_elsewhere(loc)))
            continue
        try:
            resolved = resolve_under(value, data_root, also=(runs_dir,) if may_use_runs else ())
        except PathEscape as error:
            errors.append(Issue(loc, f"{error}"))
            continue
        _set(out, loc, str(resolved))
    submitted_out = out.get("out_dir")
    if isinstance(submitted_out, str) and submitted_out.strip():
        try:
            resolve_under(submitted_out, run_dir)
        except PathEscape as error:
            errors.append(Issue(("out_dir",), f"{error}; outputs always go to the run's folder"))
    if errors:
        raise ConfigError(errors)
    out["out_dir"] = str(output_dir(run_dir))
    return out


def safe_relative(name: str) -> PurePosixPath:
    """A member name of an upload (tar member or multipart file name) as a safe relative path.
    Backslashes count as separators. Raises :class:`PathEscape` for absolute names, ``..``
    parts, empty names and NUL bytes."""
    if "\x00" in name:
        raise PathEscape(f"{name!r}: NUL byte in a file name")
    text = name.replace("\\", "/")
    if text.startswith("/") or re.match(r"^[A-Za-z]:", text):
        raise PathEscape(f"{name!r}: absolute path")
    parts = [p for p in text.split("/") if p not in ("", ".")]
    if not parts:
        raise PathEscape(f"{name!r}: empty file name")
    if any(p == ".." for p in parts):
        raise PathEscape(f"{name!r}: '..' would leave the dataset folder")
    return PurePosixPath(*parts)
