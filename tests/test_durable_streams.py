"""Published means durable (DESIGN.md rule 16): when Redis loses stream entries whose outbox rows
are already marked published, the relay notices and publishes the retained events again, before
anything newer of theirs. Real `celery worker` and `celery beat` on PostgreSQL and a private
`redis-server` that the tests restart."""

import threading
import time
import uuid
from collections import Counter
from io import StringIO
from datetime import timedelta

import pytest
import redis
from django.core.management import call_command
from django.core.management.base import CommandError
from django.db import connection, transaction
from django.utils import timezone

from perf.services import PrivateRedis
from sagas.models import OutboxEvent, OutboxStream
from sagas.outbox import outbox_emit
from sagas.publishers import RedisStreamPublisher
from sagas.relay import DEFER, outbox_relay
from sagas.testing import CeleryBeat, CeleryWorker, purge_queues, subprocess_environment

pytestmark = [
    pytest.mark.django_db(transaction=True),
    pytest.mark.services(reason="restarts its own redis-server under a real worker and beat"),
]

STREAM = "events.parcel"


class Relay:
    """A worker and a beat of their own (own queues), publishing to the private Redis every 0.2 s."""

    def __init__(self, redis_server: PrivateRedis, **env: str):
        self.queue = f"streams-{uuid.uuid4().hex[:8]}"
        environment = subprocess_environment(
            REDIS_URL=redis_server.url(0),
            CELERY_TASK_DEFAULT_QUEUE=self.queue,
            SAGAS_CONTROL_QUEUE=f"{self.queue}-control",
            OUTBOX_RELAY_INTERVAL="0.2",
            **env,
        )
        self.worker = CeleryWorker(queues=[self.queue, f"{self.queue}-control"], env=environment)
        self.beat = CeleryBeat(env=environment)

    def __enter__(self):
        self.worker.start()
        self.beat.start()
        return self

    def __exit__(self, *exc):
        self.beat.stop()
        self.worker.stop()
        purge_queues(self.queue, f"{self.queue}-control")

    def output(self) -> str:
        return self.worker.output()[-4000:]


def emit(aggregate_id: str, event_type: str, **kwargs) -> OutboxEvent:
    with transaction.atomic():
        return outbox_emit(aggregate_type="parcel", aggregate_id=aggregate_id, event_type=event_type, payload={}, **kwargs)


def entries(client: redis.Redis) -> list[tuple[str, str, int]]:
    """(event id, aggregate id, sequence) of each entry of the stream, in stream order."""
    return [
        (fields[b"id"].decode(), fields[b"aggregate_id"].decode(), int(fields[b"sequence"]))
        for _, fields in client.xrange(STREAM)
    ]


def wait_until(condition, *, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.1)
    return True


def all_published() -> bool:
    return not OutboxEvent.objects.filter(published_at=None).exists()


def in_stream_order_per_aggregate(stream: list[tuple[str, str, int]]) -> bool:
    by_aggregate: dict[str, list[int]] = {}
    for _, aggregate_id, sequence in stream:
        by_aggregate.setdefault(aggregate_id, []).append(sequence)
    return all(sequences == sorted(sequences) for sequences in by_aggregate.values())


def test_events_lost_with_a_redis_restart_without_persistence_are_published_again_before_newer_ones(tmp_path):
    with PrivateRedis(tmp_path) as redis_server, Relay(redis_server) as relay:
        client = redis.Redis.from_url(redis_server.url(0))
        before = [emit(f"p{n % 5}", f"BEFORE_{n}") for n in range(30)]
        assert wait_until(lambda: all_published() and len(entries(client)) == 30, timeout=30), relay.output()

        redis_server.restart(down_for=0.5)  # no persistence: the stream is gone, its rows stay published
        after = [emit(f"p{n % 5}", f"AFTER_{n}") for n in range(20)]
        expected = {str(event.id) for event in before + after}
        everything_in_stream = wait_until(lambda: expected <= {e[0] for e in entries(client)}, timeout=30)
        stream = entries(client)
        log = relay.worker.output()

    missing = expected - {e[0] for e in stream}
    assert everything_in_stream, f"{len(missing)} of {len(expected)} events missing from the stream"
    assert len(stream) == len(expected), "each event once: the lost ones again, the new ones after them"
    assert in_stream_order_per_aggregate(stream)
    assert f"outbox_stream_recovered stream={STREAM} republished=30 " in log, log[-4000:]


