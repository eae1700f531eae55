"""What the training engine and the service agree on: one torch-free module that the API, the
worker's runner and the engine all import, so that neither side parses the other's log text.

The engine (``python -m worker.entry``, or the test stub ``worker.stub``) is started by a
worker's runner with the run's folder as working directory and writes, in ``out_dir``:

``result.json`` (:class:`EngineResult`)
    written once, atomically, when the process ends in any way it can still report: the
    outcome, the failure reason and a one-line message, steps and tokens trained, the final
    checkpoint. A process killed by a signal writes none; the runner then classifies from the
    exit code. The runner deletes a stale one before each attempt.
``events.jsonl`` (:class:`EngineEvent`, one JSON object a line, append-only)
    what happened when: started, configured (engine loaded, config checked), data ready, model built, first step, each checkpoint, a stop
    request, a self-fencing, finished; each with an aware UTC timestamp and the attempt. The
    smoke test's stage timings and the dashboard read it; a line cut short by a crash is
    skipped.
``.owner.json`` (:class:`Owner`)
    written by the worker that claimed the run, before it starts the engine: the attempt that
    owns the folder. The engine re-reads it before it renames a checkpoint into place and
    stops (:attr:`ExitCode.FENCED`) when another attempt owns the folder.

The process' exit code is an :class:`ExitCode`; a failure's cause is a :class:`FailureReason`
(also a database CHECK constraint: adding one is a migration). Checkpoint folder names, the
metrics.csv and router.csv columns and the GPU peak-FLOPs table live here too, once.

Environment the runner gives the engine (all optional; ``run_train.py`` sets none):
:data:`ENV_ATTEMPT` (the fencing token), :data:`ENV_WATCHDOG_FD` (read end of a pipe the
worker writes a byte to while its lease is safely held), :data:`ENV_TRAINER_DEADLINE` (seconds
without a byte after which the engine stops itself) and :data:`ENV_CHECKPOINT_WRITE` (how much
longer a checkpoint write already under way may take), :data:`ENV_ENGINE` (``stub`` selects the
torch-free test engine). ``worker.fence`` implements the engine's side.
"""

from __future__ import annotations

import enum
import os
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from pydantic import AwareDatetime, BaseModel, ConfigDict, Field, ValidationError

# -- environment of the engine process ------------------------------------------------------------

#: The claimed attempt (fencing token) of the run this process trains; unset outside a worker.
ENV_ATTEMPT = "MOEJOBS_ATTEMPT"
#: File descriptor (inherited) of the read end of the worker's heartbeat pipe.
ENV_WATCHDOG_FD = "MOEJOBS_WATCHDOG_FD"
#: Seconds without a heartbeat byte after which the engine stops itself (float).
ENV_TRAINER_DEADLINE = "MOEJOBS_TRAINER_DEADLINE_SECONDS"
#: Seconds a checkpoint write that began before the deadline may still take (float).
ENV_CHECKPOINT_WRITE = "MOEJOBS_CHECKPOINT_WRITE_SECONDS"
#: Which engine ``worker.entry`` starts: ``litgpt`` (default) or ``stub`` (tests).
ENV_ENGINE = "MOEJOBS_ENGINE"
#: Engine names accepted in :data:`ENV_ENGINE`.
ENGINES = ("litgpt", "stub")


# -- exit codes and failure reasons -----------------------------------------------------------------


class ExitCode(enum.IntEnum):
    """Exit codes of the engine process (``python -m worker.entry`` and ``run_train.py``)."""

    #: Training finished (or there was nothing left to train).
    OK = 0
    #: Training failed; ``result.json`` has the reason (invalid data, out of memory, no space,
    #: a crash).
    FAILED = 1
    #: The config is invalid or this machine cannot run it (pre-flight); nothing was trained.
    INVALID_CONFIG = 2
    #: Stopped by SIGTERM/SIGINT at an optimizer-step boundary after writing a resumable
    #: checkpoint (EX_TEMPFAIL: run it again and it resumes).
    INTERRUPTED = 75
    #: The watchdog stopped the process: its worker went silent past the trainer deadline, or
    #: another attempt owns the run's folder. Nothing was written after that moment.
    FENCED = 76
    #: SIGINT before training started (128 + 2): one line, nothing trained.
    SIGINT_BEFORE_START = 130
    #: SIGTERM before training started (128 + 15): one line, nothing trained.
    SIGTERM_BEFORE_START = 143


