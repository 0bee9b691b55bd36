"""Test sagas and sagas built with the real services and runner (no worker): each step runs as one
delivery of `runner.step_run`, the way the `sagas.run_step` task runs it."""

from datetime import timedelta

from sagas import runner, services
from sagas.definition import COMPENSATE, FORWARD, Saga, Step
from sagas.exceptions import BusinessError
from sagas.models import SagaInstance


def record(ctx):
    return {"step": ctx.step}


def refuse(ctx):
    raise BusinessError(f"cannot undo {ctx.step}")


three_steps = Saga(
    "unit_services_three_steps",
    version=1,
    steps=[
        Step("reserve", action=record, compensation=record, timeout=4.0),
        Step("charge", action=record, compensation=record, timeout=6.0),
        Step("notify", action=record, timeout=2.0),
    ],
)
undo_fails = Saga(
    "unit_services_undo_fails",
    version=1,
    steps=[Step("reserve", action=record, compensation=refuse), Step("charge", action=record)],
)
with_deadline = Saga(
    "unit_services_with_deadline",
    version=1,
    steps=[Step("reserve", action=record, compensation=record), Step("charge", action=record, compensation=record)],
    deadline=timedelta(minutes=5),
)


def run(saga, step: str, direction: str = FORWARD, *, counting=runner.Counting.IN_STEP, expected_timeout=None) -> runner.StepResult:
    """One delivery of a step, as the run_step task makes it (by default a first delivery over a
    transport that flags redeliveries; `expected_timeout`: the message's soft time limit)."""
    return runner.step_run(
        saga_id=saga.id, step_name=step, direction=direction, republish=lambda: None, counting=counting, expected_timeout=expected_timeout
    )


def reload(saga) -> SagaInstance:
    return SagaInstance.objects.get(pk=saga.id)


def completed_saga():
    """A saga whose every step completed."""
    saga = services.saga_start(definition=three_steps, input={})
    for step in ["reserve", "charge", "notify"]:
        run(saga, step)
    return saga


def compensated_saga():
    """A saga aborted after its first step, whose compensation then completed."""
    saga = services.saga_start(definition=three_steps, input={})
    run(saga, "reserve")
    services.saga_abort(saga_id=saga.id, reason="unit test")
    run(saga, "reserve", COMPENSATE)
    return saga


def failed_saga():
    """A saga aborted after its first step, whose compensation failed for good (needs attention)."""
    saga = services.saga_start(definition=undo_fails, input={})
    run(saga, "reserve")
    services.saga_abort(saga_id=saga.id, reason="unit test")
    assert run(saga, "reserve", COMPENSATE).outcome is runner.Outcome.FAILED
    runner.step_failure_handle(saga_id=saga.id, step_name="reserve", direction=COMPENSATE, failed_task_id="t-1")
    return saga
