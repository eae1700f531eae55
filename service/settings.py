"""The service's settings: the only module that reads environment variables.

Every setting is read from an environment variable named ``MOEJOBS_<NAME>`` (for example
``MOEJOBS_DATABASE_URL``) or passed explicitly (``Settings(home=...)``, as the CLI's
``--home DIR`` does). Explicit arguments win over the environment.

Paths and URLs that are not set are derived from ``HOME`` (default ``~/.moejobs``):

================  ==========================================================
``DATABASE_URL``  ``sqlite:///HOME/moejobs.sqlite3``
``BROKER_URL``    ``sqla+sqlite:///HOME/broker.sqlite3`` (kombu's SQLAlchemy transport)
``DATA_ROOT``     ``HOME/data``
``RUNS_DIR``      ``HOME/runs``
================  ==========================================================

Malformed values fail with ``pydantic.ValidationError``. Unsafe combinations (listening beyond
loopback without ``API_TOKEN`` or with one shorter than :data:`MIN_REMOTE_TOKEN_LENGTH`
characters; a heartbeat interval not shorter than the lease it renews) fail
with :class:`UnsafeSettingsError`, whose message says what to change and, unlike pydantic's
error, never echoes the input values (the token among them). Commands build settings with
:func:`load_settings`, which turns both into :class:`InvalidSettingsError`: one line per problem,
naming the setting as the user wrote it (``MOEJOBS_PORT: expected an integer, got 'abc'``).
"""

from __future__ import annotations

import functools
import ipaddress
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import Field, SecretStr, ValidationError, field_validator, model_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict
from pydantic_settings import SettingsError as _SourceError

from service.webhooks import check_url

ENV_PREFIX = "MOEJOBS_"

#: Host names that only ever resolve to this machine.
_LOOPBACK_NAMES = {"localhost", "localhost.localdomain", "ip6-localhost", "ip6-loopback"}


#: Fewest characters of ``API_TOKEN`` when ``HOST`` is not a loopback address (a loopback-only
#: server accepts any non-blank token).
MIN_REMOTE_TOKEN_LENGTH = 32
#: How the messages tell the user to make a token (43 URL-safe characters, 256 random bits).
MAKE_TOKEN = '`python -c "import secrets; print(secrets.token_urlsafe(32))"`'


class UnsafeSettingsError(Exception):
    """The settings are individually valid but unsafe together. Deliberately not a
    ``ValueError``, so pydantic does not wrap it (its wrapper prints every input value,
    secrets included)."""


#: Settings whose values are never repeated in a message: they may carry a password or token.
_SECRET_FIELDS = frozenset(
    {"api_token", "database_url", "broker_url", "webhook_secret", "webhook_urls"}
)

#: pydantic error types -> what was expected, for values that do not parse.
_EXPECTED = {
    "int_parsing": "an integer",
    "int_type": "an integer",
    "int_from_float": "an integer",
    "float_parsing": "a number",
    "float_type": "a number",
    "finite_number": "a finite number",
    "bool_parsing": "true or false",
    "bool_type": "true or false",
}


def setting_name(field: str, labels: Mapping[str, str] | None = None) -> str:
    """How the user wrote setting ``field``: ``labels[field]`` (e.g. ``--port`` when the CLI
    flag gave it), else its environment variable ``MOEJOBS_<FIELD>``."""
    return (labels or {}).get(field) or ENV_PREFIX + field.upper()


