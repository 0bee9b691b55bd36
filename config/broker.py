"""Celery's SQLAlchemy transport, polling every 0.1 s instead of every second.

The stock transport hands every transport option to `sqlalchemy.create_engine`, so its polling
interval cannot be set through `broker_transport_options`, and kombu lets a URL's `sqla+` prefix
win over `broker_transport`. So the subclass gets its own URL prefix: `sqla-fast+sqlite:///...`
(the embedded default). A plain `sqla+...` URL still works, polling once a second."""

from celery.worker.consumer import Consumer
from kombu.transport import TRANSPORT_ALIASES
from kombu.transport.sqlalchemy import Transport as SQLAlchemyTransport

PREFIX = "sqla-fast"


class Transport(SQLAlchemyTransport):
    polling_interval = 0.1


TRANSPORT_ALIASES[PREFIX] = "config.broker:Transport"



class WorkerConsumer(Consumer):
    """The worker's consumer (settings.CELERY_WORKER_CONSUMER), as in Celery 5.6 when the broker
    connection is lost: the dead connection is collected, not also closed.

    Celery 5.7.0 closes it after collecting it. With Redis, closing the channel tries to put the
    unacknowledged messages back, and acking a task that finishes afterwards reaches for the
    channel's connection pool; both go through a transport whose client the collect removed, raise
    AttributeError, and the worker process exits ("Unrecoverable error"): every Redis restart took
    our workers down (found by `make chaos`, kept by
    tests/test_saga_recovery.py::test_a_worker_survives_its_redis_broker_restarting_while_it_holds_a_message).
    Left alone, the unacknowledged messages stay in Redis's unacked set and come back after the
    visibility timeout (or are gone with a Redis that restarted empty; the sweeper covers that)."""

    def on_connection_error_after_connected(self, exc):
        if self.connection is not None:
            self.connection.close = lambda: None  # this connection object only; it is dropped next
        super().on_connection_error_after_connected(exc)
