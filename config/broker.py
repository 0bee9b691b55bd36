"""The broker transports and worker consumer this project runs on.

- `redis://`, `rediss://`, `sqla+`/`sqlalchemy+` URLs get the transports of sagas.worker, which
  drop (and record) a message they cannot read instead of dying on it.
- The embedded default is Celery's SQLAlchemy transport polling every 0.1 s instead of every
  second. The stock transport hands every transport option to `sqlalchemy.create_engine`, so its
  polling interval cannot be set through `broker_transport_options`, and kombu lets a URL's
  `sqla+` prefix win over `broker_transport`. So the subclass gets its own URL prefix:
  `sqla-fast+sqlite:///...`.
- The worker consumer is sagas.worker.WorkerConsumer (settings.CELERY_WORKER_CONSUMER).
"""

from kombu.transport import TRANSPORT_ALIASES

from sagas.worker import SQLAlchemyTransport

PREFIX = "sqla-fast"


class Transport(SQLAlchemyTransport):
    polling_interval = 0.1


TRANSPORT_ALIASES.update(
    {
        "redis": "sagas.worker:RedisTransport",
        "rediss": "sagas.worker:RedisTransport",
        "sqla": "sagas.worker:SQLAlchemyTransport",
        "sqlalchemy": "sagas.worker:SQLAlchemyTransport",
        PREFIX: "config.broker:Transport",
    }
)
