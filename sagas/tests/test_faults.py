"""Fault injection (sagas.faults): what a step pays for it when no fault is injected."""

import pytest
from django.db import connection
from django.test.utils import CaptureQueriesContext

from sagas import services
from sagas.definition import FORWARD
from sagas.faults import fault_take
from sagas.testing import inject_fault
from sagas.tests.builders import three_steps

pytestmark = pytest.mark.django_db(transaction=True)


def test_a_step_without_a_fault_takes_no_write_transaction_to_find_out(settings):
    settings.SAGAS_FAULT_INJECTION = True
    saga = services.saga_start(definition=three_steps, input={})
    inject_fault(three_steps.name, "charge", kind="business")  # another step's

    with CaptureQueriesContext(connection) as queries:
        kinds = fault_take(saga=saga, step="reserve", direction=FORWARD)

    sql = [q["sql"].upper() for q in queries]
    assert kinds == frozenset()
    assert len(sql) == 1 and "FOR UPDATE" not in sql[0] and not sql[0].startswith("BEGIN"), sql


def test_an_injected_fault_is_still_taken_once(settings):
    settings.SAGAS_FAULT_INJECTION = True
    saga = services.saga_start(definition=three_steps, input={})
    inject_fault(three_steps.name, "charge", kind="business", times=1)

    taken = [fault_take(saga=saga, step="charge", direction=FORWARD) for _ in range(2)]

    assert taken == [frozenset({"business"}), frozenset()]
