"""The runner's handling of lost deliveries and errbacks, without a worker."""

import os
import re
import threading
import time

import pytest
from django.db import IntegrityError, OperationalError, connection, transaction
from django.test.utils import CaptureQueriesContext
from django.utils import timezone

from sagas import sql, runner, services
from sagas.definition import COMPENSATE, FORWARD, Retry, Saga, Step
from sagas.models import OutboxEvent, SagaState, StepExecution, StepState
from sagas.outbox import outbox_emit
from sagas.tests.builders import failed_saga, reload, run, three_steps

pytestmark = pytest.mark.django_db


def step_row(saga, name: str, direction: str = FORWARD) -> StepExecution:
    return StepExecution.objects.get(saga=saga, name=name, direction=direction)


def lost_delivery(saga, step: str) -> None:
    """A delivery counted before its action that then died: its worker was killed, or the hard
    time limit killed it (the step's transaction never committed)."""
    delivery = runner.Delivery(saga_id=saga.id, step_name=step, direction=FORWARD, counting=runner.Counting.BEFORE, republish=lambda: None)
    assert delivery.count_before() is None


def test_an_errback_for_a_step_that_spent_its_delivery_budget_fails_it_and_compensates(sent, django_capture_on_commit_callbacks):
    with django_capture_on_commit_callbacks(execute=True):
        saga = services.saga_start(definition=three_steps, input={})
        run(saga, "reserve")
        for _ in range(three_steps.step("charge").max_deliveries):
            lost_delivery(saga, "charge")

    with django_capture_on_commit_callbacks(execute=True):
        runner.step_failure_handle(saga_id=saga.id, step_name="charge", direction=FORWARD, failed_task_id="t-1")

    assert step_row(saga, "charge").state == StepState.FAILED
    assert reload(saga).state == SagaState.COMPENSATING
    assert sent.compensations == [(str(saga.pk), ["reserve"], COMPENSATE)]


def test_the_errback_of_a_hard_time_limit_leaves_the_step_to_its_requeued_message(sent, django_capture_on_commit_callbacks):
    with django_capture_on_commit_callbacks(execute=True):
        saga = services.saga_start(definition=three_steps, input={})
        run(saga, "reserve")
        lost_delivery(saga, "charge")

    with django_capture_on_commit_callbacks(execute=True):
        runner.step_failure_handle(saga_id=saga.id, step_name="charge", direction=FORWARD, failed_task_id="t-1")

    assert step_row(saga, "charge").state == StepState.RUNNING
    assert reload(saga).state == SagaState.RUNNING
    assert sent.compensations == []


def test_a_redelivered_errback_from_before_an_operator_retry_does_not_fail_the_retry(sent, django_capture_on_commit_callbacks):
    with django_capture_on_commit_callbacks(execute=True):
        saga = failed_saga()
        services.saga_retry_compensation(saga_id=saga.id)

    with django_capture_on_commit_callbacks(execute=True):
        runner.step_failure_handle(saga_id=saga.id, step_name="reserve", direction=COMPENSATE, failed_task_id="t-1")

    assert reload(saga).state == SagaState.COMPENSATING


@pytest.mark.parametrize("counting", list(runner.Counting))
def test_database_errors_retried_by_the_task_do_not_spend_the_delivery_budget(counting, sent, django_capture_on_commit_callbacks, monkeypatch):
    with django_capture_on_commit_callbacks(execute=True):
        saga = services.saga_start(definition=three_steps, input={})

    def database_gone_in_transaction_2(*args, **kwargs):
        raise OperationalError("server closed the connection unexpectedly")

    with monkeypatch.context() as patched:
        patched.setattr(runner.Delivery, "_run_step", database_gone_in_transaction_2)
        for _ in range(three_steps.step("reserve").max_deliveries):
            with pytest.raises(OperationalError):
                run(saga, "reserve", counting=counting)
    with django_capture_on_commit_callbacks(execute=True):
        result = run(saga, "reserve")

    assert result.outcome is runner.Outcome.DONE, step_row(saga, "reserve").last_error


