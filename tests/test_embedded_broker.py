"""The embedded broker (config.broker, issue 11): Celery's SQLAlchemy transport on a SQLite file,
made to carry a saga's chain of messages without sleeping or locking between them. Each test uses
a broker file of its own, so they run in both test modes."""

import sqlite3
import time
import uuid
from queue import Empty

import pytest
from celery import current_app
from kombu import Connection

from sagas.testing import CeleryWorker, subprocess_environment
from tests.sagaapp.models import Effect


@pytest.fixture
def broker_url(tmp_path):
    return f"sqla-fast+sqlite:///{tmp_path}/broker.sqlite3"


def put(conn: Connection, queue: str, n: int) -> None:
    channel = conn.default_channel
    channel.queue_declare(queue)
    for i in range(n):
        channel._put(queue, {"body": str(i), "headers": {}, "properties": {"delivery_info": {}}})


def test_the_broker_file_is_in_wal_mode_and_a_taken_message_leaves_its_table(broker_url, tmp_path):
    queue = "q"
    with Connection(broker_url) as conn:
        put(conn, queue, 3)

        taken = [conn.default_channel._get(queue)["body"] for _ in range(3)]

        with pytest.raises(Empty):
            conn.default_channel._get(queue)
    db = sqlite3.connect(tmp_path / "broker.sqlite3")
    assert taken == ["0", "1", "2"]
    assert db.execute("PRAGMA journal_mode").fetchone() == ("wal",)
    assert db.execute("SELECT count(*) FROM kombu_message").fetchone() == (0,), "the stock transport keeps every taken message"


def test_looking_for_work_in_an_empty_queue_does_not_wait_for_the_write_lock(broker_url, tmp_path):
    with Connection(broker_url) as conn:
        put(conn, "q", 0)
        writer = sqlite3.connect(tmp_path / "broker.sqlite3", isolation_level=None)
        writer.execute("BEGIN IMMEDIATE")  # a publisher mid-commit holds the broker's write lock
        try:
            started = time.monotonic()
            with pytest.raises(Empty):
                conn.default_channel._get("q")
            looked_for = time.monotonic() - started
        finally:
            writer.execute("ROLLBACK")

    assert looked_for < 1.0, f"an idle poll waited {looked_for:.1f}s for the write lock"


def test_the_polling_interval_is_a_transport_option(broker_url):
    with Connection(broker_url, transport_options={"polling_interval": 0.05}) as conn:
        put(conn, "q", 1)  # the stock transport hands the option to create_engine, which refuses it

        assert conn.transport.polling_interval == 0.05


@pytest.mark.django_db(transaction=True)
def test_a_worker_takes_its_next_message_when_a_slot_frees_not_a_polling_interval_later(broker_url):
    # Given a worker with one pool process, prefetching one message, polling every 2 s
    queue = f"embedded-{uuid.uuid4().hex[:8]}"
    env = subprocess_environment(CELERY_BROKER_URL=broker_url, CELERY_TASK_DEFAULT_QUEUE=queue, BROKER_POLLING_INTERVAL="2.0")
    worker = CeleryWorker(queues=[queue], concurrency=1, env=env).start()
    try:
        # When five quick tasks are queued at once
        saga_id = str(uuid.uuid4())
        with Connection(broker_url) as conn:
            for _ in range(5):
                current_app.send_task("tests.record_effect", args=[saga_id], queue=queue, connection=conn)
        deadline = time.monotonic() + 30
        while Effect.objects.filter(saga_id=saga_id).count() < 5 and time.monotonic() < deadline:
            time.sleep(0.05)
    finally:
        worker.stop()

    # Then each one ran as soon as the one before it was acknowledged (not 4 x 2 s apart)
    times = list(Effect.objects.filter(saga_id=saga_id).values_list("created_at", flat=True))
    assert len(times) == 5, worker.output()[-3000:]
    assert (max(times) - min(times)).total_seconds() < 2.0, times
