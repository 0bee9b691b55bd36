"""manage.py consume_events: a consumer group over an outbox stream."""

import threading
import time
import uuid
from io import StringIO

import pytest
import redis
from django.conf import settings
from django.core.management import call_command
from django.db import connection, transaction

from sagas.models import InboxMessage
from sagas.outbox import outbox_emit
from sagas.publishers import RedisStreamPublisher
from sagas.relay import outbox_relay
from tests.sagaapp.models import Effect

pytestmark = [pytest.mark.services(reason="Redis Streams"), pytest.mark.django_db(transaction=True)]


@pytest.fixture
def stream():
    aggregate_type = f"thing{uuid.uuid4().hex[:8]}"
    yield aggregate_type
    redis.Redis.from_url(settings.REDIS_URL).delete(f"events.{aggregate_type}")


def publish(aggregate_type: str, count: int) -> list[str]:
    ids = []
    for _ in range(count):
        with transaction.atomic():
            event = outbox_emit(aggregate_type=aggregate_type, aggregate_id=uuid.uuid4(), event_type="THING_HAPPENED", payload={})
        ids.append(str(event.id))
    outbox_relay(publisher=RedisStreamPublisher(settings.REDIS_URL))
    return ids


def consume_events(*args) -> str:
    out = StringIO()
    call_command("consume_events", *args, "--block", "100", "--idle-exit", "0.5", stdout=out)
    return out.getvalue()


def test_the_group_handles_each_event_once_through_its_inbox_and_acks_it(stream):
    publish(stream, 3)

    first = consume_events("--stream", f"events.{stream}", "--group", "g1", "--handler", "test-recorder")
    again = consume_events("--stream", f"events.{stream}", "--group", "g1", "--handler", "test-recorder")

    assert first.count(" handled") == 3 and "processed 3 message(s)" in first
    assert "processed 0 message(s)" in again, "acknowledged messages are not read again"
    assert Effect.objects.count() == 3 == InboxMessage.objects.filter(consumer="test-recorder").count()
    assert redis.Redis.from_url(settings.REDIS_URL).xpending(f"events.{stream}", "g1")["pending"] == 0


def test_messages_left_pending_by_a_dead_consumer_are_reclaimed_and_handled(stream):
    publish(stream, 2)
    client = redis.Redis.from_url(settings.REDIS_URL)
    client.xgroup_create(f"events.{stream}", "g2", id="0")
    client.xreadgroup("g2", "dead-consumer", {f"events.{stream}": ">"}, count=10)  # read, never acked

    output = consume_events("--stream", f"events.{stream}", "--group", "g2", "--handler", "test-recorder", "--claim-idle", "0")

    assert "reclaimed 2 message(s)" in output and output.count(" handled") == 2
    assert client.xpending(f"events.{stream}", "g2")["pending"] == 0


def test_without_a_handler_events_are_shown_and_a_redelivered_one_to_a_handler_is_a_duplicate(stream):
    publish(stream, 1)
    consume_events("--stream", f"events.{stream}", "--group", "g3", "--handler", "test-recorder")

    shown = consume_events("--stream", f"events.{stream}", "--group", "g4")
    duplicate = consume_events("--stream", f"events.{stream}", "--group", "g5", "--handler", "test-recorder")

    assert " shown" in shown and "THING_HAPPENED" in shown
    assert "duplicate (inbox)" in duplicate
    assert Effect.objects.count() == 1


def test_a_message_that_keeps_failing_is_retried_then_dead_lettered_without_stalling_the_stream(stream):
    with transaction.atomic():
        outbox_emit(aggregate_type=stream, aggregate_id=uuid.uuid4(), event_type="THING_HAPPENED", payload={"fail": True})
    publish(stream, 1)
    client = redis.Redis.from_url(settings.REDIS_URL)

    output = consume_events(
        "--stream", f"events.{stream}", "--group", "g6", "--handler", "test-recorder",
        "--claim-idle", "0", "--claim-every", "0", "--max-deliveries", "2",
    )

    assert "failed (try 1 of 2)" in output and "dead-lettered after 2 tries" in output
    assert " handled" in output, "the good message behind it was handled"
    assert Effect.objects.count() == 1
    assert client.xpending(f"events.{stream}", "g6")["pending"] == 0
    [(_, dead)] = client.xrange(f"events.{stream}.dead-letter")
    client.delete(f"events.{stream}.dead-letter")
    assert b"the handler failed" in dead[b"error"]


def test_a_consumer_whose_stream_redis_lost_creates_its_group_again_and_dedupes_what_is_published_again(stream):
    publish(stream, 2)
    out = StringIO()

    def consumer():
        try:
            call_command(
                "consume_events", "--stream", f"events.{stream}", "--group", "g6", "--handler", "test-recorder",
                "--block", "100", "--idle-exit", "3", stdout=out,
            )
        finally:
            connection.close()

    running = threading.Thread(target=consumer)
    running.start()
    deadline = time.monotonic() + 10
    while InboxMessage.objects.filter(consumer="test-recorder").count() < 2 and time.monotonic() < deadline:
        time.sleep(0.05)
    redis.Redis.from_url(settings.REDIS_URL).delete(f"events.{stream}")  # Redis restarted without persistence
    publish(stream, 1)  # the relay finds the loss, publishes the two again, then the new one
    running.join(30)

    output = out.getvalue()
    assert "lost its group g6" in output
    assert output.count("duplicate (inbox)") == 2 and output.count(" handled") == 3
    assert Effect.objects.count() == 3