@pytest.mark.services(reason="needs PostgreSQL row locks")
@pytest.mark.django_db(transaction=True)
def test_a_delivery_that_waited_while_another_completed_the_step_is_not_counted_and_does_not_reopen_it():
    saga = services.saga_start(definition=three_steps, input={})
    locked = threading.Event()

    def complete_reserve_while_holding_its_row():
        with transaction.atomic():
            row = StepExecution.objects.select_for_update().get(saga=saga, name="reserve", direction=FORWARD)
            locked.set()
            time.sleep(0.5)  # the other delivery's UPDATE is waiting for this row now
            row.state, row.deliveries, row.attempts = StepState.COMPLETED, 1, 1
            row.save()
        connection.close()

    other = threading.Thread(target=complete_reserve_while_holding_its_row)
    other.start()
    locked.wait()
    counted = sql.count_delivery(saga.id, "reserve", FORWARD, now=timezone.now())
    other.join()

    assert counted is False, "it must see the committed COMPLETED, or it would run the step a second time"
    assert (step_row(saga, "reserve").state, step_row(saga, "reserve").deliveries) == (StepState.COMPLETED, 1)


def test_a_forward_step_whose_earlier_steps_have_not_completed_is_dropped_uncounted(sent, django_capture_on_commit_callbacks):
    with django_capture_on_commit_callbacks(execute=True):
        saga = services.saga_start(definition=three_steps, input={})

    result = run(saga, "notify")  # a stray or forged message: reserve and charge never ran

    assert result.outcome is runner.Outcome.STALE
    notify = step_row(saga, "notify")
    assert (notify.state, notify.deliveries, notify.result) == (StepState.PENDING, 0, None)
    assert reload(saga).state == SagaState.PENDING


def test_a_forward_step_runs_once_every_earlier_step_completed(sent, django_capture_on_commit_callbacks):
    with django_capture_on_commit_callbacks(execute=True):
        saga = services.saga_start(definition=three_steps, input={})
        run(saga, "reserve")
        assert run(saga, "notify").outcome is runner.Outcome.STALE, "charge has not run yet"
        run(saga, "charge")

        result = run(saga, "notify")

    assert result.outcome is runner.Outcome.DONE
    assert reload(saga).state == SagaState.COMPLETED


def test_a_compensation_of_a_step_that_never_took_effect_is_dropped(sent, django_capture_on_commit_callbacks):
    with django_capture_on_commit_callbacks(execute=True):
        saga = services.saga_start(definition=three_steps, input={})
        run(saga, "reserve")
        services.saga_abort(saga_id=saga.id, reason="unit test")

        result = run(saga, "charge", COMPENSATE)

    assert result.outcome is runner.Outcome.STALE
    assert not StepExecution.objects.filter(saga=saga, name="charge", direction=COMPENSATE).exists()
    assert reload(saga).state == SagaState.COMPENSATING


def test_compensations_run_newest_first_an_older_one_waits_for_its_turn(sent, django_capture_on_commit_callbacks):
    with django_capture_on_commit_callbacks(execute=True):
        saga = services.saga_start(definition=three_steps, input={})
        run(saga, "reserve")
        run(saga, "charge")
        services.saga_abort(saga_id=saga.id, reason="unit test")

        early = run(saga, "reserve", COMPENSATE)
        in_turn = [run(saga, "charge", COMPENSATE).outcome, run(saga, "reserve", COMPENSATE).outcome]

    assert early.outcome is runner.Outcome.STALE
    assert in_turn == [runner.Outcome.DONE, runner.Outcome.DONE]
    assert reload(saga).state == SagaState.COMPENSATED


def test_an_errback_for_a_step_the_log_does_not_have_changes_nothing(sent, django_capture_on_commit_callbacks):
    with django_capture_on_commit_callbacks(execute=True):
        saga = services.saga_start(definition=three_steps, input={})

    runner.step_failure_handle(saga_id=saga.id, step_name="no_such_step", direction=FORWARD, failed_task_id="t-1")

    assert reload(saga).state == SagaState.PENDING


def emit_in_a_nested_atomic_block(ctx):
    with transaction.atomic():  # as a domain service does: @transaction.atomic around its writes
        outbox_emit(aggregate_type="unit", aggregate_id=ctx.saga_id, event_type="DONE", payload={})
    return {"ok": True}


def catch_a_duplicate_and_go_on(ctx):
    """Inserts a duplicate inside a nested atomic block, catches the error and goes on: needs a
    savepoint to roll back to."""
    event = outbox_emit(aggregate_type="unit", aggregate_id=ctx.saga_id, event_type="FIRST", payload={})
    try:
        with transaction.atomic():
            OutboxEvent.objects.create(id=event.id, aggregate_type="unit", aggregate_id="x", event_type="DUP", payload={}, created_at=ctx.now)
    except IntegrityError:
        pass
    return {"events": OutboxEvent.objects.filter(aggregate_id=str(ctx.saga_id)).count()}


