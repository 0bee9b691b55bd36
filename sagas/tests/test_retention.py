"""History retention (sagas.retention): settled sagas and old inbox rows are pruned in small
batches, oldest first; FAILED, running and recent sagas never are. Sagas are built with the real
services and runner; they are aged by moving their finish time back, as time would."""

import uuid
from datetime import timedelta

import pytest
from django.core import checks
from django.db import connection, transaction
from django.utils import timezone

from sagas import retention, services, tasks
from sagas.checks import check_inbox_retention
from sagas.consumers import consume
from sagas.definition import FORWARD
from sagas.models import ConsumerDelivery, HousekeepingRun, InboxMessage, OutboxEvent, SagaInstance, StepExecution
from sagas.outbox import outbox_emit
from sagas.publishers import message
from sagas.relay import outbox_cleanup
from sagas.tests.builders import compensated_saga, completed_saga, failed_saga, run, three_steps

pytestmark = pytest.mark.django_db

RETENTION = timedelta(days=30)


def finished_days_ago(saga, days: float):
    SagaInstance.objects.filter(pk=saga.pk).update(finished_at=timezone.now() - timedelta(days=days))
    return saga


def remaining(*sagas) -> set:
    return set(SagaInstance.objects.filter(pk__in=[s.pk for s in sagas]).values_list("pk", flat=True))


def test_prune_deletes_the_settled_sagas_past_the_retention_with_their_steps_and_nothing_else(sent):
    old_completed, old_compensated = finished_days_ago(completed_saga(), 40), finished_days_ago(compensated_saga(), 40)
    old_failed = finished_days_ago(failed_saga(), 40)
    running = services.saga_start(definition=three_steps, input={})
    run(running, "reserve", FORWARD)
    SagaInstance.objects.filter(pk=running.pk).update(created_at=timezone.now() - timedelta(days=40))
    recent = finished_days_ago(completed_saga(), 29)

    pruned = retention.sagas_prune(now=timezone.now(), retention=RETENTION)

    assert pruned.deleted == 2 and not pruned.more
    assert remaining(old_completed, old_compensated, old_failed, running, recent) == {old_failed.pk, running.pk, recent.pk}
    assert not StepExecution.objects.filter(saga_id__in=[old_completed.pk, old_compensated.pk]).exists()
    assert StepExecution.objects.filter(saga_id=old_failed.pk).exists() and StepExecution.objects.filter(saga_id=recent.pk).exists()


def test_prune_deletes_in_batches_oldest_first_and_the_next_run_goes_on(sent):
    sagas = [finished_days_ago(completed_saga(), 40 + n) for n in range(5)]  # sagas[4] finished first

    first = retention.sagas_prune(now=timezone.now(), retention=RETENTION, batch_size=2, time_budget=0)
    left_after_first = remaining(*sagas)
    second = retention.sagas_prune(now=timezone.now(), retention=RETENTION, batch_size=2, time_budget=0)
    third = retention.sagas_prune(now=timezone.now(), retention=RETENTION, batch_size=2, time_budget=60)

    assert (first.deleted, first.batches, first.more) == (2, 1, True), "stopped at its time budget after one batch"
    assert left_after_first == {s.pk for s in sagas[:3]}, "the two that finished longest ago went first"
    assert (second.deleted, second.more) == (2, True)
    assert (third.deleted, third.batches, third.more) == (1, 1, False)
    assert remaining(*sagas) == set()


def test_each_batch_is_announced_before_it_is_deleted(sent):
    old = finished_days_ago(completed_saga(), 40)
    seen = []

    def receiver(sender, *, sagas, **kwargs):
        seen.extend((saga.pk, saga.state, SagaInstance.objects.filter(pk=saga.pk).exists()) for saga in sagas)

    retention.saga_pruning.connect(receiver)
    try:
        retention.sagas_prune(now=timezone.now(), retention=RETENTION)
    finally:
        retention.saga_pruning.disconnect(receiver)

    assert seen == [(old.pk, "COMPLETED", True)]
    assert remaining(old) == set()


