"""Logs as an operator reads them (config.logs, sagas.log): with LOG_FORMAT=json every line a
worker logs while a step runs, Celery's own task lines included, carries the step's saga id, name,
version, step, direction and delivery; a business refusal is an INFO line without a traceback;
the relay's housekeeping is silent at INFO."""

import json

import pytest
from celery import signature

from sagas.models import FaultKind, SagaState
from sagas.testing import CeleryWorker, inject_fault, subprocess_environment, timeline, wait_for_saga
from sagas.testing.fixtures import parked_queue
from tests.sagaapp.sagas import four_steps

pytestmark = pytest.mark.django_db(transaction=True)


def test_json_lines_of_a_step_carry_its_context_and_a_refusal_has_no_traceback():
    """No saga_worker: this test's messages go to the parked queue, which this worker consumes."""
    env = subprocess_environment(LOG_FORMAT="json", CELERY_TASK_DEFAULT_QUEUE=parked_queue())  # its next steps go there too
    with CeleryWorker(queues=[parked_queue()], concurrency=1, env=env) as worker:
        signature("sagas.relay_outbox").apply_async()  # runs before the saga's steps (one process, in order)
        inject_fault(four_steps.name, "ship", kind=FaultKind.BUSINESS)
        saga = wait_for_saga(four_steps.start(input={}).id)
        assert saga.state == SagaState.COMPENSATED, timeline(saga.id)
        output = worker.output()

    lines = [json.loads(line) for line in output.splitlines() if line.startswith("{")]
    assert lines, output[-2000:]
    plain = [line for line in output.splitlines() if str(saga.id) in line and not line.startswith("{")]
    assert not plain, f"every line about the saga is JSON (Celery's banner at start is not logged): {plain[:3]}"
    succeeded = [line for line in lines if line["message"].startswith("Task sagas.run_step[") and " succeeded " in line["message"]]
    assert len(succeeded) >= 3, "reserve, charge and the compensations"
    for line in succeeded:
        assert line["saga_id"] == str(saga.id)
        assert (line["saga_name"], line["saga_version"]) == (four_steps.name, four_steps.version)
        assert line["step"] in ("reserve", "charge", "ship", "notify") and line["direction"] in ("forward", "compensate")
        assert line["delivery"] == 1
    refused = [line for line in lines if "raised expected" in line["message"]]
    assert len(refused) == 1 and refused[0]["level"] == "info" and refused[0]["step"] == "ship", refused
    assert "exception" not in refused[0] and "Traceback" not in output
    assert not [line for line in lines if "sagas.relay_outbox" in line["message"] and line["level"] == "info"]


def test_plain_lines_of_celery_about_a_step_end_with_its_saga_fields():
    env = subprocess_environment(CELERY_TASK_DEFAULT_QUEUE=parked_queue())
    with CeleryWorker(queues=[parked_queue()], concurrency=1, env=env) as worker:
        saga = wait_for_saga(four_steps.start(input={}).id)
        output = worker.output()

    succeeded = [line for line in output.splitlines() if "Task sagas.run_step[" in line and " succeeded " in line]
    assert len(succeeded) == 4, output[-2000:]
    for line in succeeded:
        assert line.endswith("]") and f"[saga={saga.id} name={four_steps.name} v={four_steps.version} step=" in line, line
