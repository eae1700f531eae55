"""Database tables (SQLModel). Tables only: API shapes live in ``service/api/models.py``, state
changes in ``service/runs.py``, the schema's history in ``migrations/``.

Tables: ``runs``, ``run_events``, ``metric_points``, ``router_points``, ``checkpoints``,
``workers``, ``throughput``, ``run_provenance``, ``sweeps``, ``sweep_trials``,
``webhook_deliveries``. Every constraint
and index is named by :data:`NAMING_CONVENTION` so that migrations can refer to them on every
database.

Conventions
-----------
- Timestamps are timezone-aware UTC (:class:`UTCDateTime`): PostgreSQL ``timestamptz``; on
  SQLite an ISO string of the UTC time, given back as an aware datetime.
- JSON columns are ``jsonb`` on PostgreSQL, JSON text on SQLite.
- Enums are stored as their string values with a named CHECK constraint (no native PostgreSQL
  enum types: adding a status is then a constraint change, not a type migration).
- Children of a run (events, metric/router points, checkpoints, provenance) are deleted with it
  (``ON DELETE CASCADE``; SQLite needs ``PRAGMA foreign_keys=ON``, which ``service.db`` sets).
- Checkpoint steps: a ``step-NNNNNNNN`` folder has that step; the ``final`` folder records the
  step it was written at when the caller knows it, else NULL. A checkpoint is identified by its
  folder name, unique per run (see ``reads.get_checkpoint`` for lookups by step or "final").
"""

import enum
import uuid
from datetime import UTC, datetime
from typing import Any

import sqlalchemy as sa
from sqlalchemy.dialects.postgresql import JSONB
from sqlmodel import Field, SQLModel

from service import contract
from service.contract import FailureReason

#: Constraint/index names: the same on SQLite and PostgreSQL, so migrations can drop or alter
#: them by name (SQLite has no names otherwise, which batch migrations need).
NAMING_CONVENTION = {
    "ix": "ix_%(table_name)s_%(column_0_N_name)s",
    "uq": "uq_%(table_name)s_%(column_0_N_name)s",
    "ck": "ck_%(table_name)s_%(constraint_name)s",
    "fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s",
    "pk": "pk_%(table_name)s",
}

metadata = sa.MetaData(naming_convention=NAMING_CONVENTION)


class Base(SQLModel):
    """Base of every table here; owns :data:`metadata` (not SQLModel's global one), which is
    the ``target_metadata`` of the migrations."""

    metadata = metadata


def table_of(model: type[SQLModel]) -> sa.Table:
    """The ``sa.Table`` of a table model (SQLModel sets ``__table__`` without declaring it)."""
    return model.__table__  # type: ignore[attr-defined]


def utcnow() -> datetime:
    """The current time, timezone-aware UTC (what every timestamp column stores)."""
    return datetime.now(UTC)


def aware_now(now: datetime | None) -> datetime:
    """``now``, or :func:`utcnow` when it is None: what the ``now`` parameters of
    ``service.runs`` and ``service.reads`` (there for tests) go through. Raises ValueError
    for a naive ``now``."""
    if now is None:
        return utcnow()
    if now.tzinfo is None:
        raise ValueError("now must be timezone-aware")
    return now


class UTCDateTime(sa.TypeDecorator[datetime]):
    """A timestamp stored in UTC and always returned timezone-aware.

    Naive datetimes are refused on the way in (``ValueError``): a naive value is ambiguous.
    PostgreSQL stores ``timestamptz``; SQLite stores the UTC wall time as text and the
    result gets ``tzinfo=UTC`` back, so both databases return equal, comparable values."""

    impl = sa.DateTime(timezone=True)
    cache_ok = True

    def process_bind_param(self, value: datetime | None, dialect: sa.Dialect) -> Any:
        if value is None:
            return None
        if value.tzinfo is None:
            raise ValueError(f"naive datetime {value!r}: use an aware UTC datetime")
        value = value.astimezone(UTC)
        if dialect.name == "sqlite":
            # SQLite's DATETIME keeps no offset; store the UTC wall time.
            return value.replace(tzinfo=None)
        return value

    def process_result_value(self, value: datetime | None, dialect: sa.Dialect) -> Any:
        if value is None:
            return None
        if value.tzinfo is None:
            return value.replace(tzinfo=UTC)
        return value.astimezone(UTC)


