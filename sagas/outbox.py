"""The transactional outbox: emit an event in the same transaction as the change that caused it.

    with transaction.atomic():
        order.status = "confirmed"; order.save()
        outbox_emit(aggregate_type="order", aggregate_id=order.id, event_type="ORDER_CONFIRMED", payload={...})

If the transaction commits, the event is there to publish; if it rolls back, so does the event.
"""

from __future__ import annotations

import os
import time
from collections.abc import Mapping
from datetime import datetime
from functools import cache
from pathlib import Path
from typing import Any

from celery import signature
from django.conf import settings
from django.db import connection, transaction
from django.utils import timezone
from redis.exceptions import RedisError

from sagas import sql
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
    if settings.OUTBOX_RELAY_KICK and not any(callback is _kick_relay for _, callback, _ in connection.run_on_commit):
        # Publish right after the commit instead of waiting for the beat (once per transaction;
        # robust: a broker hiccup must not fail the committed request, the beat covers it).
        transaction.on_commit(_kick_relay, robust=True)
    event = OutboxEvent(
        aggregate_type=aggregate_type,
        aggregate_id=str(aggregate_id),
        event_type=event_type,
        payload=dict(payload),
        created_at=now or timezone.now(),
    )
    # Sequence numbers are taken at insert, but transactions commit in their own order: two
    # concurrent transactions emitting for one aggregate could commit n+1 before n, and the relay
    # would publish them in that order. Serialising emitters per aggregate (a transaction-scoped
    # lock, taken in the insert's own statement) makes sequence order the commit order.
    return sql.outbox_insert(event, lock_key=f"outbox:{aggregate_type}:{aggregate_id}")


# While a kick is queued and no relay has started since, a commit need not send another: that
# relay starts after this commit and will see its events. At a high commit rate this turns one
# relay task per commit into a few per second. The mark expires like the kick itself, in case the
# kick message is lost (the beat's relay covers that gap). It lives in Redis, shared by every
# process; on SQLite without Redis, in a file next to the database, which only processes on its
# machine can write to (issue 11: there a relay per commit was a fifth of the workers' time);
# elsewhere every commit kicks.
KICK_MARK = "sagas:outbox:kick-pending"
KICK_EXPIRES = 10


def _kick_relay() -> None:
    from sagas import dispatch

    if dispatch.broker_presumed_down():
        return  # the beat's relay publishes these events; this request waits for no broker
    marks = _kick_marks()
    if marks is not None and not marks.take():
        return
    dispatch.send(signature("sagas.relay_outbox", options={"expires": KICK_EXPIRES}))


def kick_mark_clear() -> None:
    """Each relay run calls this before it looks for events: later commits must kick again.
    Tests call it too, so a kick that a previous test parked or purged does not hold back theirs."""
    marks = _kick_marks()
    if marks is not None:
        marks.clear()


class RedisKickMark:
    def __init__(self, url: str):
        import redis

        self.client = redis.Redis.from_url(url, socket_timeout=0.5, socket_connect_timeout=0.5)

    def take(self) -> bool:
        """True when no kick was pending (this caller sends one); True also when Redis fails."""
        try:
            return bool(self.client.set(KICK_MARK, 1, nx=True, ex=KICK_EXPIRES))
        except RedisError:
            return True  # kick anyway

    def clear(self) -> None:
        try:
            self.client.delete(KICK_MARK)
        except RedisError:
            pass  # the mark expires on its own


class FileKickMark:
    """The mark as a file, created exclusively (SET NX); one older than KICK_EXPIRES counts as
    gone (EX)."""

    def __init__(self, path: Path):
        self.path = path

    def take(self) -> bool:
        """True when no kick was pending (this caller sends one); True also when the file fails."""
        try:
            os.close(os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o600))
            return True
        except FileExistsError:
            pass
        except OSError:
            return True  # kick anyway
        try:
            if time.time() - os.stat(self.path).st_mtime <= KICK_EXPIRES:
                return False
            os.utime(self.path)  # expired: this kick takes it over
        except OSError:
            pass  # a relay started and cleared it meanwhile: kick
        return True

    def clear(self) -> None:
        try:
            os.unlink(self.path)
        except OSError:
            pass  # none pending; or it expires on its own


@cache
def _kick_marks() -> RedisKickMark | FileKickMark | None:
    if settings.REDIS_URL:
        return RedisKickMark(settings.REDIS_URL)
    name = str(connection.settings_dict.get("NAME") or "")
    if connection.vendor == "sqlite" and name and name != ":memory:" and not name.startswith("file:"):
        return FileKickMark(Path(f"{name}.relay-kick"))
    return None
