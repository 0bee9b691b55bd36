"""History retention: what the engine keeps of finished work, and for how long.

    sagas_prune(now=..., retention=timedelta(days=30))   # beat's sagas.prune_sagas
    inbox_prune(now=..., retention=timedelta(days=30))   # beat's sagas.prune_inbox

Settled sagas (COMPLETED or COMPENSATED) are deleted with their step rows a retention period
after they finished; never a FAILED saga (it waits for an operator) nor one still running. Inbox
rows are deleted with their delivery counts a retention period after they were received; published
outbox events by sagas.relay.outbox_cleanup. Each job deletes oldest first through an index, in
small batches, each its own short transaction, until nothing is left or its time budget is spent;
the next run goes on where it stopped. So a run's cost is bounded whatever the history, and two
beats running at once take different rows (SKIP LOCKED).

Domain apps prune their own tables with `prune_in_batches` and `oldest_batch`, and learn of each
saga about to be deleted through the `saga_pruning` signal, sent inside the transaction that
deletes it (orders keeps a summary of its saga on the order).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime, timedelta

from django.conf import settings
from django.db import transaction
from django.db.models import QuerySet
from django.dispatch import Signal

from sagas.models import SETTLED_STATES, ConsumerDelivery, InboxMessage, SagaInstance

# Sent with sagas=[SagaInstance, ...] (their fields loaded) in the transaction that deletes them,
# before the delete: a receiver that raises keeps the whole batch.
saga_pruning = Signal()


@dataclass
class PruneRun:
    deleted: int = 0
    batches: int = 0
    more: bool = False  # stopped at the time budget with rows left


def prune_in_batches(delete_batch: Callable[[int], int], *, batch_size: int | None = None, time_budget: float | None = None) -> PruneRun:
    """Call `delete_batch(batch_size)`, which deletes at most that many rows in a transaction of its
    own and returns how many, until a batch comes back short or `time_budget` seconds are spent
    (by default RETENTION_BATCH_SIZE and RETENTION_TIME_BUDGET)."""
    batch_size = batch_size or settings.RETENTION_BATCH_SIZE
    deadline = time.monotonic() + (settings.RETENTION_TIME_BUDGET if time_budget is None else time_budget)
    run = PruneRun()
    while True:
        deleted = delete_batch(batch_size)
        run.deleted += deleted
        run.batches += 1
        if deleted < batch_size:
            return run
        if time.monotonic() >= deadline:
            run.more = True
            return run


def oldest_batch(queryset: QuerySet, *, order_by: str, size: int) -> list:
    """The primary keys of the `size` rows of `queryset` first by `order_by`, locked, passing over
    rows another transaction holds. Inside transaction.atomic."""
    return list(queryset.order_by(order_by).select_for_update(skip_locked=True).values_list("pk", flat=True)[:size])


def prunable_sagas(*, before: datetime) -> QuerySet[SagaInstance]:
    """Settled sagas that finished before `before` (through saga_prunable_idx)."""
    return SagaInstance.objects.filter(state__in=SETTLED_STATES, finished_at__lt=before)


def sagas_prune(*, now: datetime, retention: timedelta, batch_size: int | None = None, time_budget: float | None = None) -> PruneRun:
    """Delete the sagas settled longer than `retention` ago, with their step rows, oldest first.
    Before each batch is deleted, `saga_pruning` lets the apps that refer to them keep what they
    need (an order's summary of its saga)."""
    prunable = prunable_sagas(before=now - retention)

    def delete_batch(size: int) -> int:
        with transaction.atomic():
            sagas = list(prunable.order_by("finished_at").select_for_update(skip_locked=True).defer("input")[:size])
            if sagas:
                saga_pruning.send(sender=SagaInstance, sagas=sagas)
                SagaInstance.objects.filter(pk__in=[saga.pk for saga in sagas]).delete()  # steps and faults cascade
        return len(sagas)

    return prune_in_batches(delete_batch, batch_size=batch_size, time_budget=time_budget)


def inbox_prune(*, now: datetime, retention: timedelta, batch_size: int | None = None, time_budget: float | None = None) -> PruneRun:
    """Delete the inbox rows received longer than `retention` ago, oldest first, and the delivery
    counts of the same consumer and event. The retention must outlast every way an event can come
    again (sagas.checks): an event delivered after its inbox row is gone would be handled twice."""
    expired = InboxMessage.objects.filter(received_at__lt=now - retention)

    def delete_batch(size: int) -> int:
        with transaction.atomic():
            ids = oldest_batch(expired, order_by="received_at", size=size)
            rows = InboxMessage.objects.filter(pk__in=ids).values_list("consumer", "event_id")
            by_consumer: dict[str, list] = {}
            for consumer, event_id in rows:
                by_consumer.setdefault(consumer, []).append(event_id)
            for consumer, event_ids in sorted(by_consumer.items()):
                ConsumerDelivery.objects.filter(consumer=consumer, event_id__in=event_ids).delete()
            InboxMessage.objects.filter(pk__in=ids).delete()
        return len(ids)

    return prune_in_batches(delete_batch, batch_size=batch_size, time_budget=time_budget)


def retention_period(days: float | None) -> timedelta | None:
    """A retention setting in days as a period; None when it is 0 or unset (keep forever)."""
    return timedelta(days=days) if days else None

