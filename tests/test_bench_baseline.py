"""The benchmark's fair baseline (perf.baseline) keeps the guarantees it is compared on, on a real
worker: the orchestrated saga's placement and outbox events, a compensation sent through the
broker that undoes newest first, and steps a late duplicate cannot use to undo a confirmed order."""

import re
import time
import uuid

import pytest
from django.conf import settings

from inventory.models import Reservation, ReservationStatus, Stock
from inventory.services import product_create
from orders.models import IdempotencyRecord, IdempotencyRecordState, Order, OrderStatus
from orders.sagas import STEP_FAILED_TEXT
from orders.selectors import order_events
from orders.services import LineRequest, order_place
from payments.models import Payment
from perf import baseline
from sagas.models import SagaState
from sagas.testing import CeleryWorker, purge_queues, subprocess_environment, wait_for_saga

FORWARD_EVENTS = ["ORDER_CREATED", "INVENTORY_RESERVED", "PAYMENT_PROCESSED", "ORDER_CONFIRMED", "FULFILLMENT_REQUESTED"]


@pytest.fixture
def baseline_worker(saga_worker, django_user_model, monkeypatch):
    """A worker that knows the baseline's tasks, on a queue of its own (the session's saga worker
    does not load perf.baseline), and the chains the test places sent to that queue."""
    queue = f"{settings.CELERY_TASK_DEFAULT_QUEUE}-baseline-{uuid.uuid4().hex[:8]}"
    env = subprocess_environment(CELERY_TASK_DEFAULT_QUEUE=queue, SAGAS_CONTROL_QUEUE=f"{queue}-control")
    chain = baseline.fair_chain
    monkeypatch.setattr(baseline, "fair_chain", lambda order_id: chain(order_id).set(queue=queue))
    worker = CeleryWorker(queues=[queue], include=["perf.baseline"], concurrency=1, env=env).start()
    yield worker
    worker.stop()
    purge_queues(queue, f"{queue}-control")


@pytest.fixture
def owner(django_user_model):
    return django_user_model.objects.create_user(username="bench-baseline")


def _place(owner, *, payment_method: str, sku: str = "BASE-1") -> Order:
    product_create(sku=sku, name="Baseline product", price="12.50", on_hand=10)
    return baseline.fair_order_place(
        owner=owner, lines=[LineRequest(sku, 2)], payment_method=payment_method, idempotency_key=f"key-{uuid.uuid4()}"
    ).order


def _settled(order: Order, timeout: float = 30.0) -> Order:
    deadline = time.monotonic() + timeout
    while Order.objects.get(pk=order.pk).status == OrderStatus.PENDING:
        assert time.monotonic() < deadline, f"order {order.pk} still pending after {timeout:g} s"
        time.sleep(0.05)
    return Order.objects.get(pk=order.pk)


def _event_types(order: Order) -> list[str]:
    return [event.event_type for event in order_events(order.pk)]


def test_a_baseline_order_is_placed_and_confirmed_with_the_sagas_writes_and_events(baseline_worker, owner):
    product_create(sku="BASE-1", name="Baseline product", price="12.50", on_hand=10)
    saga_order = order_place(owner=owner, lines=[LineRequest("BASE-1", 2)], payment_method="pm_ok", idempotency_key="saga").order

    order = _settled(_place(owner, payment_method="pm_ok"))

    assert wait_for_saga(saga_order.saga_id).state == SagaState.COMPLETED
    assert order.status == OrderStatus.CONFIRMED and order.saga_id is None
    assert IdempotencyRecord.objects.get(order=order).state == IdempotencyRecordState.DONE
    assert _event_types(order) == _event_types(saga_order) == FORWARD_EVENTS
    assert Payment.objects.filter(reference=str(order.pk)).count() == 1
    assert list(Reservation.objects.filter(saga_id=order.pk).values_list("status", flat=True)) == [ReservationStatus.COMMITTED]


def test_a_declined_payment_is_undone_newest_first_by_an_errback_sent_through_the_broker(baseline_worker, owner):
    order = _settled(_place(owner, payment_method="pm_declined"))

    assert "Task bench.fair.undo[" in baseline_worker.output()  # received as a task of its own
    assert order.status == OrderStatus.CANCELLED
    assert order.cancel_reason == STEP_FAILED_TEXT["process_payment"]
    assert _event_types(order) == ["ORDER_CREATED", "INVENTORY_RESERVED", "PAYMENT_FAILED", "INVENTORY_RELEASED", "ORDER_CANCELLED"]
    assert not Payment.objects.filter(reference=str(order.pk)).exists()
    assert Reservation.objects.get(saga_id=order.pk).status == ReservationStatus.RELEASED
    assert Stock.objects.get(product__sku="BASE-1").reserved == 0


def test_a_duplicated_chain_does_not_charge_twice_nor_undo_a_confirmed_order(baseline_worker, owner):
    order = _settled(_place(owner, payment_method="pm_ok"))

    baseline.fair_chain(str(order.pk)).apply_async()  # every step delivered again, after the order was confirmed

    _wait_for_line(baseline_worker, UNDO_SUCCEEDED)  # the repeated first step was refused, and the undo ran
    order.refresh_from_db()
    assert order.status == OrderStatus.CONFIRMED
    assert _event_types(order) == FORWARD_EVENTS
    assert Payment.objects.filter(reference=str(order.pk)).count() == 1
    assert Stock.objects.get(product__sku="BASE-1").reserved == 0


UNDO_SUCCEEDED = re.compile(r"Task bench\.fair\.undo\[[^\]]+\] succeeded")


def _wait_for_line(worker: CeleryWorker, pattern: re.Pattern, timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while not pattern.search(worker.output(since_start=True)):
        assert time.monotonic() < deadline, f"{pattern.pattern!r} not in the worker's output after {timeout:g} s:\n{worker.output()[-3000:]}"
        time.sleep(0.05)
