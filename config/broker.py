"""Celery's SQLAlchemy transport, polling every 0.1 s instead of every second.

The stock transport hands every transport option to `sqlalchemy.create_engine`, so its polling
interval cannot be set through `broker_transport_options`; this subclass sets it instead. Used
only for the embedded broker (a SQLite file)."""

from kombu.transport.sqlalchemy import Transport as SQLAlchemyTransport


class Transport(SQLAlchemyTransport):
    polling_interval = 0.1
