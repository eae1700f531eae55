"""One set of checks for every entry point: ``run_train.py --dry-run`` / ``moejobs validate``
(the command line) and ``POST /runs`` / ``POST /runs/validate`` (the API).

:func:`check_run` takes the merged train and model documents and where their paths resolve,
and returns what every entry point reports:

1. the schema, the cross-field rules and the warnings
   (``service.config.validate.validate_configs``);
2. the input paths resolved: on the command line (:class:`LocalPaths`) a relative path is
   read from the current folder, as the engine opens it; in the API (:class:`ServerPaths`)
   under ``DATA_ROOT`` (checkpoints also in ``RUNS_DIR``), escapes refused
   (``service.config.paths.resolve_run_paths``);
3. whether the inputs are usable (:func:`input_problems`): the training and validation data
   folders hold ``.txt`` files, the tokenizer folder holds ``tokenizer.json`` or
   ``tokenizer.model``, a ``resume`` path is a complete checkpoint folder,
   ``initial_checkpoint_dir`` holds ``lit_model.pth``. The messages are the engine's own
   (``worker.tokenizer`` raises the data and tokenizer ones from here), so a dry run, the API
   and a failed run say the same words.

Severity of an unusable input: an **error** on the command line (the run would start now and
fail), a **warning** in the API (data may be uploaded and a tokenizer trained through the API
after the run is submitted but before it starts). What stays outside: the fleet's capacity
(the API's) and the device pre-flight (``worker.train.preflight``, the command line's).
Nothing here imports torch or the worker.
"""

from __future__ import annotations

import copy
import os
import posixpath
import stat
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from service.config.issues import ConfigError, Issue
from service.config.paths import (
    INPUT_FIELDS,
    RUN_REFERENCE_CLI_MESSAGE,
    RUN_REFERENCE_FIELD,
    doc_value,
    is_run_reference,
    resolve_run_paths,
    run_reference_elsewhere,
)
from service.config.validate import Validated, validate_configs
from service.contract import ExitCode, FailureReason

__all__ = [
    "CHECKPOINT_FILES",
    "Checked",
    "InputProblem",
    "LocalPaths",
    "ServerPaths",
    "check_run",
    "checkpoint_problem",
    "data_folder_problem",
    "input_problems",
    "resume_true_problem",
    "tokenizer_folder_problem",
]

#: The files of a complete checkpoint folder (``worker.checkpoint.REQUIRED``; a test keeps
#: the two equal).
CHECKPOINT_FILES = (
    "lit_model.pth",
    "model_config.yaml",
    "training_state.pt",
    "training_state.json",
)
#: The weights file of a checkpoint folder (what ``initial_checkpoint_dir`` must hold).
WEIGHTS_FILE = "lit_model.pth"
#: A tokenizer folder holds one of these (what ``litgpt.Tokenizer`` loads).
TOKENIZER_MODEL_FILES = ("tokenizer.json", "tokenizer.model")

#: Input fields of the train config: location -> what the path must be.
_DATA_FIELDS = (("data", "init_args", "train_data_path"), ("data", "init_args", "val_data_path"))


# -- what one path must be (messages shared with the engine) -----------------------------------


#: Paths longer than this are cut in messages (a hostile path may be thousands of characters).
_SHOWN_MAX = 256


def _shown(path: Path) -> str:
    text = str(path)
    return text if len(text) <= _SHOWN_MAX else f"{text[:200]}... ({len(text)} characters)"


def _stat(path: Path) -> os.stat_result | str | None:
    """``os.stat(path)``; None when it does not exist; the reason when it cannot be read."""
    try:
        return os.stat(path)
    except (FileNotFoundError, NotADirectoryError):
        return None
    except (OSError, ValueError) as exc:  # too long, no permission, a loop, a NUL byte
        return getattr(exc, "strerror", None) or str(exc)


def _is_file(path: Path) -> bool:
    st = _stat(path)
    return isinstance(st, os.stat_result) and stat.S_ISREG(st.st_mode)


def _folder_problem(folder: Path, missing: str) -> str | None:
    st = _stat(folder)
    if st is None:
        return f"{_shown(folder)}: {missing}"
    if isinstance(st, str):
        return f"{_shown(folder)}: cannot be read ({st})"
    return None


def data_folder_problem(folder: str | Path) -> str | None:
    """Why ``folder`` cannot be a TextFiles data folder (its ``*.txt`` files at the top
    level), or None. The message starts with the folder; ``worker.tokenizer.text_files``
    raises it as a ``DataError``."""
    folder = Path(folder)
    problem = _folder_problem(
        folder,
        "data folder does not exist (put .txt files there: "
        "`moejobs seed-data` writes a demo corpus, "
        "POST /datasets/{name} uploads one)",
    )
    if problem:
        return problem
    if not folder.is_dir():
        return f"{_shown(folder)}: expected a folder of .txt files, found a file"
    try:
        has_text = any(p.is_file() for p in folder.glob("*.txt"))
    except OSError as exc:
        return f"{_shown(folder)}: cannot be read ({exc.strerror or exc})"
    if not has_text:
        return f"{_shown(folder)}: no .txt files at the top level of this folder"
    return None


