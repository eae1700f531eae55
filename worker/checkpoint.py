"""Checkpoint folders: LitGPT-loadable weights plus the training state, written atomically.

Layout of ``out_dir/step-XXXXXXXX/`` (8-digit optimizer step) and ``out_dir/final/``::

    lit_model.pth          model state dict, LitGPT key names (``litgpt generate <dir>`` loads it)
    model_config.yaml      the ``litgpt.Config`` as YAML (what ``litgpt.utils.save_config`` writes)
    tokenizer.json, tokenizer_config.json, generation_config.json, ...   copied tokenizer files
    training_state.pt      optimizer state, RNG states and the fields of training_state.json
    training_state.json    step, tokens, data position, elapsed time, the resolved train config, and
                           what the resume checks compare (raw-data and tokenizer hashes, the plan)

A folder is first written as ``out_dir/.tmp-<name>-<pid>/``, every file flushed to disk, and
then renamed to its final name, so a folder named ``step-*`` or ``final`` is always complete.
Replacing an existing folder (``final/`` of a resumed run) renames the old one to
``.old-<name>-<pid>`` first and deletes it after the new one is in place; if the process dies in
between, :func:`clean_stale` puts the old folder back.

Under a worker (``worker.fence`` installed) a write is a fenced section: it does not start once
the process is fenced, and the rename into place is refused (:meth:`worker.fence.Fence.check_commit`)
when another attempt owns the folder or the write outlasted the allowance; the temporary folder
is then removed and the process exits with ``ExitCode.FENCED``.

Resuming picks the newest checkpoint whose files actually load
(:func:`latest_loadable_checkpoint`); a damaged one (a truncated ``lit_model.pth``, an
unreadable ``training_state.json``) is skipped with a warning naming the file.

Torch is imported only by the functions that write or load tensors: listing and reading
``training_state.json`` work without it.
"""

from __future__ import annotations

import json
import math
import os
import re
import shutil
from collections.abc import Callable, Iterable
from contextlib import nullcontext
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

from service import contract
from service.config.plan import warmup_steps
from worker import errors, fence
from worker.tokenizer import TOKENIZER_FILES

if TYPE_CHECKING:  # pragma: no cover
    import torch

FINAL = contract.FINAL
STATE_PT = "training_state.pt"
STATE_JSON = "training_state.json"
WEIGHTS = "lit_model.pth"
MODEL_CONFIG = "model_config.yaml"
REQUIRED = (WEIGHTS, MODEL_CONFIG, STATE_PT, STATE_JSON)
_TEMP_RE = re.compile(r"^\.(tmp|old)-(.+)-(\d+)$")


step_dir_name = contract.step_dir_name


@dataclass(frozen=True)
class CheckpointInfo:
    """A complete checkpoint folder and the contents of its ``training_state.json``."""

    path: Path
    step: int
    meta: dict[str, Any]

    @property
    def is_final(self) -> bool:
        return self.path.name == FINAL


def _fsync_file(path: Path) -> None:
    with open(path, "rb") as fh:
        os.fsync(fh.fileno())


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _pid_alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def clean_stale(out_dir: Path) -> list[str]:
    """Remove leftovers of writers that died: ``.tmp-*`` folders, and ``.old-*`` folders whose
    replacement is in place. An ``.old-<name>-<pid>`` whose ``<name>`` folder is missing is
    renamed back (the process died between the two renames). Folders of live processes are kept.

    Returns:
        what was done, one line per folder (for the log).
    """
    done: list[str] = []
    if not out_dir.is_dir():
        return done
    for entry in sorted(out_dir.iterdir()):
        m = _TEMP_RE.match(entry.name)
        if not m or not entry.is_dir() or _pid_alive(int(m.group(3))):
            continue
        kind, name = m.group(1), m.group(2)
        if kind == "old" and not (out_dir / name).exists():
            os.replace(entry, out_dir / name)
            done.append(f"restored {name} from {entry.name}")
        else:
            shutil.rmtree(entry, ignore_errors=True)
            done.append(f"removed stale {entry.name}")
    return done


def _tensor_bytes(obj: Any) -> int:
    """Bytes of the tensors in a nested dict/list/tuple (the size a checkpoint file needs)."""
    if hasattr(obj, "element_size") and hasattr(obj, "nelement"):
        return obj.element_size() * obj.nelement()
    if isinstance(obj, dict):
        return sum(_tensor_bytes(v) for v in obj.values())
    if isinstance(obj, (list, tuple)):
        return sum(_tensor_bytes(v) for v in obj)
    return 0


