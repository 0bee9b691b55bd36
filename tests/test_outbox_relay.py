"""The transactional outbox and its relay: each guarantee of the outbox issue as its own test."""

import os
import threading
import time
import uuid
from datetime import timedelta
from types import SimpleNamespace
from unittest import mock

import pytest
from django.conf import settings
from django.db import connection, transaction
from django.utils import timezone

from sagas.models import OutboxEvent
from sagas.outbox import KICK_EXPIRES, FileKickMark, OutsideTransaction, kick_mark_clear, outbox_emit
from sagas.publishers import Outcomes, RedisStreamPublisher, destination
from sagas.relay import outbox_cleanup, outbox_relay, outbox_replay

services_only = pytest.mark.services(reason="needs PostgreSQL row locks (SKIP LOCKED) and Redis Streams")


class Recorder:
    """A publisher that records what it was handed; `fail(aggregate_id)` makes that aggregate's events fail."""

    name = "recorder"

    def __init__(self):
        self.published: list[tuple[str, str, int]] = []
        self.failing: set[str] = set()
        self.lock = threading.Lock()

    def publish(self, events):
        outcomes = []
        with self.lock:
            for event in events:
                if event.aggregate_id in self.failing:
                    outcomes.append(ConnectionError(f"broker refused {event.aggregate_id}"))
                else:
                    self.published.append((event.aggregate_id, event.event_type, event.sequence))
                    outcomes.append(None)
        return outcomes


def emit(aggregate_id: str, event_type: str = "THING_HAPPENED", aggregate_type: str = "thing") -> OutboxEvent:
    with transaction.atomic():
        return outbox_emit(aggregate_type=aggregate_type, aggregate_id=aggregate_id, event_type=event_type, payload={"n": event_type})


@pytest.mark.django_db(transaction=True)
def test_emitting_outside_a_transaction_is_refused():
    with pytest.raises(OutsideTransaction):
        outbox_emit(aggregate_type="thing", aggregate_id="1", event_type="X", payload={})

    assert not OutboxEvent.objects.exists()


@pytest.mark.django_db(transaction=True)
def test_an_event_rolled_back_with_its_transaction_is_never_published():
    with pytest.raises(RuntimeError), transaction.atomic():
        outbox_emit(aggregate_type="thing", aggregate_id="1", event_type="X", payload={})
        raise RuntimeError("the business change failed")
    recorder = Recorder()

    outbox_relay(publisher=recorder)

    assert recorder.published == [] and not OutboxEvent.objects.exists()


@pytest.mark.django_db(transaction=True)
def test_events_are_published_once_in_order_per_aggregate_and_marked():
    for n in range(3):
        for aggregate in ("a", "b"):
            emit(aggregate, f"E{n}")
    recorder = Recorder()

    result = outbox_relay(publisher=recorder)

    assert result.published == 6
    for aggregate in ("a", "b"):
        assert [t for a, t, _ in recorder.published if a == aggregate] == ["E0", "E1", "E2"]
    assert not OutboxEvent.objects.filter(published_at=None).exists()
    assert outbox_relay(publisher=recorder).published == 0, "nothing is published twice"


@pytest.mark.django_db(transaction=True)
def test_commits_while_a_kick_is_queued_send_no_more_kicks_until_a_relay_starts(monkeypatch):
    kicks = []
    monkeypatch.setattr("sagas.outbox.signature", lambda name, **options: SimpleNamespace(apply_async=lambda: kicks.append(name)))
    kick_mark_clear()

    emit("a", "E1")
    emit("b", "E2")  # the first kick's relay has not started yet: it will see E2 too
    kicks_before_a_relay_started = len(kicks)
    kick_mark_clear()  # what each relay run does first
    emit("c", "E3")

    assert (kicks_before_a_relay_started, len(kicks)) == (1, 2)
    assert kicks == ["sagas.relay_outbox"] * 2