#: JSON document column: jsonb on PostgreSQL (indexable, compact), JSON text elsewhere.
JSONDoc = sa.JSON().with_variant(JSONB(), "postgresql")


class RunStatus(str, enum.Enum):
    """Where a run is. ``queued`` and ``running`` are live; the other three are terminal
    (final: no transition leaves them). Allowed moves: ``service.runs.ALLOWED_TRANSITIONS``."""

    queued = "queued"
    running = "running"
    succeeded = "succeeded"
    failed = "failed"
    cancelled = "cancelled"

    @property
    def terminal(self) -> bool:
        return self in TERMINAL_STATUSES


TERMINAL_STATUSES = frozenset({RunStatus.succeeded, RunStatus.failed, RunStatus.cancelled})


def _enum(enum_cls: type[enum.Enum], name: str) -> sa.Enum:
    """A string column restricted to ``enum_cls``'s values by a CHECK constraint named
    ``ck_<table>_<name>`` (``name`` must be unique within the table)."""
    return sa.Enum(
        enum_cls,
        name=name,
        native_enum=False,
        create_constraint=True,
        length=32,
        values_callable=lambda cls: [member.value for member in cls],
        validate_strings=True,
    )


class CancelReason(str, enum.Enum):
    """Why a run ended ``cancelled`` (``runs.cancel_reason``)."""

    #: Someone asked (``POST /runs/{id}/cancel``, ``moejobs cancel``).
    requested = "requested"
    #: Its sweep's early stopping stopped it (at a step boundary, with a checkpoint).
    pruned = "pruned"
    #: Its sweep was cancelled.
    sweep_cancelled = "sweep_cancelled"
    #: A smoke test that no worker could train (the reconciler cancelled it).
    no_worker = "no_worker"


class SweepStatus(str, enum.Enum):
    """Where a sweep is: ``running`` creates and watches trials; the other three are final."""

    running = "running"
    #: Every trial it will create was created and has ended (``end_reason`` says why it stopped).
    finished = "finished"
    #: Ended without a usable trial (e.g. every sampled point was invalid): ``end_reason``.
    failed = "failed"
    cancelled = "cancelled"


def _run_fk(ondelete: str = "CASCADE") -> sa.ForeignKey:
    return sa.ForeignKey("runs.id", ondelete=ondelete)