class FailureReason(str, enum.Enum):
    """Why a run failed: the fixed list, stored in ``runs.failure_reason`` (CHECK constraint).

    Permanent (:data:`PERMANENT_REASONS`): the same config on the same data would fail the
    same way. Retryable (:data:`RETRYABLE_REASONS`): the cause was outside the run; the run is
    queued again while its failure count is below ``MOEJOBS_MAX_ATTEMPTS``."""

    invalid_config = "invalid_config"
    invalid_data = "invalid_data"
    out_of_memory = "out_of_memory"
    #: ENOSPC while writing (a checkpoint, metrics, the token cache); the message names the
    #: path and its free space.
    no_space = "no_space"
    #: Killed by a signal from outside the worker (the OOM killer excepted), or SIGTERM that
    #: the worker did not send.
    killed = "killed"
    crashed = "crashed"
    #: The worker holding the run went silent (lease expired) or its trainer fenced itself.
    lost_worker = "lost_worker"


RETRYABLE_REASONS = frozenset({FailureReason.killed, FailureReason.lost_worker})
PERMANENT_REASONS = frozenset(FailureReason) - RETRYABLE_REASONS


# -- result.json ------------------------------------------------------------------------------------

RESULT_FILE = "result.json"
EVENTS_FILE = "events.jsonl"
OWNER_FILE = ".owner.json"


class Outcome(str, enum.Enum):
    """How an engine process ended, as it reports it in ``result.json``."""

    #: Trained to the end of the plan, or found nothing left to train.
    succeeded = "succeeded"
    #: Stopped with a failure ``reason``.
    failed = "failed"
    #: Stopped on request (SIGTERM/SIGINT) after writing a resumable checkpoint, or before
    #: training started (then ``steps`` is what earlier attempts trained).
    interrupted = "interrupted"
    #: Stopped itself: its worker went silent, or another attempt owns the folder.
    fenced = "fenced"


def utc_now() -> datetime:
    """The current time, aware UTC (every timestamp of the contract)."""
    return datetime.now(UTC)


def _atomic_write(path: Path, text: str) -> None:
    """Write ``text`` to ``path`` through a temporary file and ``os.replace`` (readers see the
    old or the new file, never half of one). Raises OSError."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        with open(tmp, "w", encoding="utf-8") as fh:
            fh.write(text)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


class EngineResult(BaseModel):
    """``out_dir/result.json``: the engine's own account of how it ended."""

    model_config = ConfigDict(extra="ignore")

    outcome: Outcome
    reason: FailureReason | None = Field(
        None, description="Set when outcome is failed (and only then)."
    )
    message: str = Field(
        "",
        description="One line for people: what happened, naming the field, file or path concerned.",
    )
    exit_code: int = Field(description="The ExitCode the process exits with.")
    attempt: int | None = Field(
        None, description="MOEJOBS_ATTEMPT of the process, when a worker started it."
    )
    steps: int = Field(0, ge=0, description="Optimizer steps completed, all attempts.")
    planned_steps: int | None = Field(None, ge=0)
    tokens: int = Field(0, ge=0, description="Tokens trained, all ranks, all attempts.")
    final_loss: float | None = None
    val_loss: float | None = None
    checkpoint: str | None = Field(
        None,
        description="Path of the newest checkpoint this process wrote (final/ on success), if any.",
    )
    stopped_by: str | None = Field(
        None, description="completed, max_time, nothing_to_do, SIGTERM, SIGINT, watchdog, owner."
    )
    peak_memory_bytes: int | None = None
    elapsed_s: float | None = Field(None, description="Wall seconds of this process.")
    finished_at: AwareDatetime = Field(default_factory=utc_now)

    def write(self, out_dir: Path | str) -> Path:
        """Write ``out_dir/result.json`` atomically; returns its path. Raises OSError."""
        path = Path(out_dir) / RESULT_FILE
        _atomic_write(path, self.model_dump_json(indent=2) + "\n")
        return path

    @classmethod
    def read(cls, out_dir: Path | str) -> EngineResult | None:
        """The result in ``out_dir``, or None when there is none or it is unreadable."""
        try:
            return cls.model_validate_json((Path(out_dir) / RESULT_FILE).read_bytes())
        except (OSError, ValidationError, ValueError):
            return None


# -- events.jsonl -------------------------------------------------------------------------------------


class EventKind(str, enum.Enum):
    """What an engine event marks, in the order they normally happen."""

    started = "started"  # the process is up (signal handlers installed)
    configured = "configured"  # engine imported, config valid, pre-flight passed
    data_progress = (
        "data_progress"  # tokenizing: tokens, tokens/s, ETA (every few seconds, and when done)
    )
    data_ready = "data_ready"  # tokenizer loaded, text tokenized (or read from cache)
    model_built = "model_built"  # model built, compiled, optimizer set up; plan known
    first_step = "first_step"  # the first optimizer step of this process finished
    checkpoint_written = "checkpoint_written"
    stop_requested = "stop_requested"  # SIGTERM/SIGINT received
    fenced = "fenced"  # the watchdog stopped the process
    finished = "finished"  # mirrors result.json's outcome