def _torch_save(obj: Any, path: Path) -> None:
    """``torch.save`` through a Python file object: a full disk then surfaces as the writer's
    ``OSError(ENOSPC)`` (as the ``__context__`` of torch's "unexpected pos" RuntimeError)
    instead of an error with no errno."""
    import torch

    with open(path, "wb") as fh:
        torch.save(obj, fh)


def save_checkpoint(
    out_dir: Path,
    name: str,
    *,
    model_state: dict[str, torch.Tensor],
    model_config: Any,
    tokenizer_dir: Path | None,
    state: dict[str, Any],
    meta: dict[str, Any],
) -> Path:
    """Write checkpoint folder ``out_dir/name`` atomically and return its path.

    Args:
        model_state: the model's state dict with LitGPT key names (no wrapper prefixes).
        model_config: a ``litgpt.Config``; written with ``litgpt.utils.save_config``.
        tokenizer_dir: folder whose ``TOKENIZER_FILES`` are copied (skipped when None).
        state: training state for ``training_state.pt`` (optimizer state dict, RNG states, ...).
        meta: JSON-serialisable summary (must contain ``step``); stored in both state files.

    With a fence installed (``worker.fence.current()``) the write runs inside
    ``Fence.writing()`` and ``Fence.check_commit()`` is called right before the rename.

    Raises:
        worker.errors.NoSpace: the filesystem is full (also inside ``torch.save``); the message
            names the file and the free space; the temporary folder is removed.
        worker.fence.Fenced: only when the fence's exit callback returns (tests): the process
            is fenced; the temporary folder is removed and nothing was renamed. In production
            the process exits with ``ExitCode.FENCED`` instead.
        OSError: the folder cannot be written (permissions).
    """
    from litgpt.utils import save_config

    guard = fence.current()
    out_dir = Path(out_dir)
    target = out_dir / name
    pid = os.getpid()
    tmp = out_dir / f".tmp-{name}-{pid}"
    writing_now = WEIGHTS
    try:
        with guard.writing() if guard is not None else nullcontext():
            try:
                out_dir.mkdir(parents=True, exist_ok=True)
                if tmp.exists():
                    shutil.rmtree(tmp)
                tmp.mkdir()
                _torch_save(model_state, tmp / WEIGHTS)
                writing_now = MODEL_CONFIG
                save_config(model_config, tmp)
                if tokenizer_dir is not None:
                    for fname in TOKENIZER_FILES:
                        src = Path(tokenizer_dir) / fname
                        if src.is_file():
                            writing_now = fname
                            shutil.copyfile(src, tmp / fname)
                writing_now = STATE_PT
                _torch_save({**state, "meta": meta}, tmp / STATE_PT)
                writing_now = STATE_JSON
                (tmp / STATE_JSON).write_text(
                    json.dumps(meta, indent=2, default=str) + "\n", encoding="utf-8"
                )
                writing_now = ""
                for f in tmp.iterdir():
                    _fsync_file(f)
                _fsync_dir(tmp)
                if guard is not None:
                    guard.check_commit()  # raises Fenced: another attempt owns out_dir
                old = out_dir / f".old-{name}-{pid}"
                if target.exists():
                    os.replace(target, old)
                os.replace(tmp, target)
                _fsync_dir(out_dir)
                if old.exists():
                    shutil.rmtree(old, ignore_errors=True)
            except BaseException:
                # inside writing(): a watchdog that fenced meanwhile waits for this removal
                shutil.rmtree(tmp, ignore_errors=True)
                raise
    except fence.Fenced as exc:
        assert guard is not None  # only the guard raises Fenced
        guard.fence_now(str(exc))  # os._exit(FENCED); returns only with a test's exit callback
        raise
    except BaseException as exc:
        if errors.no_space_errno(exc) is not None:
            raise errors.no_space(
                target / writing_now if writing_now else target,
                "checkpoint",
                _tensor_bytes(model_state) + _tensor_bytes(state),
            ) from exc
        raise
    return target


def read_checkpoint(path: Path) -> CheckpointInfo | None:
    """The :class:`CheckpointInfo` of ``path``, or None when it is not a complete checkpoint."""
    path = Path(path)
    if not path.is_dir() or not all((path / f).is_file() for f in REQUIRED):
        return None
    try:
        meta = json.loads((path / STATE_JSON).read_text(encoding="utf-8"))
        return CheckpointInfo(path=path, step=int(meta["step"]), meta=meta)
    except (OSError, ValueError, KeyError, TypeError):
        return None


