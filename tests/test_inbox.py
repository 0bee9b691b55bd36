"""Consumers behind an inbox: a duplicate delivery has no second effect."""

import time
import uuid
from datetime import timedelta

import pytest
from django.db import IntegrityError, connection, transaction
from django.db.transaction import TransactionManagementError
from django.utils import timezone

from sagas.consumers import consume, consumer_give_up, consumers_redeliver, subscribe, subscribers
from sagas.models import InboxMessage, OutboxEvent, ParkedDelivery
from sagas.outbox import outbox_emit
from sagas.publishers import ConsumerTaskPublisher, message
from tests.sagaapp.models import Effect


def an_event(**payload):
    with transaction.atomic():
        return outbox_emit(aggregate_type="thing", aggregate_id=uuid.uuid4(), event_type="THING_HAPPENED", payload=payload)


@pytest.mark.django_db(transaction=True)
def test_the_same_event_consumed_twice_takes_effect_once():
    event = an_event()

    first = consume(consumer="test-recorder", message=message(event))
    second = consume(consumer="test-recorder", message=message(event))

    assert (first, second) == (True, False)
    assert Effect.objects.filter(saga_id=event.aggregate_id).count() == 1
    assert InboxMessage.objects.filter(consumer="test-recorder", event_id=event.id).count() == 1


@pytest.mark.django_db(transaction=True)
def test_a_failing_handler_leaves_no_inbox_row_so_a_retry_runs_it_again():
    event = an_event(fail=True)

    with pytest.raises(ValueError):
        consume(consumer="test-recorder", message=message(event))

    assert not InboxMessage.objects.exists(), "the inbox row rolls back with the handler's effects"


def test_consumers_are_found_by_event_type_and_payload():
    assert subscribers("THING_HAPPENED") == ["test-recorder"]
    assert subscribers("THING_HAPPENED", {"colour": "red"}) == ["test-filtered", "test-recorder"]
    assert subscribers("SOMETHING_ELSE", {"colour": "red"}) == []


@pytest.mark.django_db(transaction=True)
def test_an_event_a_consumer_filtered_out_is_neither_consumed_nor_redelivered_to_it():
    blue, red = an_event(colour="blue"), an_event(colour="red")
    OutboxEvent.objects.update(published_at=timezone.now() - timedelta(minutes=5))

    handled = [consume(consumer="test-filtered", message=message(e)) for e in (blue, red)]
    redelivered = consumers_redeliver(now=timezone.now(), min_age=timedelta(seconds=1), window=timedelta(hours=1))

    assert handled == [False, True]
    assert Effect.objects.filter(step="red").count() == 1
    assert redelivered == 2, "both events to test-recorder, neither to test-filtered (blue is not for it, red is handled)"


@pytest.mark.django_db(transaction=True)
def test_events_published_twice_to_consumer_tasks_on_a_real_worker_take_effect_once(saga_worker):
    events = [an_event() for _ in range(5)]
    publisher = ConsumerTaskPublisher()

    publisher.publish(events)
    publisher.publish(events)  # a relay that crashed before marking publishes again

    import time

    deadline = time.monotonic() + 20
    while InboxMessage.objects.count() < 5 and time.monotonic() < deadline:
        time.sleep(0.1)
    time.sleep(0.5)  # give the duplicates time to be (not) applied
    for event in events:
        assert Effect.objects.filter(saga_id=event.aggregate_id).count() == 1


@pytest.mark.django_db(transaction=True)
def test_an_event_type_the_consumer_did_not_subscribe_to_is_not_handled():
    with transaction.atomic():
        other = outbox_emit(aggregate_type="thing", aggregate_id=uuid.uuid4(), event_type="OTHER_THING", payload={})

    handled = consume(consumer="test-recorder", message=message(other))

    assert handled is False
    assert not Effect.objects.exists() and not InboxMessage.objects.exists()


@pytest.mark.django_db(transaction=True)
def test_an_event_whose_delivery_was_lost_is_delivered_again_by_the_sweep(saga_worker, settings):
    import time
    from datetime import timedelta

    from django.utils import timezone

    from sagas.consumers import consumers_redeliver
    from sagas.models import OutboxEvent

    # No relay kicked by the commits: one on the worker could publish the event (and its consumer
    # handle it) before the sweep runs, which would leave the sweep nothing to redeliver.
    settings.OUTBOX_RELAY_KICK = False
    lost = an_event()  # published, but its consumer task never arrived (e.g. the broker was flushed)
    OutboxEvent.objects.filter(pk=lost.pk).update(published_at=timezone.now() - timedelta(minutes=5))
    handled_meanwhile = an_event()
    consume(consumer="test-recorder", message=message(handled_meanwhile))
    OutboxEvent.objects.filter(pk=handled_meanwhile.pk).update(published_at=timezone.now() - timedelta(minutes=5))

    sent = consumers_redeliver(now=timezone.now(), min_age=timedelta(seconds=60), window=timedelta(hours=1))

    assert sent == 1, "only the event without an inbox row"
    deadline = time.monotonic() + 20
    while not InboxMessage.objects.filter(event_id=lost.id).exists() and time.monotonic() < deadline:
        time.sleep(0.1)
    assert Effect.objects.filter(saga_id=lost.aggregate_id).count() == 1
    assert consumers_redeliver(now=timezone.now(), min_age=timedelta(seconds=60), window=timedelta(hours=1)) == 0


