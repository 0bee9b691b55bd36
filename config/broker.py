"""The broker transports and worker consumer this project runs on.

- `redis://`, `rediss://`, `sqla+`/`sqlalchemy+` URLs get the transports of sagas.worker, which
  drop (and record) a message they cannot read instead of dying on it.
- The embedded default, `sqla-fast+sqlite:///...`, is Celery's SQLAlchemy transport made fit to
  carry a saga's chain of messages on one machine (issue 11). Kombu lets a URL's `sqla+` prefix
  win over `broker_transport`, so this transport has its own URL prefix. What it changes, on
  SQLite:
    - the broker file is in WAL mode with synchronous=NORMAL and a busy timeout, like Django's
      (config.env): a publish no longer waits for two fsyncs, and a consumer's look for work
      does not block publishers;
    - a consumer looks for a message with a plain read (no lock) and takes the write lock only
      when there is one to take; the message it takes is deleted, not kept forever as an
      invisible row that every later look has to skip (the stock transport's table only grows);
    - a worker whose pool slots are all busy (prefetch) waits for a slot to free and looks again
      at once, instead of sleeping a whole polling interval after every task: that sleep, not
      the database, was most of the embedded mode's time (issue 11's profile);
    - the polling interval (how long a consumer with nothing to take waits before looking
      again) is the `polling_interval` broker transport option (BROKER_POLLING_INTERVAL, config.env).
      The stock transport hands every option to `sqlalchemy.create_engine`, which refuses it.
- The worker consumer is sagas.worker.WorkerConsumer (settings.CELERY_WORKER_CONSUMER).
"""

from __future__ import annotations

import socket
import threading
from json import dumps, loads
from queue import Empty
from time import monotonic

from kombu.transport import TRANSPORT_ALIASES
from kombu.transport import sqlalchemy as kombu_sqlalchemy
from kombu.transport import virtual
from kombu.utils.encoding import bytes_to_str
from sqlalchemy import create_engine, event, text
from sqlalchemy.exc import SQLAlchemyError

from sagas.worker import SQLAlchemyChannel, SQLAlchemyTransport

PREFIX = "sqla-fast"
POLLING_INTERVAL = 0.1  # seconds; the transport option polling_interval overrides it
BUSY_TIMEOUT = 30  # seconds a writer waits for the broker file's lock, as Django's SQLite (config.env)
# Transport options kombu or this module read; the rest go to sqlalchemy.create_engine.
KOMBU_OPTIONS = frozenset({
    "queue_tablename", "message_tablename", "callback", "errback", "max_retries",
    "interval_start", "interval_step", "interval_max", "retry_errors", "polling_interval",
})


class QoS(virtual.QoS):
    """Prefetch accounting that tells the transport when a message is settled: a pool slot is free."""

    def ack(self, delivery_tag):
        super().ack(delivery_tag)
        self.channel.connection.slot_freed()

    def reject(self, delivery_tag, requeue=False):
        super().reject(delivery_tag, requeue=requeue)
        self.channel.connection.slot_freed()


class _SQLiteChannel(kombu_sqlalchemy.Channel):
    """kombu's SQLAlchemy channel, with the SQLite changes of this module. Below
    sagas.worker.SQLAlchemyChannel, which turns an unreadable envelope into a recorded drop."""

    QoS = QoS

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self._queue_ids: dict[str, int] = {}

    def _engine_from_config(self):
        client = self.connection.client
        options = {k: v for k, v in client.transport_options.items() if k not in KOMBU_OPTIONS}
        if client.hostname.startswith("sqlite"):
            options.setdefault("connect_args", {}).setdefault("timeout", BUSY_TIMEOUT)
        engine = create_engine(client.hostname, **options)
        if engine.dialect.name == "sqlite":
            event.listen(engine, "connect", _sqlite_pragmas)
            with engine.begin() as conn:  # messages the stock transport took and kept, invisible forever
                if engine.dialect.has_table(conn, self.message_tablename):
                    conn.execute(text(f"DELETE FROM {self.message_tablename} WHERE visible = 0"))
        return engine

    @property
    def _sqlite(self) -> bool:
        return self.session.bind.dialect.name == "sqlite"

    def _queue_id(self, queue: str) -> int:
        # Queue rows are never deleted, so an id once read stays right for this channel's life.
        if queue not in self._queue_ids:
            self._queue_ids[queue] = self._get_or_create(queue).id
        return self._queue_ids[queue]

    def _put(self, queue, payload, **kwargs):
        if not self._sqlite:
            return super()._put(queue, payload, **kwargs)
        session = self.session
        try:
            session.execute(
                text(f"INSERT INTO {self.message_tablename} (visible, payload, version, queue_id) VALUES (1, :payload, 1, :queue)"),
                {"payload": dumps(payload), "queue": self._queue_id(queue)},
            )
            session.commit()
        except SQLAlchemyError:
            session.rollback()  # as kombu's: the publish fails (and may be retried), the session stays usable
            raise

    def _get(self, queue):
        if not self._sqlite:
            return super()._get(queue)
        session, table, queue_id = self.session, self.message_tablename, self._queue_id(queue)
        oldest = text(f"SELECT id, payload FROM {table} WHERE queue_id = :queue AND visible != 0 ORDER BY timestamp, id LIMIT 1")
        try:
            # A read first: in WAL mode it takes no lock, so an idle consumer's polls cost publishers nothing.
            if session.execute(oldest, {"queue": queue_id}).first() is None:
                raise Empty()
            session.commit()  # end the read; BEGIN IMMEDIATE must start the transaction
            session.execute(text("BEGIN IMMEDIATE"))
            row = session.execute(oldest, {"queue": queue_id}).first()  # another consumer may have taken it
            if row is None:
                raise Empty()
            session.execute(text(f"DELETE FROM {table} WHERE id = :id"), {"id": row.id})
        finally:
            session.commit()
        return loads(bytes_to_str(row.payload))


class Channel(SQLAlchemyChannel, _SQLiteChannel):
    pass


def _sqlite_pragmas(dbapi_connection, _record) -> None:
    cursor = dbapi_connection.cursor()
    cursor.execute("PRAGMA journal_mode=WAL")
    cursor.execute("PRAGMA synchronous=NORMAL")
    cursor.close()


class Transport(SQLAlchemyTransport):
    Channel = Channel
    polling_interval = POLLING_INTERVAL

    def __init__(self, client, **kwargs):
        super().__init__(client, **kwargs)
        self._slot_freed = threading.Event()

    def slot_freed(self) -> None:
        """A message was acknowledged or rejected (by the pool's result thread): look for work now."""
        self._slot_freed.set()

    def drain_events(self, connection, timeout=None):
        """Deliver one message. With none to take, or every prefetch slot busy, wait until a slot
        frees or the polling interval has passed, then look again; socket.timeout after `timeout`."""
        started = monotonic()
        while True:
            self._slot_freed.clear()  # before looking: a slot freed while looking still wakes the wait
            try:
                self.cycle.get(self._deliver, timeout=timeout)
                return
            except Empty:
                pass
            wait = self.polling_interval
            if timeout is not None:
                left = timeout - (monotonic() - started)
                if left <= 0:
                    raise socket.timeout()
                wait = min(wait, left)
            self._slot_freed.wait(wait)


TRANSPORT_ALIASES.update(
    {
        "redis": "sagas.worker:RedisTransport",
        "rediss": "sagas.worker:RedisTransport",
        "sqla": "sagas.worker:SQLAlchemyTransport",
        "sqlalchemy": "sagas.worker:SQLAlchemyTransport",
        PREFIX: "config.broker:Transport",
    }
)
