"""Published means durable (DESIGN.md rule 16): when Redis loses stream entries whose outbox rows
are already marked published, the relay notices and publishes the retained events again, before
anything newer of theirs. Real `celery worker` and `celery beat` on PostgreSQL and a private
`redis-server` that the tests restart."""

import time
import uuid
from collections import Counter
from datetime import timedelta

import pytest
import redis
from django.db import transaction
from django.utils import timezone

from perf.services import PrivateRedis
from sagas.models import OutboxEvent
from sagas.outbox import outbox_emit
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
        aof = sorted(redis_server.aof_dir.glob("*.incr.aof"))[-1]
        on_disk = aof.stat().st_size
        # ...and ten published now that never reach the disk:
        tail = [emit(f"p{n % 3}", f"TAIL_{n}") for n in range(10)]
        assert wait_until(lambda: all_published() and len(entries(client)) == 20, timeout=30), relay.output()
        time.sleep(1.5)

        # When Redis dies and its AOF holds only what was fsynced before the tail
        redis_server.kill()
        with open(aof, "r+b") as file:
            file.truncate(on_disk)
        redis_server.start()
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