def test_with_aof_the_lost_tail_is_published_again_from_the_newest_entry_that_survived(tmp_path):
    an_hour_ago = timezone.now() - timedelta(hours=1)
    with PrivateRedis(tmp_path, appendfsync="everysec") as redis_server, Relay(redis_server) as relay:
        client = redis.Redis.from_url(redis_server.url(0))
        # Given ten events created over an hour ago and published a second after each...
        early = [emit(f"p{n % 3}", f"EARLY_{n}", now=an_hour_ago + timedelta(seconds=30 * n)) for n in range(10)]
        assert wait_until(lambda: all_published() and len(entries(client)) == 10, timeout=30), relay.output()
        for event in early:
            OutboxEvent.objects.filter(pk=event.pk).update(published_at=event.created_at + timedelta(seconds=1))
        time.sleep(1.5)  # appendfsync everysec: on disk
        on_disk = redis_server.aof_mark()
        # ...and ten published now that never reach the disk:
        tail = [emit(f"p{n % 3}", f"TAIL_{n}") for n in range(10)]
        assert wait_until(lambda: all_published() and len(entries(client)) == 20, timeout=30), relay.output()
        time.sleep(1.5)

        # When the machine crashes and the AOF holds only what was on disk before the tail
        redis_server.crash_restart(down_for=0.1, back_to=on_disk)
        later = [emit(f"p{n % 3}", f"LATER_{n}") for n in range(5)]
        expected = {str(event.id) for event in early + tail + later}
        everything_in_stream = wait_until(lambda: expected <= {e[0] for e in entries(client)}, timeout=30)
        stream = entries(client)
        log = relay.worker.output()

    copies = Counter(event_id for event_id, _, _ in stream)
    assert everything_in_stream, f"{len(expected - set(copies))} of {len(expected)} events missing from the stream"
    assert [copies[str(event.id)] for event in early] == [1] * 9 + [2], "again from the newest survivor, not all"
    assert all(copies[str(event.id)] == 1 for event in tail + later)
    assert in_stream_order_per_aggregate(stream)
    assert f"outbox_stream_recovered stream={STREAM} republished=11 " in log, log[-4000:]


# --- the relay's side, in this process against the suite's Redis -------------------------------


@pytest.fixture
def stream(settings):
    """A stream of its own on the suite's Redis (settings.REDIS_URL): (aggregate type, stream name)."""
    aggregate_type = f"crate{uuid.uuid4().hex[:8]}"
    name = f"events.{aggregate_type}"
    yield aggregate_type, name
    redis.Redis.from_url(settings.REDIS_URL).delete(name)


def emit_to(aggregate_type: str, aggregate_id: str, event_type: str) -> OutboxEvent:
    with transaction.atomic():
        return outbox_emit(aggregate_type=aggregate_type, aggregate_id=aggregate_id, event_type=event_type, payload={})


def types_in(client: redis.Redis, name: str) -> list[str]:
    return [fields[b"type"].decode() for _, fields in client.xrange(name)]


def test_a_batch_for_a_stream_that_lost_entries_waits_until_the_retained_events_are_in_it_again(settings, stream):
    settings.OUTBOX_STREAM_CHECK_INTERVAL = 60  # only the publish itself can notice the loss here
    aggregate_type, name = stream
    publisher = RedisStreamPublisher(settings.REDIS_URL)
    for n in range(3):
        emit_to(aggregate_type, "a", f"OLD_{n}")
    outbox_relay(publisher=publisher)
    publisher.client.delete(name)  # the stream lost every entry; the rows stay published
    new = [emit_to(aggregate_type, "a", "NEW_0"), emit_to(aggregate_type, "b", "NEW_1")]

    first = outbox_relay(publisher=publisher)
    waiting = list(OutboxEvent.objects.filter(pk__in=[e.pk for e in new]).values_list("published_at", "attempts"))
    time.sleep(DEFER.total_seconds() + 0.1)
    second = outbox_relay(publisher=publisher)

    assert (first.published, first.deferred, first.republished, first.failed) == (0, 2, 3, 0)
    assert waiting == [(None, 0), (None, 0)], "deferred, not failed: no attempt spent"
    assert second.published == 2
    assert types_in(publisher.client, name) == ["OLD_0", "OLD_1", "OLD_2", "NEW_0", "NEW_1"]
    assert OutboxStream.objects.values_list("recoveries", "republished").get(name=name) == (1, 3)


def test_a_loss_is_found_when_nothing_is_being_published_at_most_every_check_interval(settings, stream):
    settings.OUTBOX_STREAM_CHECK_INTERVAL = 2.0
    aggregate_type, name = stream
    publisher = RedisStreamPublisher(settings.REDIS_URL)
    for n in range(3):
        emit_to(aggregate_type, "a", f"E{n}")
    outbox_relay(publisher=publisher)  # looks first, then publishes
    publisher.client.delete(name)

    too_soon = outbox_relay(publisher=publisher)
    time.sleep(2.1)
    in_time = outbox_relay(publisher=publisher)

    assert (too_soon.republished, in_time.republished, in_time.published) == (0, 3, 0)
    assert types_in(publisher.client, name) == ["E0", "E1", "E2"]


