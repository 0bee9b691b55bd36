"""Stock hoarding (issue 10, finding 8): orders whose payment never answers held a product's
whole stock. An orchestrated order is undone at its payment deadline, which releases its stock;
a choreographed one reserves only once paid; and one customer may hold only so many pending
orders at once."""

import importlib
import threading
import time
from datetime import timedelta

import pytest
from django.conf import settings
from django.db import connection

import orders.sagas
from inventory.models import Reservation, Stock
from orders.models import Flow, IdempotencyRecord, Order, OrderStatus
from orders.sagas import PAYMENT_DEADLINE, place_order
from orders.services import LineRequest, order_cancel, order_place
from payments.consumers import charge_key
from payments.gateway import SimulatedProvider
from sagas.models import SagaState, StepState
from sagas.testing import timeline, wait_for_saga
from tests.engine_helpers import step_row, wait_for_step
from tests.orders_helpers import a_product, a_user, an_order, assert_shop_invariants, charged_minus_refunded
from tests.test_orders_api import an_order_body, api_as, place


@pytest.fixture
def provider():
    provider = SimulatedProvider(settings.PAYMENTS_PROVIDER_PATH)
    provider.reset()
    return provider


# --- the payment deadline -----------------------------------------------------------------------


def test_the_order_saga_has_the_configured_payment_deadline():
    assert place_order.deadline == PAYMENT_DEADLINE == timedelta(seconds=settings.ORDER_PAYMENT_DEADLINE)
    assert timedelta(minutes=1) <= PAYMENT_DEADLINE <= timedelta(hours=1), "the default leaves time to pay, not to hoard"


@pytest.mark.django_db
def test_an_order_saga_starts_with_its_deadline_set():
    a_product()

    order = an_order()

    assert order.saga.deadline_at == order.saga.created_at + PAYMENT_DEADLINE


@pytest.fixture
def payment_deadline_of_1_5_seconds(settings):
    """The order saga defined again as a deploy with ORDER_PAYMENT_DEADLINE=1.5 would define it
    (the setting is read when the definition is built); the default definition again after."""
    default = settings.ORDER_PAYMENT_DEADLINE
    settings.ORDER_PAYMENT_DEADLINE = 1.5
    importlib.reload(orders.sagas)
    yield
    settings.ORDER_PAYMENT_DEADLINE = default
    importlib.reload(orders.sagas)


@pytest.mark.django_db(transaction=True)
def test_an_order_whose_payment_never_answers_is_undone_at_its_deadline_and_its_stock_released(
    saga_worker, provider, payment_deadline_of_1_5_seconds
):
    # pm_blackhole: the provider charges, and every answer is lost. Retries alone would give up
    # after 5 tries; the deadline (1.5 s here, 15 min by default) comes first.
    product = a_product(on_hand=10)

    order = an_order(lines=[(product.sku, 8)], payment_method="pm_blackhole")
    wait_for_step(order.saga_id, "process_payment", StepState.RETRYING)
    held_while_paying = Stock.objects.get(pk=product.pk).reserved
    saga = wait_for_saga(order.saga_id, timeout=60)
    order.refresh_from_db()

    assert held_while_paying == 8
    assert (saga.state, saga.failure_reason) == (SagaState.COMPENSATED, "deadline exceeded"), timeline(saga.id)
    assert step_row(saga.id, "process_payment").attempts < 5, "undone by the deadline, not by running out of retries"
    assert (order.status, order.cancel_reason) == (OrderStatus.CANCELLED, "the payment was not confirmed in time")
    stock = Stock.objects.get(pk=product.pk)
    assert (stock.on_hand, stock.reserved) == (10, 0)
    assert charged_minus_refunded(order) == 0, "the charge the provider made was found by its key and refunded"
    assert_shop_invariants()


@pytest.mark.django_db(transaction=True)
def test_a_choreographed_order_whose_payment_never_answers_holds_no_stock(saga_worker, provider):
    product = a_product(on_hand=10)

    order = order_place(
        owner=a_user(), lines=[LineRequest(product.sku, 8)], payment_method="pm_blackhole",
        flow=Flow.CHOREOGRAPHED, idempotency_key="choreo-blackhole",
    ).order
    deadline = time.monotonic() + 30
    while provider.ledger().calls.get(charge_key(str(order.id)), 0) < 2 and time.monotonic() < deadline:
        time.sleep(0.1)

    assert provider.ledger().calls.get(charge_key(str(order.id)), 0) >= 2, "the charge was tried and retried"
    assert Stock.objects.get(pk=product.pk).reserved == 0, "stock is reserved only after the payment went through"
    assert not Reservation.objects.filter(saga_id=order.id).exists()


# --- the pending-order cap ----------------------------------------------------------------------


@pytest.fixture
def cap_of_3(settings):
    settings.ORDER_MAX_PENDING_PER_CUSTOMER = 3
    return 3


@pytest.mark.django_db
def test_a_customer_at_the_pending_order_cap_gets_429_with_a_clear_json_body(cap_of_3):
    a_product(on_hand=486)
    alice = api_as(a_user("alice"))
    placed = [place(alice, an_order_body(quantity=48), key=f"hoard-{n}").status_code for n in range(cap_of_3)]

    refused = place(alice, an_order_body(quantity=48), key="one-too-many")

    assert placed == [201] * cap_of_3
    assert refused.status_code == 429
    assert refused["Content-Type"] == "application/json"
    assert "3 orders in progress" in refused.json()["detail"]
    assert Order.objects.count() == cap_of_3
    assert not IdempotencyRecord.objects.filter(key="one-too-many").exists(), "the key can be used again later"
    assert place(api_as(a_user("bob")), an_order_body(), key="bobs").status_code == 201, "the cap is per customer"


@pytest.mark.django_db
def test_the_cap_counts_only_pending_orders_and_replays_are_not_new_orders(cap_of_3):
    a_product()
    alice = a_user("alice")
    client = api_as(alice)
    first = place(client, an_order_body(), key="k0")
    for n in range(1, cap_of_3):
        place(client, an_order_body(), key=f"k{n}")

    replay = place(client, an_order_body(), key="k0")
    order_cancel(order=Order.objects.get(pk=first.json()["id"]))  # its saga never started: cancelled at once
    after_cancel = place(client, an_order_body(), key="after-cancel")

    assert replay.status_code == 201 and replay["Idempotent-Replayed"] == "true"
    assert after_cancel.status_code == 201, after_cancel.content
    assert Order.objects.filter(owner=alice, status=OrderStatus.PENDING).count() == cap_of_3


@pytest.mark.services(reason="needs PostgreSQL for truly concurrent requests")
@pytest.mark.django_db(transaction=True)
def test_concurrent_orders_of_one_customer_cannot_pass_the_cap_together(settings):
    settings.ORDER_MAX_PENDING_PER_CUSTOMER = 1
    a_product()
    alice = a_user()
    clients = [api_as(alice) for _ in range(8)]
    start = threading.Barrier(len(clients))
    codes = []

    def send(n, client):
        try:
            start.wait(timeout=30)
            codes.append(place(client, an_order_body(), key=f"race-{n}").status_code)
        finally:
            connection.close()

    threads = [threading.Thread(target=send, args=(n, c)) for n, c in enumerate(clients)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=60)

    assert sorted(codes) == [201] + [429] * (len(clients) - 1), codes
    assert Order.objects.filter(owner=alice).count() == 1
