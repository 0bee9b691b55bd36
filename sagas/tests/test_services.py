"""saga_start and saga_sweep against the database, without a worker: sagas are built and moved on
with the real services and runner; the messages they would send are recorded (`sent`)."""

import logging
from datetime import timedelta

import pytest
from django.utils import timezone

from sagas import runner, services
from sagas.definition import COMPENSATE, FORWARD
from sagas.exceptions import SagaIdempotencyConflict
from sagas.models import SagaInstance, SagaState, StepExecution, StepState
from sagas.tests.builders import (
    compensated_saga,
    completed_saga,
    failed_saga,
    reload,
    run,
    three_steps,
    undo_fails,
    with_deadline,
)

pytestmark = pytest.mark.django_db


# --- saga_start ----------------------------------------------------------------------------------


def test_starting_twice_with_the_same_idempotency_key_returns_the_first_saga(sent, django_capture_on_commit_callbacks):
    with django_capture_on_commit_callbacks(execute=True):
        first = services.saga_start(definition=three_steps, input={"order": 1}, idempotency_key="order-1")

    with django_capture_on_commit_callbacks(execute=True):
        second = services.saga_start(definition=three_steps, input={"order": 1}, idempotency_key="order-1")

    assert second.pk == first.pk
    assert SagaInstance.objects.filter(name=three_steps.name, idempotency_key="order-1").count() == 1
    assert sent.forward == [(str(first.pk), three_steps.name, 0)], "only the first start sends a message"


@pytest.mark.django_db(transaction=True)
def test_starting_again_under_a_used_idempotency_key_with_another_input_is_refused(sent):
    first = services.saga_start(definition=three_steps, input={"order": 1}, idempotency_key="order-1")

    with pytest.raises(SagaIdempotencyConflict, match=f"idempotency key 'order-1' was started before with another input \\(saga {first.pk}\\)"):
        services.saga_start(definition=three_steps, input={"order": 2}, idempotency_key="order-1")

    assert SagaInstance.objects.get(pk=first.pk).input == {"order": 1}


def test_the_same_idempotency_key_in_another_saga_starts_a_new_one(sent, django_capture_on_commit_callbacks):
    with django_capture_on_commit_callbacks(execute=True):
        first = services.saga_start(definition=three_steps, input={}, idempotency_key="shared-key")

    with django_capture_on_commit_callbacks(execute=True):
        other = services.saga_start(definition=undo_fails, input={}, idempotency_key="shared-key")

    assert other.pk != first.pk
    assert len(sent.forward) == 2


def test_starting_records_one_pending_step_per_step_in_order(sent, django_capture_on_commit_callbacks):
    with django_capture_on_commit_callbacks(execute=True):
        saga = services.saga_start(definition=three_steps, input={"amount": "9.99"})

    rows = StepExecution.objects.filter(saga=saga).order_by("position")
    assert [(r.name, r.position, r.direction, r.state, r.deliveries) for r in rows] == [
        ("reserve", 0, FORWARD, StepState.PENDING, 0),
        ("charge", 1, FORWARD, StepState.PENDING, 0),
        ("notify", 2, FORWARD, StepState.PENDING, 0),
    ]
    assert reload(saga).state == SagaState.PENDING


def test_the_first_step_is_sent_only_when_the_starting_transaction_commits(sent, django_capture_on_commit_callbacks):
    with django_capture_on_commit_callbacks(execute=False) as callbacks:
        saga = services.saga_start(definition=three_steps, input={})
        assert sent.forward == [], "sent before the saga row is visible to a worker"

    for callback in callbacks:
        callback()

    assert sent.forward == [(str(saga.pk), three_steps.name, 0)]


def test_starting_logs_a_structured_transition_line_with_the_saga_id(sent, caplog, django_capture_on_commit_callbacks):
    caplog.set_level(logging.INFO, logger="sagas")

    with django_capture_on_commit_callbacks(execute=True):
        saga = services.saga_start(definition=three_steps, input={}, idempotency_key="logged")

    lines = [r for r in caplog.records if r.getMessage().startswith(f"saga_transition saga={saga.id} ")]
    assert len(lines) == 1
    assert "to=PENDING" in lines[0].getMessage()
    assert lines[0].saga_id == str(saga.id)


@pytest.mark.parametrize("bad_input", [{"when": object()}, {"amounts": {1, 2}}, ["not", "a", "mapping"], "text"])
def test_starting_with_input_that_is_not_a_json_object_raises_invalid_saga_input(sent, bad_input):
    with pytest.raises(services.InvalidSagaInput):
        services.saga_start(definition=three_steps, input=bad_input)

    assert not SagaInstance.objects.filter(name=three_steps.name).exists()
    assert sent.forward == []


