"""Reads over the saga log and the outbox: timelines, backlog, and what the soak checks."""

from datetime import timedelta

from django.conf import settings
from django.db.models import Count, Exists, F, Min, OuterRef, Q, Sum

from sagas.models import (
    ACTIVE_STATES,
    ConsumerDelivery,
    Direction,
    InboxMessage,
    OutboxEvent,
    OutboxStream,
    RejectedMessage,
    SagaInstance,
    SagaState,
    StepExecution,
    StepState,
)


def saga_timeline(saga: SagaInstance) -> list[StepExecution]:
    """Every step and compensation of the saga in the order they started; not started yet: last.
    Uses a prefetched `steps` when the caller prefetched it."""
    return sorted(saga.steps.all(), key=lambda e: (e.started_at is None, e.started_at, e.direction, e.position))


def sagas_stuck(*, now, sagas=None):
    """Unfinished sagas that made no progress within their step timeout (plus SAGAS_STUCK_GRACE):
    what the sweeper re-drives and health counts as overdue. Read through saga_stuck_idx."""
    sagas = SagaInstance.objects.all() if sagas is None else sagas
    return sagas.filter(state__in=ACTIVE_STATES, stuck_after__lt=now)


def sagas_newest_first(
    *, states=None, name: str | None = None, stuck_at=None, before: SagaInstance | None = None, limit: int
) -> list[SagaInstance]:
    """One page of sagas, newest first by (created_at, id), optionally of these states, of this
    name, stuck at `stuck_at`, and older than `before` (the last saga of the previous page).
    Bounded by `limit` and read in saga_created_idx's order (or from saga_stuck_idx for a narrow
    filter), so a page costs the same at millions of sagas: no OFFSET, no COUNT."""
    sagas = SagaInstance.objects.all()
    if states:
        sagas = sagas.filter(state__in=list(states))
    if name:
        sagas = sagas.filter(name=name)
    if stuck_at is not None:
        sagas = sagas_stuck(now=stuck_at, sagas=sagas)
    if before is not None:
        # (created_at, id) < before's, with created_at <= before's spelled out: that half bounds
        # the index scan (the OR alone is a filter read from the newest saga on: 240 ms at a million).
        older = Q(created_at__lt=before.created_at) | Q(id__lt=before.id)
        sagas = sagas.filter(Q(created_at__lte=before.created_at) & older)
    return list(sagas.order_by("-created_at", "-id")[:limit])


def saga_last_errors(saga_ids) -> dict:
    """saga id -> (step, direction, last error) of its step or compensation that failed or retried
    most recently, for the sagas that have one: what went wrong last, one grouped read by saga_id."""
    rows = (
        StepExecution.objects.filter(saga_id__in=list(saga_ids))
        .exclude(last_error="")
        .values_list("saga_id", "name", "direction", "last_error", "started_at", "finished_at")
    )
    latest: dict = {}
    for saga_id, name, direction, error, started_at, finished_at in rows:
        moment = finished_at or started_at
        if saga_id not in latest or (moment and (latest[saga_id][0] is None or moment > latest[saga_id][0])):
            latest[saga_id] = (moment, (name, direction, error))
    return {saga_id: entry for saga_id, (_, entry) in latest.items()}


def outbox_stats(*, now) -> dict:
    """Backlog (unpublished, not parked), age in seconds of the oldest of it, events published in
    the last minute per second, and dead-lettered count."""
    # Two reads, each through its own index (outbox_unpublished_idx, outbox_published_idx): one
    # aggregate with FILTERs over the whole table would read every retained event for each call.
    stats = outbox_unpublished().aggregate(
        backlog=Count("pk", filter=Q(dead_lettered_at__isnull=True)),
        oldest=Min("created_at", filter=Q(dead_lettered_at__isnull=True)),
        dead_lettered=Count("pk", filter=Q(dead_lettered_at__isnull=False)),
    )
    last_minute = OutboxEvent.objects.filter(published_at__gte=now - timedelta(minutes=1)).count()
    return {
        "backlog": stats["backlog"],
        "oldest_unpublished_age_s": round((now - stats["oldest"]).total_seconds(), 3) if stats["oldest"] else 0.0,
        "published_per_s": round(last_minute / 60, 2),
        "dead_lettered": stats["dead_lettered"],
    }


def sagas_unfinished(sagas=None):
    """Sagas that are not finished: still active, or FAILED without a recorded reason."""
    sagas = SagaInstance.objects.all() if sagas is None else sagas
    return sagas.filter(Q(state__in=ACTIVE_STATES) | Q(state=SagaState.FAILED, failure_reason=""))


def outbox_unpublished():
    """Committed events not published yet, the dead-lettered ones included."""
    return OutboxEvent.objects.filter(published_at__isnull=True)


def consumer_inbox_gaps() -> list[tuple[str, str, str]]:
    """(consumer, event id, event type) for each published event that a subscribed in-process
    consumer has not handled (no inbox row): a delivery that is lost, or still on its way."""
    from sagas.consumers import subscriptions

    gaps = []
    for sub in subscriptions():
        handled = InboxMessage.objects.filter(consumer=sub.consumer, event_id=OuterRef("id"))
        missing = sub.matching(OutboxEvent.objects.filter(published_at__isnull=False)).exclude(Exists(handled))
        gaps += [(sub.consumer, str(event_id), event_type) for event_id, event_type in missing.values_list("id", "event_type")]
    return gaps


