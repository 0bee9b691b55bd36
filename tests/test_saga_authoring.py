"""What a saga author meets (issue 13): definitions checked when they are created, with errors
naming the saga and the step; durations as timedeltas or seconds; a step that returns something
that is not JSON fails at once, naming the step and the type; a compensation knows why the saga
is undone; on_finish gets the outcome; a reused idempotency key with another input is refused;
a worker without the saga's definition says so in one line and keeps the message."""

from datetime import timedelta

import pytest

from sagas import Retry, Saga, Step
from sagas.exceptions import InvalidSagaDefinition
from sagas.models import SagaInstance, SagaState, StepExecution, StepState
from sagas.testing import CeleryWorker, subprocess_environment, timeline, wait_for_saga
from sagas.testing.fixtures import parked_queue
from tests.engine_helpers import step_row
from tests.sagaapp.models import Effect
from tests.sagaapp.sagas import declined, not_json


def noop(ctx):
    return None


@pytest.mark.parametrize(
    "steps, message",
    [
        ([Step("reserve", action="reserve_stock")], "saga broken, step reserve: action must be a function taking the step context, not 'reserve_stock'"),
        ([Step("reserve", action=noop, compensation=42)], "saga broken, step reserve: compensation must be a function"),
        ([Step("reserve", action=noop), Step("reserve", action=noop)], "saga broken has more than one step named reserve"),
        ([Step("charge", action=noop, compensate_uncertain=True)], "saga broken, step charge: compensate_uncertain needs a compensation"),
        ([Step("charge", action=noop, max_deliveries=0)], "saga broken, step charge: max_deliveries must be a whole number of at least 1"),
        (["reserve"], "saga broken: steps must be Step(...), not 'reserve'"),
        ([], "saga broken has no steps"),
    ],
)
def test_a_definition_is_checked_when_it_is_created_and_the_error_names_saga_and_step(steps, message):
    with pytest.raises(InvalidSagaDefinition) as refused:
        Saga("broken", version=1, steps=steps)
    assert message in str(refused.value)


@pytest.mark.parametrize(
    "build, message",
    [
        (lambda: Step("reserve", action=noop, timeout=-1), "step reserve: timeout must be a timedelta or a number of seconds"),
        (lambda: Step("reserve", action=noop, timeout="30s"), "step reserve: timeout must be a timedelta or a number of seconds"),
        (lambda: Retry(max_attempts=0), "Retry.max_attempts must be a whole number of at least 1"),
        (lambda: Retry(initial_delay=timedelta(seconds=-1)), "Retry.initial_delay must be a timedelta or a number of seconds"),
        (lambda: Retry(non_retryable=("PaymentDeclined",)), "Retry.non_retryable must be exception classes"),
        (lambda: Saga("late", version=1, steps=[Step("a", action=noop)], deadline="soon"), "saga late: deadline must be a timedelta"),
    ],
)
def test_a_bad_duration_or_policy_is_refused_where_it_is_written(build, message):
    with pytest.raises(InvalidSagaDefinition, match=message):
        build()


def test_durations_are_timedeltas_or_seconds_and_both_give_the_same_fingerprint():
    in_timedeltas = Saga("durations_td", version=1, deadline=timedelta(minutes=2), steps=[
        Step("a", action=noop, timeout=timedelta(seconds=5), retry=Retry(initial_delay=timedelta(milliseconds=500), max_delay=timedelta(seconds=8))),
    ])
    in_seconds = Saga("durations_s", version=1, deadline=120, steps=[
        Step("a", action=noop, timeout=5, retry=Retry(initial_delay=0.5, max_delay=8)),
    ])

    step = in_timedeltas.steps[0]
    assert (step.timeout, step.retry.initial_delay, step.retry.max_delay) == (5.0, 0.5, 8.0)
    assert in_timedeltas.deadline == in_seconds.deadline == timedelta(minutes=2)
    assert in_timedeltas.fingerprint == in_seconds.fingerprint


def test_the_fingerprint_of_a_definition_did_not_change_with_the_retry_rename():
    """Sagas in flight recorded their definition's fingerprint; renaming Retry.backoff to
    initial_delay must not make a deploy refuse them (sagas.checks)."""
    assert Retry(initial_delay=0.5).describe()["backoff"] == 0.5


pytestmark_worker = pytest.mark.django_db(transaction=True)


@pytestmark_worker
def test_a_compensation_knows_why_and_on_finish_gets_the_outcome(saga_worker):
    saga = wait_for_saga(declined.start(input={}).id)
    assert saga.state == SagaState.COMPENSATED, timeline(saga.id)

    undo = StepExecution.objects.get(saga=saga, name="reserve", direction="compensate")
    assert undo.result["failed_step"] == "pay"
    assert undo.result["refusal"] == "card declined by the issuer"
    assert "step pay failed: CardDeclined: card declined by the issuer" in undo.result["reason"]
    finished = Effect.objects.get(saga_id=saga.id, step__startswith="on_finish:")
    assert (finished.step, finished.direction) == ("on_finish:COMPENSATED", "pay")


@pytestmark_worker
def test_a_step_that_returns_something_not_json_fails_at_once_naming_the_step_and_the_type(saga_worker):
    saga = wait_for_saga(not_json.start(input={}).id)

    assert saga.state == SagaState.COMPENSATED, timeline(saga.id)
    strange = step_row(saga.id, "strange")
    assert (strange.state, strange.attempts) == (StepState.FAILED, 1), "not retried: it would return the same kind of value"
    assert "InvalidStepResult: step strange returned a set, which is not JSON" in strange.last_error
    assert Effect.objects.filter(saga_id=saga.id, step="reserve", direction="compensate").count() == 1


only_here = Saga("test_only_in_this_process", version=1, steps=[Step("a", action=noop)])


@pytestmark_worker
def test_a_worker_without_the_definition_says_so_in_one_line_and_keeps_the_message():
    """The test process defines this saga; its worker does not (as after adding a saga without
    restarting the workers): no traceback, nothing counted, the message retried."""
    env = subprocess_environment(CELERY_TASK_DEFAULT_QUEUE=parked_queue(), SAGAS_UNKNOWN_DEFINITION_RETRY="0.5")
    with CeleryWorker(queues=[parked_queue()], concurrency=1, env=env) as worker:
        saga = only_here.start(input={})
        worker.wait_for_output(f"saga_definition_unknown saga={saga.id}", timeout=30)
        output = worker.output()

    lines = [line for line in output.splitlines() if "saga_definition_unknown" in line]
    assert lines and f"no saga definition {only_here.name} v1 is registered in this process" in lines[0]
    assert "Restart the workers after adding or changing a saga" in lines[0]
    assert "Traceback" not in output
    assert SagaInstance.objects.get(pk=saga.id).state == SagaState.PENDING
    assert step_row(saga.id, "a").deliveries == 0, "nothing was counted: the message is not spent"