def test_a_kick_mark_file_older_than_a_kick_lives_is_taken_over(tmp_path):
    mark = FileKickMark(tmp_path / "db.sqlite3.relay-kick")

    first, second = mark.take(), mark.take()
    expired = time.time() - KICK_EXPIRES - 1
    os.utime(mark.path, (expired, expired))  # its kick was lost and no relay cleared it
    after_expiry = mark.take()
    mark.clear()
    after_a_relay_started = mark.take()

    assert (first, second, after_expiry, after_a_relay_started) == (True, False, True, True)


@pytest.mark.django_db(transaction=True)
def test_an_event_committed_when_no_relay_ran_after_it_is_published_by_the_next_run():
    emit("a", "E0")  # the process died right after the commit: its kick never reached a relay
    recorder = Recorder()

    outbox_relay(publisher=recorder)  # the beat's next run

    assert [t for _, t, _ in recorder.published] == ["E0"]


@pytest.mark.django_db(transaction=True)
def test_a_crash_between_publish_and_mark_publishes_again_and_loses_nothing():
    emit("a", "E0")
    emit("a", "E1")

    class CrashAfterPublish(Recorder):
        def publish(self, events):
            super().publish(events)
            raise SystemExit("relay process killed before it could mark the batch")

    crashing = CrashAfterPublish()
    with pytest.raises(SystemExit):
        outbox_relay(publisher=crashing)
    recorder = Recorder()
    outbox_relay(publisher=recorder)

    assert [t for _, t, _ in crashing.published] == ["E0"]
    assert [t for _, t, _ in recorder.published] == ["E0", "E1"], "the unmarked event goes out again (at least once)"
    assert not OutboxEvent.objects.filter(published_at=None).exists()


@pytest.mark.django_db(transaction=True)
def test_a_poison_event_backs_off_then_is_dead_lettered_holding_back_only_its_aggregate(settings):
    settings.OUTBOX_MAX_ATTEMPTS = 3
    settings.OUTBOX_RETRY_BACKOFF = 0.0  # due again at once, so the test needs no clock games
    poison = emit("bad", "P0")
    emit("bad", "P1")
    emit("good", "G0")
    recorder = Recorder()
    recorder.failing.add("bad")

    for _ in range(5):
        outbox_relay(publisher=recorder)
        emit("good", f"G{len(recorder.published)}")
    outbox_relay(publisher=recorder)

    poison.refresh_from_db()
    assert poison.attempts == 3 and poison.dead_lettered_at is not None and "broker refused" in poison.last_error
    assert OutboxEvent.objects.get(event_type="P1").published_at is None, "its aggregate waits behind it"
    assert {a for a, _, _ in recorder.published} == {"good"}
    assert not OutboxEvent.objects.filter(aggregate_id="good", published_at=None).exists(), "others keep flowing"

    recorder.failing.clear()
    assert outbox_replay(event_ids=[poison.pk]) == 1
    outbox_relay(publisher=recorder)

    assert [t for a, t, _ in recorder.published if a == "bad"] == ["P0", "P1"]


@pytest.mark.django_db(transaction=True)
def test_a_failed_publish_is_retried_with_exponential_backoff(settings):
    settings.OUTBOX_RETRY_BACKOFF = 10.0
    settings.OUTBOX_RETRY_MAX_DELAY = 1000.0
    event = emit("bad")
    recorder = Recorder()
    recorder.failing.add("bad")
    delays = []

    for _ in range(3):
        OutboxEvent.objects.filter(pk=event.pk).update(next_attempt_at=None)  # due now
        before = timezone.now()
        outbox_relay(publisher=recorder)
        event.refresh_from_db()
        delays.append((event.next_attempt_at - before).total_seconds())

    assert 5 <= delays[0] <= 10.5 and 10 <= delays[1] <= 20.5 and 20 <= delays[2] <= 40.5, delays
    assert outbox_relay(publisher=recorder).published == 0, "not due before its next attempt time"


