"""Event consumers: a registry of handlers, each run as a Celery task behind an inbox.

    @subscribe("payments", events=["ORDER_CREATED"])
    def charge_for_order(event: ConsumedEvent) -> None:
        ...  # runs once per event id, in the same transaction as the inbox row

Handlers live in an app's `consumers.py` (imported at start-up). Delivery is at least once; the
inbox row (unique consumer + event id) makes a duplicate delivery a no-op.
"""

from __future__ import annotations

import contextlib
import json
import logging
import uuid
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any

from celery import signature
from django.db import transaction
from django.db.models import F, QuerySet
from django.utils import timezone
from django.utils.dateparse import parse_datetime

from sagas import metrics, sql
from sagas.counting import Counting
from sagas.models import ConsumerDelivery, InboxMessage, OutboxEvent, ParkedDelivery

log = logging.getLogger("sagas.consumers")


@dataclass(frozen=True)
class ConsumedEvent:
    id: str
    type: str
    aggregate_type: str
    aggregate_id: str
    sequence: int
    created_at: datetime
    payload: Mapping[str, Any]

    @classmethod
    def from_message(cls, message: Mapping[str, str]) -> ConsumedEvent:
        """From the wire form (sagas.publishers.message), as read from a task or a Redis stream."""
        return cls(
            id=message["id"],
            type=message["type"],
            aggregate_type=message["aggregate_type"],
            aggregate_id=message["aggregate_id"],
            sequence=int(message["sequence"]),
            created_at=parse_datetime(message["created_at"]),
            payload=json.loads(message["payload"]),
        )


Handler = Callable[[ConsumedEvent], None]


GiveUp = Callable[[ConsumedEvent, str], None]


@dataclass(frozen=True)
class Subscription:
    consumer: str
    events: frozenset[str]
    handler: Handler
    # Payload fields an event must have, with these values, to be delivered to this consumer.
    where: Mapping[str, Any] = field(default_factory=dict)
    # Called as on_give_up(event, reason) when the consumer gives up on an event, in the
    # transaction that parks it: settle what the handler may have left half done (a charge whose
    # answer was lost: refund it by its key, tell the others). Raising leaves the event unparked,
    # to be delivered and given up on again later.
    on_give_up: GiveUp | None = None
    # The handler runs in the inbox row's transaction and its atomic blocks make no savepoint (if
    # anything raises, it all rolls back anyway); a handler that catches a database error and goes
    # on needs them: subscribe(..., savepoints=True).
    savepoints: bool = False

    def wants(self, event_type: str, payload: Mapping[str, Any]) -> bool:
        return event_type in self.events and all(payload.get(key) == value for key, value in self.where.items())

    def matching(self, events: QuerySet[OutboxEvent]) -> QuerySet[OutboxEvent]:
        """The OutboxEvents of `events` this consumer wants."""
        return events.filter(event_type__in=self.events, **{f"payload__{key}": value for key, value in self.where.items()})


_subscriptions: dict[str, Subscription] = {}


def subscribe(
    consumer: str,
    *,
    events: Iterable[str],
    where: Mapping[str, Any] | None = None,
    on_give_up: GiveUp | None = None,
    savepoints: bool = False,
) -> Callable[[Handler], Handler]:
    """Register `handler` as consumer `consumer` of these event types (one handler per consumer),
    optionally only of events whose payload has the fields in `where` with those values: other
    events are never sent to it (no task, no inbox row). `on_give_up`, `savepoints`: see Subscription."""

    def register(handler: Handler) -> Handler:
        existing = _subscriptions.get(consumer)
        if existing is not None and existing.handler.__qualname__ != handler.__qualname__:
            raise ValueError(f"consumer {consumer!r} is already registered to {existing.handler.__qualname__}")
        _subscriptions[consumer] = Subscription(consumer, frozenset(events), handler, dict(where or {}), on_give_up, savepoints)
        return handler

    return register


def subscriptions() -> list[Subscription]:
    """Every registered consumer, by name."""
    return [sub for _, sub in sorted(_subscriptions.items())]


def subscribers(event_type: str, payload: Mapping[str, Any] | None = None) -> list[str]:
    return sorted(name for name, sub in _subscriptions.items() if sub.wants(event_type, payload or {}))


