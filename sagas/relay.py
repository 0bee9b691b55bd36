"""The outbox relay: publish committed events at least once, in order per aggregate.

Each round claims the *head* of every aggregate (its oldest unpublished event) that is due, with
`SELECT ... FOR UPDATE SKIP LOCKED`, in a short transaction that leases them (next_attempt_at set
CLAIM_LEASE ahead, so no other relay takes them meanwhile); publishes the batch outside any
transaction; and marks what went out in a second short transaction. No transaction stays open
while the publisher talks to a broker: on SQLite that would hold the database's one write lock
(every step and request waiting behind a publish), on PostgreSQL a connection idle in a
transaction (issue 11). Claiming only heads is what keeps an aggregate's events in order with
several relays running: event n+1 becomes claimable only once event n is committed as published.
A relay that crashes after publishing but before marking leaves its events to be claimed again
when the lease ends (at least once); one whose publisher raises releases them at once. An event
committed out of sequence order is simply claimed by a later round. A failing event is retried
with exponential backoff and jitter and, after settings.OUTBOX_MAX_ATTEMPTS, parked in the dead
letter; it holds back only its own aggregate. An event the publisher defers (a stream that lost
entries is being repaired first, see sagas.streams) is simply tried again a second later.

A round costs what its batch costs, however long the backlog: the heads are found by reading the
oldest unpublished events once, in sequence order (an aggregate's first one there is its head),
not by asking for each candidate whether an older event of its aggregate is unpublished. That
anti-join is what PostgreSQL misjudges when its statistics predate the backlog (they usually do:
a backlog builds faster than autovacuum analyses a large table): it rescanned every unpublished
event for each candidate, 693 ms a round with 5,000 waiting (issue 15).
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from datetime import datetime, timedelta

from django.conf import settings
from django.db import DatabaseError, connection, transaction
from django.db.models import Q
from django.utils import timezone

from sagas import metrics, sql
from sagas.definition import Retry
from sagas.models import OutboxEvent
from sagas.publishers import PublishDeferred, awaiting_consumers, record_of
from sagas.retention import PruneRun, oldest_batch, prune_in_batches

log = logging.getLogger("sagas.outbox")

# A deferred event is claimable again after this long (no attempt counted).
DEFER = timedelta(seconds=1)
# How long a claimed batch is the claiming relay's to publish and mark. A relay killed meanwhile
# holds its events back this long; one slower than this (frozen) may see another relay publish
# them too, which at-least-once allows (consumers dedupe by id). As long as PostgreSQL's
# idle-in-transaction timeout (config.env), which bounded the single-transaction relay before.
CLAIM_LEASE = timedelta(seconds=60)


@dataclass
class RelayResult:
    published: int = 0
    failed: int = 0
    dead_lettered: int = 0
    rounds: int = 0
    deferred: int = 0
    republished: int = 0  # events published again because their stream lost them

    def __iadd__(self, other: RelayResult) -> RelayResult:
        self.published += other.published
        self.failed += other.failed
        self.dead_lettered += other.dead_lettered
        self.rounds += other.rounds
        self.deferred += other.deferred
        self.republished += other.republished
        return self


def backoff_policy() -> Retry:
    return Retry(
        max_attempts=settings.OUTBOX_MAX_ATTEMPTS,
        initial_delay=settings.OUTBOX_RETRY_BACKOFF,
        max_delay=settings.OUTBOX_RETRY_MAX_DELAY,
    )


def due(now: datetime):
    """Unpublished, not parked events whose time has come (claimable ones and those behind them)."""
    return OutboxEvent.objects.filter(published_at__isnull=True, dead_lettered_at__isnull=True).filter(
        Q(next_attempt_at__isnull=True) | Q(next_attempt_at__lte=now)
    )


def claimable(now: datetime, *, scan: int | None = None):
    """Due events with no earlier unpublished event of their aggregate (heads), oldest first, among
    the oldest `scan` unpublished events (default: twice OUTBOX_BATCH_SIZE). Reads those at once to
    find the heads (see heads); the queryset re-checks that each is still due when evaluated."""
    found, _more = heads(now=now, scan=scan or 2 * settings.OUTBOX_BATCH_SIZE)
    return due(now).filter(pk__in=found).order_by("sequence")


def heads(*, now: datetime, scan: int) -> tuple[list[int], bool]:
    """The sequence numbers of the due heads among the oldest `scan` unpublished events, oldest
    first, and whether more unpublished events lie past those. One statement, one walk of
    outbox_unpublished_idx: in sequence order an aggregate's first unpublished event is its head,
    so everything after it is held back, as is every aggregate whose head is not due (leased to
    another relay, backing off, or parked in the dead letter, which holds back its aggregate only)."""
    oldest = (
        OutboxEvent.objects.filter(published_at__isnull=True)
        .order_by("sequence")
        .values_list("sequence", "aggregate_type", "aggregate_id", "dead_lettered_at", "next_attempt_at")[:scan]
    )
    seen: set[tuple[str, str]] = set()
    found, read = [], 0
    for sequence, aggregate_type, aggregate_id, dead_lettered_at, next_attempt_at in oldest:
        read += 1
        if (aggregate_type, aggregate_id) in seen:
            continue
        seen.add((aggregate_type, aggregate_id))
        if dead_lettered_at is None and (next_attempt_at is None or next_attempt_at <= now):
            found.append(sequence)
    return found, read == scan


def outbox_relay(*, publisher, batch_size: int | None = None, time_budget: float | None = None) -> RelayResult:
    """Publish rounds of due events until a round finds none or `time_budget` seconds have passed.
    Each round takes at most one event per aggregate (its head), so an aggregate with n waiting
    events needs n rounds. A publisher that can `verify` what it published is asked to first (it
    decides how often it looks), and again after a round in which it deferred events."""
    batch_size = batch_size or settings.OUTBOX_BATCH_SIZE
    budget_end = time.monotonic() + (time_budget if time_budget is not None else settings.OUTBOX_RELAY_TIME_BUDGET)
    verify = getattr(publisher, "verify", None)
    total = RelayResult(republished=verify() if verify else 0)
    policy = backoff_policy()
    while True:
        result, claimed = _relay_round(publisher=publisher, batch_size=batch_size, policy=policy, now=timezone.now())
        if result.deferred and verify:
            result.republished += verify(force=True)
        total += result
        if claimed == 0 or time.monotonic() >= budget_end:
            return total


def _relay_round(*, publisher, batch_size: int, policy: Retry, now: datetime) -> tuple[RelayResult, int]:
    result = RelayResult(rounds=1)
    events = _claim(batch_size=batch_size, now=now)
    if not events:
        return result, 0
    try:
        outcomes = publisher.publish(events)
    except BaseException:
        _release(events, now=now)
        raise
    # When the publisher confirmed, not when the round began: a stream's recovery re-publishes
    # events by this time (sagas.streams), so it must not be earlier than the publication.
    published_at = timezone.now()
    with transaction.atomic():
        published = [event.pk for event, error in zip(events, outcomes, strict=True) if error is None]
        _mark_published(published, published_at=published_at, awaiting=awaiting_consumers(outcomes))
        result.published = len(published)
        sent = [event for event, error in zip(events, outcomes, strict=True) if error is None]
        metrics.after_commit(lambda: metrics.outbox_published(sent, now=published_at))
        record_of(outcomes)()  # what the publisher commits with the marks (stream positions)
        deferred = [event.pk for event, error in zip(events, outcomes, strict=True) if isinstance(error, PublishDeferred)]
        if deferred:
            sql.outbox_update(deferred, unpublished_only=True, next_attempt_at=now + DEFER)
            result.deferred = len(deferred)
        for event, error in zip(events, outcomes, strict=True):
            if error is not None and not isinstance(error, PublishDeferred):
                _record_failure(event, error, policy=policy, now=now, result=result)
    return result, len(events)


def _mark_published(sequences: list[int], *, published_at: datetime, awaiting: frozenset[int]) -> None:
    """Mark these events published, those still unpublished (a relay that outlived its lease may
    find them published already). One that no in-process consumer was sent needs nothing from
    the redelivery sweep: consumed as it is published; the others stay watched until the sweep
    finds that each of their consumers has handled them (sagas.consumers)."""
    done = {"published_at": published_at, "next_attempt_at": None}
    sql.outbox_update([s for s in sequences if s not in awaiting], unpublished_only=True, consumed_at=published_at, **done)
    sql.outbox_update([s for s in sequences if s in awaiting], unpublished_only=True, **done)


def _claim(*, batch_size: int, now: datetime) -> list[OutboxEvent]:
    """Lease up to batch_size due heads to this relay; [] when none is due. Looks with a plain
    read first: with nothing due no write transaction is begun, which on SQLite takes the
    database's write lock (transaction_mode IMMEDIATE).

    Heads another relay is claiming right now are skipped (SKIP LOCKED), so several relays take
    different batches; when the oldest batch_size unpublished events yield too few heads (other
    relays hold them, or aggregates held back fill them), a longer stretch is read."""
    if not due(now).exists():
        return []
    with transaction.atomic():
        if connection.vendor == "postgresql":
            # A claim lost in a crash only makes its events claimable again at once: its commit
            # need not wait for the disk (SQLite's synchronous=NORMAL does not either).
            with connection.cursor() as cursor:
                cursor.execute("SET LOCAL synchronous_commit = off")
        events: list[OutboxEvent] = []
        tried: set[int] = set()
        scan = batch_size
        while True:
            found, more = heads(now=now, scan=scan)
            untried = [sequence for sequence in found if sequence not in tried]
            while untried and len(events) < batch_size:
                chunk, untried = untried[: batch_size - len(events)], untried[batch_size - len(events) :]
                tried.update(chunk)
                events += sql.outbox_lock_due(chunk, now=now)
            if len(events) >= batch_size or not more:
                break
            scan *= 4
        sql.outbox_update([event.pk for event in events], next_attempt_at=now + CLAIM_LEASE)
    return events


def _release(events: list[OutboxEvent], *, now: datetime) -> None:
    """The publisher raised: the batch is claimable again at once, no attempt counted. If the
    database cannot be reached either, the lease runs out instead."""
    try:
        OutboxEvent.objects.filter(
            pk__in=[event.pk for event in events], published_at__isnull=True, next_attempt_at=now + CLAIM_LEASE
        ).update(next_attempt_at=now)
    except DatabaseError:
        log.warning("outbox_claim_not_released events=%s: claimable again in %s", len(events), CLAIM_LEASE)


def _record_failure(event: OutboxEvent, error: BaseException, *, policy: Retry, now: datetime, result: RelayResult) -> None:
    event.attempts += 1
    event.last_error = f"{type(error).__name__}: {error}"[:2000]
    if event.attempts >= policy.max_attempts:
        event.dead_lettered_at = now
        result.dead_lettered += 1
        log.error(
            "outbox_dead_lettered event=%s type=%s aggregate=%s:%s attempts=%s error=%s",
            event.id, event.event_type, event.aggregate_type, event.aggregate_id, event.attempts, event.last_error,
        )
    else:
        event.next_attempt_at = now + timedelta(seconds=policy.delay(event.attempts))
        result.failed += 1
        log.warning(
            "outbox_publish_failed event=%s aggregate=%s:%s attempt=%s retry_at=%s error=%s",
            event.id, event.aggregate_type, event.aggregate_id, event.attempts, event.next_attempt_at, event.last_error,
        )
    OutboxEvent.objects.filter(pk=event.pk, published_at__isnull=True).update(
        attempts=event.attempts, last_error=event.last_error, next_attempt_at=event.next_attempt_at, dead_lettered_at=event.dead_lettered_at
    )


def outbox_replay(*, event_ids) -> int:
    """Take dead-lettered events out of the dead letter with a fresh retry budget. Returns how many."""
    return OutboxEvent.objects.filter(pk__in=event_ids, dead_lettered_at__isnull=False, published_at__isnull=True).update(
        dead_lettered_at=None, attempts=0, next_attempt_at=None
    )


def outbox_cleanup(
    *, now: datetime | None = None, retention: timedelta | None = None, batch_size: int | None = None, time_budget: float | None = None
) -> PruneRun:
    """Delete events published longer ago than the retention period, never an unpublished one:
    oldest first through outbox_published_idx, in batches of `batch_size` (each its own short
    transaction) for at most `time_budget` seconds; the next run goes on where this one stopped."""
    now = now or timezone.now()
    cutoff = now - (retention or timedelta(hours=settings.OUTBOX_RETENTION_HOURS))
    expired = OutboxEvent.objects.filter(published_at__isnull=False, published_at__lt=cutoff)

    def delete_batch(size: int) -> int:
        with transaction.atomic():
            sequences = oldest_batch(expired, order_by="published_at", size=size)
            OutboxEvent.objects.filter(pk__in=sequences).delete()
        return len(sequences)

    return prune_in_batches(delete_batch, batch_size=batch_size, time_budget=time_budget)