@pytest.mark.django_db(transaction=True)
def test_cleanup_deletes_only_published_events_older_than_the_retention():
    old, recent, unpublished = emit("a", "OLD"), emit("b", "RECENT"), emit("c", "UNPUBLISHED")
    now = timezone.now()
    OutboxEvent.objects.filter(pk=old.pk).update(published_at=now - timedelta(days=30))
    OutboxEvent.objects.filter(pk=recent.pk).update(published_at=now - timedelta(hours=1))
    OutboxEvent.objects.filter(pk=unpublished.pk).update(created_at=now - timedelta(days=300))

    run = outbox_cleanup(now=now, retention=timedelta(days=7))

    assert run.deleted == 1
    assert set(OutboxEvent.objects.values_list("event_type", flat=True)) == {"RECENT", "UNPUBLISHED"}


@services_only
@pytest.mark.django_db(transaction=True)
def test_an_event_committed_out_of_sequence_order_is_still_published():
    started, release = threading.Event(), threading.Event()

    def slow_writer():
        with transaction.atomic():
            outbox_emit(aggregate_type="thing", aggregate_id="slow", event_type="LATE", payload={})
            started.set()
            release.wait(10)
        connection.close()

    writer = threading.Thread(target=slow_writer)
    writer.start()
    started.wait(10)
    emit("fast", "EARLY")  # takes a higher sequence, commits first
    recorder = Recorder()
    outbox_relay(publisher=recorder)
    release.set()
    writer.join()
    outbox_relay(publisher=recorder)

    assert [t for _, t, _ in recorder.published] == ["EARLY", "LATE"]
    late = OutboxEvent.objects.get(event_type="LATE")
    assert late.sequence < OutboxEvent.objects.get(event_type="EARLY").sequence and late.published_at is not None


@services_only
@pytest.mark.django_db(transaction=True)
def test_several_relays_at_once_publish_10000_events_exactly_once_in_order_per_aggregate():
    aggregate_type = f"load{uuid.uuid4().hex[:8]}"
    rows = [
        OutboxEvent(aggregate_type=aggregate_type, aggregate_id=str(n % 200), event_type=f"E{n // 200}", payload={}, created_at=timezone.now())
        for n in range(10_000)
    ]
    OutboxEvent.objects.bulk_create(rows, batch_size=2000)
    publisher = RedisStreamPublisher(settings.REDIS_URL)
    stream = f"events.{aggregate_type}"
    publisher.client.delete(stream)
    errors = []

    def relay_until_drained():
        try:
            while OutboxEvent.objects.filter(aggregate_type=aggregate_type, published_at=None).exists():
                outbox_relay(publisher=publisher, batch_size=300)
        except Exception as exc:  # noqa: BLE001 - surfaced by the assertion below
            errors.append(exc)
        finally:
            connection.close()

    relays = [threading.Thread(target=relay_until_drained) for _ in range(4)]  # two beats, two kicks
    for relay in relays:
        relay.start()
    for relay in relays:
        relay.join(120)

    entries = publisher.client.xrange(stream)
    publisher.client.delete(stream)
    assert errors == []
    ids = [fields[b"id"] for _, fields in entries]
    assert len(ids) == 10_000 and len(set(ids)) == 10_000, "every event exactly once"
    by_aggregate: dict[bytes, list[int]] = {}
    for _, fields in entries:
        by_aggregate.setdefault(fields[b"aggregate_id"], []).append(int(fields[b"sequence"]))
    assert all(seq == sorted(seq) for seq in by_aggregate.values()), "order per aggregate"
    assert not OutboxEvent.objects.filter(aggregate_type=aggregate_type, published_at=None).exists()


@services_only
@pytest.mark.django_db(transaction=True)
def test_the_redis_publisher_routes_by_aggregate_type_keyed_by_aggregate_id():
    event = emit("order-1", "ORDER_CREATED", aggregate_type=f"order{uuid.uuid4().hex[:6]}")
    publisher = RedisStreamPublisher(settings.REDIS_URL)

    outbox_relay(publisher=publisher)

    [(_, fields)] = publisher.client.xrange(destination(event))
    publisher.client.delete(destination(event))
    assert fields[b"id"].decode() == str(event.id)
    assert (fields[b"type"], fields[b"aggregate_id"]) == (b"ORDER_CREATED", b"order-1")
    assert b'"n": "ORDER_CREATED"' in fields[b"payload"]


