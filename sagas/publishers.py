"""Where the outbox relay sends events. A publisher is anything with

    name: str
    def publish(self, events: Sequence[OutboxEvent]) -> list[BaseException | None]

returning one outcome per event, in order (None: published). It must not raise for a failed
event; the relay backs that event off and, after too many tries, dead-letters it. Publishing
is at least once: the relay may hand the same event over again after a crash, so consumers
dedupe by `event.id`. A Kafka publisher would produce to topic `events.<aggregate_type>` keyed
by `aggregate_id` and plug in through settings.OUTBOX_PUBLISHER without touching the relay.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from functools import cache

from django.conf import settings
from django.core.serializers.json import DjangoJSONEncoder
from django.utils.module_loading import import_string

from sagas.models import OutboxEvent


def destination(event: OutboxEvent) -> str:
    """Routed by aggregate type, like Debezium's outbox EventRouter."""
    return f"events.{event.aggregate_type}"


def message(event: OutboxEvent) -> dict[str, str]:
    """The wire form: the key (aggregate id) and the event's id and type travel with the payload."""
    return {
        "id": str(event.id),
        "type": event.event_type,
        "aggregate_type": event.aggregate_type,
        "aggregate_id": event.aggregate_id,
        "sequence": str(event.sequence),
        "created_at": event.created_at.isoformat(),
        "payload": json.dumps(event.payload, cls=DjangoJSONEncoder),
    }


class RedisStreamPublisher:
    """XADD each event to the stream `events.<aggregate_type>`, capped near `maxlen` entries."""

    name = "redis-streams"

    def __init__(self, url: str | None = None, *, maxlen: int | None = None):
        import redis

        self._redis = redis
        self.client = redis.Redis.from_url(url or settings.REDIS_URL)
        self.maxlen = maxlen or settings.OUTBOX_STREAM_MAXLEN

    def publish(self, events: Sequence[OutboxEvent]) -> list[BaseException | None]:
        pipe = self.client.pipeline(transaction=False)
        for event in events:
            pipe.xadd(destination(event), message(event), maxlen=self.maxlen, approximate=True)
        try:
            results = pipe.execute(raise_on_error=False)
        except self._redis.RedisError as exc:
            return [exc] * len(events)
        return [r if isinstance(r, BaseException) else None for r in results]


class ConsumerTaskPublisher:
    """Hand each event to the in-process consumers subscribed to its type, one Celery task per
    consumer (see sagas.consumers). With no subscriber, an event is simply marked published."""

    name = "consumer-tasks"

    def publish(self, events: Sequence[OutboxEvent]) -> list[BaseException | None]:
        from kombu.exceptions import OperationalError

        from sagas.consumers import deliver

        outcomes: list[BaseException | None] = []
        for event in events:
            try:
                deliver(event)
                outcomes.append(None)
            except OperationalError as exc:
                outcomes.append(exc)
        return outcomes


class AllPublishers:
    """Publish to each of several publishers; an event fails if any of them failed it, and its
    retry goes to all of them again (at least once, everywhere)."""

    def __init__(self, publishers: Sequence):
        self.publishers = list(publishers)
        self.name = "+".join(p.name for p in self.publishers)

    def publish(self, events: Sequence[OutboxEvent]) -> list[BaseException | None]:
        outcomes: list[BaseException | None] = [None] * len(events)
        for publisher in self.publishers:
            for n, error in enumerate(publisher.publish(events)):
                outcomes[n] = outcomes[n] or error
        return outcomes


@cache
def configured_publisher():
    """settings.OUTBOX_PUBLISHER: a comma-separated list of "redis", "consumers" or dotted paths
    to publisher classes."""
    named = {"redis": RedisStreamPublisher, "consumers": ConsumerTaskPublisher}
    choices = [c.strip() for c in settings.OUTBOX_PUBLISHER.split(",") if c.strip()]
    publishers = [named[c]() if c in named else import_string(c)() for c in choices]
    return publishers[0] if len(publishers) == 1 else AllPublishers(publishers)
