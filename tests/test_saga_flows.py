"""The saga engine end to end on a real worker: success, failures, retries, compensation."""

import pytest

from sagas.exceptions import SagaIdempotencyConflict, SagaStateConflict
from sagas.models import Direction, FaultKind, SagaInstance, SagaState, StepState
from sagas.services import saga_abort, saga_retry_compensation
from sagas.testing import inject_fault, timeline, wait_for_saga
from tests.engine_helpers import compensations_in_start_order, effect_count, effects, step_row, wait_for_step_in_hand
from tests.sagaapp.sagas import STEP_NAMES, four_steps, keep_going, parallel, versioned_v1

pytestmark = pytest.mark.django_db(transaction=True)

F, C = Direction.FORWARD, Direction.COMPENSATE


@pytest.mark.parametrize("failing", STEP_NAMES)
def test_a_business_failure_compensates_the_completed_steps_newest_first(saga_worker, failing):
    inject_fault(four_steps.name, failing, kind=FaultKind.BUSINESS)
    position = STEP_NAMES.index(failing)
    done = STEP_NAMES[:position]

    saga = wait_for_saga(four_steps.start(input={}).id)

    assert saga.state == SagaState.COMPENSATED, timeline(saga.id)
    undone = [name for name in reversed(done) if name != "notify"]
    assert effects(saga.id) == [(n, F) for n in done] + [(n, C) for n in undone]
    assert compensations_in_start_order(saga.id) == undone
    failed = step_row(saga.id, failing)
    assert (failed.state, failed.attempts) == (StepState.FAILED, 1), "a business failure is never retried"
    assert "InjectedBusinessError" in failed.last_error
    assert f"step {failing} failed" in saga.failure_reason


def test_transient_failures_are_retried_until_the_step_succeeds(saga_worker):
    inject_fault(four_steps.name, "charge", kind=FaultKind.TRANSIENT, times=2)

    saga = wait_for_saga(four_steps.start(input={}).id)

    assert saga.state == SagaState.COMPLETED, timeline(saga.id)
    charge = step_row(saga.id, "charge")
    assert (charge.attempts, charge.state) == (3, StepState.COMPLETED)
    assert "InjectedTransientError" in charge.last_error
    assert effect_count(saga.id, "charge") == 1
    assert charge.result["attempt"] == 3


def test_a_step_whose_retries_run_out_is_failed_and_compensated(saga_worker):
    inject_fault(four_steps.name, "ship", kind=FaultKind.TRANSIENT, times=None)

    saga = wait_for_saga(four_steps.start(input={}).id)

    assert saga.state == SagaState.COMPENSATED, timeline(saga.id)
    assert step_row(saga.id, "ship").attempts == 3
    assert compensations_in_start_order(saga.id) == ["charge", "reserve"]


def test_a_compensation_that_keeps_failing_leaves_the_saga_failed_until_an_operator_retries(saga_worker):
    inject_fault(four_steps.name, "ship", kind=FaultKind.BUSINESS)
    stubborn = inject_fault(four_steps.name, "charge", kind=FaultKind.TRANSIENT, times=None, direction=C)

    saga = wait_for_saga(four_steps.start(input={}).id)

    assert saga.state == SagaState.FAILED, timeline(saga.id)
    assert "compensation charge failed" in saga.failure_reason
    charge_undo = step_row(saga.id, "charge", C)
    assert (charge_undo.state, charge_undo.attempts) == (StepState.FAILED, 3)
    assert step_row(saga.id, "reserve", C).state == StepState.PENDING, "newest-first stops at the failure"

    stubborn.delete()
    saga_retry_compensation(saga_id=saga.id)
    saga = wait_for_saga(saga.id)

    assert saga.state == SagaState.COMPENSATED, timeline(saga.id)
    assert effects(saga.id)[-2:] == [("charge", C), ("reserve", C)]


def test_continue_on_compensation_failure_runs_the_older_compensations_anyway(saga_worker):
    inject_fault(keep_going.name, "notify", kind=FaultKind.BUSINESS)
    inject_fault(keep_going.name, "charge", kind=FaultKind.BUSINESS, direction=C)

    saga = wait_for_saga(keep_going.start(input={}).id)

    assert saga.state == SagaState.FAILED, timeline(saga.id)
    assert compensations_in_start_order(saga.id) == ["ship", "charge", "reserve"]
    assert [e for e in effects(saga.id) if e[1] == C] == [("ship", C), ("reserve", C)]


def test_parallel_compensation_does_not_hold_the_others_back_behind_a_failing_one(saga_worker):
    # ship's compensation is slow and charge's always fails: sequentially, reserve would wait
    # for both and then never run.
    inject_fault(parallel.name, "notify", kind=FaultKind.BUSINESS)
    inject_fault(parallel.name, "charge", kind=FaultKind.TRANSIENT, times=None, direction=C)

    saga = wait_for_saga(parallel.start(input={}).id)

    assert saga.state == SagaState.FAILED, timeline(saga.id)
    assert "compensation charge failed" in saga.failure_reason
    assert effect_count(saga.id, "ship", C) == 1
    assert effect_count(saga.id, "reserve", C) == 1
    assert step_row(saga.id, "charge", C).attempts == 3


def test_starting_twice_with_the_same_idempotency_key_returns_the_first_saga(saga_worker):
    first = four_steps.start(input={"n": 1}, idempotency_key="order-42")
    second = four_steps.start(input={"n": 1}, idempotency_key="order-42")
    with pytest.raises(SagaIdempotencyConflict, match="started before with another input"):
        four_steps.start(input={"n": 2}, idempotency_key="order-42")

    wait_for_saga(first.id)

    assert second.id == first.id
    assert SagaInstance.objects.filter(idempotency_key="order-42").count() == 1
    assert effect_count(first.id, "reserve") == 1


def test_a_saga_finishes_with_the_definition_version_it_started_with(saga_worker):
    saga = wait_for_saga(versioned_v1.start(input={}).id)

    assert (saga.version, saga.state) == (1, SagaState.COMPLETED)
    assert [e[0] for e in effects(saga.id)] == ["reserve", "charge"]


@pytest.mark.services(
    reason="after the running step commits, the abort and the next step race for SQLite's write lock "
    "(PostgreSQL queues row locks first come, first served); either outcome is safe"
)
def test_aborting_a_running_saga_waits_for_the_step_in_hand_then_compensates(saga_worker):
    saga = four_steps.start(input={"sleep": {"ship": 1.5}})
    wait_for_step_in_hand(saga_worker, saga.id, "ship")

    saga_abort(saga_id=saga.id, reason="customer changed their mind")
    saga = wait_for_saga(saga.id)

    assert saga.state == SagaState.COMPENSATED, timeline(saga.id)
    assert saga.failure_reason == "customer changed their mind"
    assert effect_count(saga.id, "notify") == 0
    assert compensations_in_start_order(saga.id) == ["ship", "charge", "reserve"]


def test_a_completed_saga_cannot_be_aborted(saga_worker):
    saga = wait_for_saga(four_steps.start(input={}).id)

    with pytest.raises(SagaStateConflict):
        saga_abort(saga_id=saga.id)
    assert SagaInstance.objects.get(pk=saga.id).state == SagaState.COMPLETED


def test_retrying_the_compensation_of_a_saga_that_is_not_failed_is_refused(saga_worker):
    saga = wait_for_saga(four_steps.start(input={}).id)

    with pytest.raises(SagaStateConflict):
        saga_retry_compensation(saga_id=saga.id)
