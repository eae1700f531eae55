"""API shapes (request and response bodies; the run request is ``service.submission.RunCreate``), kept apart from the tables in
``service.models``: a response is built field by field from a row, never by dumping the row
(no mass assignment in, no internal column out)."""

from __future__ import annotations

import uuid
from datetime import datetime
from typing import Annotated, Any, Literal

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, Strict
from sqlalchemy import Row

from service.config.fields import check_path_text
from service.contract import METRIC_COLUMNS, EngineEvent
from service.models import Checkpoint, RouterPoint, Run, RunEvent, Worker


class IssueOut(BaseModel):
    """A warning or error about a config field; ``loc`` as in error responses."""

    loc: list[str | int]
    msg: str


class MetricRow(BaseModel):
    """One row of a run's metrics.csv as stored: ``step`` and every metric column
    (``service.contract.METRIC_COLUMNS``; README "Outputs" says what each means)."""

    step: int
    tokens: int | None
    loss: float | None
    learning_rate: float | None
    grad_norm: float | None
    tokens_per_sec: float | None
    mfu: float | None
    elapsed_s: float | None
    val_loss: float | None
    val_ppl: float | None

    @classmethod
    def of(cls, p: Any) -> MetricRow:
        """From a ``MetricPoint`` or a row with the same attributes."""
        return cls(step=p.step, **{column: getattr(p, column) for column in METRIC_COLUMNS})


class RunPublic(BaseModel):
    """A run as the API shows it."""

    id: uuid.UUID
    name: str
    owner: str
    status: str
    preset: str | None
    attempt: int = Field(
        description="Claims so far (the fencing token): graceful stops and "
        "retries each start a new attempt."
    )
    failures: int = Field(
        description="Attempts that failed (lost worker, killed training...); "
        "the run fails for good at MOEJOBS_MAX_ATTEMPTS."
    )
    worker_id: str | None
    estimate: dict[str, Any] | None
    warnings: list[IssueOut]
    cancel_requested: bool
    failure_reason: str | None
    failure_message: str | None
    exit_code: int | None
    created_at: datetime
    queued_at: datetime
    started_at: datetime | None
    finished_at: datetime | None
    updated_at: datetime
    heartbeat_at: datetime | None
    lease_expires_at: datetime | None
    latest_metrics: MetricRow | None = Field(
        None,
        description="The run's metric row of the highest step (what the runs list shows); "
        "null before its first logged step.",
    )

    @classmethod
    def of(cls, run: Run | Row[Any], latest: Any = None) -> RunPublic:
        """From the run's row (a ``Run`` or a row with its attributes, e.g.
        ``service.reads.list_runs(configs=False)``'s) and its newest metric row (a
        ``MetricPoint`` or a row with the same attributes), if any."""
        return cls.model_validate(cls.fields(run, latest))

    @staticmethod
    def fields(run: Any, latest: Any = None) -> dict[str, Any]:
        """The fields of :meth:`of` as a plain dict (validate a whole page at once)."""
        return {
            "id": run.id,
            "name": run.name,
            "owner": run.owner,
            "status": run.status.value,
            "preset": run.preset,
            "attempt": run.attempt,
            "failures": run.failures,
            "worker_id": run.worker_id,
            "estimate": run.estimate,
            "warnings": run.warnings or [],
            "cancel_requested": run.cancel_requested,
            "failure_reason": run.failure_reason.value if run.failure_reason else None,
            "failure_message": run.failure_message,
            "exit_code": run.exit_code,
            "created_at": run.created_at,
            "queued_at": run.queued_at,
            "started_at": run.started_at,
            "finished_at": run.finished_at,
            "updated_at": run.updated_at,
            "heartbeat_at": run.heartbeat_at,
            "lease_expires_at": run.lease_expires_at,
            "latest_metrics": None
            if latest is None
            else {"step": latest.step, **{c: getattr(latest, c) for c in METRIC_COLUMNS}},
        }


class RunCreated(RunPublic):
    """``POST /runs`` answer: the run, plus whether its message reached the broker."""

    enqueued: bool = Field(
        description="False when the broker was unreachable; the run stays "
        "queued and the reconciler sends it later."
    )
    created: bool = Field(description="False when an Idempotency-Key retry returned the first run.")