class EngineEvent(BaseModel):
    """One line of ``out_dir/events.jsonl``."""

    model_config = ConfigDict(extra="ignore")

    at: AwareDatetime
    event: EventKind
    attempt: int | None = None
    pid: int | None = None
    step: int | None = None
    message: str | None = None
    data: dict[str, Any] = Field(default_factory=dict)


def append_event(
    out_dir: Path | str,
    event: EventKind | str,
    *,
    attempt: int | None = None,
    step: int | None = None,
    message: str | None = None,
    **data: Any,
) -> EngineEvent:
    """Append one event line to ``out_dir/events.jsonl`` (created with its folder) and flush it
    to the OS; returns the event. Extra keyword values go to ``data`` (JSON-able). Raises
    OSError."""
    item = EngineEvent(
        at=utc_now(),
        event=EventKind(event),
        attempt=attempt,
        pid=os.getpid(),
        step=step,
        message=message,
        data=data,
    )
    path = Path(out_dir) / EVENTS_FILE
    path.parent.mkdir(parents=True, exist_ok=True)
    line = item.model_dump_json(exclude_none=True) + "\n"
    # One write() of a short line with O_APPEND: lines of concurrent writers do not interleave.
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        os.write(fd, line.encode("utf-8"))
    finally:
        os.close(fd)
    return item


def read_events(out_dir: Path | str, *, attempt: int | None = None) -> list[EngineEvent]:
    """The events of ``out_dir/events.jsonl`` in file order (only ``attempt``'s when given);
    malformed or partial lines are skipped; [] when there is no file."""
    try:
        raw = (Path(out_dir) / EVENTS_FILE).read_bytes()
    except OSError:
        return []
    events = []
    for line in raw.splitlines():
        try:
            item = EngineEvent.model_validate_json(line)
        except (ValidationError, ValueError):
            continue
        if attempt is None or item.attempt == attempt:
            events.append(item)
    return events


# -- the owner of a run's folder ------------------------------------------------------------------------


class Owner(BaseModel):
    """``out_dir/.owner.json``: the attempt that owns the run's folder."""

    attempt: int
    worker_id: str
    claimed_at: AwareDatetime = Field(default_factory=utc_now)


def write_owner(out_dir: Path | str, attempt: int, worker_id: str) -> Path:
    """Record (atomically) that ``attempt`` on ``worker_id`` owns ``out_dir``; the claiming
    worker calls this before starting the engine. Raises OSError."""
    path = Path(out_dir) / OWNER_FILE
    _atomic_write(path, Owner(attempt=attempt, worker_id=worker_id).model_dump_json() + "\n")
    return path


def read_owner(out_dir: Path | str) -> Owner | None:
    """The owner of ``out_dir``, or None when no worker claimed it (``run_train.py``) or the
    file is unreadable."""
    try:
        return Owner.model_validate_json((Path(out_dir) / OWNER_FILE).read_bytes())
    except (OSError, ValidationError, ValueError):
        return None


def owns(out_dir: Path | str, attempt: int | None) -> bool:
    """Whether a process of ``attempt`` may still write into ``out_dir``: always when it has
    no attempt (not started by a worker) or no owner file exists, else only while the owner
    file names this attempt."""
    if attempt is None:
        return True
    owner = read_owner(out_dir)
    return owner is None or owner.attempt == attempt


# -- checkpoint folder names -----------------------------------------------------------------------------

#: The checkpoint written at the end of a run.
FINAL = "final"
_STEP_PREFIX = "step-"


def step_dir_name(step: int) -> str:
    """``step-00000042`` for optimizer step 42 (8 digits, more when the step needs them)."""
    if step < 0:
        raise ValueError(f"step must be >= 0, got {step}")
    return f"{_STEP_PREFIX}{step:08d}"


def checkpoint_step(name: str) -> int | None:
    """The step of a ``step-XXXXXXXX`` folder name (8 or more ASCII digits); None for any
    other name, ``final`` included."""
    digits = name[len(_STEP_PREFIX) :]
    if name.startswith(_STEP_PREFIX) and len(digits) >= 8 and digits.isascii() and digits.isdigit():
        return int(digits)
    return None


def is_checkpoint_name(name: str) -> bool:
    """True for ``final`` and ``step-XXXXXXXX`` names (the only names of complete folders)."""
    return name == FINAL or checkpoint_step(name) is not None


# -- checkpoint folder contents ------------------------------------------------------------------------

