"""pytest fixtures for sagas on a real worker. Enable with `pytest_plugins = ["sagas.testing.fixtures"]`.

`saga_worker` gives a running `celery worker` subprocess that shares the test database and the
broker. It is started once per session and restarted for the next test if a test killed it.
"""

import pytest

from sagas.testing import CeleryWorker, purge_queues


@pytest.fixture(scope="session")
def _saga_worker_session(django_db_setup, django_db_blocker):
    with django_db_blocker.unblock():
        purge_queues()
        worker = CeleryWorker().start()
    yield worker
    worker.stop()


@pytest.fixture
def saga_worker(_saga_worker_session, transactional_db):
    """A live worker for this test (tests using it get a transactional database)."""
    worker = _saga_worker_session
    if not worker.alive:
        purge_queues()
        worker.start()
    yield worker
