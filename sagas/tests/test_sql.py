"""sagas.sql: the hand-written statements read and write what the ORM would, on both backends."""

import threading
import time
from datetime import timedelta

import pytest
from django.db import OperationalError, connection, connections, transaction
from django.utils import timezone

from sagas import services, sql
from sagas.definition import COMPENSATE, FORWARD
from sagas.models import OutboxEvent, SagaInstance, SagaState, StepExecution, StepState
from sagas.tests.builders import run, three_steps

pytestmark = pytest.mark.django_db


def as_dict(instance) -> dict:
    return {f.attname: getattr(instance, f.attname) for f in type(instance)._meta.concrete_fields}


def test_lock_saga_and_steps_reads_every_field_as_the_orm_does_in_position_order(sent):
    saga = services.saga_start(definition=three_steps, input={"order": "o-1", "amount": "9.99", "nested": [1, {"a": None}]})
    run(saga, "reserve")

    with transaction.atomic():
        locked_saga, steps = sql.lock_saga_and_steps(saga.id, FORWARD)

    assert as_dict(locked_saga) == as_dict(SagaInstance.objects.get(pk=saga.pk))
    assert [as_dict(s) for s in steps] == [as_dict(s) for s in StepExecution.objects.filter(saga=saga, direction=FORWARD).order_by("position")]
    assert [s.name for s in steps] == ["reserve", "charge", "notify"]
    assert steps[0].result == {"step": "reserve"} and steps[0].saga is locked_saga
    assert not locked_saga._state.adding and not steps[0]._state.adding


def test_lock_saga_and_steps_is_none_for_a_direction_without_steps_or_an_unknown_saga(sent):
    saga = services.saga_start(definition=three_steps, input={})

    with transaction.atomic():
        assert sql.lock_saga_and_steps(saga.id, COMPENSATE) is None
        assert sql.lock_saga_and_steps("6b1d8f0e-3f57-4cde-9a57-2d0b8f7c0b11", FORWARD) is None


def test_save_step_and_saga_writes_the_named_fields_and_no_other(sent):
    saga = services.saga_start(definition=three_steps, input={})
    with transaction.atomic():
        locked_saga, steps = sql.lock_saga_and_steps(saga.id, FORWARD)
        step = steps[0]
        later = timezone.now() + timedelta(minutes=5)
        step.state, step.attempts, step.deliveries, step.result, step.finished_at = StepState.COMPLETED, 1, 2, {"x": [1, "2"]}, later
        step.last_error = "not saved: not named"
        locked_saga.state, locked_saga.stuck_after = SagaState.RUNNING, later
        locked_saga.failure_reason = "not saved either"

        sql.save_step_and_saga(step, ["state", "attempts", "deliveries", "result", "finished_at"], locked_saga, ["state", "stuck_after"])

    row = StepExecution.objects.get(pk=step.pk)
    assert (row.state, row.attempts, row.deliveries, row.result, row.finished_at) == (StepState.COMPLETED, 1, 2, {"x": [1, "2"]}, later)
    assert row.last_error == ""
    saga_row = SagaInstance.objects.get(pk=saga.pk)
    assert (saga_row.state, saga_row.stuck_after, saga_row.failure_reason) == (SagaState.RUNNING, later, "")


def test_count_delivery_counts_a_step_in_its_turn_and_nothing_else(sent):
    saga = services.saga_start(definition=three_steps, input={})
    now = timezone.now()

    assert sql.count_delivery(saga.id, "charge", FORWARD, now=now) is False, "reserve has not completed"
    assert sql.count_delivery(saga.id, "reserve", FORWARD, now=now) is True
    assert sql.count_delivery(saga.id, "reserve", FORWARD, now=now) is False, "a delivery died unfinished: decided under the locks"

    reserve = StepExecution.objects.get(saga=saga, name="reserve", direction=FORWARD)
    assert (reserve.state, reserve.deliveries, reserve.started_at) == (StepState.RUNNING, 1, now)
    SagaInstance.objects.filter(pk=saga.pk).update(state=SagaState.COMPENSATING)
    StepExecution.objects.filter(pk=reserve.pk).update(attempts=1, state=StepState.COMPLETED)
    assert sql.count_delivery(saga.id, "charge", FORWARD, now=now) is False, "the saga no longer runs forward"