class Run(Base, table=True):
    """One training job: what was submitted, what it resolved to, and where it stands.

    ``status`` moves only through ``service.runs`` (one function writes it, each move also
    writes a :class:`RunEvent`). ``attempt`` counts claims (1 on the first start); it is the
    fencing token a worker passes back so that a worker whose lease was taken over cannot
    write to the run any more; ``failures`` counts the attempts that failed (what
    ``MOEJOBS_MAX_ATTEMPTS`` bounds: graceful stops and re-queues do not count). ``failure_reason`` is set exactly when ``status`` is failed.
    """

    __tablename__ = "runs"
    __table_args__ = (
        sa.UniqueConstraint("owner", "idempotency_key"),
        sa.Index(None, "status", "created_at"),
        sa.Index(None, "created_at"),
        sa.CheckConstraint("attempt >= 0", name="attempt_nonnegative"),
        sa.CheckConstraint("failures >= 0", name="failures_nonnegative"),
        sa.CheckConstraint(
            "(status = 'failed' AND failure_reason IS NOT NULL)"
            " OR (status <> 'failed' AND failure_reason IS NULL)",
            name="failure_reason_iff_failed",
        ),
    )

    id: uuid.UUID = Field(default_factory=uuid.uuid4, primary_key=True)
    name: str = Field(max_length=200, description="Human-readable name, not unique.")
    owner: str = Field(
        default="local", max_length=200, description="Who submitted it (token identity)."
    )
    status: RunStatus = Field(
        default=RunStatus.queued,
        sa_type=_enum(RunStatus, "status"),
        sa_column_kwargs={"nullable": False},
    )
    preset: str | None = Field(default=None, max_length=200)
    write_checkpoints: bool = Field(
        default=True,
        sa_column_kwargs={"nullable": False, "server_default": sa.true()},
        description="Whether the training writes checkpoints (false: the smoke test).",
    )
    submitted_train: dict[str, Any] = Field(
        sa_type=JSONDoc,
        sa_column_kwargs={"nullable": False},
        description="train_config exactly as submitted (before presets/overrides).",
    )
    submitted_model: dict[str, Any] = Field(
        sa_type=JSONDoc,
        sa_column_kwargs={"nullable": False},
        description="model_config exactly as submitted.",
    )
    resolved_train: dict[str, Any] = Field(
        sa_type=JSONDoc,
        sa_column_kwargs={"nullable": False},
        description="The validated train config the engine runs (paths resolved).",
    )
    resolved_model: dict[str, Any] = Field(
        sa_type=JSONDoc,
        sa_column_kwargs={"nullable": False},
        description="The validated model config the engine runs.",
    )
    estimate: dict[str, Any] | None = Field(default=None, sa_type=JSONDoc)
    warnings: list[Any] = Field(
        default_factory=list, sa_type=JSONDoc, sa_column_kwargs={"nullable": False}
    )
    attempt: int = Field(default=0, description="Number of claims so far (fencing token).")
    failures: int = Field(
        default=0,
        sa_column_kwargs={"server_default": "0"},
        description="Attempts that ended in a failure (lost worker, killed, crashed...); "
        "MOEJOBS_MAX_ATTEMPTS bounds it. A graceful stop (checkpoint and re-queue) is none.",
    )
    worker_id: str | None = Field(default=None, max_length=200, index=True)
    heartbeat_at: datetime | None = Field(default=None, sa_type=UTCDateTime())
    lease_expires_at: datetime | None = Field(default=None, sa_type=UTCDateTime())
    created_at: datetime = Field(
        default_factory=utcnow, sa_type=UTCDateTime(), sa_column_kwargs={"nullable": False}
    )
    queued_at: datetime = Field(
        default_factory=utcnow,
        sa_type=UTCDateTime(),
        sa_column_kwargs={"nullable": False},
        description="When it last entered queued (creation or re-queue).",
    )
    started_at: datetime | None = Field(
        default=None, sa_type=UTCDateTime(), description="Start of the latest attempt."
    )
    finished_at: datetime | None = Field(default=None, sa_type=UTCDateTime())
    updated_at: datetime = Field(
        default_factory=utcnow, sa_type=UTCDateTime(), sa_column_kwargs={"nullable": False}
    )
    failure_reason: FailureReason | None = Field(
        default=None, sa_type=_enum(FailureReason, "failure_reason")
    )
    failure_message: str | None = Field(default=None, sa_type=sa.Text())
    exit_code: int | None = Field(default=None)
    cancel_requested: bool = Field(default=False, sa_column_kwargs={"nullable": False})
    cancel_requested_at: datetime | None = Field(default=None, sa_type=UTCDateTime())
    idempotency_key: str | None = Field(default=None, max_length=255)
    request_hash: str | None = Field(
        default=None, max_length=64, description="sha256 hex of the canonical request body."
    )
    cancel_reason: CancelReason | None = Field(
        default=None,
        sa_type=_enum(CancelReason, "cancel_reason"),
        description="Why the run was cancelled (set with the request; NULL before migration 0006).",
    )
    tags: list[str] = Field(
        default_factory=list,
        sa_type=JSONDoc,
        sa_column_kwargs={"nullable": False, "server_default": "[]"},
        description="Labels to find the run again (set at submission or later).",
    )
    note: str | None = Field(default=None, sa_type=sa.Text(), description="Free text.")
    sweep_id: uuid.UUID | None = Field(
        default=None,
        sa_type=sa.Uuid(),
        foreign_key="sweeps.id",
        ondelete="SET NULL",
        index=True,
        description="The sweep whose trial this run is, if any.",
    )
    sweep_params: dict[str, Any] | None = Field(
        default=None,
        sa_type=JSONDoc,
        description="The trial's parameters: dotted paths into the two documents -> values.",
    )
    webhooks: list[Any] = Field(
        default_factory=list,
        sa_type=JSONDoc,
        sa_column_kwargs={"nullable": False, "server_default": "[]"},
        description="Webhook subscriptions ``[{url, events}]`` (the submission's and the "
        "server's MOEJOBS_WEBHOOK_URLS); see service/webhooks.py.",
    )