@pytest.mark.django_db(transaction=True)
def test_a_relay_stuck_publishing_does_not_hold_the_other_relays_back():
    for n in range(20):
        emit(f"agg-{n}")
    claimed, release = threading.Event(), threading.Event()

    class Stuck(Recorder):
        def publish(self, events):
            claimed.set()
            release.wait(30)  # e.g. a broker that stopped answering mid-batch
            return super().publish(events)

    def stuck_relay():
        outbox_relay(publisher=Stuck(), batch_size=5)
        connection.close()

    stuck = threading.Thread(target=stuck_relay)
    stuck.start()
    claimed.wait(10)
    recorder, done = Recorder(), threading.Event()

    def other_relay():
        outbox_relay(publisher=recorder, batch_size=100, time_budget=0)
        connection.close()
        done.set()

    threading.Thread(target=other_relay).start()
    finished_while_stuck = done.wait(5)
    release.set()
    stuck.join(30)

    assert finished_while_stuck, "the second relay waited for the first one's claimed rows (or SQLite's write lock)"
    assert len(recorder.published) == 15


@pytest.mark.django_db(transaction=True)
def test_the_relay_holds_no_transaction_while_it_publishes():
    claimed = emit("a", "E0")
    seen = {}

    class Checking(Recorder):
        def publish(self, events):
            seen["in_transaction"] = connection.in_atomic_block

            def write():  # another process writing while the broker is slow: a step, a request
                try:
                    emit("b", "OTHER")
                    OutboxEvent.objects.filter(pk=claimed.pk).update(last_error="")  # the claimed row itself
                    seen["wrote"] = True
                finally:
                    connection.close()

            writer = threading.Thread(target=write)
            writer.start()
            writer.join(5)
            return super().publish(events)

    outbox_relay(publisher=Checking(), time_budget=0)

    assert seen == {"in_transaction": False, "wrote": True}, "the relay held SQLite's write lock or the rows' locks while publishing"
    assert OutboxEvent.objects.get(pk=claimed.pk).published_at is not None


@pytest.mark.django_db(transaction=True)
def test_a_relay_killed_after_claiming_holds_its_events_back_only_until_the_lease_ends():
    from sagas import relay

    emit("a", "E0")
    emit("a", "E1")
    relay._claim(batch_size=10, now=timezone.now())  # ...and the relay process died here
    recorder = Recorder()

    while_leased = outbox_relay(publisher=recorder).published
    outbox_relay(publisher=recorder)  # nothing: the claimed head holds its aggregate back too
    published_meanwhile = list(recorder.published)
    later = timezone.now() + relay.CLAIM_LEASE + timedelta(seconds=1)
    with mock.patch("sagas.relay.timezone.now", return_value=later):
        after_the_lease = outbox_relay(publisher=recorder).published

    assert (while_leased, published_meanwhile) == (0, [])
    assert after_the_lease == 2 and [t for _, t, _ in recorder.published] == ["E0", "E1"]


@pytest.mark.django_db(transaction=True)
def test_what_a_publisher_records_commits_with_the_marks_of_its_batch():
    emit("a", "E0")
    recorded = []

    class Recording(Recorder):
        def publish(self, events):
            def record():
                recorded.append((connection.in_atomic_block, OutboxEvent.objects.filter(published_at=None).count()))

            return Outcomes(super().publish(events), record=record)

    outbox_relay(publisher=Recording())

    assert recorded == [(True, 0)], "recorded inside the transaction that marked the batch published"