def _unreadable(path: Path) -> str:
    """Why :func:`read_checkpoint` refuses ``path``: the missing or unreadable file."""
    missing = [f for f in REQUIRED if not (path / f).is_file()]
    if missing:
        return f"{path / missing[0]}: missing"
    try:
        meta = json.loads((path / STATE_JSON).read_text(encoding="utf-8"))
        int(meta["step"])
    except (OSError, ValueError, KeyError, TypeError) as exc:
        return f"{path / STATE_JSON}: unreadable ({type(exc).__name__}: {_first_line(exc)})"
    return f"{path}: unreadable"


def _first_line(exc: BaseException) -> str:
    return (str(exc).strip().splitlines() or [""])[0]


def list_checkpoints(out_dir: Path) -> list[CheckpointInfo]:
    """Complete ``step-*`` and ``final`` checkpoints in ``out_dir``, oldest step first
    (at equal steps ``final`` sorts last). Reads ``training_state.json`` only (no tensors)."""
    out_dir = Path(out_dir)
    found: list[CheckpointInfo] = []
    if not out_dir.is_dir():
        return found
    for entry in out_dir.iterdir():
        if contract.is_checkpoint_name(entry.name):
            info = read_checkpoint(entry)
            if info is not None:
                found.append(info)
    return sorted(found, key=lambda c: (c.step, c.is_final))


def latest_checkpoint(out_dir: Path) -> CheckpointInfo | None:
    """The complete checkpoint with the highest step (``final`` wins a tie), or None. Does not
    load tensors: use :func:`latest_loadable_checkpoint` to resume."""
    found = list_checkpoints(out_dir)
    return found[-1] if found else None


def load_problem(path: Path) -> str | None:
    """None when the weights and the training state of checkpoint folder ``path`` load, else
    one line naming the file that does not and why. Cheap: ``torch.load(mmap=True)`` maps the
    tensors without reading them (a truncated file fails on its zip directory)."""
    import torch

    for fname, weights_only in ((WEIGHTS, True), (STATE_PT, False)):
        f = Path(path) / fname
        try:
            obj = torch.load(f, map_location="cpu", weights_only=weights_only, mmap=True)
            del obj
        except Exception as exc:  # noqa: BLE001 - any failure means "cannot resume from this"
            return f"{f}: {type(exc).__name__}: {_first_line(exc)}"
    return None


def latest_loadable_checkpoint(
    out_dir: Path, warn: Callable[[str], object] = print
) -> CheckpointInfo | None:
    """The newest checkpoint of ``out_dir`` (highest step, ``final`` winning a tie) whose files
    load (:func:`load_problem`); each newer one that does not is skipped with ``warn(line)``
    naming the file. None when ``out_dir`` holds no checkpoint folder at all.

    Raises:
        worker.errors.CheckpointError: checkpoint folders exist but none loads (the message
            names each damaged file).
    """
    out_dir = Path(out_dir)
    if not out_dir.is_dir():
        return None
    candidates: list[tuple[tuple[float, bool], Path, CheckpointInfo | None]] = []
    for entry in out_dir.iterdir():
        if not contract.is_checkpoint_name(entry.name) or not entry.is_dir():
            continue
        info = read_checkpoint(entry)
        if info is not None:
            key = (float(info.step), info.is_final)
        else:  # damaged: by its name's step; a final/ of unknown step counts as the newest
            step = contract.checkpoint_step(entry.name)
            key = (float(step) if step is not None else math.inf, entry.name == FINAL)
        candidates.append((key, entry, info))
    problems: list[str] = []
    for _, entry, info in sorted(candidates, key=lambda c: c[0], reverse=True):
        problem = _unreadable(entry) if info is None else load_problem(entry)
        if problem is None:
            return info
        problems.append(problem)
        warn(f"checkpoint {entry.name} cannot be loaded and is skipped: {problem}")
    if problems:
        raise errors.CheckpointError(
            f"resume: no loadable checkpoint in {out_dir}: {'; '.join(problems)}; remove the damaged "
            "folder(s) to start over, or point resume at a good checkpoint"
        )
    return None


