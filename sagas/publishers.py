"""Where the outbox relay sends events. A publisher is anything with

    name: str
    def publish(self, events: Sequence[OutboxEvent]) -> list[BaseException | None]

returning one outcome per event, in order (None: published). The relay calls it outside any
transaction. It must not raise for a failed event; the relay backs that event off and, after too many tries, dead-letters it. An outcome
that is a PublishDeferred is not a failure: the event is tried again a second later, no attempt
counted. Publishing is at least once: the relay may hand the same event over again after a
crash, so consumers dedupe by `event.id`. A Kafka publisher would produce to topic
`events.<aggregate_type>` keyed by `aggregate_id` and plug in through settings.OUTBOX_PUBLISHER
without touching the relay. What the publisher must commit together with the relay's marks
(the stream positions of RedisStreamPublisher) it returns as an `Outcomes` list whose `record`
the relay calls inside the transaction that marks the batch published. The events it handed to
in-process consumers (ConsumerTaskPublisher) it names in `Outcomes.awaiting`: the consumers'
redelivery sweep watches those until each consumer has handled them; any other event is marked
consumed as it is marked published (OutboxEvent.consumed_at).

A publisher may also have

    def verify(self, *, force: bool = False) -> int

which the relay calls at the start of each run and, with force=True, after a round in which the publisher deferred events: check that what was published is still
there and publish again what was lost (returns how many events). Without force the publisher
decides how often it really looks.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable, Iterable, Sequence
from functools import cache

from django.conf import settings
from django.core.serializers.json import DjangoJSONEncoder
from django.utils import timezone
from django.utils.module_loading import import_string

from sagas import streams
from sagas.models import OutboxEvent

log = logging.getLogger("sagas.outbox")


class Outcomes(list):
    """publish()'s outcomes, with `record()`: writes that must commit in the relay's transaction
    marking the batch published, not before it (see RedisStreamPublisher); and `awaiting`: the
    primary keys of the events handed to in-process consumers (see ConsumerTaskPublisher)."""

    def __init__(self, outcomes=(), *, record: Callable[[], None] | None = None, awaiting: Iterable[int] = ()):
        super().__init__(outcomes)
        self.record = record or (lambda: None)
        self.awaiting = frozenset(awaiting)


def record_of(outcomes) -> Callable[[], None]:
    """What to call in the marking transaction for these outcomes (nothing for a plain list)."""
    return getattr(outcomes, "record", None) or (lambda: None)


def awaiting_consumers(outcomes) -> frozenset[int]:
    """The events these outcomes handed to in-process consumers (none for a plain list)."""
    return getattr(outcomes, "awaiting", frozenset())


class PublishDeferred(Exception):
    """An event the publisher did not publish yet, through no fault of its own: try again soon."""


class StreamLost(PublishDeferred):
    """The Redis stream lost entries: its batch waits until the retained events are in it again."""


STREAM_PREFIX = "events."


def destination(event: OutboxEvent) -> str:
    """Routed by aggregate type, like Debezium's outbox EventRouter."""
    return f"{STREAM_PREFIX}{event.aggregate_type}"


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
    """XADD each event to the stream `events.<aggregate_type>`, capped near `maxlen` entries, and
    make sure a stream that lost entries gets them back (sagas.streams).

    Per round: one SELECT of the streams' remembered entries, one pipelined round trip (a checked
    append script per stream), and one upsert of the new remembered entries, in the relay's
    transaction that marks the batch published (Outcomes.record)."""

    name = "redis-streams"

    def __init__(self, url: str | None = None, *, maxlen: int | None = None):
        import redis

        self._redis = redis
        self.client = redis.Redis.from_url(url or settings.REDIS_URL, socket_connect_timeout=2, socket_timeout=5)  # a frozen Redis fails the round, not the relay
        self.maxlen = maxlen or settings.OUTBOX_STREAM_MAXLEN
        self._next_verify = 0.0  # time.monotonic() of the next unforced check

    def publish(self, events: Sequence[OutboxEvent]) -> list[BaseException | None]:
        batches: dict[str, list[OutboxEvent]] = {}
        for event in events:
            batches.setdefault(destination(event), []).append(event)
        remembered = streams.positions(batches)
        pipe = self.client.pipeline(transaction=False)
        for stream, batch in batches.items():
            streams.append(
                pipe, stream=stream, last_entry_id=remembered.get(stream, ""), messages=[message(e) for e in batch], maxlen=self.maxlen
            )
        try:
            results = pipe.execute(raise_on_error=False)
        except self._redis.RedisError as exc:
            return [exc] * len(events)
        outcome: dict[str, BaseException | None] = {}
        written: dict[str, tuple[str, str]] = {}
        for (stream, batch), result in zip(batches.items(), results, strict=True):
            if isinstance(result, BaseException):
                outcome[stream] = result
            elif (ids := streams.appended_ids(result)) is None:
                outcome[stream] = StreamLost(f"{stream} no longer holds entry {remembered[stream]}")
                log.warning("outbox_stream_lost stream=%s last_entry=%s: %s events deferred", stream, remembered[stream], len(batch))
            else:
                outcome[stream] = None
                written[stream] = (batch[0].aggregate_type, ids[-1])
        # Recorded with the relay's marks, in one transaction: a recovery that runs meanwhile then
        # sees both or neither (sagas.streams), never a position whose events are not yet published.
        return Outcomes(
            [outcome[destination(event)] for event in events],
            record=lambda: streams.positions_record(written, now=timezone.now()),
        )

    def verify(self, *, force: bool = False) -> int:
        """Look for streams that lost entries and publish the retained events to them again: when
        forced, else at most every OUTBOX_STREAM_CHECK_INTERVAL seconds. Returns how many events."""
        if not force and time.monotonic() < self._next_verify:
            return 0
        self._next_verify = time.monotonic() + settings.OUTBOX_STREAM_CHECK_INTERVAL
        try:
            return streams.streams_verify(self.client, maxlen=self.maxlen, batch_size=settings.OUTBOX_BATCH_SIZE)
        except self._redis.RedisError as exc:
            log.warning("outbox_stream_check_failed error=%s: checked again on a later run", exc)
            return 0