# --- saga_sweep ----------------------------------------------------------------------------------


def test_a_saga_that_made_no_progress_is_redriven_once(sent, django_capture_on_commit_callbacks):
    now = timezone.now()
    with django_capture_on_commit_callbacks(execute=True):
        saga = services.saga_start(definition=three_steps, input={}, now=now - timedelta(minutes=5))
    SagaInstance.objects.filter(pk=saga.pk).update(stuck_after=now - timedelta(seconds=1))
    sent.clear()

    with django_capture_on_commit_callbacks(execute=True):
        counts = services.saga_sweep(now=now)

    assert counts == {"overdue": 0, "redriven": 1}
    saga = reload(saga)
    assert saga.redrives == 1
    assert saga.stuck_after > now
    assert saga.state == SagaState.PENDING
    assert sent.forward == [(str(saga.pk), three_steps.name, 0)]


def test_a_second_sweep_right_after_a_redrive_does_nothing(sent, django_capture_on_commit_callbacks):
    now = timezone.now()
    with django_capture_on_commit_callbacks(execute=True):
        saga = services.saga_start(definition=three_steps, input={}, now=now - timedelta(minutes=5))
    SagaInstance.objects.filter(pk=saga.pk).update(stuck_after=now - timedelta(seconds=1))
    with django_capture_on_commit_callbacks(execute=True):
        services.saga_sweep(now=now)
    sent.clear()

    with django_capture_on_commit_callbacks(execute=True):
        counts = services.saga_sweep(now=now + timedelta(seconds=1))

    assert counts == {"overdue": 0, "redriven": 0}
    assert reload(saga).redrives == 1
    assert sent.forward == [] and sent.compensations == []


def test_a_redrive_resends_from_the_first_step_the_log_does_not_show_completed(sent, django_capture_on_commit_callbacks):
    now = timezone.now()
    with django_capture_on_commit_callbacks(execute=True):
        saga = services.saga_start(definition=three_steps, input={})
        assert run(saga, "reserve").outcome is runner.Outcome.DONE
    SagaInstance.objects.filter(pk=saga.pk).update(stuck_after=now - timedelta(seconds=1))
    sent.clear()

    with django_capture_on_commit_callbacks(execute=True):
        services.saga_sweep(now=now)

    assert sent.forward == [(str(saga.pk), three_steps.name, 1)]


def test_a_saga_past_its_deadline_is_moved_to_compensating(sent, django_capture_on_commit_callbacks):
    now = timezone.now()
    with django_capture_on_commit_callbacks(execute=True):
        saga = services.saga_start(definition=with_deadline, input={})
        assert run(saga, "reserve").outcome is runner.Outcome.DONE
    SagaInstance.objects.filter(pk=saga.pk).update(deadline_at=now - timedelta(seconds=1))
    sent.clear()

    with django_capture_on_commit_callbacks(execute=True):
        counts = services.saga_sweep(now=now)

    assert counts == {"overdue": 1, "redriven": 0}
    saga = reload(saga)
    assert (saga.state, saga.failure_reason) == (SagaState.COMPENSATING, "deadline exceeded")
    assert sent.forward == []
    assert sent.compensations == [(str(saga.pk), ["reserve"], COMPENSATE)]
    undo = StepExecution.objects.get(saga=saga, direction=COMPENSATE)
    assert (undo.name, undo.state) == ("reserve", StepState.PENDING)


def test_a_saga_past_its_deadline_with_nothing_to_undo_is_compensated_at_once(sent, django_capture_on_commit_callbacks):
    now = timezone.now()
    with django_capture_on_commit_callbacks(execute=True):
        saga = services.saga_start(definition=with_deadline, input={})
    SagaInstance.objects.filter(pk=saga.pk).update(deadline_at=now - timedelta(seconds=1))
    sent.clear()

    with django_capture_on_commit_callbacks(execute=True):
        services.saga_sweep(now=now)

    saga = reload(saga)
    assert (saga.state, saga.failure_reason) == (SagaState.COMPENSATED, "deadline exceeded")
    assert sent.compensations == []