def require_loadable(path: Path) -> None:
    """Raise :class:`worker.errors.CheckpointError` naming the file when checkpoint folder
    ``path`` does not load (:func:`load_problem`)."""
    problem = load_problem(path)
    if problem is not None:
        raise errors.CheckpointError(f"resume: checkpoint {path} cannot be loaded: {problem}")


def load_weights(path: Path) -> dict[str, torch.Tensor]:
    """The model state dict of checkpoint folder ``path`` (accepts ``{"model": sd}`` too).

    Raises:
        worker.errors.CheckpointError: the file is missing or cannot be loaded (named)."""
    import torch

    f = Path(path) / WEIGHTS
    try:
        sd = torch.load(f, map_location="cpu", weights_only=True, mmap=True)
    except Exception as exc:  # noqa: BLE001 - name the file instead of "[Errno 22] Invalid argument"
        raise errors.CheckpointError(
            f"{f}: cannot be loaded ({type(exc).__name__}: {_first_line(exc)})"
        ) from exc
    return sd.get("model", sd) if isinstance(sd, dict) and "model" in sd else sd


def load_state(path: Path) -> dict[str, Any]:
    """The contents of ``training_state.pt`` of checkpoint folder ``path``.

    Raises:
        worker.errors.CheckpointError: the file is missing or cannot be loaded (named)."""
    import torch

    f = Path(path) / STATE_PT
    try:
        return torch.load(f, map_location="cpu", weights_only=False)
    except Exception as exc:  # noqa: BLE001
        raise errors.CheckpointError(
            f"{f}: cannot be loaded ({type(exc).__name__}: {_first_line(exc)})"
        ) from exc


# --------------------------------------------------------------------------------------------------
# Resume checks: what a checkpoint records about its run, and the comparison on resume
# --------------------------------------------------------------------------------------------------

#: ``training_state.json`` keys the resume checks need; checkpoints written before the checks
#: existed lack them and are resumed unchecked (with a warning).
RESUME_RECORD_KEYS = ("train_data", "tokenizer_sha256", "plan")


def _text_record(text) -> dict[str, Any] | None:
    if text is None:
        return None
    return {"sha256": text.sha256, "files": len(text.files), "bytes": text.n_bytes}


def resume_record(train, plan, source, tokenizer_sha256: str | None) -> dict[str, Any]:
    """The fields of ``training_state.json`` (and the meta in ``training_state.pt``) that a later
    resume compares with its own run (:func:`check_resume`).

    Args:
        train: the validated ``TrainConfig``.
        plan: its ``service.config.plan.TrainingPlan``.
        source: the ``worker.data.SourceText`` the run reads (None: nothing about the data is recorded).
        tokenizer_sha256: ``worker.tokenizer.tokenizer_hash`` of the tokenizer folder.

    Returns:
        ``{"train_data": {"sha256", "files", "bytes"}, "val_data": same or None, "tokenizer_sha256",
        "token_format" (``worker.data.CACHE_FORMAT``: how the text became token ids), "plan": {"lr", "min_lr", "warmup_steps", "global_batch_size", "micro_batch_size", "seq_len",
        "max_tokens", "max_steps", "optimizer_steps"}}``; the hashes are SHA-256 hex digests of the raw
        bytes (``worker.data.files_sha256``), not of the token cache.
    """
    from worker.data import CACHE_FORMAT

    t = train.train
    record: dict[str, Any] = {
        "tokenizer_sha256": tokenizer_sha256,
        "token_format": CACHE_FORMAT,
        "plan": {
            "lr": train.optimizer.lr,
            "min_lr": t.min_lr,
            "warmup_steps": plan.warmup_steps,
            "global_batch_size": t.global_batch_size,
            "micro_batch_size": plan.micro_batch_size,
            "seq_len": plan.seq_len,
            "max_tokens": t.max_tokens,
            "max_steps": t.max_steps,
            "optimizer_steps": plan.optimizer_steps,
        },
    }
    if source is not None:
        record["train_data"] = _text_record(source.train)
        record["val_data"] = _text_record(source.val)
    return record


