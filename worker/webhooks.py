"""The webhook sender: every worker sends the deliveries that are due every
``MOEJOBS_WEBHOOK_TICK_SECONDS`` (a thread of ``worker.registry.WorkerRuntime``), off the
training path and after the transaction that recorded them (``service.runs.add_deliveries``).

Each pass claims due deliveries with a database lease (``service.runs.claim_deliveries``: two
workers never send the same attempt), POSTs each body signed with ``MOEJOBS_WEBHOOK_SECRET``
(``service.webhooks.headers``) with short timeouts and without following redirects, and
records the attempt (``service.runs.record_delivery``: delivered, retried with exponential
backoff, or given up after ``MOEJOBS_WEBHOOK_MAX_ATTEMPTS``), which also writes a line in the
run's history. A worker that dies between the POST and the record leaves a lease that expires,
and the attempt is made again: a receiver may see a delivery twice (``X-Moejobs-Delivery`` is
the same), never zero times.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from datetime import datetime

import httpx
from sqlmodel import col, select

from service import runs, webhooks
from service.db import Database, read_transaction
from service.models import DeliveryState, WebhookDelivery
from service.settings import Settings

log = logging.getLogger("moejobs.webhooks")


@dataclass
class SendSummary:
    """What one :func:`send_due` pass did (delivery ids as strings)."""

    delivered: list[str] = field(default_factory=list)
    retried: list[str] = field(default_factory=list)
    given_up: list[str] = field(default_factory=list)


def _post(client: httpx.Client, url: str, body: bytes, headers: dict[str, str]) -> int:
    """POST once; the status code (a redirect is an answer like any other: not followed)."""
    return client.post(url, content=body, headers=headers).status_code


def send_due(
    settings: Settings,
    db: Database,
    holder: str,
    *,
    now: datetime | None = None,
    client: httpx.Client | None = None,
) -> SendSummary:
    """One pass: claim the due deliveries as ``holder``, send each once, record each attempt.
    Without ``MOEJOBS_WEBHOOK_SECRET`` nothing is sent (the deliveries wait; a warning says
    why). Never raises for a receiver's trouble; database errors propagate."""
    summary = SendSummary()
    if settings.webhook_secret is None:
        with db.session() as session, read_transaction(session):
            waiting = session.exec(
                select(WebhookDelivery.id)
                .where(col(WebhookDelivery.state) == DeliveryState.pending)
                .limit(1)
            ).first()
        if waiting is not None:
            log.warning("webhook deliveries wait: this worker has no MOEJOBS_WEBHOOK_SECRET")
        return summary
    secret = settings.webhook_secret.get_secret_value()
    own = client is None
    if client is None:
        client = httpx.Client(
            timeout=httpx.Timeout(webhooks.TIMEOUT_SECONDS), follow_redirects=False
        )
    try:
        with db.session() as session:
            due = runs.claim_deliveries(session, holder, now=now)
        for delivery in due:
            body = delivery.body.encode("utf-8")
            stamp = int(time.time()) if now is None else int(now.timestamp())
            headers = webhooks.headers(secret, delivery.id, delivery.event, body, stamp)
            status: int | None = None
            error: str | None = None
            try:
                status = _post(client, delivery.url, body, headers)
            except Exception as exc:  # httpx's errors, and a host httpx cannot encode
                error = f"{exc.__class__.__name__}: {exc}"[:300]
            with db.session() as session:
                row = runs.record_delivery(
                    session,
                    delivery.id,
                    holder,
                    status_code=status,
                    error=error,
                    max_attempts=settings.webhook_max_attempts,
                    now=now,
                )
            if row is None:
                continue
            shown = webhooks.shown_url(delivery.url)
            if row.state.value == "delivered":
                summary.delivered.append(str(row.id))
                log.info("webhook %s %s to %s: delivered", row.id, row.event, shown)
            elif row.state.value == "failed":
                summary.given_up.append(str(row.id))
                log.warning(
                    "webhook %s %s to %s: given up after %d attempts (%s)",
                    row.id,
                    row.event,
                    shown,
                    row.attempts,
                    row.last_error,
                )
            else:
                summary.retried.append(str(row.id))
                log.info(
                    "webhook %s %s to %s: attempt %d failed (%s)",
                    row.id,
                    row.event,
                    shown,
                    row.attempts,
                    row.last_error,
                )
    finally:
        if own:
            client.close()
    return summary