def test_two_relays_finding_the_same_loss_publish_the_lost_events_again_once(settings, stream):
    aggregate_type, name = stream
    for n in range(50):
        emit_to(aggregate_type, str(n % 7), f"E{n}")
    outbox_relay(publisher=RedisStreamPublisher(settings.REDIS_URL))
    client = redis.Redis.from_url(settings.REDIS_URL)
    client.delete(name)
    start, counts = threading.Barrier(2), []

    def relay_process():
        publisher = RedisStreamPublisher(settings.REDIS_URL)
        start.wait(10)
        counts.append(publisher.verify(force=True))
        connection.close()

    relays = [threading.Thread(target=relay_process) for _ in range(2)]
    for thread in relays:
        thread.start()
    for thread in relays:
        thread.join(30)

    assert sorted(counts) == [0, 50]
    assert client.xlen(name) == 50
    assert OutboxStream.objects.values_list("recoveries", "republished", "recovery_lease_until").get(name=name) == (1, 50, None)


def test_a_recovery_held_by_another_relay_is_left_to_it_until_its_lease_runs_out(settings, stream):
    aggregate_type, name = stream
    publisher = RedisStreamPublisher(settings.REDIS_URL)
    for n in range(4):
        emit_to(aggregate_type, "a", f"E{n}")
    outbox_relay(publisher=publisher)
    publisher.client.delete(name)
    now = timezone.now()
    OutboxStream.objects.filter(name=name).update(recovery_lease_until=now + timedelta(seconds=30))

    while_held = publisher.verify(force=True)
    OutboxStream.objects.filter(name=name).update(recovery_lease_until=now - timedelta(seconds=1))  # that relay died
    after_it_ran_out = publisher.verify(force=True)

    assert (while_held, after_it_ran_out) == (0, 4)
    assert types_in(publisher.client, name) == ["E0", "E1", "E2", "E3"]


def test_outbox_replay_publishes_again_what_was_published_since_a_time_showing_progress_and_a_count(settings, stream):
    aggregate_type, name = stream
    other_type = f"{aggregate_type}x"
    client = redis.Redis.from_url(settings.REDIS_URL)
    for n in range(3):
        emit_to(aggregate_type, "a", f"E{n}")
    emit_to(other_type, "b", "OTHER")
    outbox_relay(publisher=RedisStreamPublisher(settings.REDIS_URL))
    OutboxEvent.objects.filter(event_type="E0").update(published_at=timezone.now() - timedelta(hours=3))
    client.delete(name, f"events.{other_type}")
    one_stream, every_stream = StringIO(), StringIO()

    call_command("outbox_replay", "--since", "2h", "--stream", name, stdout=one_stream)
    replayed_one_stream = types_in(client, name)
    since = (timezone.now() - timedelta(hours=4)).isoformat()
    call_command("outbox_replay", "--since", since, stdout=every_stream)
    client.delete(f"events.{other_type}")

    assert replayed_one_stream == ["E1", "E2"]
    assert f"{name}: 2/2" in one_stream.getvalue()
    assert one_stream.getvalue().rstrip().endswith("published 2 event(s) again to 1 stream(s)")
    assert types_in(client, name) == ["E1", "E2", "E0", "E1", "E2"], "consumers dedupe by id and order by sequence"
    assert every_stream.getvalue().rstrip().endswith("published 4 event(s) again to 2 stream(s)")
    with pytest.raises(CommandError, match="duration"):
        call_command("outbox_replay", "--since", "yesterday")
    with pytest.raises(CommandError, match="events.<aggregate type>"):
        call_command("outbox_replay", "--since", "1h", "--stream", "order")


def test_when_the_newest_surviving_entry_is_not_the_relays_every_retained_event_is_published_again(settings, stream):
    aggregate_type, name = stream
    publisher = RedisStreamPublisher(settings.REDIS_URL)
    publisher.client.xadd(name, {"note": "added by hand"})
    for n in range(3):
        emit_to(aggregate_type, "a", f"E{n}")
    outbox_relay(publisher=publisher)
    relays_entries = [entry_id for entry_id, fields in publisher.client.xrange(name) if b"id" in fields]
    publisher.client.xdel(name, *relays_entries)  # lost; what survived carries no created_at

    republished = publisher.verify(force=True)

    assert republished == 3
    assert [fields.get(b"type") for _, fields in publisher.client.xrange(name)] == [None, b"E0", b"E1", b"E2"]