@pytest.mark.django_db(transaction=True)
def test_outbox_insert_writes_the_row_the_orm_would_with_increasing_sequence_numbers():
    with transaction.atomic():
        first = sql.outbox_insert(OutboxEvent(aggregate_type="unit", aggregate_id="a-1", event_type="ONE", payload={"n": 1}, created_at=timezone.now()), lock_key="k")
        second = sql.outbox_insert(OutboxEvent(aggregate_type="unit", aggregate_id="a-1", event_type="TWO", payload={"n": 2}, created_at=timezone.now()), lock_key="k")

    assert second.sequence > first.sequence
    for event in (first, second):
        assert as_dict(OutboxEvent.objects.get(pk=event.pk)) == as_dict(event)
        assert not event._state.adding


@pytest.mark.django_db(transaction=True)
def test_outbox_lock_due_reads_the_due_events_among_those_named_as_the_orm_would_oldest_first():
    now = timezone.now()
    with transaction.atomic():
        events = [
            sql.outbox_insert(OutboxEvent(aggregate_type="unit", aggregate_id=f"a-{n}", event_type="E", payload={"n": n, "amount": "1.50"}, created_at=now), lock_key=f"k{n}")
            for n in range(5)
        ]
    due, published, parked, leased, backing_off_past = events
    OutboxEvent.objects.filter(pk=published.pk).update(published_at=now)
    OutboxEvent.objects.filter(pk=parked.pk).update(dead_lettered_at=now)
    OutboxEvent.objects.filter(pk=leased.pk).update(next_attempt_at=now + timedelta(seconds=60))
    OutboxEvent.objects.filter(pk=backing_off_past.pk).update(next_attempt_at=now - timedelta(seconds=1))

    with transaction.atomic():
        locked = sql.outbox_lock_due([e.pk for e in reversed(events)], now=now)

    assert [e.pk for e in locked] == [due.pk, backing_off_past.pk]
    assert [as_dict(e) for e in locked] == [as_dict(OutboxEvent.objects.get(pk=e.pk)) for e in locked]
    assert sql.outbox_lock_due([], now=now) == []


@pytest.mark.django_db(transaction=True)
def test_outbox_update_sets_the_named_fields_of_the_named_events_or_only_the_unpublished_ones():
    now = timezone.now()
    with transaction.atomic():
        events = [
            sql.outbox_insert(OutboxEvent(aggregate_type="unit", aggregate_id="a", event_type="E", payload={}, created_at=now), lock_key="k")
            for _ in range(3)
        ]
    first, second, untouched = events
    OutboxEvent.objects.filter(pk=second.pk).update(published_at=now - timedelta(hours=1))

    leased = sql.outbox_update([first.pk, second.pk], next_attempt_at=now)
    marked = sql.outbox_update([first.pk, second.pk], unpublished_only=True, published_at=now, consumed_at=None)

    assert (leased, marked) == (2, 1)
    rows = {e.pk: e for e in OutboxEvent.objects.all()}
    assert (rows[first.pk].published_at, rows[first.pk].next_attempt_at) == (now, now)
    assert rows[second.pk].published_at == now - timedelta(hours=1), "published already: left alone"
    assert rows[untouched.pk].next_attempt_at is None and rows[untouched.pk].published_at is None


@pytest.mark.django_db(transaction=True)
def test_lock_saga_and_steps_sets_the_wait_limits_before_it_waits_for_a_lock(sent):
    """The limits ride on the locking read: its own wait for a saga row that another transaction
    holds already ends at the step's lock timeout (a third of the step timeout), not never."""
    if connection.vendor != "postgresql":
        pytest.skip("wait limits are PostgreSQL settings")
    saga = services.saga_start(definition=three_steps, input={})
    holding, release = threading.Event(), threading.Event()

    def hold_the_saga_row():
        try:
            with transaction.atomic():
                SagaInstance.objects.select_for_update().get(pk=saga.pk)
                holding.set()
                release.wait(30)
        finally:
            connections.close_all()

    holder = threading.Thread(target=hold_the_saga_row)
    holder.start()
    try:
        assert holding.wait(10)
        started = time.monotonic()
        with pytest.raises(OperationalError, match="lock timeout"), transaction.atomic():
            sql.lock_saga_and_steps(saga.id, FORWARD, limit_timeout=0.6)
        assert time.monotonic() - started < 5
    finally:
        release.set()
        holder.join()

    with transaction.atomic(), connection.cursor() as cursor:
        sql.lock_saga_and_steps(saga.id, FORWARD, limit_timeout=0.6)
        cursor.execute("SELECT current_setting('lock_timeout'), current_setting('statement_timeout'), current_setting('idle_in_transaction_session_timeout')")
        assert cursor.fetchone() == ("200ms", "600ms", "5600ms")