@pytest.mark.parametrize(
    ("build", "state"),
    [(completed_saga, SagaState.COMPLETED), (compensated_saga, SagaState.COMPENSATED), (failed_saga, SagaState.FAILED)],
)
def test_the_sweeper_never_touches_a_finished_saga(sent, django_capture_on_commit_callbacks, build, state):
    now = timezone.now()
    with django_capture_on_commit_callbacks(execute=True):
        saga = build()
    assert reload(saga).state == state
    SagaInstance.objects.filter(pk=saga.pk).update(
        stuck_after=now - timedelta(hours=1), deadline_at=now - timedelta(hours=1)
    )
    before = reload(saga)
    sent.clear()

    with django_capture_on_commit_callbacks(execute=True):
        counts = services.saga_sweep(now=now)

    assert counts == {"overdue": 0, "redriven": 0}
    after = reload(saga)
    assert (after.state, after.redrives, after.updated_at, after.failure_reason) == (
        before.state, before.redrives, before.updated_at, before.failure_reason
    )
    assert sent.forward == [] and sent.compensations == []


# --- regressions found in review -------------------------------------------------------------


def test_a_nan_in_the_input_is_refused_and_never_answered_with_another_saga(sent, django_capture_on_commit_callbacks):
    with django_capture_on_commit_callbacks(execute=True):
        services.saga_start(definition=three_steps, input={"customer": "alice"})

    with pytest.raises(services.InvalidSagaInput):
        services.saga_start(definition=three_steps, input={"customer": "bob", "amount": float("nan")})


def test_a_retried_compensation_whose_message_is_lost_is_redriven_by_the_sweeper(sent, django_capture_on_commit_callbacks):
    with django_capture_on_commit_callbacks(execute=True):
        saga = failed_saga()
    with django_capture_on_commit_callbacks(execute=True):
        services.saga_retry_compensation(saga_id=saga.id)
    sent.clear()

    with django_capture_on_commit_callbacks(execute=True):
        counts = services.saga_sweep(now=timezone.now() + timedelta(hours=1))

    assert counts["redriven"] == 1
    assert sent.compensations == [(str(saga.pk), ["reserve"], COMPENSATE)]


def test_a_saga_without_a_registered_definition_does_not_stop_the_sweeper_redriving_others(sent, django_capture_on_commit_callbacks):
    now = timezone.now()
    with django_capture_on_commit_callbacks(execute=True):
        healthy = services.saga_start(definition=three_steps, input={})
        orphan = services.saga_start(definition=undo_fails, input={})
    SagaInstance.objects.filter(pk=orphan.pk).update(name="unit_services_removed", stuck_after=now - timedelta(minutes=2))
    SagaInstance.objects.filter(pk=healthy.pk).update(stuck_after=now - timedelta(minutes=1))
    sent.clear()

    with django_capture_on_commit_callbacks(execute=True):
        services.saga_sweep(now=now)

    assert reload(healthy).redrives == 1
    assert sent.forward == [(str(healthy.pk), three_steps.name, 0)]


# --- operator actions that do not fit the saga ----------------------------------------------


@pytest.mark.parametrize(
    ("build", "why"),
    [(completed_saga, "COMPLETED"), (compensated_saga, "COMPENSATED already"), (failed_saga, "FAILED: a compensation needs attention")],
)
def test_aborting_a_finished_saga_is_refused_with_the_reason(sent, django_capture_on_commit_callbacks, build, why):
    with django_capture_on_commit_callbacks(execute=True):
        saga = build()
    before = reload(saga)

    with pytest.raises(services.SagaStateConflict, match=why):
        services.saga_abort(saga_id=saga.id)

    after = reload(saga)
    assert (after.state, after.updated_at, after.failure_reason) == (before.state, before.updated_at, before.failure_reason)


def test_aborting_a_saga_whose_definition_this_deployment_lacks_is_refused_not_crashed(sent, django_capture_on_commit_callbacks):
    with django_capture_on_commit_callbacks(execute=True):
        saga = services.saga_start(definition=three_steps, input={})
    SagaInstance.objects.filter(pk=saga.pk).update(name="unit_services_removed")

    with pytest.raises(services.SagaStateConflict, match="unit_services_removed v1 is not registered"):
        services.saga_abort(saga_id=saga.id)

    assert reload(saga).state == SagaState.PENDING


def test_aborting_a_compensating_saga_again_changes_nothing(sent, django_capture_on_commit_callbacks):
    with django_capture_on_commit_callbacks(execute=True):
        saga = services.saga_start(definition=three_steps, input={})
        run(saga, "reserve")
        services.saga_abort(saga_id=saga.id, reason="first")

    again = services.saga_abort(saga_id=saga.id, reason="second")

    assert (again.state, reload(saga).failure_reason) == (SagaState.COMPENSATING, "first")