class RunEvent(Base, table=True):
    """One line of a run's history: a status transition (``from_status`` -> ``to_status``;
    ``from_status`` is NULL for the creation event) or a note without a transition (then both
    are equal, e.g. a cancel request while running). ``actor`` says who: "api",
    "worker:<id>", "reconciler"."""

    __tablename__ = "run_events"
    __table_args__ = (sa.Index(None, "run_id", "id"),)

    id: int | None = Field(default=None, primary_key=True)
    run_id: uuid.UUID = Field(sa_type=sa.Uuid(), foreign_key="runs.id", ondelete="CASCADE")
    at: datetime = Field(
        default_factory=utcnow, sa_type=UTCDateTime(), sa_column_kwargs={"nullable": False}
    )
    from_status: RunStatus | None = Field(default=None, sa_type=_enum(RunStatus, "from_status"))
    to_status: RunStatus = Field(
        sa_type=_enum(RunStatus, "to_status"), sa_column_kwargs={"nullable": False}
    )
    reason: FailureReason | None = Field(default=None, sa_type=_enum(FailureReason, "reason"))
    message: str = Field(default="", sa_type=sa.Text(), sa_column_kwargs={"nullable": False})
    actor: str | None = Field(default=None, max_length=200)
    attempt: int = Field(default=0)


class MetricPoint(Base, table=True):
    """One row of a run's metrics.csv. The primary key (run_id, step) is the uniqueness rule
    that makes ingestion idempotent. Units: tokens = tokens seen by all ranks so far,
    learning_rate per step, tokens_per_sec summed over ranks, mfu a fraction in [0, 1],
    elapsed_s seconds since training start; val_loss/val_ppl only on evaluation steps.
    NaN losses are stored as NULL on SQLite (SQLite has no NaN)."""

    __tablename__ = "metric_points"
    __table_args__ = (sa.CheckConstraint("step >= 0", name="step_nonnegative"),)

    run_id: uuid.UUID = Field(
        sa_type=sa.Uuid(), foreign_key="runs.id", ondelete="CASCADE", primary_key=True
    )
    step: int = Field(
        primary_key=True, sa_type=sa.Integer(), sa_column_kwargs={"autoincrement": False}
    )
    tokens: int | None = Field(default=None, sa_type=sa.BigInteger())
    loss: float | None = Field(default=None)
    learning_rate: float | None = Field(default=None)
    grad_norm: float | None = Field(default=None)
    tokens_per_sec: float | None = Field(default=None)
    mfu: float | None = Field(default=None)
    elapsed_s: float | None = Field(default=None)
    val_loss: float | None = Field(default=None)
    val_ppl: float | None = Field(default=None)


#: The metric columns in metrics.csv order (after ``step``): ``service.contract``.
METRIC_COLUMNS = contract.METRIC_COLUMNS

#: Largest step the step columns hold (INTEGER: 32-bit signed on PostgreSQL).
MAX_STEP = 2**31 - 1


class RouterPoint(Base, table=True):
    """MoE router telemetry: at optimizer ``step``, the fraction of routed token slots that
    MoE layer ``layer`` (0-based block index) sent to ``expert`` (0-based). For one
    (step, layer) the fractions over experts sum to 1. Primary key = uniqueness rule."""

    __tablename__ = "router_points"
    __table_args__ = (sa.CheckConstraint("fraction >= 0 AND fraction <= 1", name="fraction_range"),)

    run_id: uuid.UUID = Field(
        sa_type=sa.Uuid(), foreign_key="runs.id", ondelete="CASCADE", primary_key=True
    )
    step: int = Field(
        primary_key=True, sa_type=sa.Integer(), sa_column_kwargs={"autoincrement": False}
    )
    layer: int = Field(
        primary_key=True, sa_type=sa.Integer(), sa_column_kwargs={"autoincrement": False}
    )
    expert: int = Field(
        primary_key=True, sa_type=sa.Integer(), sa_column_kwargs={"autoincrement": False}
    )
    fraction: float = Field(sa_column_kwargs={"nullable": False})


class Checkpoint(Base, table=True):
    """A complete checkpoint folder of a run (recorded only after it was renamed into place).
    ``name`` is the folder name (``step-00000500`` or ``final``), unique per run; ``step`` as
    described in the module docstring; ``path`` absolute; ``size_bytes`` the folder's total."""

    __tablename__ = "checkpoints"
    __table_args__ = (
        sa.UniqueConstraint("run_id", "name"),
        sa.Index(None, "run_id", "step"),
    )

    id: int | None = Field(default=None, primary_key=True)
    run_id: uuid.UUID = Field(sa_type=sa.Uuid(), foreign_key="runs.id", ondelete="CASCADE")
    name: str = Field(max_length=200)
    step: int | None = Field(default=None)
    path: str = Field(sa_type=sa.Text(), sa_column_kwargs={"nullable": False})
    size_bytes: int | None = Field(default=None, sa_type=sa.BigInteger())
    created_at: datetime = Field(
        default_factory=utcnow, sa_type=UTCDateTime(), sa_column_kwargs={"nullable": False}
    )


