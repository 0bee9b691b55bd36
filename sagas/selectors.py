from sagas.models import SagaInstance, StepExecution


def saga_timeline(saga: SagaInstance) -> list[StepExecution]:
    """Every step and compensation of the saga in the order they started; not started yet: last.
    Uses a prefetched `steps` when the caller prefetched it."""
    return sorted(saga.steps.all(), key=lambda e: (e.started_at is None, e.started_at, e.direction, e.position))


def outbox_stats(*, now) -> dict:
    """Backlog (unpublished, not parked), age in seconds of the oldest of it, events published in
    the last minute per second, and dead-lettered count."""
    from datetime import timedelta

    from django.db.models import Count, Min, Q

    from sagas.models import OutboxEvent

    stats = OutboxEvent.objects.aggregate(
        backlog=Count("pk", filter=Q(published_at__isnull=True, dead_lettered_at__isnull=True)),
        oldest=Min("created_at", filter=Q(published_at__isnull=True, dead_lettered_at__isnull=True)),
        dead_lettered=Count("pk", filter=Q(published_at__isnull=True, dead_lettered_at__isnull=False)),
        last_minute=Count("pk", filter=Q(published_at__gte=now - timedelta(minutes=1))),
    )
    return {
        "backlog": stats["backlog"],
        "oldest_unpublished_age_s": round((now - stats["oldest"]).total_seconds(), 3) if stats["oldest"] else 0.0,
        "published_per_s": round(stats["last_minute"] / 60, 2),
        "dead_lettered": stats["dead_lettered"],
    }