def deliver(event: OutboxEvent) -> list[str]:
    """Send the event to each subscribed consumer as a `sagas.consume_event` task; returns their names."""
    consumers = subscribers(event.event_type, event.payload)
    for consumer in consumers:
        _send(consumer, event)
    return consumers


def message_problem(*, consumer, message) -> str:
    """What is wrong with a consume_event message, or "" when it names a registered consumer and
    carries an event in the wire form."""
    if not isinstance(consumer, str) or consumer not in _subscriptions:
        return f"no consumer {str(consumer)[:100]!r} is registered in this process"
    if not isinstance(message, Mapping):
        return "the event must be a JSON object in the wire form (sagas.publishers.message)"
    try:
        event = ConsumedEvent.from_message(message)
        uuid.UUID(event.id)
    except (KeyError, TypeError, ValueError, AttributeError) as exc:
        return f"the event is not in the wire form: {type(exc).__name__}: {exc}"
    if event.created_at is None or not isinstance(event.payload, Mapping):
        return "the event's created_at must be an ISO time and its payload a JSON object"
    return ""


def consume(
    *,
    consumer: str,
    message: Mapping[str, str],
    now: datetime | None = None,
    max_deliveries: int | None = None,
    counting: Counting = Counting.BEFORE,
) -> bool:
    """Run `consumer`'s handler for this event unless its inbox already has it. The inbox row and
    the handler's writes commit together. Returns False for a duplicate, an event type the consumer
    did not subscribe to, or (with max_deliveries) an event delivered more often than that without
    finishing, e.g. because its handler kills the worker. Raises what the handler raises.

    `counting` (sagas.counting): a first delivery over a transport that flags redeliveries is not
    counted at all (it finishes with an inbox row, or with an error, which is not a lost delivery);
    others are counted before the handler runs, with the death the broker tells of."""
    subscription = _subscriptions.get(consumer)
    if subscription is None:
        raise LookupError(f"no consumer {consumer!r} is registered in this process")
    event = ConsumedEvent.from_message(message)
    if not subscription.wants(event.type, event.payload):
        return False  # e.g. consume_events --handler reading a stream that carries other types too
    counted = max_deliveries is not None and counting.counts_first
    if counted and sql.consumer_delivery_count(consumer=consumer, event_id=event.id, deaths=counting.deaths) > max_deliveries:
        consumer_give_up(
            consumer=consumer, message=message, reason=f"delivered more than {max_deliveries} times without finishing", now=now
        )
        return False
    try:
        with transaction.atomic():
            if not sql.inbox_claim(consumer=consumer, event_id=event.id, event_type=event.type, received_at=now or timezone.now()):
                log.info("inbox_duplicate consumer=%s event=%s type=%s", consumer, event.id, event.type)
                return False
            # The handler's writes roll back with the inbox row if anything raises: no savepoints.
            with contextlib.nullcontext() if subscription.savepoints else sql.savepoints_off(f"consumer {consumer} (subscribe(..., savepoints=True))"):
                subscription.handler(event)
    except Exception:
        metrics.consumer_failed(consumer)
        if counted:
            _uncount_delivery(consumer, event.id)  # it finished, with an error: retries have their own budget
        raise
    return True


def consumer_give_up(*, consumer: str, message: Mapping[str, str], reason: str, now: datetime | None = None) -> bool:
    """Give up on this event for this consumer, once: park it (ParkedDelivery), write its inbox row
    (so neither a late delivery nor the redelivery sweep runs the handler again) and run the
    consumer's on_give_up settlement, all in one transaction. False when the event was handled
    or given up on already (the inbox row is the lock: a handler still running holds it).
    Raises what on_give_up raises; then nothing is parked."""
    subscription = _subscriptions[consumer]
    event = ConsumedEvent.from_message(message)
    now = now or timezone.now()
    with transaction.atomic():
        if not sql.inbox_claim(consumer=consumer, event_id=event.id, event_type=event.type, received_at=now):
            return False
        ParkedDelivery.objects.create(
            consumer=consumer, event_id=event.id, event_type=event.type, aggregate_type=event.aggregate_type,
            aggregate_id=event.aggregate_id, reason=reason[:2000], parked_at=now, settled=subscription.on_give_up is not None,
        )
        if subscription.on_give_up is not None:
            subscription.on_give_up(event, reason)
    metrics.consumer_gave_up(consumer)
    log.error(
        "consume_given_up consumer=%s event=%s type=%s aggregate=%s:%s settled=%s: %s",
        consumer, event.id, event.type, event.aggregate_type, event.aggregate_id, subscription.on_give_up is not None, reason,
    )
    return True