class Worker(Base, table=True):
    """A registered worker process (liveness comes from here, not Celery's remote control).
    ``gpus``: list of ``{"index": int, "name": str, "memory_bytes": int}``; ``gpu_count`` the
    GPUs it owns (0 = CPU only); ``gpu_memory_bytes`` the smallest GPU's total memory (what a
    run can count on per device). ``kind`` names the hardware a run's speed depends on (the
    GPU name, e.g. "NVIDIA H200", or "cpu: <model name>"); ``host_memory_bytes`` the memory
    of the machine (or of its cgroup), which is what a CPU worker trains in and which the CPU
    workers of one host share; ``free_bytes`` the free space under RUNS_DIR, renewed with
    every heartbeat. NULL = not reported (a worker that reports no memory never causes a
    refusal: ``service.admission``). ``role`` says which queues it consumes (:class:`WorkerRole`):
    only workers that train count for admission, readiness and the reconciler's re-sends."""

    __tablename__ = "workers"
    __table_args__ = (sa.CheckConstraint("role IN ('all', 'train', 'aux')", name="role_known"),)

    id: str = Field(primary_key=True, max_length=200)
    host: str = Field(max_length=255)
    pid: int | None = Field(default=None)
    gpus: list[Any] = Field(
        default_factory=list, sa_type=JSONDoc, sa_column_kwargs={"nullable": False}
    )
    gpu_count: int = Field(default=0)
    gpu_memory_bytes: int | None = Field(default=None, sa_type=sa.BigInteger())
    kind: str | None = Field(default=None, max_length=200)
    host_memory_bytes: int | None = Field(default=None, sa_type=sa.BigInteger())
    free_bytes: int | None = Field(default=None, sa_type=sa.BigInteger())
    role: str = Field(
        default="all", max_length=8, sa_column_kwargs={"nullable": False, "server_default": "all"}
    )
    heartbeat_at: datetime = Field(
        default_factory=utcnow, sa_type=UTCDateTime(), sa_column_kwargs={"nullable": False}
    )
    current_run_id: uuid.UUID | None = Field(
        default=None, sa_type=sa.Uuid(), foreign_key="runs.id", ondelete="SET NULL"
    )
    started_at: datetime = Field(
        default_factory=utcnow, sa_type=UTCDateTime(), sa_column_kwargs={"nullable": False}
    )


class WorkerRole(str, enum.Enum):
    """Which queues a worker consumes (``service.queue.worker_queues``)."""

    #: training runs and short CPU jobs (tokenizers, data preparation): a lone worker
    all = "all"
    #: training runs only (a GPU slot beside an ``aux`` worker)
    train = "train"
    #: short CPU jobs only: tokenizers and data preparation; never trains
    aux = "aux"

    @property
    def trains(self) -> bool:
        return self is not WorkerRole.aux


#: Roles of workers that train runs.
TRAINING_ROLES = (WorkerRole.all.value, WorkerRole.train.value)


class Throughput(Base, table=True):
    """Worker calibration: the training speed that succeeded runs of one model config reached
    on one worker kind (``service.admission`` turns it into the expected time of new runs).

    ``model_key``: sha256 hex of the resolved model config and the precision
    (``service.admission.model_key``); ``worker_kind``: ``Worker.kind``.
    ``tokens_per_sec_per_device``: tokens trained / seconds of training at the run's last
    metric row, divided by its world size (mean over ``runs`` runs);
    ``flops_per_sec_per_device``: the same times the estimate's FLOPs per token (model FLOP/s
    reached; used for other configs on the same kind)."""

    __tablename__ = "throughput"
    __table_args__ = (
        sa.CheckConstraint("runs >= 1", name="runs_positive"),
        sa.CheckConstraint("tokens_per_sec_per_device > 0", name="tokens_per_sec_positive"),
    )

    model_key: str = Field(primary_key=True, max_length=64)
    worker_kind: str = Field(primary_key=True, max_length=200)
    tokens_per_sec_per_device: float = Field(sa_column_kwargs={"nullable": False})
    flops_per_sec_per_device: float | None = Field(default=None)
    runs: int = Field(default=1)
    last_run_id: uuid.UUID | None = Field(default=None, sa_type=sa.Uuid())
    updated_at: datetime = Field(
        default_factory=utcnow, sa_type=UTCDateTime(), sa_column_kwargs={"nullable": False}
    )


