"""Recording a rejected message (sagas.rejects): it must reach the table whenever the database
answers, and never raise."""

import pytest
from django.db import connection, connections

from sagas.models import RejectedMessage
from sagas.rejects import message_reject_record

pytestmark = pytest.mark.django_db(transaction=True)


@pytest.mark.services(reason="ends a PostgreSQL session from another one")
def test_a_rejected_message_is_recorded_on_a_connection_the_database_cut_since_its_last_use():
    # Given this process's connection, opened earlier (a worker's start-up check opens it), and
    # since cut by the server (PostgreSQL restarted, or an admin ended the session)
    connection.ensure_connection()
    with connection.cursor() as cursor:
        cursor.execute("SELECT pg_backend_pid()")
        [pid] = cursor.fetchone()
    other = connections.create_connection("default")
    try:
        with other.cursor() as cursor:
            cursor.execute("SELECT pg_terminate_backend(%s)", [pid])
    finally:
        other.close()

    # When a worker records a message it rejected
    message_reject_record(reason="not JSON", body="garbage after a restart", queue="q", close_connection=True)

    # Then it is recorded: the database answers, only the old connection was gone
    assert RejectedMessage.objects.filter(body="garbage after a restart").count() == 1


def test_recording_a_rejected_message_with_the_database_down_logs_it_and_does_not_raise(monkeypatch, caplog):
    tries = []

    def refuse(*args, **kwargs):
        from django.db import OperationalError

        tries.append(1)
        raise OperationalError("connection refused")

    monkeypatch.setattr(RejectedMessage, "save", refuse)

    message_reject_record(reason="not JSON", body="garbage", queue="q")

    assert "message_rejected_not_recorded queue=q: OperationalError" in caplog.text
    assert len(tries) == 2  # once more on a new connection, then given up
