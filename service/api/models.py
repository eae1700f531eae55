"""API shapes (request and response bodies; the run request is ``service.submission.RunCreate``), kept apart from the tables in
``service.models``: a response is built field by field from a row, never by dumping the row
(no mass assignment in, no internal column out)."""

from __future__ import annotations

import uuid
from datetime import datetime
from typing import Annotated, Any, Literal

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, Strict
from sqlalchemy import Row

from service.config.fields import Note, Tags, check_path_text
from service.contract import METRIC_COLUMNS, EngineEvent
from service.models import Checkpoint, RouterPoint, Run, RunEvent, WebhookDelivery, Worker
from service.webhooks import shown_url


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
    tags: list[str] = Field(
        default_factory=list, description="Labels (set at submission or with PATCH /runs/{id})."
    )
    note: str | None = Field(default=None, description="Free text about the run.")

    # -- issue 11, sweeps --
    sweep_id: uuid.UUID | None = Field(None, description="The sweep whose trial this run is.")
    sweep_params: dict[str, Any] | None = Field(
        None, description="The trial's parameters: dotted paths -> values (sweeps only)."
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
            "tags": run.tags or [],
            "note": run.note,
            "sweep_id": getattr(run, "sweep_id", None),
            "sweep_params": getattr(run, "sweep_params", None),
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


class WebhookDeliveryPublic(BaseModel):
    """One webhook delivery (README: Webhooks): one event for one URL and its attempts."""

    id: uuid.UUID = Field(description="Also the body's id and the X-Moejobs-Delivery header.")
    event: str = Field(description="run.succeeded, run.failed, run.cancelled, run.checkpoint, "
                       "sweep.finished, sweep.failed, sweep.cancelled")  # fmt: skip
    url: str = Field(description="The receiver, without its query string.")
    state: str = Field(description="pending, delivered or failed (given up)")
    attempts: int
    next_attempt_at: datetime | None = Field(description="When a pending one is tried next.")
    last_status_code: int | None
    last_error: str | None
    created_at: datetime
    delivered_at: datetime | None

    @classmethod
    def of(cls, d: WebhookDelivery) -> WebhookDeliveryPublic:
        return cls(
            id=d.id,
            event=d.event,
            url=shown_url(d.url),
            state=d.state.value,
            attempts=d.attempts,
            next_attempt_at=d.next_attempt_at if d.state.value == "pending" else None,
            last_status_code=d.last_status_code,
            last_error=d.last_error,
            created_at=d.created_at,
            delivered_at=d.delivered_at,
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


# -- tags, notes and comparison (issue 11: compare) ------------------------------------------------


class RunLabels(BaseModel):
    """Body of ``PATCH /runs/{id}``: what to change about a run's tags and note (keys left out
    stay as they are; ``"note": null`` clears the note). ``tags`` replaces the whole list;
    ``add_tags`` / ``remove_tags`` change it in place (not together with ``tags``)."""

    model_config = ConfigDict(extra="forbid")

    tags: Tags | None = None
    add_tags: Tags = Field(default_factory=list)
    remove_tags: Tags = Field(default_factory=list)
    note: Note | None = None


class BestValue(BaseModel):
    value: float
    step: int = Field(description="The first step that reached it.")


class ComparedRun(BaseModel):
    """One run of ``GET /compare``: who it is, its last metric row and its best values."""

    id: uuid.UUID
    name: str
    status: str
    tags: list[str]
    note: str | None
    steps_total: int | None = Field(description="Optimizer steps planned (the estimate).")
    final: MetricRow | None = Field(description="The metric row of the highest step.")
    best: dict[str, BestValue] = Field(
        description="Per column the run logged: the lowest loss, val_loss and val_ppl, the "
        "highest tokens_per_sec and mfu."
    )


class ConfigDifference(BaseModel):
    key: str = Field(
        description="Dotted path into the resolved documents, e.g. "
        "train_config.optimizer.init_args.lr or model_config.n_expert."
    )
    values: list[Any] = Field(description="One per run, in the order of ``runs`` (null: unset).")


class Comparison(BaseModel):
    """``GET /compare`` answer."""

    runs: list[ComparedRun]
    differences: list[ConfigDifference] = Field(
        description="The config keys whose values differ between the runs, sorted."
    )
    left_out: list[str] = Field(
        description="Keys that differ by construction and are not listed: out_dir and any "
        "value naming a folder of the run's own."
    )


class RunSeries(BaseModel):
    """One run's metric columns for an overlay, column-wise: ``step[i]`` goes with
    ``values[column][i]`` (null where the row has no value)."""

    run_id: uuid.UUID
    name: str
    total: int = Field(description="Rows the run has before downsampling.")
    downsampled: bool
    step: list[int]
    values: dict[str, list[float | None]]


class SeriesPage(BaseModel):
    """``GET /compare/metrics`` answer."""

    columns: list[str]
    series: list[RunSeries]


# -- sweeps (issue 11) ----------------------------------------------------------------------------


class SweepMetric(BaseModel):
    name: str = Field(description="The metrics.csv column the sweep optimises.")
    goal: Literal["minimize", "maximize"]


class SweepTrialPublic(BaseModel):
    """One trial: its parameters, where it is and its metric values."""

    number: int = Field(description="From 0, in creation order; the run is <sweep name>-<number>.")
    params: dict[str, Any]
    status: str = Field(
        description="The run's status (queued, running, succeeded, failed, cancelled); "
        "pending (waiting for a free slot, no run yet); skipped (the point was invalid: "
        "errors); deleted (its run was deleted)."
    )
    errors: list[dict[str, Any]] = Field(description="Why a skipped point was invalid.")
    run_id: uuid.UUID | None
    cancel_reason: str | None = Field(
        description="pruned (median early stopping), sweep_cancelled or requested."
    )
    final_value: float | None = Field(description="The metric's last logged value.")
    best_value: float | None = Field(description="The metric's best logged value (by goal).")
    last_step: int | None = Field(description="Step of the last logged value.")

    @classmethod
    def of(cls, t: Any) -> SweepTrialPublic:
        """From a ``service.sweeps.controller.TrialView``."""
        return cls(
            number=t.number,
            params=t.params,
            status=t.status,
            errors=t.errors,
            run_id=t.run_id,
            cancel_reason=t.cancel_reason,
            final_value=t.final_value,
            best_value=t.best_value,
            last_step=t.last_step,
        )


class SweepSummary(BaseModel):
    """A sweep without its trials (``GET /sweeps``)."""

    id: uuid.UUID
    name: str
    owner: str
    status: str = Field(description="running, finished, failed or cancelled.")
    method: Literal["grid", "random", "tpe"]
    metric: SweepMetric
    max_runs: int | None
    max_concurrent: int
    seed: int | None
    end_reason: str | None
    cancel_requested: bool
    trial_counts: dict[str, int] = Field(description="Trials by status.")
    best_trial: SweepTrialPublic | None = Field(
        description="The succeeded trial with the best value (lower number on a tie)."
    )
    created_at: datetime
    updated_at: datetime
    finished_at: datetime | None

    @staticmethod
    def fields(view: Any) -> dict[str, Any]:
        """From a ``service.sweeps.controller.SweepView``."""
        s = view.sweep
        counts: dict[str, int] = {}
        for t in view.trials:
            counts[t.status] = counts.get(t.status, 0) + 1
        return {
            "id": s.id,
            "name": s.name,
            "owner": s.owner,
            "status": s.status.value,
            "method": s.method,
            "metric": {"name": s.metric_name, "goal": s.metric_goal},
            "max_runs": s.max_runs,
            "max_concurrent": s.max_concurrent,
            "seed": s.seed,
            "end_reason": s.end_reason,
            "cancel_requested": s.cancel_requested,
            "trial_counts": counts,
            "best_trial": SweepTrialPublic.of(view.best) if view.best is not None else None,
            "created_at": s.created_at,
            "updated_at": s.updated_at,
            "finished_at": s.finished_at,
        }

    @classmethod
    def of(cls, view: Any) -> SweepSummary:
        return cls.model_validate(cls.fields(view))


class SweepPublic(SweepSummary):
    """A sweep with its document and every trial (``GET /sweeps/{id}``)."""

    spec: dict[str, Any] = Field(description="The sweep document as validated.")
    trials: list[SweepTrialPublic]

    @classmethod
    def of(cls, view: Any) -> SweepPublic:
        return cls.model_validate(
            {
                **SweepSummary.fields(view),
                "spec": view.sweep.spec,
                "trials": [SweepTrialPublic.of(t) for t in view.trials],
            }
        )


class SweepPage(BaseModel):
    items: list[SweepSummary]


class SweepValidation(BaseModel):
    """``POST /sweeps/validate``: whether the sweep would be accepted, and its trials' points
    (a grid's; empty for random and tpe, which sample as they go)."""

    valid: bool
    errors: list[dict[str, Any]]
    warnings: list[IssueOut]
    points: list[dict[str, Any]]