class RunProvenance(Base, table=True):
    """What produced a run's result, recorded by the worker when training starts:
    ``package_versions`` ``{"torch": "2.14.1", ...}``, ``git_commit`` of the code (or NULL),
    the seed, ``hardware`` (``{"gpus": [...], "cuda": ..., "cpu": ...}``), and sha256 hex
    digests of the training data and the tokenizer files."""

    __tablename__ = "run_provenance"

    run_id: uuid.UUID = Field(
        sa_type=sa.Uuid(), foreign_key="runs.id", ondelete="CASCADE", primary_key=True
    )
    package_versions: dict[str, Any] = Field(
        default_factory=dict, sa_type=JSONDoc, sa_column_kwargs={"nullable": False}
    )
    git_commit: str | None = Field(default=None, max_length=64)
    seed: int | None = Field(default=None, sa_type=sa.BigInteger())
    hardware: dict[str, Any] = Field(
        default_factory=dict, sa_type=JSONDoc, sa_column_kwargs={"nullable": False}
    )
    data_hash: str | None = Field(default=None, max_length=128)
    tokenizer_hash: str | None = Field(default=None, max_length=128)
    recorded_at: datetime = Field(
        default_factory=utcnow, sa_type=UTCDateTime(), sa_column_kwargs={"nullable": False}
    )


class Sweep(Base, table=True):
    """A sweep: trials (ordinary runs) generated from a base config and a search space.

    ``spec`` is the submitted sweep document as validated (its ``base`` holds the two documents
    and the preset, as ``POST /runs`` takes them); ``method``, ``metric_name``/``metric_goal``,
    ``max_runs`` (NULL: the grid's size), ``max_concurrent`` and ``seed`` are copied out of it
    for queries. ``controller_id``/``controller_until`` are the lease of the one controller
    that may decide for the sweep at a time (a worker id or ``api:<host>:<pid>``)."""

    __tablename__ = "sweeps"
    __table_args__ = (
        sa.UniqueConstraint("owner", "idempotency_key"),
        sa.Index(None, "created_at"),
        sa.CheckConstraint("method IN ('grid', 'random', 'tpe')", name="method_known"),
        sa.CheckConstraint("metric_goal IN ('minimize', 'maximize')", name="metric_goal_known"),
        sa.CheckConstraint("max_concurrent >= 1", name="max_concurrent_positive"),
        sa.CheckConstraint("max_runs IS NULL OR max_runs >= 1", name="max_runs_positive"),
    )

    id: uuid.UUID = Field(default_factory=uuid.uuid4, primary_key=True)
    name: str = Field(max_length=200)
    owner: str = Field(default="local", max_length=200)
    status: SweepStatus = Field(
        default=SweepStatus.running,
        sa_type=_enum(SweepStatus, "status"),
        sa_column_kwargs={"nullable": False},
    )
    method: str = Field(max_length=16)
    metric_name: str = Field(max_length=64)
    metric_goal: str = Field(max_length=16)
    max_runs: int | None = Field(default=None)
    max_concurrent: int = Field(default=1)
    seed: int | None = Field(default=None, sa_type=sa.BigInteger())
    spec: dict[str, Any] = Field(sa_type=JSONDoc, sa_column_kwargs={"nullable": False})
    end_reason: str | None = Field(default=None, sa_type=sa.Text())
    cancel_requested: bool = Field(default=False, sa_column_kwargs={"nullable": False})
    controller_id: str | None = Field(default=None, max_length=200)
    controller_until: datetime | None = Field(default=None, sa_type=UTCDateTime())
    idempotency_key: str | None = Field(default=None, max_length=255)
    created_at: datetime = Field(
        default_factory=utcnow, sa_type=UTCDateTime(), sa_column_kwargs={"nullable": False}
    )
    updated_at: datetime = Field(
        default_factory=utcnow, sa_type=UTCDateTime(), sa_column_kwargs={"nullable": False}
    )
    finished_at: datetime | None = Field(default=None, sa_type=UTCDateTime())
    webhooks: list[Any] = Field(
        default_factory=list,
        sa_type=JSONDoc,
        sa_column_kwargs={"nullable": False, "server_default": "[]"},
        description="Webhook subscriptions of the sweep's own end ``[{url, events}]``.",
    )