def consumer_replay(*, parked: ParkedDelivery) -> None:
    """Deliver a parked event to its consumer again with a fresh budget (after the cause was
    fixed). Raises OutboxEvent.DoesNotExist when the event is no longer retained."""
    event = OutboxEvent.objects.get(id=parked.event_id)
    with transaction.atomic():
        InboxMessage.objects.filter(consumer=parked.consumer, event_id=parked.event_id).delete()
        ConsumerDelivery.objects.filter(consumer=parked.consumer, event_id=parked.event_id).delete()
        parked.delete()
        OutboxEvent.objects.filter(pk=event.pk).update(consumed_at=None)  # watched again: its message may be lost too
        transaction.on_commit(lambda: _send(parked.consumer, event))
    log.warning("consume_replayed consumer=%s event=%s type=%s", parked.consumer, event.id, event.event_type)


def _uncount_delivery(consumer: str, event_id: str) -> None:
    ConsumerDelivery.objects.filter(consumer=consumer, event_id=event_id, deliveries__gt=0).update(deliveries=F("deliveries") - 1)


def consumers_redeliver(*, now: datetime, min_age: timedelta, window: timedelta, limit: int = 500, scan: int = 5000) -> int:
    """Send again each published event that a subscribed consumer has no inbox row for, published
    between `window` and `min_age` ago: its task message was lost (broker flush, a worker killed
    under the embedded broker) or its retries ran out. Safe because handlers sit behind the inbox.
    At most `limit` deliveries per consumer, oldest first. Returns how many deliveries it sent.

    It reads only the events it still watches (OutboxEvent.consumed_at empty, outbox_unconsumed_idx),
    at most `scan` of them: those the relay handed to consumers and not yet found handled. Each is
    closed once every consumer that wants it has handled it (or given up on it), or once it left
    the window. So a run costs what is live, not what the outbox retains (it read every event of
    the window once per consumer, 2.2 s at a million sagas: issue 15)."""
    watched = OutboxEvent.objects.filter(published_at__isnull=False, consumed_at__isnull=True)
    _close(watched.filter(published_at__lt=now - window).order_by("published_at").values("pk")[:scan], now=now)  # not sent again
    events = list(
        watched.filter(published_at__gte=now - window, published_at__lt=now - min_age).order_by("published_at", "sequence")[:scan]
    )
    lacking = _lacking(events)
    _close([event.pk for event in events if not lacking[event.pk]], now=now)
    sent = 0
    for name in sorted(_subscriptions):
        # In publication order, which keeps each aggregate's order: the relay publishes an event
        # only after the one before it.
        for event in [event for event in events if name in lacking[event.pk]][:limit]:
            _send(name, event, redelivery=True)
            sent += 1
    if sent:
        log.warning("consumers_redelivered count=%s", sent)
    return sent


def _lacking(events: list[OutboxEvent]) -> dict[int, set[str]]:
    """For each event, the consumers that want it and have no inbox row for it: one read of the
    inbox per consumer, through its unique (consumer, event id) index."""
    wanted = {event.pk: set(subscribers(event.event_type, event.payload)) for event in events}
    for name in sorted({name for names in wanted.values() for name in names}):
        ids = [event.id for event in events if name in wanted[event.pk]]
        handled = set(InboxMessage.objects.filter(consumer=name, event_id__in=ids).values_list("event_id", flat=True))
        for event in events:
            if event.id in handled:
                wanted[event.pk].discard(name)
    return wanted


def _close(pks: Iterable[int] | QuerySet, *, now: datetime) -> None:
    """The redelivery sweep no longer watches these events (primary keys, or a query of them)."""
    OutboxEvent.objects.filter(pk__in=pks).update(consumed_at=now)


def _send(consumer: str, event: OutboxEvent, *, redelivery: bool = False) -> None:
    from sagas.publishers import message

    kwargs = {"consumer": consumer, "message": message(event)}
    if redelivery:
        kwargs["redelivery"] = True
    signature("sagas.consume_event", kwargs=kwargs).apply_async()
