"""A deadline for a web request's database queries, enforced from outside the query.

A frozen PostgreSQL (SIGSTOPped, or a network that drops packets) never answers, and nothing on
the server can cancel a query then: libpq waits forever. So each request gets a deadline
(settings.WEB_DB_DEADLINE seconds from its start); a watchdog thread shuts down the socket of a
query still running past it. The query then fails with an OperationalError, which
config.outage answers as a 503. Connecting is bounded on its own (connect_timeout).

`bounded(seconds)` applies the same to any block of code on the current thread's connection
(the health check uses it).
"""

from __future__ import annotations

import logging
import os
import socket
import threading
import time
from contextlib import contextmanager

from django.conf import settings
from django.db import connection

log = logging.getLogger("chainsaga.outage")

_lock = threading.Lock()
_running: dict[int, tuple[float, int]] = {}  # thread id -> (deadline, socket fd) of a query in progress
_watchdog: threading.Thread | None = None
TICK = 0.1


@contextmanager
def bounded(seconds: float):
    """Queries on this thread's default connection inside the block fail once `seconds` have
    passed since it began (PostgreSQL; elsewhere a no-op)."""
    if seconds <= 0 or connection.vendor != "postgresql":
        yield
        return
    deadline = time.monotonic() + seconds

    def watched(execute, sql, params, many, context):
        fd = _socket_of(context["connection"])
        if fd is None:
            return execute(sql, params, many, context)
        _ensure_watchdog()
        with _lock:
            _running[threading.get_ident()] = (deadline, fd)
        try:
            return execute(sql, params, many, context)
        finally:
            with _lock:
                _running.pop(threading.get_ident(), None)

    with connection.execute_wrapper(watched):
        yield


class QueryDeadlineMiddleware:
    """Every query of a request must finish within settings.WEB_DB_DEADLINE of the request's start."""

    def __init__(self, get_response):
        self.get_response = get_response

    def __call__(self, request):
        with bounded(settings.WEB_DB_DEADLINE):
            return self.get_response(request)


def _socket_of(db) -> int | None:
    raw = getattr(db, "connection", None)
    pgconn = getattr(raw, "pgconn", None)
    try:
        return pgconn.socket if pgconn is not None else None
    except Exception:  # noqa: BLE001 - a connection already broken has no socket: nothing to watch
        return None


def _ensure_watchdog() -> None:
    global _watchdog
    if _watchdog is not None and _watchdog.is_alive():
        return
    with _lock:
        if _watchdog is None or not _watchdog.is_alive():
            _watchdog = threading.Thread(target=_watch, name="db-deadline", daemon=True)
            _watchdog.start()


def _watch() -> None:
    while True:
        time.sleep(TICK)
        now = time.monotonic()
        # Under the lock: the query's thread cannot return and close (and the number be reused)
        # the socket while it is being cut.
        with _lock:
            overdue = [(ident, fd) for ident, (deadline, fd) in _running.items() if deadline <= now]
            for ident, fd in overdue:
                _running.pop(ident, None)
                _cut(fd)


def _cut(fd: int) -> None:
    """Shut the socket down under the waiting libpq call: it returns with an error at once."""
    try:
        sock = socket.socket(fileno=os.dup(fd))
    except OSError:
        return  # closed meanwhile: the query finished
    try:
        sock.shutdown(socket.SHUT_RDWR)
        log.warning("db_deadline_exceeded: a query ran past the request's deadline; its connection was cut")
    except OSError:
        pass
    finally:
        sock.close()
