"""The transactional outbox: emit an event in the same transaction as the change that caused it.

    with transaction.atomic():
        order.status = "confirmed"; order.save()
        outbox_emit(aggregate_type="order", aggregate_id=order.id, event_type="ORDER_CONFIRMED", payload={...})

If the transaction commits, the event is there to publish; if it rolls back, so does the event.
"""

from __future__ import annotations

from collections.abc import Mapping
from datetime import datetime
from typing import Any

from celery import signature
from django.db import connection, transaction
from django.utils import timezone

from sagas.models import OutboxEvent


class OutsideTransaction(RuntimeError):
    """outbox_emit was called outside transaction.atomic: the event could commit without the change."""


def outbox_emit(
    *,
    aggregate_type: str,
    aggregate_id: Any,
    event_type: str,
    payload: Mapping[str, Any],
    now: datetime | None = None,
) -> OutboxEvent:
    """Record an event to publish. Must run inside transaction.atomic; raises OutsideTransaction."""
    if not connection.in_atomic_block:
        raise OutsideTransaction(f"{event_type} for {aggregate_type}:{aggregate_id} must be emitted inside transaction.atomic")
    if connection.vendor == "postgresql":
        # Sequence numbers are taken at insert, but transactions commit in their own order: two
        # concurrent transactions emitting for one aggregate could commit n+1 before n, and the
        # relay would publish them in that order. Serialising emitters per aggregate (until they
        # commit) makes sequence order the commit order. SQLite writers are serial already.
        with connection.cursor() as cursor:
            cursor.execute("SELECT pg_advisory_xact_lock(hashtext(%s))", [f"outbox:{aggregate_type}:{aggregate_id}"])
    if not any(callback is _kick_relay for _, callback, _ in connection.run_on_commit):
        # Publish right after the commit instead of waiting for the beat (once per transaction;
        # robust: a broker hiccup must not fail the committed request, the beat covers it).
        transaction.on_commit(_kick_relay, robust=True)
    return OutboxEvent.objects.create(
        aggregate_type=aggregate_type,
        aggregate_id=str(aggregate_id),
        event_type=event_type,
        payload=dict(payload),
        created_at=now or timezone.now(),
    )


def _kick_relay() -> None:
    signature("sagas.relay_outbox", options={"expires": 10}).apply_async()