def tokenizer_folder_problem(folder: str | Path) -> str | None:
    """Why ``folder`` cannot be a tokenizer folder (it must hold ``tokenizer.json`` or
    ``tokenizer.model``), or None. The message starts with the folder;
    ``worker.tokenizer.load_tokenizer`` raises it (after ``tokenizer_dir``) as a ``DataError``
    and checks the contents further when it loads them."""
    folder = Path(folder)
    problem = _folder_problem(
        folder,
        "folder does not exist (train one with `moejobs tokenizer "
        "train`, or POST /tokenizers/{name} on the API)",
    )
    if problem:
        return problem
    if not folder.is_dir():
        return f"{_shown(folder)}: is a file, not a tokenizer folder"
    if not any(_is_file(folder / name) for name in TOKENIZER_MODEL_FILES):
        return f"{_shown(folder)}: holds neither tokenizer.json nor tokenizer.model"
    return None


def checkpoint_problem(folder: str | Path) -> str | None:
    """Why ``folder`` is not a complete checkpoint folder to resume from, or None (the text
    the engine gives for ``resume: PATH``)."""
    folder = Path(folder)
    if (
        _stat(folder) is None
        or not folder.is_dir()
        or not all(_is_file(folder / name) for name in CHECKPOINT_FILES)
    ):
        return f"{_shown(folder)} is not a complete checkpoint folder (needs {', '.join(CHECKPOINT_FILES)})"
    return None


def resume_true_problem(out_dir: str | Path) -> str | None:
    """For ``resume: true``: why ``out_dir`` holds no complete checkpoint folder to resume
    from (the engine's text), or None. Loading the tensors is left to the engine."""
    out_dir = Path(out_dir)
    try:
        children = [p for p in out_dir.iterdir() if p.is_dir()] if out_dir.is_dir() else []
    except OSError:
        children = []
    if any(checkpoint_problem(p) is None for p in children):
        return None
    return f"resume: true but out_dir {_shown(out_dir)} holds no complete checkpoint"


def _weights_problem(folder: Path) -> str | None:
    problem = _folder_problem(folder, "folder does not exist")
    if problem:
        return problem
    if not _is_file(folder / WEIGHTS_FILE):
        return f"{_shown(folder)}: holds no {WEIGHTS_FILE} (the weights to start from)"
    return None


@dataclass(frozen=True)
class InputProblem:
    """An input path the engine cannot use: ``issue`` names the field; ``reason`` is how the
    engine fails when it meets it (``invalid_data``, or ``invalid_config`` for a ``resume``
    path, as ``worker.train`` does)."""

    issue: Issue
    reason: FailureReason = FailureReason.invalid_data

    @property
    def exit_code(self) -> int:
        """The engine's exit code for it: 2 for ``invalid_config``, else 1."""
        return int(
            ExitCode.INVALID_CONFIG
            if self.reason == FailureReason.invalid_config
            else ExitCode.FAILED
        )


def input_problems(train: dict) -> list[InputProblem]:
    """Every unusable input path of a train document whose paths are already resolved
    (absolute), in the order the engine meets them: ``resume`` (a path), the tokenizer
    (``tokenizer_dir``, else ``initial_checkpoint_dir``), the training then validation data,
    the initial weights. Never raises: an unreadable path is a problem naming it."""
    out: list[InputProblem] = []
    resume = train.get("resume")
    if isinstance(resume, str) and resume != "auto":
        problem = checkpoint_problem(resume)
        if problem:
            out.append(InputProblem(Issue(("resume",), problem), FailureReason.invalid_config))
    initial = train.get("initial_checkpoint_dir")
    initial_problem = _weights_problem(Path(initial)) if isinstance(initial, str) else None
    tokenizer = train.get("tokenizer_dir")
    if isinstance(tokenizer, str):
        problem = tokenizer_folder_problem(tokenizer)
        if problem:
            out.append(InputProblem(Issue(("tokenizer_dir",), problem)))
    elif (
        isinstance(initial, str) and initial_problem is None
    ):  # the tokenizer comes with the weights
        problem = tokenizer_folder_problem(initial)
        if problem:
            out.append(InputProblem(Issue(("initial_checkpoint_dir",), problem)))
    for loc in _DATA_FIELDS:
        value = doc_value(train, loc)
        if isinstance(value, str):
            problem = data_folder_problem(value)
            if problem:
                out.append(InputProblem(Issue(loc, problem)))
    if initial_problem:
        out.append(InputProblem(Issue(("initial_checkpoint_dir",), initial_problem)))
    return out


# -- where paths resolve -------------------------------------------------------------------------


