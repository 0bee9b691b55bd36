"""When a step's delivery is counted, on real workers (sagas.runner.Counting): a first delivery
with its outcome, in the step's one transaction; a delivery the broker flags as redelivered with
the death it tells of; one the sweeper re-drives before it runs. The delivery budget keeps its
meaning on Redis and on RabbitMQ: a step that kills its worker every time is failed after
max_deliveries deliveries that never finished, and one killed once is run again and completes."""

import uuid

import pytest
from django.conf import settings

from sagas import dispatch
from sagas.dispatch import step_signature
from sagas.models import Direction, FaultKind, SagaState, StepState
from sagas.testing import CeleryWorker, inject_fault, subprocess_environment, timeline, wait_for_saga
from tests.engine_helpers import effect_count, step_row, wait_for_step, wait_for_step_in_hand
from tests.sagaapp.sagas import four_steps
from tests.test_poison_messages import RABBITMQ_URL, rabbitmq_answers

pytestmark = [pytest.mark.django_db(transaction=True), pytest.mark.services(reason="the Redis and RabbitMQ brokers flag redeliveries")]


@pytest.fixture(params=["redis", "rabbitmq"])
def broker_worker(request, monkeypatch):
    """A worker of its own on a queue of its own, on the Redis test broker or on RabbitMQ; yields
    (worker, start) where start(input) starts a four_steps saga whose messages go to it."""
    if request.param == "rabbitmq" and not rabbitmq_answers():
        pytest.fail("RabbitMQ does not answer on 127.0.0.1:5672 (.ci/run starts it)")
    url = RABBITMQ_URL if request.param == "rabbitmq" else settings.CELERY_BROKER_URL
    queue = f"{settings.CELERY_TASK_DEFAULT_QUEUE}-counting-{uuid.uuid4().hex[:8]}"
    env = subprocess_environment(CELERY_BROKER_URL=url, CELERY_TASK_DEFAULT_QUEUE=queue, SAGAS_CONTROL_QUEUE=f"{queue}-control")
    from config.celery import app

    def start(input: dict):
        with monkeypatch.context() as parked:
            parked.setattr(dispatch, "send_forward", lambda *args, **kwargs: None)
            saga = four_steps.start(input=input)
        # The whole chain, as dispatch.send_forward sends it, but to this worker's broker and queue
        # (send_task: the parked-queue fixture reroutes Signature.apply_async in tests like these).
        chain = dispatch.linked([step_signature(saga.id, step, Direction.FORWARD) for step in four_steps.steps])
        with app.connection_for_write(url) as conn:
            app.send_task(chain.task, kwargs=chain.kwargs, connection=conn, **{**chain.options, "queue": queue})
        return saga

    worker = CeleryWorker(queues=[queue], concurrency=1, env=env).start()
    try:
        yield worker, start
    finally:
        worker.kill()
        with app.connection_for_write(url) as conn:
            for name in (queue, f"{queue}-control"):
                conn.default_channel.queue_delete(name)


def test_a_step_that_kills_its_worker_every_time_is_failed_after_its_delivery_budget(broker_worker):
    worker, start = broker_worker
    inject_fault(four_steps.name, "ship", kind=FaultKind.CRASH, times=None)

    saga = wait_for_saga(start({}).id, timeout=90)

    assert saga.state == SagaState.COMPENSATED, timeline(saga.id)
    ship = step_row(saga.id, "ship")
    assert ship.state == StepState.FAILED
    # The first delivery died uncounted; the broker flagged the second, which counted that death
    # and itself; the third found max_deliveries=2 deliveries that never finished and failed it.
    assert (ship.deliveries, ship.attempts) == (3, 0), timeline(saga.id)
    assert worker.output(since_start=True).count(f"saga_fault_crash saga={saga.id} step=ship") == 2
    assert "worker lost" in ship.last_error
    assert effect_count(saga.id, "ship") == 0


def test_a_step_whose_worker_was_killed_once_runs_again_and_counts_the_death(broker_worker):
    worker, start = broker_worker
    saga = start({"sleep": {"ship": 3}})
    wait_for_step_in_hand(worker, saga.id, "ship")

    assert worker.kill_children()
    saga = wait_for_saga(saga.id, timeout=60)

    assert saga.state == SagaState.COMPLETED, timeline(saga.id)
    assert effect_count(saga.id, "ship") == 1
    ship = step_row(saga.id, "ship")
    assert (ship.deliveries, ship.attempts) == (2, 1), timeline(saga.id)
    assert [step_row(saga.id, name).deliveries for name in ("reserve", "charge", "notify")] == [1, 1, 1]


def test_a_first_delivery_shows_nothing_until_it_commits_and_a_redriven_one_is_counted_first(saga_worker, monkeypatch):
    # Given two sagas whose first messages never left, each with a slow first step
    with monkeypatch.context() as lost:
        lost.setattr(dispatch, "send_forward", lambda *args, **kwargs: None)
        fresh, redriven = (four_steps.start(input={"sleep": {"reserve": 1.5}}) for _ in range(2))

    # When one is sent as a first delivery and the other as the sweeper re-drives it
    dispatch.send_forward(fresh.id, four_steps, from_position=0)
    wait_for_step_in_hand(saga_worker, fresh.id, "reserve")
    in_hand = step_row(fresh.id, "reserve")
    dispatch.send_forward(redriven.id, four_steps, from_position=0, redrive=True)

    # Then the first delivery is one transaction: nothing shows while it runs
    assert (in_hand.state, in_hand.deliveries) == (StepState.PENDING, 0)
    # and the re-driven one was counted and shown RUNNING before its action ran
    assert wait_for_step(redriven.id, "reserve", StepState.RUNNING, timeout=30).deliveries == 1
    for saga in (fresh, redriven):
        saga = wait_for_saga(saga.id)
        assert saga.state == SagaState.COMPLETED, timeline(saga.id)
        # the header marks only the re-sent step's message, not the steps linked after it
        assert [step_row(saga.id, name).deliveries for name in ("reserve", "charge", "ship", "notify")] == [1, 1, 1, 1]