class InvalidSettingsError(Exception):
    """Settings that cannot be used, as one line per problem for a user.

    ``problems`` holds ``(field, text)`` pairs; ``field`` is a :class:`Settings` field name, or
    None when ``text`` already names what to change. :meth:`lines` renders them as
    ``NAME: text`` with the name the user wrote; ``str()`` joins those lines with "; ". No
    line repeats the value of a setting that may hold a secret (token, database or broker URL).
    """

    def __init__(self, problems: Sequence[tuple[str | None, str]]):
        self.problems = list(problems)
        super().__init__("; ".join(self.lines()))

    def lines(self, labels: Mapping[str, str] | None = None) -> list[str]:
        """One line per problem, each naming the setting: ``labels`` maps a field to the name
        the user gave it (a CLI flag such as ``--home``); others are ``MOEJOBS_<FIELD>``. In a
        line that names settings itself (an unsafe combination), the variables of labelled
        fields are replaced by their labels."""
        lines = []
        for field, text in self.problems:
            if field is not None:
                lines.append(f"{setting_name(field, labels)}: {text}")
                continue
            for name, label in (labels or {}).items():
                text = text.replace(setting_name(name), label)
            lines.append(text)
        return lines

    @classmethod
    def from_exception(cls, error: Exception) -> InvalidSettingsError:
        """The problems of a ``pydantic.ValidationError`` (one per error), an
        :class:`UnsafeSettingsError` or a pydantic-settings source error (one each)."""
        if isinstance(error, InvalidSettingsError):
            return error
        if isinstance(error, ValidationError):
            return cls([_problem(e) for e in error.errors(include_url=False)])
        return cls([(None, " ".join(str(error).split()))])


def _problem(error: Mapping) -> tuple[str | None, str]:
    """``(field, text)`` for one entry of ``ValidationError.errors()``."""
    loc = error.get("loc") or ()
    field = str(loc[0]) if loc else None
    kind, message, value = error.get("type", ""), str(error.get("msg", "")), error.get("input")
    if kind == "value_error":  # our validators' messages say what is wrong and show what they may
        return field, message.removeprefix("Value error, ")
    if kind in _EXPECTED:
        text = f"expected {_EXPECTED[kind]}"
    else:
        text = message[:1].lower() + message[1:]
        for prefix, replacement in (
            ("input should be", "must be"),
            ("string should", "must"),
            ("input should", "must"),
        ):
            if text.startswith(prefix):
                text = replacement + text[len(prefix) :]
                break
    if field not in _SECRET_FIELDS and isinstance(value, (str, int, float)):
        text += f", got {value!r}"
    return field, text


def is_loopback_host(host: str) -> bool:
    """True when ``host`` (a name or an IPv4/IPv6 literal, brackets allowed) can only be
    reached from this machine: ``localhost`` or an address in 127.0.0.0/8 or ``::1``.
    ``0.0.0.0``, ``::`` and every other name count as reachable from elsewhere."""
    name = host.strip().strip("[]").lower()
    if name in _LOOPBACK_NAMES:
        return True
    try:
        return ipaddress.ip_address(name).is_loopback
    except ValueError:
        return False


def normalize_database_url(url: str) -> str:
    """Map the PostgreSQL spellings that would pick a driver we do not ship
    (``postgres://``, ``postgresql://``, ``postgresql+psycopg2://``) to
    ``postgresql+psycopg://`` (psycopg 3); other URLs are returned unchanged."""
    for prefix in ("postgres://", "postgresql://", "postgresql+psycopg2://"):
        if url.startswith(prefix):
            return "postgresql+psycopg://" + url[len(prefix) :]
    return url


#: Database URL schemes moejobs can use, after :func:`normalize_database_url`.
DATABASE_SCHEMES = ("sqlite", "sqlite+pysqlite", "postgresql+psycopg")

DATABASE_URL_FORMS = (
    "sqlite:///PATH (the embedded default) or "
    "postgresql+psycopg://USER:PASSWORD@HOST:PORT/NAME "
    "(postgres://, postgresql:// and postgresql+psycopg2:// mean the same)"
)


def check_database_url(url: str) -> str:
    """``url`` normalised (:func:`normalize_database_url`) when its scheme is one moejobs can use
    (:data:`DATABASE_SCHEMES`). Raises ValueError listing the accepted forms otherwise; the
    message repeats the scheme only, never the URL (it may hold a password)."""
    url = normalize_database_url(url.strip())
    scheme, sep, _ = url.partition("://")
    if not sep:
        raise ValueError(f"not a database URL; use {DATABASE_URL_FORMS}")
    if scheme.lower() not in DATABASE_SCHEMES:
        raise ValueError(f"unsupported scheme {scheme + '://'!r}; use {DATABASE_URL_FORMS}")
    return url


