"""Publish retained outbox events to their Redis streams again, by hand.

    python manage.py outbox_replay --since 2h                                   # every stream
    python manage.py outbox_replay --since 2026-11-25T08:00:00Z --stream events.order

Every event published at or after --since (an ISO 8601 time, UTC unless it says otherwise, or a
duration back from now: 90s, 15m, 2h, 7d) and still retained (OUTBOX_RETENTION_HOURS) is added to
its stream again, in sequence order. The relay does this by itself when it finds that a stream lost
entries (sagas.streams); this is for a loss it cannot see, e.g. a stream restored from an old
backup. Consumers dedupe by event id, so events they already have are no-ops.
"""

import re
from datetime import UTC, datetime, timedelta

from django.conf import settings
from django.core.management.base import BaseCommand, CommandError
from django.utils import timezone

from sagas.models import OutboxEvent
from sagas.publishers import STREAM_PREFIX
from sagas.streams import stream_republish

DURATION = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([smhd])\s*$")
UNITS = {"s": "seconds", "m": "minutes", "h": "hours", "d": "days"}


def parse_since(text: str, *, now: datetime) -> datetime:
    """An aware datetime from an ISO 8601 time (naive: UTC) or a duration before `now`; ValueError."""
    if match := DURATION.match(text):
        return now - timedelta(**{UNITS[match[2]]: float(match[1])})
    when = datetime.fromisoformat(text.strip())
    return when if timezone.is_aware(when) else when.replace(tzinfo=UTC)


class Command(BaseCommand):
    help = "Publish retained outbox events to their Redis streams again (consumers dedupe by event id)."

    def add_arguments(self, parser):
        parser.add_argument("--since", required=True, help="ISO 8601 time (e.g. 2026-11-25T08:00:00Z) or a duration ago (90s, 15m, 2h, 7d)")
        parser.add_argument("--stream", default=None, help="only this stream, e.g. events.order (default: every stream)")

    def handle(self, *args, since, stream, **options):
        if not settings.REDIS_URL:
            raise CommandError("REDIS_URL is not set: the event streams live in Redis")
        try:
            since_at = parse_since(since, now=timezone.now())
        except ValueError:
            raise CommandError(f"--since {since!r}: give an ISO 8601 time or a duration such as 90s, 15m, 2h, 7d") from None
        retained = OutboxEvent.objects.filter(published_at__isnull=False, published_at__gte=since_at)
        if stream is not None:
            if not stream.startswith(STREAM_PREFIX) or stream == STREAM_PREFIX:
                raise CommandError(f"--stream {stream!r}: the outbox streams are named {STREAM_PREFIX}<aggregate type>")
            aggregate_types = [stream.removeprefix(STREAM_PREFIX)]
        else:
            aggregate_types = sorted(set(retained.values_list("aggregate_type", flat=True)))
        import redis

        client = redis.Redis.from_url(settings.REDIS_URL)
        self.stdout.write(f"publishing again the events published since {since_at.isoformat()}")
        total = 0
        for aggregate_type in aggregate_types:
            name = f"{STREAM_PREFIX}{aggregate_type}"
            count, _ = stream_republish(
                client,
                stream=name,
                aggregate_type=aggregate_type,
                since=since_at,
                maxlen=settings.OUTBOX_STREAM_MAXLEN,
                batch_size=settings.OUTBOX_BATCH_SIZE,
                progress=lambda done, of, name=name: self.stdout.write(f"{name}: {done}/{of}"),
            )
            total += count
        self.stdout.write(f"published {total} event(s) again to {len(aggregate_types)} stream(s)")