class RunPage(BaseModel):
    items: list[RunPublic]
    next_cursor: str | None


class ValidationReport(BaseModel):
    """``POST /runs/validate`` answer (always 200 for a well-formed request)."""

    valid: bool
    errors: list[dict[str, Any]]
    warnings: list[IssueOut]
    estimate: dict[str, Any] | None
    resolved: dict[str, Any] | None = Field(
        default=None,
        description="The resolved documents a run would get (paths absolute; "
        "out_dir the placeholder run folder <RUNS_DIR>/<run id>/out).",
    )


class EventPublic(BaseModel):
    id: int
    at: datetime
    from_status: str | None
    to_status: str
    reason: str | None
    message: str
    actor: str | None
    attempt: int

    @classmethod
    def of(cls, e: RunEvent) -> EventPublic:
        return cls(
            id=e.id or 0,
            at=e.at,
            from_status=e.from_status.value if e.from_status else None,
            to_status=e.to_status.value,
            reason=e.reason.value if e.reason else None,
            message=e.message,
            actor=e.actor,
            attempt=e.attempt,
        )


class EngineEventPublic(BaseModel):
    """One line of the engine's ``out/events.jsonl`` (``service.contract.EngineEvent``)."""

    at: datetime = Field(description="When it happened (UTC, the engine's clock).")
    event: str = Field(
        description="started, configured, data_progress, data_ready, model_built, first_step, "
        "checkpoint_written, stop_requested, fenced, finished"
    )
    attempt: int | None = Field(description="The run's attempt whose process wrote it.")
    pid: int | None
    step: int | None
    message: str | None
    data: dict[str, Any]

    @classmethod
    def of(cls, e: EngineEvent) -> EngineEventPublic:
        return cls(
            at=e.at,
            event=e.event.value,
            attempt=e.attempt,
            pid=e.pid,
            step=e.step,
            message=e.message,
            data=e.data,
        )


class MetricPage(BaseModel):
    items: list[MetricRow]
    next_after_step: int | None = Field(
        description="Pass as after_step to get the rows after these (the last step returned, or "
        "the after_step given when there were none)."
    )
    total: int = Field(description="Rows matched before downsampling.")
    downsampled: bool


class RouterRow(BaseModel):
    step: int
    layer: int
    expert: int
    fraction: float

    @classmethod
    def of(cls, p: RouterPoint) -> RouterRow:
        return cls(step=p.step, layer=p.layer, expert=p.expert, fraction=p.fraction)


class RouterPage(BaseModel):
    items: list[RouterRow]
    next_after_step: int | None


class CheckpointSample(BaseModel):
    """A prompt and the checkpoint's greedy continuation of it (``worker.sample``)."""

    prompt: str
    text: str


class CheckpointPublic(BaseModel):
    name: str
    step: int | None
    path: str
    size_bytes: int | None
    created_at: datetime
    archive_url: str
    samples: list[CheckpointSample] | None = Field(
        default=None,
        description="Greedy continuations of the server's sample prompts by this checkpoint, "
        "made after it was recorded (MOEJOBS_SAMPLE_PROMPTS); null until they exist or when "
        "samples are off",
    )

    @classmethod
    def of(cls, c: Checkpoint) -> CheckpointPublic:
        ref = "final" if c.name == "final" else (str(c.step) if c.step is not None else c.name)
        return cls(
            name=c.name,
            step=c.step,
            path=c.path,
            size_bytes=c.size_bytes,
            created_at=c.created_at,
            archive_url=f"/runs/{c.run_id}/checkpoints/{ref}/archive",
        )


class DownloadLink(BaseModel):
    """A link that downloads one checkpoint archive without the bearer header."""

    url: str = Field(
        description="Path and query to GET: the archive, signed when the server has an API token"
    )
    expires_at: datetime | None = Field(
        description="When the signature stops working (UTC); null when the server needs no token"
    )