@pytest.mark.services(reason="PostgreSQL's plan")
def test_prune_reads_the_prunable_sagas_through_their_index(sent):
    finished_days_ago(completed_saga(), 40)
    with connection.cursor() as cursor:
        cursor.execute("SET enable_seqscan = off")  # a few rows: the index must be usable, not just cheaper
        sql, params = retention.prunable_sagas(before=timezone.now()).order_by("finished_at").values("pk")[:500].query.sql_with_params()
        cursor.execute("EXPLAIN " + sql, params)
        plan = " ".join(row[0] for row in cursor.fetchall())
        cursor.execute("RESET enable_seqscan")

    assert "saga_prunable_idx" in plan, plan


# --- inbox ----------------------------------------------------------------------------------------


def an_event(**payload) -> OutboxEvent:
    with transaction.atomic():
        return outbox_emit(aggregate_type="thing", aggregate_id=uuid.uuid4(), event_type="THING_HAPPENED", payload=payload)


def test_inbox_rows_past_the_retention_go_with_their_delivery_counts_and_newer_ones_stay():
    old, recent = an_event(), an_event()
    now = timezone.now()
    consume(consumer="test-recorder", message=message(old), now=now - timedelta(days=40), max_deliveries=5)
    consume(consumer="test-recorder", message=message(recent), now=now - timedelta(days=1), max_deliveries=5)
    assert ConsumerDelivery.objects.count() == 2

    pruned = retention.inbox_prune(now=now, retention=RETENTION)

    assert pruned.deleted == 1
    assert list(InboxMessage.objects.values_list("event_id", flat=True)) == [recent.id]
    assert list(ConsumerDelivery.objects.values_list("event_id", flat=True)) == [recent.id]


def test_an_inbox_retention_that_an_event_could_outlive_refuses_to_start(settings):
    settings.OUTBOX_RETENTION_HOURS, settings.CONSUMER_REDELIVER_WINDOW_HOURS = 168, 24

    settings.SAGAS_INBOX_RETENTION_DAYS = 7
    too_short = check_inbox_retention()
    settings.SAGAS_INBOX_RETENTION_DAYS = 8
    long_enough = check_inbox_retention()
    settings.SAGAS_INBOX_RETENTION_DAYS = 0
    forever = check_inbox_retention()

    assert [m.id for m in too_short] == ["sagas.E003"] and too_short[0].level == checks.ERROR
    assert long_enough == forever == []


# --- the outbox cleanup -----------------------------------------------------------------------------


def test_outbox_cleanup_deletes_in_batches_and_the_next_run_goes_on():
    events = [an_event(n=n) for n in range(5)]
    OutboxEvent.objects.filter(pk__in=[e.pk for e in events]).update(published_at=timezone.now() - timedelta(days=30))

    first = outbox_cleanup(retention=timedelta(days=7), batch_size=3, time_budget=0)
    second = outbox_cleanup(retention=timedelta(days=7), batch_size=3, time_budget=0)

    assert (first.deleted, first.more, second.deleted, second.more) == (3, True, 2, False)
    assert not OutboxEvent.objects.exists()


# --- the beat tasks ---------------------------------------------------------------------------------


def test_the_prune_task_records_its_run_and_a_retention_of_0_keeps_everything(sent, settings):
    finished_days_ago(completed_saga(), 40)
    settings.SAGAS_RETENTION_DAYS = 0

    kept = tasks.prune_sagas()
    settings.SAGAS_RETENTION_DAYS = 30
    deleted = tasks.prune_sagas()

    assert (kept, deleted) == (0, 1)
    run_record = HousekeepingRun.objects.get(task="sagas.prune_sagas")
    assert (run_record.count, run_record.more) == (1, False)
    assert timezone.now() - run_record.ran_at < timedelta(minutes=1)