def consumer_duplicates_absorbed() -> int:
    """Deliveries of an event to a consumer beyond the first (redelivered, republished, retried),
    which the consumer's inbox turned into no-ops."""
    extra = ConsumerDelivery.objects.filter(deliveries__gt=1).aggregate(n=Sum(F("deliveries") - 1))["n"]
    return extra or 0


def outbox_repeated_events(*, aggregate_type: str, event_types) -> list[tuple[str, str, int]]:
    """(aggregate id, event type, count) for each of these event types emitted more than once for
    one aggregate: an effect that ran twice, which no inbox absorbed."""
    return list(
        OutboxEvent.objects.filter(aggregate_type=aggregate_type, event_type__in=list(event_types))
        .values("aggregate_id", "event_type")
        .annotate(n=Count("pk"))
        .filter(n__gt=1)
        .values_list("aggregate_id", "event_type", "n")
    )


def outbox_stream_gaps(*, published_after=None, client=None) -> dict:
    """Against the Redis streams (settings.REDIS_URL): the published events (all of them, or those
    published after `published_after`) missing from their stream `events.<aggregate_type>`, and
    how many stream entries repeat an event (at least once: consumers dedupe by id)."""
    import redis

    from sagas.publishers import destination

    client = client or redis.Redis.from_url(settings.REDIS_URL)
    expected = OutboxEvent.objects.filter(published_at__isnull=False)
    if published_after is not None:
        expected = expected.filter(published_at__gt=published_after)
    expected = list(expected.only("id", "aggregate_type"))
    streams = {destination(event) for event in expected}
    seen: dict[str, int] = {}
    for stream in streams:
        for _, fields in client.xrange(stream):
            event_id = fields[b"id"].decode()
            seen[event_id] = seen.get(event_id, 0) + 1
    missing = [str(event.id) for event in expected if str(event.id) not in seen]
    return {"checked": len(expected), "missing": missing, "repeated_entries": sum(n - 1 for n in seen.values())}


def outbox_stream_recoveries() -> dict[str, int]:
    """How often the relay found a Redis stream that had lost entries, and how many events it
    published again to repair them (sagas.streams)."""
    totals = OutboxStream.objects.aggregate(recoveries=Sum("recoveries"), republished=Sum("republished"))
    return {"recoveries": totals["recoveries"] or 0, "republished": totals["republished"] or 0}


def saga_recovery_counts(sagas=None) -> dict[str, int]:
    """How much recovery these sagas needed: step deliveries that never finished (worker lost,
    database gone), and re-drives by the sweeper (lost messages)."""
    sagas = SagaInstance.objects.all() if sagas is None else sagas
    lost = StepExecution.objects.filter(saga__in=sagas, deliveries__gt=F("attempts")).aggregate(
        n=Sum(F("deliveries") - F("attempts"))
    )["n"]
    redrives = sagas.aggregate(sagas=Count("pk", filter=Q(redrives__gt=0)), total=Sum("redrives"))
    return {
        "step deliveries that never finished (re-run)": lost or 0,
        "sagas re-driven by the sweeper": redrives["sagas"] or 0,
        "re-drives": redrives["total"] or 0,
    }


def saga_step_order_violations(sagas=None) -> list[str]:
    """What the saga log shows ran out of turn (rule 13), one line per saga and problem: a forward
    step COMPLETED while an earlier one is not, forward steps that completed in another order than
    their positions, and a compensation that ran for a step that never took effect (neither
    COMPLETED nor FAILED with an uncertain outcome)."""
    sagas = SagaInstance.objects.all() if sagas is None else sagas
    rows = StepExecution.objects.filter(saga__in=sagas).order_by("saga_id", "position").values_list(
        "saga_id", "name", "position", "direction", "state", "finished_at", "outcome_uncertain"
    )
    by_saga: dict = {}
    for saga_id, *row in rows:
        by_saga.setdefault(saga_id, []).append(row)
    violations = []
    for saga_id, steps in by_saga.items():
        forward = [s for s in steps if s[2] == Direction.FORWARD]
        took_effect = {name for name, _, _, state, _, uncertain in forward
                       if state == StepState.COMPLETED or (state == StepState.FAILED and uncertain)}
        not_done = None
        last_finished = None
        for name, _, _, state, finished_at, _ in forward:
            if state != StepState.COMPLETED:
                not_done = not_done or (name, state)
                continue
            if not_done:
                violations.append(f"saga {saga_id}: {name} COMPLETED while the earlier {not_done[0]} is {not_done[1]}")
            if last_finished and finished_at and finished_at < last_finished[1]:
                violations.append(f"saga {saga_id}: {name} completed before the earlier {last_finished[0]}")
            last_finished = (name, finished_at) if finished_at else last_finished
        for name, _, direction, state, _, _ in steps:
            if direction == Direction.COMPENSATE and state != StepState.PENDING and name not in took_effect:
                violations.append(f"saga {saga_id}: compensation of {name} is {state} but {name} never took effect")
    return violations


def rejected_message_counts(tokens) -> dict[str, int]:
    """How many RejectedMessage rows carry each token (sagas.testing.poison): a message a worker
    refused is recorded once."""
    tokens = list(tokens)
    if not tokens:
        return {}
    anyone = Q()
    for token in tokens:
        anyone |= Q(body__contains=token)
    bodies = list(RejectedMessage.objects.filter(anyone).values_list("body", flat=True))
    return {token: sum(token in body for body in bodies) for token in tokens}