@dataclass
class ResumeCheck:
    """Outcome of :func:`check_resume`.

    Attributes:
        changes: ``(kind, text)`` per difference that needs ``resume_allow_changes``; ``kind`` is one
            of ``service.config.fields.ResumeChange`` and ``text`` reads ``"what: old -> new"``.
        refused: the changes whose kind is not allowed.
        warnings: lines for the log: accepted changes, a different run length, an unchecked checkpoint.
    """

    changes: list[tuple[str, str]]
    refused: list[tuple[str, str]]
    warnings: list[str]

    def refusal(self, checkpoint: Path) -> str | None:
        """The one-line error naming every refused change and how to accept it, or None."""
        if not self.refused:
            return None
        kinds = list(dict.fromkeys(kind for kind, _ in self.refused))
        return (
            f"resume: {checkpoint} was written by a run that differs from this one: "
            + "; ".join(text for _, text in self.refused)
            + f". To continue it anyway, add resume_allow_changes: [{', '.join(kinds)}] to the train config "
            f"(run_train.py: --resume-allow-changes {','.join(kinds)}); to train from scratch instead, use "
            "another out_dir"
        )


def _describe_text(rec: dict[str, Any] | None) -> str:
    if not rec:
        return "none"
    n = rec.get("files")
    return f"{n} file{'s' if n != 1 else ''}, {rec.get('bytes', 0):,} bytes, sha256 {str(rec.get('sha256'))[:12]}"


def _num(value: Any) -> str:
    if value is None:
        return "none"
    if isinstance(value, float):
        return f"{value:g}"
    if isinstance(value, int) and not isinstance(value, bool):
        return f"{value:,}"
    return str(value)


def check_resume(
    info: CheckpointInfo,
    current: dict[str, Any],
    *,
    train,
    plan,
    allow: Iterable[str] = (),
) -> ResumeCheck:
    """Compare the run recorded in checkpoint ``info`` with the run about to continue from it.

    Refused unless allowed (``kind``): other training or validation bytes (``data``), other
    tokenizer files (``tokenizer``), another ``lr``, ``min_lr`` or warm-up (``schedule``; a warm-up
    given as ``lr_warmup_fraction`` is compared at the checkpoint's run length), another
    ``global_batch_size`` (``batch``), another sequence length (``seq_len``). Always accepted
    with a warning: a different number of planned optimizer steps (``max_tokens``/``max_steps``):
    the cosine schedule is recomputed for the new length, and tokens of another token format
    (:func:`token_format_change`). A checkpoint without the record (:data:`RESUME_RECORD_KEYS`,
    written before these checks) is accepted with a warning.

    Args:
        info: the checkpoint to resume from.
        current: :func:`resume_record` of the run about to start.
        train, plan: its validated ``TrainConfig`` and ``TrainingPlan``.
        allow: the config's ``resume_allow_changes``.

    Returns:
        :class:`ResumeCheck`. Raises nothing.
    """
    meta = info.meta
    allow = set(allow)
    format_change = token_format_change(info, current)
    if not all(meta.get(key) is not None for key in RESUME_RECORD_KEYS):
        return ResumeCheck(
            [],
            [],
            [
                f"resume: {info.path} was written before moejobs recorded the data and tokenizer hashes and the "
                "plan in training_state.json: resuming without checking that the data, the tokenizer, the "
                "learning-rate schedule, the batch size and the sequence length are the same as then"
            ]
            + ([format_change] if format_change else []),
        )
    changes: list[tuple[str, str]] = []
    args = train.data.init_args
    for key, where in (
        ("train_data", f"training data ({args.train_data_path})"),
        (
            "val_data",
            "validation data"
            + (
                f" ({args.val_data_path})"
                if args.val_data_path is not None
                else " (first training file)"
            ),
        ),
    ):
        old, new = meta.get(key), current.get(key)
        if (old or {}).get("sha256") != (new or {}).get("sha256"):
            changes.append(("data", f"{where}: {_describe_text(old)} -> {_describe_text(new)}"))
    if meta["tokenizer_sha256"] != current.get("tokenizer_sha256"):
        changes.append(
            (
                "tokenizer",
                f"tokenizer ({train.tokenizer_dir or train.initial_checkpoint_dir}): sha256 "
                f"{meta['tokenizer_sha256'][:12]} -> {str(current.get('tokenizer_sha256'))[:12]}",
            )
        )
    old_plan, new_plan = meta["plan"], current["plan"]
    for key, what, kind in (
        ("lr", "optimizer lr", "schedule"),
        ("min_lr", "train.min_lr", "schedule"),
    ):
        if not math.isclose(float(old_plan[key]), float(new_plan[key]), rel_tol=1e-12, abs_tol=0.0):
            changes.append((kind, f"{what}: {_num(old_plan[key])} -> {_num(new_plan[key])}"))
    old_steps = int(old_plan["optimizer_steps"])
    warmup_then = warmup_steps(
        train, old_steps
    )  # this config's warm-up at the checkpoint's run length
    if warmup_then != int(old_plan["warmup_steps"]):
        changes.append(
            ("schedule", f"warm-up: {old_plan['warmup_steps']} -> {warmup_then} optimizer steps")
        )
    if old_plan["global_batch_size"] != new_plan["global_batch_size"]:
        changes.append(
            (
                "batch",
                f"train.global_batch_size: {_num(old_plan['global_batch_size'])} -> "
                f"{_num(new_plan['global_batch_size'])}",
            )
        )
    if old_plan["seq_len"] != new_plan["seq_len"]:
        changes.append(
            (
                "seq_len",
                f"sequence length (train.max_seq_length): {old_plan['seq_len']} -> "
                f"{new_plan['seq_len']}",
            )
        )
    refused = [c for c in changes if c[0] not in allow]
    warnings = [
        f"resume: accepted by resume_allow_changes ({kind}): {text}"
        for kind, text in changes
        if kind in allow
    ]
    if format_change:
        warnings.append(format_change)
    if plan.optimizer_steps != old_steps:
        warnings.append(_length_warning(info, old_plan, new_plan, train, plan))
    return ResumeCheck(changes, refused, warnings)


