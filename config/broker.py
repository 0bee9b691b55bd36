"""Celery's SQLAlchemy transport, polling every 0.1 s instead of every second.

The stock transport hands every transport option to `sqlalchemy.create_engine`, so its polling
interval cannot be set through `broker_transport_options`, and kombu lets a URL's `sqla+` prefix
win over `broker_transport`. So the subclass gets its own URL prefix: `sqla-fast+sqlite:///...`
(the embedded default). A plain `sqla+...` URL still works, polling once a second."""

from kombu.transport import TRANSPORT_ALIASES
from kombu.transport.sqlalchemy import Transport as SQLAlchemyTransport

PREFIX = "sqla-fast"


class Transport(SQLAlchemyTransport):
    polling_interval = 0.1


TRANSPORT_ALIASES[PREFIX] = "config.broker:Transport"