@pytest.mark.services(reason="needs Redis redelivery of a killed pool child's message")
@pytest.mark.django_db(transaction=True)
def test_a_handler_that_kills_its_worker_every_time_is_given_up_after_its_delivery_budget(saga_worker, settings):
    import time

    from sagas.models import ConsumerDelivery

    event = an_event(crash=True)

    ConsumerTaskPublisher().publish([event])

    def deliveries() -> int:
        row = ConsumerDelivery.objects.filter(event_id=event.id).first()
        return row.deliveries if row else 0

    deadline, last, stable_since = time.monotonic() + 60, -1, time.monotonic()
    while time.monotonic() < deadline:  # until the count exceeds the budget and then stops moving
        now_count = deliveries()
        if now_count != last:
            last, stable_since = now_count, time.monotonic()
        elif now_count > settings.CONSUMER_MAX_DELIVERIES and time.monotonic() - stable_since > 3:
            break
        time.sleep(0.2)

    # A killed child's message may come back twice (requeue and restore); those copies are
    # absorbed without running the handler, so the count settles just past the budget.
    assert settings.CONSUMER_MAX_DELIVERIES < last <= 2 * (settings.CONSUMER_MAX_DELIVERIES + 1)
    assert time.monotonic() < deadline, "deliveries never stopped"
    parked = ParkedDelivery.objects.get(consumer="test-recorder", event_id=event.id)
    assert "without finishing" in parked.reason and parked.settled
    assert InboxMessage.objects.filter(event_id=event.id).exists(), "given up once: the sweep does not send it again"


def gave_up(event) -> int:
    return Effect.objects.filter(saga_id=event.aggregate_id, step="GIVEN_UP").count()


@pytest.mark.django_db(transaction=True)
def test_a_consumer_gives_up_on_an_event_once_parks_it_and_settles_it():
    event = an_event(fail=True)

    first = consumer_give_up(consumer="test-recorder", message=message(event), reason="failed 9 times")
    again = consumer_give_up(consumer="test-recorder", message=message(event), reason="failed 9 times")

    assert (first, again) == (True, False)
    assert gave_up(event) == 1
    assert ParkedDelivery.objects.get(event_id=event.id).reason == "failed 9 times"
    assert consume(consumer="test-recorder", message=message(event)) is False, "a late delivery is a duplicate"
    OutboxEvent.objects.filter(pk=event.pk).update(published_at=timezone.now() - timedelta(minutes=5))
    assert consumers_redeliver(now=timezone.now(), min_age=timedelta(seconds=60), window=timedelta(hours=1)) == 0


@pytest.mark.django_db(transaction=True)
def test_a_handler_that_keeps_failing_or_refuses_is_given_up_on_once_on_a_real_worker(saga_worker):
    failing, refused = an_event(fail=True), an_event(refuse=True)

    ConsumerTaskPublisher().publish([failing, refused])

    deadline = time.monotonic() + 30
    while ParkedDelivery.objects.count() < 2 and time.monotonic() < deadline:
        time.sleep(0.1)
    reasons = dict(ParkedDelivery.objects.values_list("event_id", "reason"))
    assert reasons[failing.id].startswith("failed 4 times: ValueError"), reasons  # CONSUMER_MAX_RETRIES=3 in tests
    assert reasons[refused.id] == "refused: BusinessError: the thing cannot be done"
    assert (gave_up(failing), gave_up(refused)) == (1, 1)


@pytest.mark.django_db(transaction=True)
def test_staff_list_parked_deliveries_and_replay_one_with_a_fresh_budget(saga_worker):
    from rest_framework.test import APIClient

    from tests.orders_helpers import a_user, an_operator

    event = an_event()
    consumer_give_up(consumer="test-recorder", message=message(event), reason="the handler had a bug")
    staff, customer = APIClient(), APIClient()
    staff.force_authenticate(an_operator())
    customer.force_authenticate(a_user())

    listed = staff.get("/api/consumers/parked/").json()["results"]
    [parked] = [p for p in listed if p["event_id"] == str(event.id)]
    refused = customer.post(f"/api/consumers/parked/{parked['id']}/replay/")
    replayed = staff.post(f"/api/consumers/parked/{parked['id']}/replay/")

    assert parked["settled"] is True and parked["reason"] == "the handler had a bug"
    assert refused.status_code == 403
    assert replayed.status_code == 202
    deadline = time.monotonic() + 20
    while not Effect.objects.filter(saga_id=event.aggregate_id, step="THING_HAPPENED").exists() and time.monotonic() < deadline:
        time.sleep(0.1)
    assert Effect.objects.filter(saga_id=event.aggregate_id, step="THING_HAPPENED").count() == 1
    assert not ParkedDelivery.objects.filter(event_id=event.id).exists()