def check_broker_url(url: str) -> str:
    """``url`` stripped, when its scheme names a kombu transport (``redis://``, ``rediss://``,
    ``amqp://``, ``sqla+sqlite://``...: kombu's ``TRANSPORT_ALIASES``, so the check follows the
    installed kombu). Raises ValueError naming the scheme (never the URL: it may hold a
    password) and the usual forms otherwise."""
    from kombu.transport import TRANSPORT_ALIASES

    url = url.strip()
    scheme, sep, _ = url.partition("://")
    transport = scheme.split("+", 1)[0].lower()
    if not sep or transport not in {alias.lower() for alias in TRANSPORT_ALIASES}:
        shown = f"unsupported scheme {scheme + '://'!r}" if sep else "not a broker URL"
        raise ValueError(
            f"{shown}; use redis://HOST:6379/0 (production) or "
            f"sqla+sqlite:///PATH (embedded), or another kombu transport"
        )
    return url


class Settings(BaseSettings):
    """All of moejobs' configuration. Build one with :func:`get_settings` (cached, from the
    environment) or ``Settings(home=..., ...)`` (explicit values win over the environment).
    Raises ``pydantic.ValidationError`` for malformed values and :class:`UnsafeSettingsError`
    for unsafe combinations.

    After validation ``database_url``, ``broker_url``, ``data_root`` and ``runs_dir`` are never
    None: unset ones are derived from ``home``. Paths are absolute with ``~`` expanded.
    Nothing is created on disk here; call :meth:`ensure_dirs` for that.
    """

    model_config = SettingsConfigDict(
        env_prefix=ENV_PREFIX,
        extra="ignore",
        validate_default=True,
        # Environment variables set to "" count as unset (e.g. MOEJOBS_API_TOKEN=).
        env_ignore_empty=True,
        # str(ValidationError) must not print a database URL's password or the token.
        hide_input_in_errors=True,
    )

    home: Path = Field(
        Path("~/.moejobs"),
        description="Folder for the embedded defaults: database, broker, data root and runs live "
        "under it unless set otherwise. CLI: --home DIR.",
    )
    database_url: str | None = Field(
        None,
        description="SQLAlchemy URL of the database. Default: SQLite file HOME/moejobs.sqlite3. "
        "PostgreSQL URLs are normalised to postgresql+psycopg://.",
    )
    broker_url: str | None = Field(
        None,
        description="Celery broker URL (redis://... in production). Default: kombu's SQLAlchemy "
        "transport on the SQLite file HOME/broker.sqlite3.",
    )
    data_root: Path | None = Field(
        None,
        description="Folder under which input paths of submitted configs resolve (datasets, "
        "tokenizers). Default: HOME/data.",
    )
    runs_dir: Path | None = Field(
        None, description="Folder for run outputs, RUNS_DIR/<run id>/... Default: HOME/runs."
    )
    api_token: SecretStr | None = Field(
        None,
        description="Bootstrap bearer token for the API. Required, of at least 32 characters, "
        "when HOST is not a loopback address.",
    )
    host: str = Field("127.0.0.1", description="Address the API listens on. CLI: --host.")
    port: int = Field(8000, ge=1, le=65535, description="Port the API listens on. CLI: --port.")
    peak_tflops: float | None = Field(
        None,
        gt=0,
        description="Peak dense TFLOP/s of one GPU for the mfu column of metrics.csv, overriding the "
        "datasheet table (worker/metrics.py: H100/H200 SXM 989.4 bf16, A100 312), e.g. for a "
        "clock-limited or unlisted GPU.",
    )
    url: str | None = Field(
        None,
        description="Base URL of the API for the client commands (submit, runs, status, ...); "
        "default http://HOST:PORT. CLI: --url.",
    )

    lease_seconds: float = Field(
        120.0,
        gt=0,
        description="How long a running run's lease lasts without a heartbeat; when it expires "
        "the reconciler treats the worker as lost.",
    )
    heartbeat_seconds: float = Field(
        15.0,
        gt=0,
        description="Interval between worker and run heartbeats. Must be shorter than "
        "LEASE_SECONDS.",
    )
    worker_stale_seconds: float = Field(
        60.0,
        gt=0,
        description="A worker whose last heartbeat is older than this is not counted as live "
        "(readiness, capability checks).",
    )
    queued_stale_seconds: float = Field(
        300.0,
        gt=0,
        description="A run left queued (not claimed) for longer than this is re-enqueued by the "
        "reconciler, in case its broker message was lost.",
    )
    sweep_tick_seconds: float = Field(
        5.0,
        gt=0,
        description="How often every worker runs the sweep controller on the running sweeps "
        "(creates trials as slots free up, applies early stopping; issue 11).",
    )
    cancel_grace_seconds: float = Field(
        120.0,
        gt=0,
        description="After SIGTERM, how long a cancelled training process gets to write its "
        "checkpoint and exit before SIGKILL.",
    )
    trainer_deadline_seconds: float | None = Field(
        None,
        gt=0,
        description="A training process stops itself (without writing more) when its worker "
        "has not vouched for the run's lease for this long: a frozen worker's training never "
        "outlives its claim. Default: a quarter of LEASE_SECONDS (30 s).",
    )
    checkpoint_write_seconds: float | None = Field(
        None,
        gt=0,
        description="The longest a checkpoint write may take (the shipped model with its "
        "optimizer state is 6.1 GiB on a CPU); a write under way when the trainer deadline "
        "passes may finish within it. Default: 3/8 of LEASE_SECONDS (45 s).",
    )
    engine: Literal["litgpt", "stub"] = Field(
        "litgpt",
        description="Training engine the workers start: litgpt (the real one) or stub (a "
        "torch-free stand-in that follows the same contract; for tests of the service).",
    )
    max_attempts: int = Field(
        3,
        ge=1,
        description="How many failures a run may have before it fails for good: a lost worker "
        "or a killed training re-queues the run until this many failures, then it fails with "
        "that reason. A graceful stop (worker shutdown: checkpoint and re-queue) is no failure.",
    )
    request_body_limit_bytes: int = Field(
        1_048_576,
        gt=0,
        description="Largest accepted request body for JSON/YAML/multipart config submissions.",
    )
    upload_limit_bytes: int = Field(
        1_073_741_824,
        gt=0,
        description="Largest accepted dataset upload (text files or a .tar of them).",
    )
    download_link_seconds: float = Field(
        300.0,
        gt=0,
        le=7 * 24 * 3600,
        description="Lifetime of a signed checkpoint download link (POST .../link), which lets a "
        "browser download an archive from a server with an API token without sending the header.",
    )
    sample_prompts: str = Field(
        "The|In the|Once upon a time",
        description="Prompts each recorded checkpoint continues (samples.json in its folder, "
        "`samples` in the checkpoint list), separated by `|`; `none`: no samples. The defaults are "
        "common English words any tokenizer trained on text encodes.",
    )
    sample_max_new_tokens: int = Field(
        32,
        ge=0,
        le=1024,
        description="Tokens generated per prompt (greedy) for a checkpoint's samples; 0: none.",
    )
    keep_checkpoints: int = Field(
        3,
        ge=0,
        description="Retention: how many of a run's newest step-* checkpoints are kept on disk "
        "(the final checkpoint is always kept); 0 keeps all.",
    )
    worker_gpus: Annotated[Literal["all"] | list[int], NoDecode] = Field(
        "all",
        description='GPUs a worker owns: "all" (every GPU it sees) or a comma-separated list '
        'of indices like CUDA_VISIBLE_DEVICES, e.g. "0,1".',
    )
    allow_unschedulable: bool = Field(
        False,
        description="Queue runs that no registered live worker can serve (too many devices, "
        "more memory than any live worker has) with a warning instead of refusing them with "
        "422. Plans no machine could run (README: Admission) are refused all the same.",
    )
    long_run_seconds: float = Field(
        7 * 24 * 3600.0,
        gt=0,
        description="A run expected to take longer than this on the fastest live worker kind "
        "is accepted with a warning (default one week).",
    )
    # -- added by the API/queue work (issue 3, engineer E): the queue name lets several
    #    deployments (or tests) share one Redis; the smoke-test model lets CI use a tiny model.
    celery_queue: str = Field(
        "moejobs",
        pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]{0,99}$",
        description="Celery queue of training runs; short CPU jobs (tokenizers) go to "
        "<CELERY_QUEUE>.aux. The API and every worker of one deployment must agree.",
    )
    worker_role: Literal["all", "train", "aux"] = Field(
        "all",
        description="Queues a worker consumes: all (training runs, then short CPU jobs: a lone "
        "worker), train (training runs only: a GPU slot) or aux (tokenizers and data "
        "preparation only: a CPU process beside the GPU slots, so no GPU waits for "
        "tokenization). CLI: moejobs worker --role.",
    )
    prepare_min_bytes: int = Field(
        16 * 2**20,
        ge=0,
        description="A run whose training and validation text is at least this many bytes and "
        "not yet tokenized is prepared by a worker that consumes the aux queue while it waits "
        "queued, and claimed for training when its token cache is ready; smaller corpora (seconds "
        "to tokenize) are tokenized by the training process itself. 0 prepares every corpus "
        "ahead. Only with ENGINE=litgpt.",
    )
    token_cache: Path | None = Field(
        None,
        description="Folder of the tokenized corpora the workers share (keyed by content and "
        "tokenizer; given to the training and preparation processes as MOEJOBS_TOKEN_CACHE). "
        "Default: HOME/token-cache. Put it where every worker of a deployment sees it.",
    )
    smoke_model_config: Path | None = Field(
        None,
        description="Model config (YAML/JSON) the smoke test trains instead of the shipped "
        "configs/model_config.yaml, e.g. a tiny model for CI.",
    )

    db_wait_seconds: float = Field(
        10.0,
        gt=0,
        le=600,
        description="API only: how long a request waits for one of the API's database "
        "connections (15 per API process) before it answers 503 database_busy with "
        "Retry-After; under load requests queue for them in arrival order.",
    )
    sqlite_busy_timeout_ms: int = Field(
        30_000,
        ge=0,
        description="SQLite only: how long a writer waits for the database lock before failing.",
    )

    # -- webhooks (issue 11) ------------------------------------------------------------------
    webhook_urls: Annotated[list[str], NoDecode] = Field(
        default_factory=list,
        description="Comma-separated http(s) URLs that every run notifies when it ends (signed "
        "POST; README: Webhooks), besides those a submission names. Needs WEBHOOK_SECRET.",
    )
    webhook_secret: SecretStr | None = Field(
        None,
        description="Key of the HMAC-SHA256 signature of every webhook delivery (at least 16 "
        "characters). Required for webhooks: without it a submission naming webhooks is a 422.",
    )
    webhook_max_attempts: int = Field(
        6,
        ge=1,
        le=20,
        description="Delivery attempts of one webhook event before it is given up (retries "
        "back off exponentially: 10 s, 20 s, 40 s ...).",
    )
    webhook_tick_seconds: float = Field(
        2.0,
        gt=0,
        description="How often every worker sends the webhook deliveries that are due.",
    )

    # -- object store (issue 12) --------------------------------------------------------------
    artifact_url: str | None = Field(
        None,
        pattern=r"^s3://[a-z0-9][a-z0-9.-]{1,61}[a-z0-9](/.*)?$",
        description="s3://bucket/prefix of the object store that keeps every run's checkpoints "
        "and files (README: Object store); endpoint, region and credentials from the standard "
        "AWS_* environment variables. Unset: artifacts stay in RUNS_DIR only.",
    )
    artifact_public_url: str | None = Field(
        None,
        description="Endpoint that presigned download links name, one a browser can reach "
        "(e.g. https://s3.example.org), when AWS_ENDPOINT_URL is a host name only the "
        "deployment resolves. Default: the endpoint the service uses.",
    )
    artifact_sync_seconds: float = Field(
        30.0,
        gt=0,
        description="With ARTIFACT_URL: how often a worker uploads a running run's metrics.csv, "
        "router.csv, events.jsonl and train.log to the store (and once at the attempt's end).",
    )

    # -- validators -------------------------------------------------------------------------

    @field_validator("worker_gpus", mode="before")
    @classmethod
    def _parse_gpus(cls, value: object) -> object:
        """Accept "all", "0,1", " 0, 1 ", a list of ints/strings; reject negatives and repeats."""
        if isinstance(value, str):
            text = value.strip()
            if text.lower() == "all":
                return "all"
            if not text:
                raise ValueError('empty GPU list: use "all" or indices like "0,1"')
            value = [part.strip() for part in text.split(",")]
        if isinstance(value, (list, tuple)):
            try:
                indices = [int(v) for v in value]
            except (TypeError, ValueError):
                raise ValueError(
                    f'GPU list must be "all" or integers like "0,1", got {value!r}'
                ) from None
            if any(i < 0 for i in indices):
                raise ValueError(f"GPU indices must be >= 0, got {indices}")
            if len(set(indices)) != len(indices):
                raise ValueError(f"GPU indices repeat: {indices}")
            return indices
        return value

    @field_validator("webhook_urls", mode="before")
    @classmethod
    def _parse_webhook_urls(cls, value: object) -> object:
        """A comma-separated string or a list; each an http(s) URL (``check_url``)."""
        if isinstance(value, str):
            value = [part.strip() for part in value.split(",") if part.strip()]
        if isinstance(value, (list, tuple)):
            return [check_url(str(v)) for v in value]
        return value

    @field_validator("webhook_secret", mode="before")
    @classmethod
    def _long_webhook_secret(cls, value: object) -> object:
        text = value.get_secret_value() if isinstance(value, SecretStr) else value
        if isinstance(text, str) and len(text.strip()) < 16:
            raise ValueError("needs at least 16 characters (a long random string)")
        return value

    @field_validator("database_url")
    @classmethod
    def _known_database(cls, value: str | None) -> str | None:
        return None if value is None else check_database_url(value)

    @field_validator("broker_url")
    @classmethod
    def _known_broker(cls, value: str | None) -> str | None:
        return None if value is None else check_broker_url(value)

    @field_validator("api_token", mode="before")
    @classmethod
    def _blank_token_is_none(cls, value: object) -> object:
        if isinstance(value, str) and not value.strip():
            return None
        return value

    @model_validator(mode="after")
    def _derive_and_check(self) -> Settings:
        home = self.home.expanduser().absolute()
        self.home = home
        if self.database_url is None:
            self.database_url = f"sqlite:///{home / 'moejobs.sqlite3'}"
        self.database_url = normalize_database_url(self.database_url)
        if self.broker_url is None:
            self.broker_url = f"sqla+sqlite:///{home / 'broker.sqlite3'}"
        self.data_root = (self.data_root or home / "data").expanduser().absolute()
        self.runs_dir = (self.runs_dir or home / "runs").expanduser().absolute()
        self.token_cache = (self.token_cache or home / "token-cache").expanduser().absolute()

        if not is_loopback_host(self.host) and self.api_token is None:
            raise UnsafeSettingsError(
                f"MOEJOBS_HOST={self.host} listens beyond this machine but no API token is set: "
                f"set MOEJOBS_API_TOKEN (a long random string: {MAKE_TOKEN}) or listen on 127.0.0.1"
            )
        if (
            not is_loopback_host(self.host)
            and self.api_token is not None
            and len(self.api_token.get_secret_value()) < MIN_REMOTE_TOKEN_LENGTH
        ):
            raise UnsafeSettingsError(
                f"MOEJOBS_HOST={self.host} listens beyond this machine but MOEJOBS_API_TOKEN has "
                f"{len(self.api_token.get_secret_value())} characters: it needs at least "
                f"{MIN_REMOTE_TOKEN_LENGTH} there (make one with {MAKE_TOKEN}), or listen on 127.0.0.1"
            )
        if self.webhook_urls and self.webhook_secret is None:
            raise UnsafeSettingsError(
                "MOEJOBS_WEBHOOK_URLS is set but MOEJOBS_WEBHOOK_SECRET is not: deliveries must "
                f"be signed; set a long random secret ({MAKE_TOKEN})"
            )
        if self.heartbeat_seconds >= self.lease_seconds:
            raise UnsafeSettingsError(
                f"MOEJOBS_HEARTBEAT_SECONDS ({self.heartbeat_seconds}) must be shorter than "
                f"MOEJOBS_LEASE_SECONDS ({self.lease_seconds}), or every lease expires between "
                f"two heartbeats"
            )
        lease, beat = self.lease_seconds, self.heartbeat_seconds
        if self.trainer_deadline_seconds is None:
            self.trainer_deadline_seconds = lease / 4
        if self.checkpoint_write_seconds is None:
            self.checkpoint_write_seconds = lease * 3 / 8
        deadline, write = self.trainer_deadline_seconds, self.checkpoint_write_seconds
        if lease <= deadline + write + beat:
            raise UnsafeSettingsError(
                f"MOEJOBS_LEASE_SECONDS ({lease:g}) must be longer than "
                f"MOEJOBS_TRAINER_DEADLINE_SECONDS ({deadline:g}) + "
                f"MOEJOBS_CHECKPOINT_WRITE_SECONDS ({write:g}) + MOEJOBS_HEARTBEAT_SECONDS "
                f"({beat:g}), or a silent worker's training could still be writing when its run "
                f"is handed to another worker: raise the lease or lower the other two"
            )
        if self.vouch_seconds + deadline < 1.5 * beat:
            raise UnsafeSettingsError(
                f"MOEJOBS_TRAINER_DEADLINE_SECONDS ({deadline:g}) is too short for "
                f"MOEJOBS_HEARTBEAT_SECONDS ({beat:g}) with this lease: a healthy worker's "
                f"training would stop between two heartbeats; raise MOEJOBS_LEASE_SECONDS or "
                f"the deadline, or shorten the heartbeat"
            )
        if self.heartbeat_seconds >= self.worker_stale_seconds:
            raise UnsafeSettingsError(
                f"MOEJOBS_HEARTBEAT_SECONDS ({self.heartbeat_seconds}) must be shorter than "
                f"MOEJOBS_WORKER_STALE_SECONDS ({self.worker_stale_seconds})"
            )
        return self

    # -- helpers ------------------------------------------------------------------------------

    @property
    def vouch_seconds(self) -> float:
        """How long after its last renewed lease a worker still feeds its training's watchdog:
        ``LEASE - TRAINER_DEADLINE - CHECKPOINT_WRITE - HEARTBEAT`` (the heartbeat interval is
        the grace for the time between a renewal and its byte, and for clock skew between the
        worker and the reconciler's machine). A training whose worker stops vouching is dead
        before the lease can expire (``worker.fence``)."""
        assert self.trainer_deadline_seconds is not None
        assert self.checkpoint_write_seconds is not None
        return (
            self.lease_seconds
            - self.trainer_deadline_seconds
            - self.checkpoint_write_seconds
            - self.heartbeat_seconds
        )

    @property
    def is_sqlite(self) -> bool:
        """True when the database is SQLite (the embedded default)."""
        assert self.database_url is not None
        return self.database_url.startswith("sqlite")

    def run_dir(self, run_id: object) -> Path:
        """The output folder of one run: ``RUNS_DIR/<run id>`` (not created)."""
        assert self.runs_dir is not None
        return self.runs_dir / str(run_id)

    def ensure_dirs(self) -> None:
        """Create HOME, DATA_ROOT, RUNS_DIR and the folders of SQLite database/broker files.

        Raises:
            InvalidSettingsError: a folder cannot be created; the message names the setting
                it comes from and the operating system's reason.
        """
        assert self.data_root is not None and self.runs_dir is not None
        folders: list[tuple[str, Path]] = [
            ("home", self.home),
            ("data_root", self.data_root),
            ("runs_dir", self.runs_dir),
        ]
        for field in ("database_url", "broker_url"):
            path = sqlite_path(getattr(self, field) or "")
            if path is not None:
                folders.append((field, path.parent))
        for field, folder in folders:
            try:
                folder.mkdir(parents=True, exist_ok=True)
            except OSError as error:
                raise InvalidSettingsError(
                    [(field, f"cannot create the folder {folder}: {error.strerror or error}")]
                ) from None

    @property
    def sample_prompt_list(self) -> list[str]:
        """:attr:`sample_prompts` split at ``|``, empty parts dropped; ``none`` (any case): no
        prompts. (An empty environment variable is ignored like every empty setting, so it
        cannot turn samples off in a child process: ``none`` can.)"""
        if self.sample_prompts.strip().lower() == "none":
            return []
        return [p for p in self.sample_prompts.split("|") if p.strip()]

    def to_env(self) -> dict[str, str]:
        """These settings as ``MOEJOBS_*`` environment variables, for child processes (a
        worker or server started by ``moejobs up``) so they see exactly these values. Includes
        the API token in clear text: pass it only to processes you start."""
        env: dict[str, str] = {}
        for name, value in self.model_dump().items():
            if value is None:
                continue
            if isinstance(value, SecretStr):
                value = value.get_secret_value()
            elif isinstance(value, list):
                value = ",".join(str(v) for v in value)
            elif isinstance(value, bool):
                value = "true" if value else "false"
            env[ENV_PREFIX + name.upper()] = str(value)
        return env