class WorkerPublic(BaseModel):
    id: str
    host: str
    pid: int | None
    gpus: list[Any]
    gpu_count: int
    gpu_memory_bytes: int | None
    kind: str | None = Field(
        default=None,
        description='GPU name ("NVIDIA H200") or "cpu: <model>": what calibration is kept by.',
    )
    host_memory_bytes: int | None = Field(
        default=None,
        description="The machine's memory "
        "(a CPU worker trains in it; shared by its host's "
        "CPU workers).",
    )
    free_bytes: int | None = Field(
        default=None, description="Free space under RUNS_DIR at the last heartbeat."
    )
    role: Literal["all", "train", "aux"] = Field(
        default="all",
        description="Queues it consumes: all (training runs and short CPU jobs), "
        "train (training runs only) or aux (tokenizers and data preparation; never trains).",
    )
    heartbeat_at: datetime
    started_at: datetime
    current_run_id: uuid.UUID | None
    live: bool

    @classmethod
    def of(cls, w: Worker, live: bool) -> WorkerPublic:
        return cls(
            id=w.id,
            host=w.host,
            pid=w.pid,
            gpus=w.gpus,
            gpu_count=w.gpu_count,
            gpu_memory_bytes=w.gpu_memory_bytes,
            kind=w.kind,
            host_memory_bytes=w.host_memory_bytes,
            free_bytes=w.free_bytes,
            role=w.role or "all",
            heartbeat_at=w.heartbeat_at,
            started_at=w.started_at,
            current_run_id=w.current_run_id,
            live=live,
        )


class DatasetPublic(BaseModel):
    name: str
    files: int = Field(description="Number of .txt files (all folders).")
    bytes: int
    folders: list[str] = Field(
        description="Sub-folders holding .txt files ('' = the top level), "
        "what train_data_path/val_data_path can name."
    )
    modified_at: datetime


class TokenizerCreate(BaseModel):
    model_config = ConfigDict(extra="forbid")

    dataset: Annotated[str, AfterValidator(check_path_text)] = Field(
        min_length=1,
        max_length=300,
        description="Dataset name, or a folder under the data root "
        "(e.g. mydata/train), whose .txt files train the tokenizer.",
    )
    vocab_size: Annotated[int, Strict()] = Field(
        4096, ge=512, le=262_144, description="Vocabulary size."
    )


class TokenizerPublic(BaseModel):
    name: str
    status: Literal["ready", "pending", "failed"]
    path: str
    vocab_size: int | None = Field(
        None,
        description="Ids of the trained tokenizer when ready "
        "(may be fewer than requested, see warnings); the requested "
        "size while pending or failed.",
    )
    requested_vocab_size: int | None = Field(None, description="The vocab_size of the request.")
    dataset: str | None = Field(None, description="The dataset of the request.")
    error: str | None = None
    requested_at: datetime | None = None
    warnings: list[str] = Field(
        default_factory=list,
        description=(
            "Problems of a ready tokenizer, e.g. 'the corpus has too little distinct text for 8192 "
            "tokens: 294 learned' when the dataset yields fewer ids than the requested vocab_size "
            "(train on more text, or ask for fewer ids)."
        ),
    )


class SmokeStage(BaseModel):
    name: str
    seconds: float | None = Field(description="Duration of the stage; None when not reached.")
    status: Literal["ok", "failed", "pending", "skipped"]


class SmokeTestPublic(BaseModel):
    id: uuid.UUID
    status: Literal["pending", "running", "passed", "failed"]
    run_status: str
    stages: list[SmokeStage]
    failed_stage: str | None
    message: str | None
    total_seconds: float | None


# -- the dashboard's lists (issue 11): smoke tests, presets ------------------------------------


class SmokeTestSummary(SmokeTestPublic):
    """One smoke test of ``GET /smoke-tests``: its report plus its run's name and creation time."""

    name: str
    created_at: datetime


class SmokeTestPage(BaseModel):
    """``GET /smoke-tests``: the server's newest smoke tests, newest first."""

    items: list[SmokeTestSummary]


class PresetPublic(BaseModel):
    """``GET /presets``: a shipped preset (``configs/presets/<name>.yaml``), the layers it merges
    over the submitted documents."""

    name: str
    train_config: dict[str, Any]
    model_doc: dict[str, Any] = Field(alias="model_config", serialization_alias="model_config")
