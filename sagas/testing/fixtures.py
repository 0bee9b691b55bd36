"""pytest fixtures for sagas on a real worker. Enable with `pytest_plugins = ["sagas.testing.fixtures"]`.

`saga_worker` gives a running `celery worker` subprocess that shares the test database and the
broker. It is started once per session and restarted for the next test if a test killed it.

A test that does not ask for `saga_worker` must not feed that long-lived worker: it would run
the test's sagas while the test's tables are being flushed. So such a test's messages go to a
parked queue that no worker consumes (and that is purged at the end of the session).
"""

import time

import pytest
from celery.canvas import Signature
from django.conf import settings
from django.db import connection
from django.utils import timezone

from sagas.models import ACTIVE_STATES, SagaInstance, StepExecution, StepState
from sagas.outbox import kick_mark_clear
from sagas.testing import CeleryWorker, purge_queues

QUIET_FOR = 0.5  # seconds without saga-log writes before a worker test's tables are flushed


def parked_queue() -> str:
    return f"{settings.CELERY_TASK_DEFAULT_QUEUE}-parked"


@pytest.fixture(scope="session")
def _saga_worker_session(django_db_setup, django_db_blocker):
    with django_db_blocker.unblock():
        purge_queues()
        worker = CeleryWorker().start()
    yield worker
    worker.stop()
    with django_db_blocker.unblock():
        purge_queues(parked_queue())


@pytest.fixture(autouse=True)
def _park_messages_without_a_worker(request, monkeypatch):
    if "saga_worker" in request.fixturenames:
        return
    send = Signature.apply_async

    def parked(self, args=None, kwargs=None, route_name=None, **options):
        options["queue"] = parked_queue()
        return send(self, args, kwargs, route_name, **options)

    monkeypatch.setattr(Signature, "apply_async", parked)


@pytest.fixture
def saga_worker(_saga_worker_session, transactional_db):
    """A live worker for this test (tests using it get a transactional database)."""
    worker = _saga_worker_session
    if not worker.alive:
        purge_queues()
        worker.start()
    kick_mark_clear()  # a kick parked or purged by an earlier test must not hold back this one's
    yield worker
    _settle()


def _transactions_elsewhere() -> bool:
    """Another session of the test database is inside a transaction (PostgreSQL): a step in hand.
    A step's first delivery shows nothing in the saga log until its one transaction commits."""
    if connection.vendor != "postgresql":
        return False  # the embedded transport's deliveries are counted, RUNNING, before they run
    with connection.cursor() as cursor:
        cursor.execute(
            "SELECT EXISTS (SELECT 1 FROM pg_stat_activity WHERE datname = current_database() "
            "AND pid <> pg_backend_pid() AND xact_start IS NOT NULL)"
        )
        return cursor.fetchone()[0]


def _settle(timeout: float = 10.0) -> None:
    """Drop what is still queued and let the worker finish what it holds, so that flushing the
    test's tables does not race (and deadlock) with a step still writing to them."""
    purge_queues()
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        busy = _transactions_elsewhere() or StepExecution.objects.filter(state=StepState.RUNNING, saga__state__in=ACTIVE_STATES).exists()
        latest = SagaInstance.objects.order_by("-updated_at").values_list("updated_at", flat=True).first()
        if not busy and (latest is None or (timezone.now() - latest).total_seconds() > QUIET_FOR):
            return
        time.sleep(0.1)