one_step = Saga("unit_runner_one_step", version=1, steps=[Step("emit", action=emit_in_a_nested_atomic_block)])
catching = Saga("unit_runner_catching", version=1, steps=[Step("catch", action=catch_a_duplicate_and_go_on, retry=Retry(max_attempts=1))])
catching_with_savepoints = Saga(
    "unit_runner_catching_savepoints", version=1, steps=[Step("catch", action=catch_a_duplicate_and_go_on, savepoints=True)]
)


@pytest.mark.django_db(transaction=True)
def test_a_first_delivery_is_one_transaction_without_savepoints(sent, settings):
    settings.SAGAS_FAULT_INJECTION = False  # as in production: no interceptor reads the database
    saga = services.saga_start(definition=one_step, input={})

    with CaptureQueriesContext(connection) as captured:
        result = run(saga, "emit")

    statements = [q["sql"].split()[0].upper() for q in captured.captured_queries]
    assert result.outcome is runner.Outcome.DONE
    assert statements.count("COMMIT") == 1, statements
    assert not [s for s in statements if "SAVEPOINT" in s], statements
    assert statements[-1] == "COMMIT", "nothing is written after the step's transaction"
    row = step_row(saga, "emit")
    assert (row.state, row.attempts, row.deliveries) == (StepState.COMPLETED, 1, 1)
    assert row.started_at is not None and row.finished_at is not None
    assert reload(saga).state == SagaState.COMPLETED


def _limits_sent(captured) -> list[str]:
    """The statements that set a step transaction's wait limits, first words and values."""
    return [q["sql"] for q in captured.captured_queries if "set_config('lock_timeout'" in q["sql"]]


@pytest.mark.django_db(transaction=True)
@pytest.mark.parametrize(
    "told, expected",
    [(30.0, ["lock"]), (None, ["own"]), (99.0, ["lock", "own"])],
    ids=["message tells the step's timeout", "message tells none", "message tells another timeout"],
)
def test_the_wait_limits_ride_on_the_locking_read_when_the_message_tells_the_step_timeout(sent, settings, told, expected):
    """`lock`: set in the locking read, from the message's timeout; `own`: a statement of their own
    before the action, with the step's timeout (30 s: lock 10 s, statement 30 s)."""
    if connection.vendor != "postgresql":
        pytest.skip("wait limits are PostgreSQL settings")
    settings.SAGAS_FAULT_INJECTION = False
    saga = services.saga_start(definition=one_step, input={})

    with CaptureQueriesContext(connection) as captured:
        result = run(saga, "emit", expected_timeout=told)

    assert result.outcome is runner.Outcome.DONE
    limits = _limits_sent(captured)
    kinds = ["lock" if q.startswith("WITH limits AS MATERIALIZED") and "FOR UPDATE" in q else "own" for q in limits]
    assert kinds == expected, limits
    if "own" in kinds:
        assert "'10000ms'" in limits[-1] and "'30000ms'" in limits[-1], limits[-1]


@pytest.mark.django_db(transaction=True)
def test_an_action_that_catches_a_database_error_and_goes_on_is_told_to_ask_for_savepoints(sent):
    saga = services.saga_start(definition=catching, input={})

    result = run(saga, "catch")

    assert result.outcome is runner.Outcome.FAILED
    assert "step catch (Step(..., savepoints=True)) runs without savepoints" in step_row(saga, "catch").last_error
    assert not OutboxEvent.objects.filter(aggregate_id=str(saga.id)).exists(), "the whole step rolled back"


@pytest.mark.django_db(transaction=True)
def test_an_action_that_asks_for_savepoints_gets_them(sent):
    saga = services.saga_start(definition=catching_with_savepoints, input={})

    result = run(saga, "catch")

    assert result.outcome is runner.Outcome.DONE, step_row(saga, "catch").last_error
    assert step_row(saga, "catch").result == {"events": 1}


def test_an_error_says_where_it_was_raised_from_its_import_root_not_the_deployment_path(sent):
    saga = services.saga_start(definition=catching, input={})

    run(saga, "catch")

    error = step_row(saga, "catch").last_error
    assert re.search(r"\(at sagas/[\w/]+\.py:\d+\)", error), error
    assert os.getcwd() not in error