#: What each token format (``worker.data.CACHE_FORMAT``) changed, for the resume warning.
_TOKEN_FORMAT_CHANGES = {
    2: "each file is now read as LitGPT's tokenize() reads it: CRLF line ends become LF and the text "
    "is stripped of leading and trailing whitespace",
}


def token_format_change(info: CheckpointInfo, current: dict[str, Any]) -> str | None:
    """The warning for resuming a checkpoint whose tokens were made by another token format
    (``token_format`` in its record; absent means format 1, before it was recorded), else None.
    Not a refusal: the raw text is the same (the data check compares its bytes), only its token
    ids differ slightly, and the run continues on the new ones."""
    old, new = info.meta.get("token_format", 1), current.get("token_format")
    if new is None or old == new:
        return None
    why = "; ".join(
        _TOKEN_FORMAT_CHANGES[v]
        for v in range(int(old) + 1, int(new) + 1)
        if v in _TOKEN_FORMAT_CHANGES
    )
    return (
        f"resume: {info.path} was trained on tokens of format {old} and this run tokenizes the same "
        f"text with format {new}" + (f" ({why})" if why else "") + ": the steps from here on see "
        "slightly different token ids than the steps before"
    )


def _length_warning(info: CheckpointInfo, old_plan: dict, new_plan: dict, train, plan) -> str:
    """The warning for a resume whose plan has another number of optimizer steps."""
    old_steps, new_steps = int(old_plan["optimizer_steps"]), plan.optimizer_steps
    keys = [
        f"train.{key} {_num(old_plan.get(key))} -> {_num(new_plan[key])}"
        for key in ("max_tokens", "max_steps")
        if old_plan.get(key) != new_plan[key]
    ]
    longer = new_steps > old_steps
    lr, min_lr = train.optimizer.lr, train.train.min_lr
    text = (
        f"resume: {'extending' if longer else 'shortening'} the run from {info.path} "
        f"({', '.join(keys) or 'global batch or sequence length changed'}): planned optimizer steps "
        f"{old_steps:,} -> {new_steps:,}; the learning-rate schedule is recomputed for the new length: the "
        f"cosine decay now reaches min_lr {min_lr:g} at step {new_steps:,} instead of step {old_steps:,}"
    )
    if plan.warmup_steps != warmup_steps(
        train, old_steps
    ):  # a warm-up fraction: it follows the length
        text += (
            f", and the warm-up (lr_warmup_fraction {train.train.lr_warmup_fraction:g} of the run) is "
            f"{plan.warmup_steps} steps instead of {warmup_steps(train, old_steps)}"
        )
    step = info.step
    if step >= new_steps:
        return text + (
            f"; the checkpoint is already at step {step:,}, not before the new end: nothing more is "
            f"trained and final/ is written from it"
        )
    old = replace(plan, optimizer_steps=old_steps, warmup_steps=int(old_plan["warmup_steps"]))
    old_lr = old.learning_rate(step + 1, float(old_plan["lr"]), float(old_plan["min_lr"]))
    return text + (
        f"; the next step ({step + 1:,}) uses learning rate {plan.learning_rate(step + 1, lr, min_lr):.4g} "
        f"(the old plan: {old_lr:.4g})"
    )