class ConsumerTaskPublisher:
    """Hand each event to the in-process consumers subscribed to its type, one Celery task per
    consumer (see sagas.consumers). With no subscriber, an event is simply marked published (and
    consumed: the redelivery sweep watches only the events it sent to a consumer)."""

    name = "consumer-tasks"

    def publish(self, events: Sequence[OutboxEvent]) -> list[BaseException | None]:
        from kombu.exceptions import OperationalError

        from sagas.consumers import deliver

        outcomes: list[BaseException | None] = []
        awaiting = []
        for event in events:
            try:
                if deliver(event):
                    awaiting.append(event.pk)
                outcomes.append(None)
            except OperationalError as exc:
                outcomes.append(exc)
        return Outcomes(outcomes, awaiting=awaiting)


class AllPublishers:
    """Publish to each of several publishers; an event fails if any of them failed it, and its
    retry goes to all of them again (at least once, everywhere)."""

    def __init__(self, publishers: Sequence):
        self.publishers = list(publishers)
        self.name = "+".join(p.name for p in self.publishers)

    def publish(self, events: Sequence[OutboxEvent]) -> list[BaseException | None]:
        outcomes: list[BaseException | None] = [None] * len(events)
        records, awaiting = [], set()
        for publisher in self.publishers:
            published = publisher.publish(events)
            records.append(record_of(published))
            awaiting |= awaiting_consumers(published)
            for n, error in enumerate(published):
                outcomes[n] = outcomes[n] or error
        return Outcomes(outcomes, record=lambda: [record() for record in records], awaiting=awaiting)

    def verify(self, *, force: bool = False) -> int:
        return sum(publisher.verify(force=force) for publisher in self.publishers if hasattr(publisher, "verify"))


@cache
def configured_publisher():
    """settings.OUTBOX_PUBLISHER: a comma-separated list of "redis", "consumers" or dotted paths
    to publisher classes."""
    named = {"redis": RedisStreamPublisher, "consumers": ConsumerTaskPublisher}
    choices = [c.strip() for c in settings.OUTBOX_PUBLISHER.split(",") if c.strip()]
    publishers = [named[c]() if c in named else import_string(c)() for c in choices]
    return publishers[0] if len(publishers) == 1 else AllPublishers(publishers)