@dataclass(frozen=True)
class LocalPaths:
    """The command line: a relative input path is read from ``cwd`` (as the engine opens it),
    any folder may be used; ``out_dir`` stays as written. Unusable inputs are errors. A
    ``run:ID/...`` reference is refused (``ConfigError``: only the service resolves them)."""

    cwd: Path
    missing_inputs_are_errors = True

    def out_dir(self, train: dict) -> Path:
        """Where the engine will look for checkpoints (``out_dir`` from ``cwd``)."""
        return self.cwd / str(train.get("out_dir") or ".")

    def resolve(self, train: dict) -> dict:
        """A copy of ``train`` with every input path absolute (joined to ``cwd``, normalised)."""
        out = copy.deepcopy(train)
        refs = [loc for loc in INPUT_FIELDS if is_run_reference(doc_value(out, loc))]
        if refs:  # no database here to look the run up in
            raise ConfigError(
                [
                    Issue(
                        loc,
                        RUN_REFERENCE_CLI_MESSAGE
                        if loc == RUN_REFERENCE_FIELD
                        else run_reference_elsewhere(loc),
                    )
                    for loc in refs
                ]
            )
        for loc in INPUT_FIELDS:
            value = doc_value(out, loc)
            if not isinstance(value, str) or value == "auto":
                continue  # unset, resume true/false/'auto'
            node = out
            for key in loc[:-1]:
                node = node[key]
            node[loc[-1]] = posixpath.normpath(posixpath.join(os.fspath(self.cwd), value))
        return out


@dataclass(frozen=True)
class ServerPaths:
    """The API: inputs under ``data_root`` (checkpoints also in ``runs_dir``), ``out_dir`` in
    ``run_dir`` (``service.config.paths.resolve_run_paths``; an escape is a ``ConfigError``).
    Unusable inputs are warnings: they may be uploaded before the run starts."""

    data_root: Path
    runs_dir: Path
    run_dir: Path
    #: Resolves a ``run:ID/CHECKPOINT`` reference in ``initial_checkpoint_dir`` to the
    #: checkpoint's path (``service.references.checkpoint_resolver``); raises ``ValueError``
    #: with the message for the field. None: such a reference is an issue.
    references: Callable[[str], str] | None = None
    missing_inputs_are_errors = False

    def resolve(self, train: dict) -> dict:
        value = doc_value(train, RUN_REFERENCE_FIELD)
        if is_run_reference(value) and self.references is not None:
            assert isinstance(value, str)
            try:
                path = self.references(value)
            except ValueError as error:
                raise ConfigError(Issue(RUN_REFERENCE_FIELD, str(error))) from None
            train = {**train, RUN_REFERENCE_FIELD[0]: path}
        return resolve_run_paths(
            train, data_root=self.data_root, runs_dir=self.runs_dir, run_dir=self.run_dir
        )


@dataclass
class Checked:
    """What :func:`check_run` found.

    ``validated``: the configs as validated (paths as written); ``train``: the train document
    with the input paths resolved (what the API stores and the engine reads); ``warnings``:
    the schema's warnings, then (API) the unusable inputs; ``errors``: (command line) the
    unusable inputs, in the engine's order.
    """

    validated: Validated
    train: dict[str, Any]
    warnings: list[Issue] = field(default_factory=list)
    errors: list[InputProblem] = field(default_factory=list)


def check_run(train: dict, model: dict, paths: LocalPaths | ServerPaths) -> Checked:
    """Validate the merged documents, resolve their paths per ``paths`` and check the inputs.

    Raises ``service.config.issues.ConfigError`` listing every schema or cross-field error
    (each issue names its document, ``train`` or ``model``), or every path that escapes its
    folder (API), or ``resume: true`` in the API (a new run has no checkpoint to resume from).
    Unusable inputs are not raised: they are :attr:`Checked.errors` on the command line,
    :attr:`Checked.warnings` in the API, with the same message text.
    """
    validated = validate_configs(train, model)
    if validated.train.resume is True and not paths.missing_inputs_are_errors:
        # an API run's out_dir is its own new folder: nothing can put a checkpoint there first
        raise ConfigError(
            Issue(
                ("resume",),
                "resume: true needs a complete checkpoint in "
                "out_dir, and a new run's out_dir is empty; use resume: auto "
                "(a run re-queued after a crash resumes from its own "
                "checkpoints) or resume: PATH of a checkpoint folder",
            )
        )
    resolved = paths.resolve(validated.train.model_dump(mode="json"))
    problems = input_problems(resolved)
    if validated.train.resume is True and isinstance(paths, LocalPaths):
        problem = resume_true_problem(paths.out_dir(resolved))
        if problem:
            problems.insert(
                0, InputProblem(Issue(("resume",), problem), FailureReason.invalid_config)
            )
    warnings = list(validated.warnings)
    if paths.missing_inputs_are_errors:
        return Checked(validated=validated, train=resolved, warnings=warnings, errors=problems)
    return Checked(
        validated=validated, train=resolved, warnings=warnings + [p.issue for p in problems]
    )