@pytest.mark.django_db(transaction=True)
def test_staff_list_and_replay_dead_lettered_events_and_health_counts_them(settings):
    from rest_framework.test import APIClient

    from tests.orders_helpers import an_operator

    settings.OUTBOX_MAX_ATTEMPTS = 1
    poison = emit("bad")
    recorder = Recorder()
    recorder.failing.add("bad")
    outbox_relay(publisher=recorder)
    staff = APIClient()
    staff.force_authenticate(an_operator())

    listed = staff.get("/api/outbox/dead-letter/").json()
    health = staff.get("/api/health/").json()
    replayed = staff.post(f"/api/outbox/{poison.id}/replay/")
    again = staff.post(f"/api/outbox/{poison.id}/replay/")

    assert [e["id"] for e in listed["results"]] == [str(poison.id)]
    assert health["outbox"]["dead_lettered"] == 1
    assert replayed.status_code == 202 and replayed.json()["dead_lettered_at"] is None
    assert again.status_code == 409
    assert APIClient().get("/api/outbox/dead-letter/").status_code == 401


@services_only
@pytest.mark.django_db(transaction=True)
def test_two_transactions_emitting_for_one_aggregate_publish_in_commit_order():
    first_emitted, release = threading.Event(), threading.Event()

    def slow_first():
        with transaction.atomic():
            outbox_emit(aggregate_type="thing", aggregate_id="same", event_type="FIRST", payload={})
            first_emitted.set()
            release.wait(10)
        connection.close()

    def second():
        emit("same", "SECOND")  # waits for the first transaction, so it commits after it
        connection.close()

    writer = threading.Thread(target=slow_first)
    writer.start()
    first_emitted.wait(10)
    follower = threading.Thread(target=second)
    follower.start()
    follower.join(0.5)
    recorder = Recorder()
    outbox_relay(publisher=recorder)  # nothing of the aggregate may go out before FIRST commits
    release.set()
    writer.join()
    follower.join(10)
    outbox_relay(publisher=recorder)

    assert [t for _, t, _ in recorder.published] == ["FIRST", "SECOND"]


# --- a round costs what its batch costs -------------------------------------------------------------


@pytest.mark.services(reason="counts the rows PostgreSQL reads (EXPLAIN ANALYZE)")
@pytest.mark.django_db(transaction=True)
def test_a_claim_reads_what_its_batch_needs_however_long_the_backlog_and_however_old_the_statistics(settings):
    from sagas import relay
    from tests.scan_helpers import rows_read, statistics_reset, statistics_taken_now

    settings.OUTBOX_RELAY_KICK = False
    for n in range(1000):
        emit(str(n % 200), "EARLIER")
    outbox_relay(publisher=Recorder())
    statistics_taken_now(OutboxEvent._meta.db_table)  # before the backlog: as autovacuum usually leaves them
    try:
        with transaction.atomic():
            for n in range(3000):
                outbox_emit(aggregate_type="thing", aggregate_id=str(n), event_type="WAITING", payload={})

        read = rows_read(lambda: relay._claim(batch_size=50, now=timezone.now()), OutboxEvent._meta.db_table)
    finally:
        statistics_reset(OutboxEvent._meta.db_table)

    assert read <= 4 * 50, f"one claim of 50 read {read} rows of a 3,000-event backlog"


@pytest.mark.django_db(transaction=True)
def test_events_held_back_behind_a_parked_head_do_not_keep_a_round_from_the_other_aggregates(settings):
    settings.OUTBOX_MAX_ATTEMPTS = 1
    recorder = Recorder()
    recorder.failing.add("stuck")
    for n in range(7):
        emit("stuck", f"STUCK_{n}")
    free = emit("free", "FREE")

    outbox_relay(publisher=recorder, batch_size=2)

    assert recorder.published == [("free", "FREE", free.sequence)]
    assert OutboxEvent.objects.filter(aggregate_id="stuck", dead_lettered_at__isnull=False).count() == 1
    assert OutboxEvent.objects.filter(aggregate_id="stuck", published_at__isnull=True).count() == 7