def sqlite_path(url: str) -> Path | None:
    """The file of a ``sqlite:///PATH`` or ``sqla+sqlite:///PATH`` URL; None for other URLs and
    for in-memory SQLite."""
    for prefix in ("sqlite:///", "sqla+sqlite:///", "sqlite+pysqlite:///"):
        if url.startswith(prefix):
            rest = url[len(prefix) :].split("?", 1)[0]
            if not rest or rest == ":memory:":
                return None
            return Path(rest)
    return None


@functools.lru_cache(maxsize=1)
def _settings_from_environment() -> Settings:
    return Settings()


_override: Settings | None = None


def get_settings() -> Settings:
    """The process-wide settings: the ones installed with :func:`use_settings`, else built
    once from the environment (cached). Raises ``pydantic.ValidationError`` on malformed values,
    :class:`UnsafeSettingsError` on unsafe ones."""
    if _override is not None:
        return _override
    return _settings_from_environment()


def use_settings(settings: Settings | None) -> None:
    """Install ``settings`` as what :func:`get_settings` returns (the CLI does this after
    parsing ``--home``/``--host``/``--port``; tests do it for isolation). ``None`` removes the
    override and clears the cache so the environment is read again."""
    global _override
    _override = settings
    _settings_from_environment.cache_clear()


def settings_for_home(home: str | os.PathLike[str], **overrides: Any) -> Settings:
    """Settings rooted at ``home`` (what ``--home DIR`` means), other values from the
    environment unless given in ``overrides``."""
    return Settings(home=Path(home), **overrides)


def load_settings(**values: Any) -> Settings:
    """``Settings(**values)`` (explicit values win over the environment) for a command to use.

    Raises:
        InvalidSettingsError: with one problem per malformed value, or the unsafe combination,
            instead of pydantic's multi-line error.
    """
    try:
        return Settings(**values)
    except (ValidationError, UnsafeSettingsError, _SourceError) as error:
        raise InvalidSettingsError.from_exception(error) from None
