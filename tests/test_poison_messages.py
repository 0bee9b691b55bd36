"""No message can stop the system (rule 12; issue 9, case 1): a message a worker cannot decode, or
whose arguments do not fit its task, is rejected without requeue and recorded, and the worker goes
on consuming, on Redis and on RabbitMQ, with one pool process and with two."""

import json
import socket
import time
import uuid

import pytest
from django.conf import settings
from kombu import Connection

from sagas.models import RejectedMessage
from sagas.testing import CeleryWorker, subprocess_environment
from sagas.testing.poison import send_poison

pytestmark = pytest.mark.django_db(transaction=True)
BROKERS = "a Redis and a RabbitMQ broker"

RABBITMQ_URL = "amqp://guest:guest@127.0.0.1:5672//"


def rabbitmq_answers() -> bool:
    try:
        with socket.create_connection(("127.0.0.1", 5672), timeout=1):
            return True
    except OSError:
        return False


@pytest.mark.services(reason=BROKERS)
@pytest.mark.parametrize("concurrency", [1, 2])
@pytest.mark.parametrize("broker", ["redis", "rabbitmq"])
def test_a_worker_rejects_and_records_every_poison_message_and_keeps_consuming(broker, concurrency):
    if broker == "rabbitmq" and not rabbitmq_answers():
        pytest.fail("RabbitMQ does not answer on 127.0.0.1:5672 (.ci/run starts it)")
    queue = f"{settings.CELERY_TASK_DEFAULT_QUEUE}-poison-{uuid.uuid4().hex[:8]}"
    env = subprocess_environment(CELERY_TASK_DEFAULT_QUEUE=queue, SAGAS_CONTROL_QUEUE=queue)
    if broker == "rabbitmq":
        env["CELERY_BROKER_URL"] = RABBITMQ_URL
    marker = uuid.uuid4().hex
    worker = CeleryWorker(queues=[queue], concurrency=concurrency, env=env).start()
    try:
        # Given garbage, wrong shapes, unknown tasks and misfitting arguments in the worker's queue
        sent = send_poison(RABBITMQ_URL if broker == "rabbitmq" else settings.CELERY_BROKER_URL, queue, marker=marker)

        # When a good message follows them
        good = _send_good(broker, queue)

        # Then the worker ran it, is alive, and recorded each poison message once, none requeued
        worker.wait_for_output(f"Task sagas.step_failed[{good}] succeeded", timeout=60)
        recorded = _recorded(marker, expected=len(sent))
        assert len(recorded) == len(sent), "\n".join(f"{r.task}: {r.reason}" for r in recorded)
        assert worker.alive and "Unrecoverable error" not in worker.output()
        assert all(len(r.body) <= RejectedMessage.MAX_BODY and r.reason for r in recorded)
        assert _waiting(broker, queue) == 0
    finally:
        worker.kill()
        _delete_queue(broker, queue)


def _recorded(marker: str, *, expected: int, timeout: float = 20.0) -> list[RejectedMessage]:
    """The rejected messages carrying `marker`, once there are `expected` of them (with two pool
    processes the good message may finish before the last poisoned one is refused)."""
    deadline = time.monotonic() + timeout
    while True:
        recorded = list(RejectedMessage.objects.filter(body__contains=marker))
        if len(recorded) >= expected or time.monotonic() > deadline:
            return recorded
        time.sleep(0.1)


def _send_good(broker: str, queue: str) -> str:
    """A well-formed engine message (an errback for a saga that does not exist: logged and done).
    Not a housekeeping task: Celery's lines about those are quiet at INFO (config.logs)."""
    from celery import current_app

    url = RABBITMQ_URL if broker == "rabbitmq" else settings.CELERY_BROKER_URL
    kwargs = {"saga_id": str(uuid.uuid4()), "step": "reserve", "direction": "forward"}
    with Connection(url) as conn:
        return current_app.send_task("sagas.step_failed", args=["no-such-task"], kwargs=kwargs, queue=queue, connection=conn).id


def _waiting(broker: str, queue: str) -> int:
    url = RABBITMQ_URL if broker == "rabbitmq" else settings.CELERY_BROKER_URL
    with Connection(url) as conn:
        try:
            return conn.default_channel.queue_declare(queue=queue, passive=True).message_count
        except conn.channel_errors:
            return 0


def _delete_queue(broker: str, queue: str) -> None:
    url = RABBITMQ_URL if broker == "rabbitmq" else settings.CELERY_BROKER_URL
    with Connection(url) as conn:
        conn.default_channel.queue_delete(queue)



def test_the_embedded_broker_drops_and_records_a_message_it_cannot_read():
    if settings.CHAINSAGA_TEST_BACKEND != "embedded":
        pytest.skip("services mode: the embedded SQLAlchemy broker is not in use")
    queue = f"{settings.CELERY_TASK_DEFAULT_QUEUE}-poison-{uuid.uuid4().hex[:8]}"
    marker = uuid.uuid4().hex
    worker = CeleryWorker(queues=[queue], concurrency=1, env=subprocess_environment(CELERY_TASK_DEFAULT_QUEUE=queue)).start()
    try:
        with Connection(settings.CELERY_BROKER_URL) as conn:
            channel = conn.default_channel
            for raw in (f"not json {marker}", json.dumps([1, 2, marker])):
                channel.session.add(channel.message_cls(payload=raw, queue=channel._get_or_create(queue)))
            channel.session.commit()

        good = _send_good("embedded", queue)

        worker.wait_for_output(f"Task sagas.step_failed[{good}] succeeded", timeout=60)
        assert len(_recorded(marker, expected=2)) == 2
        assert worker.alive and "Unrecoverable error" not in worker.output()
    finally:
        worker.kill()