#: The model's weights (a ``torch.save`` state dict with LitGPT key names) and its config.
CHECKPOINT_WEIGHTS = "lit_model.pth"
CHECKPOINT_MODEL_CONFIG = "model_config.yaml"
#: The weights as safetensors, in a ``?format=safetensors`` download (made while it streams).
CHECKPOINT_SAFETENSORS = "model.safetensors"

#: Files copied from a tokenizer folder into every checkpoint folder, when present.
TOKENIZER_FILES: tuple[str, ...] = (
    "tokenizer.json",
    "tokenizer.model",
    "tokenizer_config.json",
    "generation_config.json",
    "special_tokens_map.json",
)

#: Generated text of the checkpoints for a few prompts (``worker.sample``), one file per
#: checkpoint in this folder of ``out_dir`` (beside the checkpoint folders, not inside them: a
#: checkpoint folder is never changed once it is in place, and the worker tells a replaced
#: ``final/`` by its folder's mtime). Each: ``{"checkpoint", "step", "generated_at",
#: "max_new_tokens", "decoding", "samples": [{"prompt", "text"}]}``.
SAMPLES_DIR = "samples"


def samples_path(checkpoint_folder: Path) -> Path:
    """``out_dir/samples/<checkpoint name>.json`` of the checkpoint folder ``out_dir/<name>``."""
    return checkpoint_folder.parent / SAMPLES_DIR / f"{checkpoint_folder.name}.json"


#: What stock ``litgpt`` needs to load a checkpoint folder (``litgpt generate <dir>``,
#: ``litgpt.GPT`` + ``load_state_dict``): a ``?include=weights`` download holds only these;
#: the training state (``training_state.pt``: optimizer moments, RNG states) stays behind.
CHECKPOINT_LOADABLE: tuple[str, ...] = (
    CHECKPOINT_WEIGHTS,
    CHECKPOINT_MODEL_CONFIG,
) + TOKENIZER_FILES


# -- metrics.csv and router.csv ----------------------------------------------------------------------------

METRICS_FILE = "metrics.csv"
ROUTER_FILE = "router.csv"

#: The columns of metrics.csv, in file order (README "Outputs" describes each).
METRICS_HEADER: tuple[str, ...] = (
    "step",
    "tokens",
    "loss",
    "learning_rate",
    "grad_norm",
    "tokens_per_sec",
    "mfu",
    "elapsed_s",
    "val_loss",
    "val_ppl",
)
#: The metric columns after ``step`` (the database's metric_points columns).
METRIC_COLUMNS: tuple[str, ...] = METRICS_HEADER[1:]

#: Columns of router.csv, the MoE router telemetry in long format: for each logged optimizer
#: step, each MoE layer (0-based among the MoE layers) and each expert, the fraction of that
#: layer's routing assignments (tokens x n_expert_per_token) the expert received in the step's
#: last micro-batch (mean over ranks). A layer's fractions sum to 1.
ROUTER_HEADER: tuple[str, ...] = ("step", "layer", "expert", "fraction")


# -- GPU peak FLOP/s ----------------------------------------------------------------------------------------

#: Dense (no sparsity) peak tensor-core FLOP/s per GPU by precision family, from the vendors'
#: datasheets: NVIDIA H100/H200 SXM (989.4 TFLOPS bf16/fp16, 494.7 TF32), A100 (312 / 156),
#: L40S (362.05 / 183), L4 (121 / 60), A10G (70 / 35), RTX 4090 (165.2 / 82.6).
PEAK_FLOPS: dict[str, dict[str, float]] = {
    "H200": {"bf16": 989.4e12, "tf32": 494.7e12},
    "H100": {"bf16": 989.4e12, "tf32": 494.7e12},
    "A100": {"bf16": 312e12, "tf32": 156e12},
    "L40S": {"bf16": 362.05e12, "tf32": 183e12},
    "L4": {"bf16": 121e12, "tf32": 60e12},
    "A10G": {"bf16": 70e12, "tf32": 35e12},
    "4090": {"bf16": 165.2e12, "tf32": 82.6e12},
}


def precision_family(precision: str) -> str:
    """``"tf32"`` for 32-bit precisions (TF32 tensor cores), else ``"bf16"`` (bf16/fp16 peak)."""
    return "tf32" if precision.startswith("32") else "bf16"


def peak_flops_per_device(device_name: str, precision: str) -> float | None:
    """Peak dense FLOP/s of one GPU named ``device_name`` (``torch.cuda.get_device_name()``,
    e.g. "NVIDIA H200") for ``precision``; None when the GPU is not in :data:`PEAK_FLOPS`."""
    family = precision_family(precision)
    name = device_name.upper()
    for key in sorted(PEAK_FLOPS, key=len, reverse=True):  # "L40S" before "L4"
        if key in name:
            return PEAK_FLOPS[key][family]
    return None