def catch_a_duplicate_and_go_on(event) -> None:
    Effect.objects.create(saga_id=uuid.UUID(event.aggregate_id), step="first", direction="forward", pid=0)
    try:
        with transaction.atomic():
            InboxMessage.objects.create(consumer="test-recorder", event_id=event.id, event_type=event.type, received_at=timezone.now())
            InboxMessage.objects.create(consumer="test-recorder", event_id=event.id, event_type=event.type, received_at=timezone.now())
    except IntegrityError:
        pass
    Effect.objects.create(saga_id=uuid.UUID(event.aggregate_id), step="after", direction="forward", pid=0)


subscribe("test-catching", events=["CATCH_ME"])(catch_a_duplicate_and_go_on)
subscribe("test-catching-savepoints", events=["CATCH_ME"], savepoints=True)(catch_a_duplicate_and_go_on)


@pytest.mark.django_db(transaction=True)
def test_a_handler_runs_without_savepoints_unless_it_asks_for_them():
    with transaction.atomic():
        event = outbox_emit(aggregate_type="thing", aggregate_id=uuid.uuid4(), event_type="CATCH_ME", payload={})

    with pytest.raises(TransactionManagementError, match=r"consumer test-catching \(subscribe\(\.\.\., savepoints=True\)\) runs without savepoints"):
        consume(consumer="test-catching", message=message(event))
    assert not InboxMessage.objects.filter(consumer="test-catching").exists(), "all of it rolled back"

    assert consume(consumer="test-catching-savepoints", message=message(event)) is True
    assert [e.step for e in Effect.objects.filter(saga_id=event.aggregate_id).order_by("id")] == ["first", "after"]


# --- the redelivery sweep reads what is live ----------------------------------------------------------


@pytest.mark.django_db(transaction=True)
def test_an_event_no_in_process_consumer_was_sent_is_consumed_as_it_is_published(settings):
    from sagas.relay import outbox_relay

    settings.OUTBOX_RELAY_KICK = False  # this test relays itself
    with transaction.atomic():
        wanted = outbox_emit(aggregate_type="thing", aggregate_id=uuid.uuid4(), event_type="THING_HAPPENED", payload={})
        unwanted = outbox_emit(aggregate_type="thing", aggregate_id=uuid.uuid4(), event_type="NOBODY_WANTS_THIS", payload={})

    outbox_relay(publisher=ConsumerTaskPublisher())
    wanted.refresh_from_db()
    unwanted.refresh_from_db()

    assert unwanted.published_at is not None and unwanted.consumed_at == unwanted.published_at
    assert wanted.published_at is not None and wanted.consumed_at is None, "watched until test-recorder has it"
    consume(consumer="test-recorder", message=message(wanted))
    later = timezone.now() + timedelta(minutes=5)
    assert consumers_redeliver(now=later, min_age=timedelta(seconds=60), window=timedelta(hours=1)) == 0
    wanted.refresh_from_db()
    assert wanted.consumed_at == later, "handled by every consumer it was sent to: no longer watched"


@pytest.mark.django_db(transaction=True)
def test_an_event_past_the_redelivery_window_is_no_longer_watched_nor_sent():
    lost = an_event()
    now = timezone.now()
    OutboxEvent.objects.filter(pk=lost.pk).update(published_at=now - timedelta(hours=2))

    sent = consumers_redeliver(now=now, min_age=timedelta(seconds=60), window=timedelta(hours=1))

    lost.refresh_from_db()
    assert sent == 0 and lost.consumed_at == now


@pytest.mark.services(reason="counts the rows PostgreSQL reads (EXPLAIN ANALYZE)")
@pytest.mark.django_db(transaction=True)
def test_the_redelivery_sweep_reads_the_events_it_still_watches_not_every_event_of_its_window(settings):
    from tests.scan_helpers import rows_read

    settings.OUTBOX_RELAY_KICK = False  # no relay runs here
    with transaction.atomic():
        handled = [outbox_emit(aggregate_type="thing", aggregate_id=uuid.uuid4(), event_type="THING_HAPPENED", payload={}) for _ in range(600)]
    for event in handled:
        consume(consumer="test-recorder", message=message(event))
    lost = an_event()
    now = timezone.now()
    OutboxEvent.objects.update(published_at=now - timedelta(minutes=10))
    assert consumers_redeliver(now=now, min_age=timedelta(seconds=60), window=timedelta(hours=1)) == 1  # finds the handled ones
    if connection.vendor == "postgresql":
        # Statistics as autovacuum keeps them for a live table, not those an earlier test left
        # (test_history's big load): with those the planner may read the table whole.
        with connection.cursor() as cursor:
            cursor.execute("ANALYZE sagas_outboxevent")

    read = rows_read(lambda: consumers_redeliver(now=now, min_age=timedelta(seconds=60), window=timedelta(hours=1)), "sagas_outboxevent")

    assert read <= 5, f"the sweep read {read} outbox rows to find the one still lacking ({lost.id})"