class SweepTrial(Base, table=True):
    """One point of a sweep's search space, ``number``-ed from 0 in the order it was created
    (a trial's idempotency key is ``sweep:<sweep id>:<number>``).
    ``state`` ``created``: ``run_id`` is its run (NULL once that run was deleted); ``skipped``:
    the point was invalid (``errors``, as the API reports them) and no run was created."""

    __tablename__ = "sweep_trials"
    __table_args__ = (
        sa.UniqueConstraint("sweep_id", "number"),
        sa.CheckConstraint("state IN ('created', 'skipped')", name="state_known"),
        sa.CheckConstraint("number >= 0", name="number_nonnegative"),
    )

    id: int | None = Field(default=None, primary_key=True)
    sweep_id: uuid.UUID = Field(sa_type=sa.Uuid(), foreign_key="sweeps.id", ondelete="CASCADE")
    number: int = Field(sa_type=sa.Integer())
    params: dict[str, Any] = Field(sa_type=JSONDoc, sa_column_kwargs={"nullable": False})
    state: str = Field(default="created", max_length=16)
    run_id: uuid.UUID | None = Field(
        default=None, sa_type=sa.Uuid(), foreign_key="runs.id", ondelete="SET NULL", index=True
    )
    errors: list[Any] = Field(
        default_factory=list, sa_type=JSONDoc, sa_column_kwargs={"nullable": False}
    )
    created_at: datetime = Field(
        default_factory=utcnow, sa_type=UTCDateTime(), sa_column_kwargs={"nullable": False}
    )


class DeliveryState(str, enum.Enum):
    """Where a webhook delivery is: ``pending`` (due at ``next_attempt_at``), ``delivered``
    (a 2xx answer), ``failed`` (given up after MOEJOBS_WEBHOOK_MAX_ATTEMPTS attempts)."""

    pending = "pending"
    delivered = "delivered"
    failed = "failed"


class WebhookDelivery(Base, table=True):
    """The webhook outbox: one event for one URL, written in the transaction that made the
    event happen (a run's terminal move, a checkpoint, a sweep's end), so that an event is
    recorded exactly when it happened. ``dedupe_key`` + ``url`` is unique: recording it twice
    stores one row. A sender takes a due row with a lease (``lease_holder``/``lease_until``,
    a conditional UPDATE), so two workers never send the same attempt; ``attempts`` counts
    the attempts made. ``body`` is the exact JSON sent (the same bytes on every attempt)."""

    __tablename__ = "webhook_deliveries"
    __table_args__ = (
        sa.UniqueConstraint("dedupe_key", "url"),
        sa.Index(None, "state", "next_attempt_at"),
        sa.CheckConstraint("attempts >= 0", name="attempts_nonnegative"),
    )

    id: uuid.UUID = Field(default_factory=uuid.uuid4, primary_key=True)
    run_id: uuid.UUID | None = Field(
        default=None, sa_type=sa.Uuid(), foreign_key="runs.id", ondelete="CASCADE", index=True
    )
    sweep_id: uuid.UUID | None = Field(
        default=None, sa_type=sa.Uuid(), foreign_key="sweeps.id", ondelete="CASCADE", index=True
    )
    event: str = Field(
        max_length=32, description="run.succeeded, run.checkpoint, sweep.finished..."
    )
    url: str = Field(max_length=2048)
    dedupe_key: str = Field(max_length=200)
    body: str = Field(sa_type=sa.Text(), sa_column_kwargs={"nullable": False})
    state: DeliveryState = Field(
        default=DeliveryState.pending,
        sa_type=_enum(DeliveryState, "state"),
        sa_column_kwargs={"nullable": False},
    )
    attempts: int = Field(default=0)
    next_attempt_at: datetime = Field(
        default_factory=utcnow, sa_type=UTCDateTime(), sa_column_kwargs={"nullable": False}
    )
    lease_holder: str | None = Field(default=None, max_length=200)
    lease_until: datetime | None = Field(default=None, sa_type=UTCDateTime())
    last_status_code: int | None = Field(default=None)
    last_error: str | None = Field(default=None, sa_type=sa.Text())
    created_at: datetime = Field(
        default_factory=utcnow, sa_type=UTCDateTime(), sa_column_kwargs={"nullable": False}
    )
    delivered_at: datetime | None = Field(default=None, sa_type=UTCDateTime())
