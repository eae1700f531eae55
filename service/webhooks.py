"""Webhooks: what a subscription looks like, what is sent and how it is signed (issue 11).

Pure code (no database, no network): the outbox rows are written by ``service.runs`` in the
transaction that ends a run, and sent by ``worker.webhooks``.

A subscription is ``{"url": "https://...", "events": [...]}``. Run events: ``succeeded``,
``failed``, ``cancelled`` (default: these three) and ``checkpoint``; sweep events:
``finished``, ``failed``, ``cancelled`` (default: all). The body is a small JSON object whose
``event`` is ``run.<event>`` or ``sweep.<event>``; it is fixed when the delivery is recorded,
so every attempt sends the same bytes.

Signature: ``X-Moejobs-Signature: sha256=<hex>``, the HMAC-SHA256 with the server's secret of
``<X-Moejobs-Timestamp>.<raw body>`` (the timestamp in Unix seconds is signed with the body, so
a receiver that refuses old timestamps refuses replays).
"""

from __future__ import annotations

import hashlib
import hmac
import json
import uuid
from typing import Annotated, Any
from urllib.parse import urlsplit

import httpx
from pydantic import AfterValidator, BaseModel, ConfigDict, Field

#: Events a run's subscription may name; the default is the terminal three.
RUN_EVENTS = ("succeeded", "failed", "cancelled", "checkpoint")
RUN_DEFAULT_EVENTS = ("succeeded", "failed", "cancelled")
#: Events a sweep's subscription may name (all by default).
SWEEP_EVENTS = ("finished", "failed", "cancelled")

#: Longest webhook URL (characters) and most subscriptions per run or sweep.
MAX_URL_CHARS = 2048
MAX_WEBHOOKS = 8

#: Seconds one delivery attempt may take (connect, write, read): the receiver answers quickly
#: or the attempt counts as failed and is retried.
TIMEOUT_SECONDS = 5.0
#: How long a sender holds a delivery it claimed (longer than one attempt takes).
LEASE_SECONDS = 30.0
#: First retry delay and the longest one (exponential in between: 10, 20, 40 s ...).
BACKOFF_FIRST_SECONDS = 10.0
BACKOFF_MAX_SECONDS = 3600.0

SIGNATURE_HEADER = "X-Moejobs-Signature"
TIMESTAMP_HEADER = "X-Moejobs-Timestamp"
EVENT_HEADER = "X-Moejobs-Event"
DELIVERY_HEADER = "X-Moejobs-Delivery"


def check_url(url: str) -> str:
    """``url`` when it is an absolute http or https URL with a host, of at most
    :data:`MAX_URL_CHARS` characters, without user information or whitespace; ValueError
    saying what is wrong otherwise."""
    if len(url) > MAX_URL_CHARS:
        raise ValueError(f"a webhook URL has at most {MAX_URL_CHARS} characters, got {len(url)}")
    if any(c.isspace() or ord(c) < 32 or ord(c) == 127 for c in url):
        raise ValueError("a webhook URL may not contain whitespace or control characters")
    try:
        parts = urlsplit(url)
        parts.port  # noqa: B018 - raises ValueError for a port out of range
    except ValueError as error:
        raise ValueError(f"not a valid URL: {error}") from None
    if parts.scheme not in ("http", "https"):
        raise ValueError(f"a webhook URL must start with http:// or https://, got {url[:40]!r}")
    if not parts.hostname:
        raise ValueError("a webhook URL needs a host")
    try:  # what the sender will have to do with the host: IDNA labels, httpx's parser
        parts.hostname.encode("idna")
        httpx.URL(url)
    except Exception as error:  # UnicodeError, idna's errors, httpx.InvalidURL
        raise ValueError(f"not a valid host name: {error}") from None
    if parts.username is not None or parts.password is not None:
        raise ValueError("a webhook URL may not carry user:password@ (sign with the secret)")
    return url


def shown_url(url: str) -> str:
    """``url`` without its query and fragment (they may carry a receiver's token): what the
    run's events and the logs show."""
    parts = urlsplit(url)
    return f"{parts.scheme}://{parts.netloc}{parts.path}"


def _events(allowed: tuple[str, ...]) -> Any:
    def check(events: list[str]) -> list[str]:
        unknown = [e for e in events if e not in allowed]
        if unknown:
            raise ValueError(f"unknown events {unknown}; expected any of {', '.join(allowed)}")
        return list(dict.fromkeys(events))

    return AfterValidator(check)


class RunWebhook(BaseModel):
    """One subscription of a run: ``url`` and the ``events`` it wants."""

    model_config = ConfigDict(extra="forbid")

    url: Annotated[str, AfterValidator(check_url)] = Field(
        description="http(s) URL that receives a signed POST (at most 2048 characters)."
    )
    events: Annotated[list[str], _events(RUN_EVENTS)] = Field(
        default_factory=lambda: list(RUN_DEFAULT_EVENTS),
        min_length=1,
        description="Any of succeeded, failed, cancelled (the default: the three) and "
        "checkpoint (each recorded checkpoint).",
    )


class SweepWebhook(BaseModel):
    """One subscription of a sweep: ``url`` and the ``events`` it wants (default all)."""

    model_config = ConfigDict(extra="forbid")

    url: Annotated[str, AfterValidator(check_url)] = Field(
        description="http(s) URL that receives a signed POST (at most 2048 characters)."
    )
    events: Annotated[list[str], _events(SWEEP_EVENTS)] = Field(
        default_factory=lambda: list(SWEEP_EVENTS),
        min_length=1,
        description="Any of finished, failed, cancelled (the default: all three).",
    )


def body_text(delivery_id: uuid.UUID, event: str, data: dict[str, Any]) -> str:
    """The JSON body of a delivery: ``{"id", "event", **data}`` (compact, sorted keys)."""
    document = {"id": str(delivery_id), "event": event, **data}
    return json.dumps(document, sort_keys=True, separators=(",", ":"), default=str)


def signature(secret: str, timestamp: int, body: bytes) -> str:
    """``sha256=<hex>``: HMAC-SHA256 with ``secret`` of ``b"<timestamp>." + body``."""
    mac = hmac.new(secret.encode("utf-8"), f"{timestamp}.".encode() + body, hashlib.sha256)
    return f"sha256={mac.hexdigest()}"


def verify(secret: str, timestamp: str, body: bytes, header: str) -> bool:
    """Whether ``header`` is the signature of ``body`` sent at ``timestamp`` (constant-time);
    what a receiver does (the README's snippet), used by the tests."""
    try:
        stamp = int(timestamp)
    except ValueError:
        return False
    return hmac.compare_digest(signature(secret, stamp, body), header)


def headers(
    secret: str, delivery_id: uuid.UUID, event: str, body: bytes, timestamp: int
) -> dict[str, str]:
    """The request headers of one attempt."""
    return {
        "Content-Type": "application/json",
        "User-Agent": "moejobs-webhooks",
        EVENT_HEADER: event,
        DELIVERY_HEADER: str(delivery_id),
        TIMESTAMP_HEADER: str(timestamp),
        SIGNATURE_HEADER: signature(secret, timestamp, body),
    }


def backoff_seconds(attempts: int) -> float:
    """Delay before the next attempt after ``attempts`` failed ones (1, 2, ...):
    ``BACKOFF_FIRST_SECONDS * 2 ** (attempts - 1)``, at most ``BACKOFF_MAX_SECONDS``."""
    return float(min(BACKOFF_MAX_SECONDS, BACKOFF_FIRST_SECONDS * 2 ** max(0, attempts - 1)))
